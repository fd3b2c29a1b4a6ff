"""The two pages, drawn with streamlit: widgets around `ldm.apps.core`.

A prior's controls are built from its `sampler_options` declaration (a select box for choices, number
inputs with the declared bounds, one per element for per-scale values, a None check box for nullable
options), so a prior that lands later gets its controls without changes here. Widget keys are stable
(`<slot>:<mode>:<option>`, `seed`, `sample`, ...): the tests drive the pages by them.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any

import streamlit as st
import torch

from ldm.apps import core
from ldm.cli import USER_ERRORS
from ldm.sampler_options import Mode, Option

OTHER = "another path..."
SLOTS = ("a", "b")


# --- shared pieces --------------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Loading the prior...", max_entries=4)
def _open(source: str, device: str, stamp: float) -> core.Loaded:
    """One build per checkpoint, device and file version, shared by every rerun (`stamp`: the file's mtime)."""
    return core.load(source, device)


def open_prior(source: str, device: str, where: Any) -> core.Loaded | None:
    """The prior behind `source`, or None after a one-sentence error on the page."""
    try:
        stamp = os.path.getmtime(source) if os.path.exists(source) else 0.0
        return _open(source, device, stamp)
    except USER_ERRORS as e:
        where.error(f"Cannot open {source}: {e}")
    return None


def initial(name: str, default: int) -> int:
    """A start value from the page address (`?batch_size=4&seed=3`), so a link opens the page set up."""
    try:
        return int(st.query_params.get(name, default))
    except ValueError:
        return default


def choose_source(slot: str, given: Sequence[str], label: str) -> str | None:
    """The sidebar's checkpoint selector: the command line's paths and `configs/sampling/`, or a typed path
    (the first choice, or the one the address names: `?checkpoint=<path>`, `?checkpoint_b=<path>`)."""
    choices = [*core.checkpoint_choices(given), OTHER]
    wanted = st.query_params.get("checkpoint" if slot == "a" else f"checkpoint_{slot}")
    index = choices.index(wanted) if wanted in choices else 0
    picked = st.sidebar.selectbox(label, choices, index=index, key=f"checkpoint:{slot}",
                                  help="a prior checkpoint written by main.py, or a sampling config (.yaml)")
    if picked == OTHER:
        picked = st.sidebar.text_input(f"{label}: path", key=f"path:{slot}").strip()
    return picked or None


def device_choice() -> str:
    return st.sidebar.selectbox("Device", core.devices(), key="device")


def option_controls(loaded: core.Loaded, mode: Mode, slot: str, where: Any) -> dict[str, Any]:
    """One control per declared option; the values as the sampler takes them."""
    values = {}
    for option in core.shown_options(loaded, mode):
        values[option.name] = option_control(option, f"{slot}:{mode}:{option.name}", where)
    return values


def option_control(option: Option, key: str, where: Any) -> Any:
    help_text = f"{option.help} ({option.allowed()}; default {core.yaml_text(option.default)})"
    if option.choices is not None:
        choices = [None, *option.choices] if option.nullable else list(option.choices)
        index = choices.index(option.default) if option.default in choices else 0
        return where.selectbox(option.name, choices, index=index, key=key, help=help_text)
    if option.nullable and where.checkbox(f"{option.name}: None", value=option.default is None, key=f"{key}:none",
                                          help=help_text):
        return None
    if option.type is str:
        return where.text_input(option.name, value=str(option.default or ""), key=key, help=help_text)
    if not option.size:
        return number(option, option.name, key, where, help_text)
    columns = where.columns(option.size)
    return tuple(number(option, f"{option.name} [{i + 1}/{option.size}]", f"{key}:{i}", columns[i], help_text, i)
                 for i in range(option.size))


def number(option: Option, label: str, key: str, where: Any, help_text: str, i: int | None = None) -> Any:
    """A number input within the option's bounds (an open lower bound is left to the check on Sample)."""
    low = option.low[i or 0] if isinstance(option.low, (tuple, list)) else option.low
    high = option.high[i or 0] if isinstance(option.high, (tuple, list)) else option.high
    if option.type is int:
        return where.number_input(label, value=int(core.start_value(option, i)), step=1, key=key, help=help_text,
                                  min_value=None if low is None or option.low_open else int(low),
                                  max_value=None if high is None else int(high))
    return where.number_input(label, value=float(core.start_value(option, i)), step=0.1, format="%g", key=key,
                              help=help_text, min_value=None if low is None or option.low_open else float(low),
                              max_value=None if high is None else float(high))


def class_choice(loaded: core.Loaded, slot: str, where: Any, first: Sequence[str] = ()) -> Any:
    """A class selector with the data set's names: `first` entries (e.g. 'every class'), each class, and the
    null class (what a prior trained with dropout samples unconditionally). Returns the entry's value."""
    names = [f"{i}: {name}" for i, name in enumerate(loaded.class_names)]
    labels = [*first, *names, f"{len(names)}: none (the null class)"]
    picked = where.selectbox("Class", labels, key=f"{slot}:class")
    if picked in first:
        return picked
    return labels.index(picked) - len(first)


def prompt_choice(loaded: core.Loaded, slot: str, where: Any) -> str:
    default = loaded.prompts[0] if loaded.prompts else ""
    return where.text_input("Prompt", value=default, key=f"{slot}:prompt",
                            help="the caption to condition on (empty: unconditional)"
                                 + (f"; the training captions read like {', '.join(loaded.prompts[:3])}"
                                    if loaded.prompts else ""))


def opened(source: str | None, device: str, where: Any) -> core.Loaded | None:
    """The prior behind `source`, titled in `where`; None, with the reason shown there, when there is none
    to use (nothing chosen, a checkpoint that failed to open, a conditioning the apps cannot give)."""
    if source is None:
        where.info("Choose a checkpoint or a sampling config in the sidebar.")
        return None
    loaded = open_prior(source, device, where)
    if loaded is None:
        return None
    if loaded.cond_kind == "unsupported":
        where.warning(f"This prior is conditioned on {loaded.prior.conditioner.describe()}, which the apps do not "
                      "ask for: a super-resolution stage is sampled through a cascade's sampling config "
                      "(configs/ldm/fmnist_cascade.yaml), which gives it the stage below's output.")
        return None
    where.subheader(loaded.title)
    return loaded


def downloads(result: Mapping[str, Any], slot: str, where: Any, stem: str) -> None:
    image, factor = core.display(result["grid"], 640, 720)
    where.image(image, caption=f"{result['caption']}; shown x{factor}, nearest neighbour")
    left, right = where.columns(2)
    left.download_button("Download the grid (PNG)", result["grid"], file_name=f"{stem}_grid.png", mime="image/png",
                         key=f"download-grid:{slot}")
    right.download_button("Download every image (zip of PNGs)", result["zip"], file_name=f"{stem}s.zip",
                          mime="application/zip", key=f"download-zip:{slot}")
    if result.get("commands"):
        where.caption("Reproduce with scripts/" + ("sample.py" if stem == "sample" else "inpaint.py") + ":")
        where.code("\n".join(result["commands"]), language="bash")
    elif result.get("why_no_command"):
        where.caption(result["why_no_command"])


def reporter(prior: Any, bar: Any, picture: Any, prefix: str, nrow: int):
    """A sampler callback that moves the progress bar and shows an intermediate decode about 8 times a run."""
    def callback(info: dict[str, Any]) -> None:
        fraction, text = core.progress(info)
        bar.progress(fraction, text=f"{prefix}{text}")
        steps = int(info.get("steps") or 1)
        if "position" in info or (int(info.get("i", 0)) + 1) % max(1, steps // 8) == 0:
            images = core.preview(prior, info)
            if images is not None:
                picture.image(core.display(core.png(images, nrow), 320)[0], caption=f"intermediate decode, {text}")

    return callback


# --- the sampling page ----------------------------------------------------------------------------------
def sample_page(argv: Sequence[str]) -> None:
    st.set_page_config(page_title="Sample a prior", layout="wide")
    st.title("Sample a latent prior")
    sources = [choose_source("a", argv, "Checkpoint")]
    if st.sidebar.checkbox("Compare with a second checkpoint", value="checkpoint_b" in st.query_params, key="compare"):
        sources.append(choose_source("b", argv, "Second checkpoint"))
    device = device_choice()
    seed = int(st.sidebar.number_input("Seed", value=initial("seed", 0), min_value=0, step=1, key="seed"))
    batch_size = int(st.sidebar.number_input("Batch size", value=initial("batch_size", 16), min_value=1,
                                             max_value=256, step=1, key="batch_size",
                                             help="samples per batch (per class when sampling every class)"))
    batches = int(st.sidebar.number_input("Number of batches", value=initial("batches", 1), min_value=1,
                                          max_value=64, step=1, key="batches", help="batch b is drawn with seed + b"))
    pressed = st.sidebar.button("Sample", key="sample", type="primary")

    columns = st.columns(len(sources))
    shared: dict[str, Any] = {}
    for slot, source, column in zip(SLOTS, sources, columns):
        loaded = opened(source, device, column)
        if loaded is None:
            continue
        controls, shown = column.columns([2, 3])
        label, prompt = condition_controls(loaded, slot, controls, shared)
        with controls.expander("Sampler options", expanded=True):
            values = option_controls(loaded, "sample", slot, st)
        if pressed:
            sample_into(loaded, slot, shown, seed, batch_size, batches, label, prompt, values)
        result = st.session_state.get(f"result:{slot}")
        if result is not None and result["source"] == source:
            downloads(result, slot, shown, "sample")


def condition_controls(loaded: core.Loaded, slot: str, where: Any, shared: dict[str, Any]) -> tuple[Any, str | None]:
    """The class or prompt of one column; a second prior conditioned the same way reuses the first's choice,
    so two priors are compared on the same classes."""
    signature = (loaded.cond_kind, loaded.prior.num_classes)
    if shared.get("signature") == signature:
        return shared["label"], shared["prompt"]
    label, prompt = None, None
    if loaded.cond_kind == "class":
        label = class_choice(loaded, slot, where, first=("every class (a row each)",))
        label = "all" if isinstance(label, str) else label
    elif loaded.cond_kind == "text":
        prompt = prompt_choice(loaded, slot, where)
    if not shared:
        shared.update(signature=signature, label=label, prompt=prompt)
    return label, prompt


def sample_into(loaded: core.Loaded, slot: str, where: Any, seed: int, batch_size: int, batches: int, label: Any,
                prompt: str | None, values: dict[str, Any]) -> None:
    """Draw every batch with live progress, then keep the grid, the zip and the command lines in the session."""
    try:
        options = loaded.prior.check_sampler_options(values)
        plan = core.sample_batches(loaded, seed, batch_size, batches, label, prompt)
        changed = core.changed_options(core.shown_options(loaded, "sample"), options)
        bar, picture = where.progress(0.0, text="starting"), where.empty()
        images = []
        for b, batch in enumerate(plan):
            callback = reporter(loaded.prior, bar, picture, f"batch {b + 1} of {len(plan)}: ", batch.nrow)
            images.append(core.run_sample(loaded, batch, options, callback))
    except USER_ERRORS as e:
        where.error(str(e))
        return
    bar.progress(1.0, text=f"done: {sum(len(x) for x in images)} samples")
    picture.empty()
    everything = torch.cat(images)
    st.session_state[f"result:{slot}"] = {
        "source": loaded.source, "grid": core.png(everything, plan[0].nrow), "zip": core.png_zip(everything),
        "count": len(everything), "size": tuple(everything.shape[1:]),
        "caption": f"{len(everything)} samples, {everything.shape[3]} x {everything.shape[2]} each",
        "commands": [core.command_line("sample.py", loaded.source, b.argv, changed) for b in plan],
    }


# --- the inpainting page --------------------------------------------------------------------------------
@st.cache_resource(show_spinner="Opening the validation split...", max_entries=4)
def _validation(source: str, device: str, stamp: float) -> Any:
    from ldm.metrics.eval_data import image_split

    return image_split(_open(source, device, stamp).config, "validation")[0]


def inpaint_page(argv: Sequence[str]) -> None:
    st.set_page_config(page_title="Inpaint with a prior", layout="wide")
    st.title("Inpaint with a latent prior")
    source = choose_source("a", argv, "Checkpoint")
    device = device_choice()
    seed = int(st.sidebar.number_input("Seed", value=initial("seed", 0), min_value=0, step=1, key="seed"))
    samples = int(st.sidebar.number_input("Completions per image", value=initial("samples", 3), min_value=1,
                                          max_value=16, step=1, key="samples",
                                          help="completion k is drawn with seed + k"))
    pressed = st.sidebar.button("Inpaint", key="inpaint", type="primary")
    loaded = opened(source, device, st)
    if loaded is None:
        return
    left, middle, right = st.columns([1, 1, 2])
    left.markdown("**Source image**")
    picked = source_images(loaded, left, source, device)
    if picked is None:
        return
    images, labels, notes, reproducible = picked
    if notes:
        left.caption("; ".join(notes))
    middle.markdown("**Mask** (1 = keep)")
    mask, preset = mask_controls(images[0], middle)
    mask = mask.expand(len(images), -1, -1, -1)
    middle.markdown(f"**What the prior sees**: its {' x '.join(map(str, loaded.prior.latent_shape[-2:]))} latent "
                    "grid, the cells it fills in red")
    middle.image(core.latent_preview(loaded, images[0], mask[:1], 192))
    with left.expander("Sampler options", expanded=True):
        label, prompt = None, None
        if loaded.cond_kind == "class":
            first = ("the images' own labels",) if labels is not None else ()
            label = class_choice(loaded, "a", st, first=first)
            label = None if isinstance(label, str) else label
        elif loaded.cond_kind == "text":
            prompt = prompt_choice(loaded, "a", st)
        values = option_controls(loaded, "inpaint", "a", st)
    if bool((mask > 0.5).all()):
        right.info("The mask keeps every pixel: draw the hole, or pick a preset.")
    if pressed:
        cond = labels if label is None and labels is not None else core.inpaint_cond(loaded, len(images), label,
                                                                                     prompt)
        same_cond = (label is None and not prompt)
        inpaint_into(loaded, images, mask, cond, samples, seed, values,
                     preset if reproducible and same_cond else None, right)
    result = st.session_state.get("result:a")
    if result is not None and result["source"] == source:
        downloads(result, "a", right, "inpaint")


def source_images(loaded: core.Loaded, where: Any, source: str, device: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None, list[str], bool] | None:
    """The images to inpaint (n, C, H, W), their labels (validation split), the conversions applied, and
    whether `scripts/inpaint.py` picks the same images (the split's first ones)."""
    kinds = ["Upload", "Validation split"]
    kind = where.radio("From", kinds, index=int(st.query_params.get("source") == "validation"), key="source",
                       horizontal=True)
    if kind == "Upload":
        upload = where.file_uploader("PNG or JPEG, any size or mode", type=["png", "jpg", "jpeg"], key="upload")
        if upload is None:
            where.info("Upload an image, or pick one from the validation split.")
            return None
        try:
            image, notes = core.read_upload(upload.getvalue(), upload.name, loaded.image_shape)
        except core.UploadError as e:
            where.error(str(e))
            return None
        where.image(core.display(core.png(image[None], 1), 160)[0], caption=f"{upload.name}, as the prior sees it")
        return image[None], None, notes, False
    start = int(where.number_input("First image", value=0, min_value=0, step=1, key="index"))
    count = int(where.number_input("Images", value=initial("count", 4), min_value=1, max_value=16, step=1,
                                   key="count"))
    try:
        stamp = os.path.getmtime(source) if os.path.exists(source) else 0.0
        dataset = _validation(source, device, stamp)
    except USER_ERRORS as e:
        where.error(f"No validation split to pick from: {e}")
        return None
    if start >= len(dataset):
        where.error(f"The validation split has {len(dataset)} images; the first image must be below that.")
        return None
    items = [dataset[i] for i in range(start, min(len(dataset), start + count))]
    fitted = [core.fit_image(torch.as_tensor(item["image"]).float(), loaded.image_shape) for item in items]
    images = torch.stack([f[0] for f in fitted])
    labels = torch.tensor([int(item["class_label"]) for item in items]) if loaded.cond_kind == "class" and all(
        "class_label" in item for item in items) else None  # a class prior's condition, as inpaint.py gives it
    where.image(core.display(core.png(images, len(images)), 320)[0], caption=f"validation images {start}.."
                f"{start + len(images) - 1}")
    return images, labels, fitted[0][1], start == 0


def mask_controls(image: torch.Tensor, where: Any) -> tuple[torch.Tensor, str | None]:
    """The mask (1, 1, H, W) from a preset or a drawing on a canvas over the image, and the preset's
    `scripts/inpaint.py --mask` name (None for a drawing)."""
    _, h, w = image.shape
    how = where.radio("Mask", ["Preset", "Brush", "Rectangle"], key="mask_mode", horizontal=True)
    if how == "Preset":
        label = where.selectbox("Preset", list(core.MASK_PRESETS), key="preset")
        return core.preset_mask(label, 1, h, w), core.MASK_PRESETS[label]
    from streamlit_drawable_canvas import st_canvas  # needs a running app: imported where it is drawn

    background, factor = core.display(core.png(image[None], 1), 256)
    stroke = where.slider("Brush width", 2, 64, 24, key="brush") if how == "Brush" else 2
    with where:
        result = st_canvas(fill_color="rgba(230, 40, 40, 0.6)", stroke_color="rgba(230, 40, 40, 0.6)",
                           stroke_width=stroke, background_image=background, height=background.height,
                           width=background.width, drawing_mode="freedraw" if how == "Brush" else "rect",
                           return_image_data=True, key=f"canvas:{how}")
    where.caption("Paint the hole (what the prior fills).")
    return core.canvas_mask(getattr(result, "image_data", None), h, w), None


def inpaint_into(loaded: core.Loaded, images: torch.Tensor, mask: torch.Tensor, cond: Any, samples: int, seed: int,
                 values: dict[str, Any], preset: str | None, where: Any) -> None:
    """Fill the hole `samples` times with live progress; keep the rows, the zip and (where the script makes the
    same grid) the `scripts/inpaint.py` command in the session."""
    try:
        options = loaded.prior.check_sampler_options(values, mode="inpaint")
        bar, picture = where.progress(0.0, text="starting"), where.empty()
        callback = reporter(loaded.prior, bar, picture, "", len(images))
        rows = core.run_inpaint(loaded, images, mask, cond, samples, seed, options, callback)
    except USER_ERRORS as e:
        where.error(str(e))
        return
    bar.progress(1.0, text=f"done: {samples} completions of {len(images)} images")
    picture.empty()
    changed = core.changed_options(core.shown_options(loaded, "inpaint"), options)
    argv = ["--mask", preset, "-n", str(len(images)), "--samples", str(samples), "--split", "validation",
            "--seed", str(seed)] if preset else []
    st.session_state["result:a"] = {
        "source": loaded.source, "grid": core.png(torch.cat(rows), len(images)), "zip": core.png_zip(
            torch.cat(rows[2:]), "completion"), "count": samples * len(images), "size": tuple(rows[0].shape[1:]),
        "caption": f"rows: the images, what the prior is shown (the hole grey), {samples} completions",
        "commands": [core.command_line("inpaint.py", loaded.source, argv, changed)] if preset else [],
        "why_no_command": "scripts/inpaint.py takes a preset mask, the validation split's first images and their "
                          "own labels: this result has no command line.",
    }

"""What the apps compute, apart from drawing: every function here takes plain values and tensors, so the
tests call it without a browser, and the pages in `ldm.apps.ui` stay a thin layer of widgets."""

from __future__ import annotations

import argparse
import io
import os
import shlex
import zipfile
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image

from ldm.checkpoint import instantiate_from_checkpoint
from ldm.cli import needs
from ldm.conditioning import TokenizedCaption
from ldm.data.image_folder import ImageLoadError, load_image
from ldm.masks import named_mask
from ldm.metrics.eval_data import class_prompts
from ldm.sampler_options import Mode, Option
from ldm.util import get_obj_from_str

ROOT = Path(__file__).resolve().parents[2]
SAMPLING_CONFIGS = ROOT / "configs" / "sampling"
CondKind = Literal["none", "class", "text", "unsupported"]
# what an upload may be: PNG or JPEG, up to this size (checked from the header, before decoding)
UPLOAD_FORMATS = ("PNG", "JPEG")
MAX_UPLOAD_PIXELS = 40_000_000
MAX_UPLOAD_SIDE = 12_000
# the inpainting presets, by the label the app shows, and the `ldm.masks.named_mask` name behind each
MASK_PRESETS = {"upper half kept": "upper", "left half kept": "left", "lower half kept": "lower",
                "centre hole": "centre", "outpainting border": "border"}
LUMA = torch.tensor([0.299, 0.587, 0.114])  # ITU-R 601, as PIL's RGB -> L


# --- checkpoints ----------------------------------------------------------------------------------------
def app_sources(argv: Sequence[str]) -> list[str]:
    """The checkpoints or sampling configs an app is started with: `streamlit run scripts/sample_app.py --
    a.ckpt b.yaml`, or `-r a.ckpt` as in `scripts/sample.py`."""
    parser = argparse.ArgumentParser(description="Offer these checkpoints or sampling configs in the app.")
    parser.add_argument("sources", nargs="*", help="prior checkpoints or sampling configs (.yaml)")
    parser.add_argument("-r", "--resume", action="append", default=[], help="a checkpoint, as in sample.py")
    args = parser.parse_args(list(argv))
    return list(dict.fromkeys([*args.resume, *args.sources]))


def checkpoint_choices(given: Sequence[str], folder: Path = SAMPLING_CONFIGS) -> list[str]:
    """What the checkpoint selector offers: the paths given on the command line, then the sampling configs
    under `configs/sampling/` (each one entry: a prior assembled from checkpoints)."""
    found = [os.path.relpath(p) for p in sorted(folder.glob("*.y*ml"))] if folder.is_dir() else []
    return list(dict.fromkeys([*given, *found]))


def devices() -> list[str]:
    """CPU, and each CUDA device where present."""
    return ["cpu", *(f"cuda:{i}" for i in range(torch.cuda.device_count()))]


@dataclass
class Loaded:
    """A prior opened by an app, with what its controls need to know about it."""

    prior: Any
    config: dict[str, Any]
    source: str
    image_shape: tuple[int, int, int]  # (C, H, W) of a sample at the default settings
    cond_kind: CondKind
    class_names: list[str] = field(default_factory=list)
    prompts: list[str] = field(default_factory=list)  # suggested captions for a text prior

    @property
    def title(self) -> str:
        n = sum(p.numel() for name in self.prior.network_names for p in getattr(self.prior, name).parameters())
        return f"{type(self.prior).__name__} ({n / 1e6:.2f}M parameters), {Path(self.source).name}"


def load(source: str, device: str = "cpu") -> Loaded:
    """Build a prior from a checkpoint or a sampling config and put it on `device`; a user error (missing
    file, a first stage, a bad config) is a `ValueError` subclass with one sentence."""
    prior, config = instantiate_from_checkpoint(source, check_class=needs("prior", "the app"))
    prior = prior.to(device).eval()
    with torch.no_grad():  # one decode of empty latents tells the image size, whatever the first stage
        kind = torch.long if prior.latent_kind == "tokens" else torch.float32
        shape = tuple(prior.decode(torch.zeros(1, *prior.latent_shape, dtype=kind, device=prior.device)).shape[1:])
    kind_ = cond_kind(prior)
    k = prior.num_classes if kind_ == "class" else None
    prompts = []
    if kind_ == "text":
        for split in ("validation", "test", "train"):
            prompts = class_prompts(config, split) or []
            if prompts:
                break
    return Loaded(prior, config, source, shape, kind_, class_names(config, k) if k else [], prompts)


def cond_kind(prior: Any) -> CondKind:
    """How a user conditions this prior: not at all, by a class label, by a caption, or by something the apps
    do not ask for (a super-resolution stage's low-resolution image)."""
    conditioner = prior.conditioner
    if not conditioner.is_conditional:
        return "none"
    if isinstance(conditioner, TokenizedCaption):
        return "text"
    if prior.num_classes and len(conditioner.keys) == 1:
        return "class"
    return "unsupported"


def class_names(config: Mapping[str, Any], k: int) -> list[str]:
    """The data set's class names (`class_names` of the data class a split names), or 'class i'."""
    for split in ("validation", "test", "train"):
        node = ((config.get("data") or {}).get("params") or {}).get(split) or {}
        try:
            cls = get_obj_from_str(node["target"], key=f"data.params.{split}.target") if "target" in node else None
        except (ValueError, ImportError):
            cls = None
        names = getattr(cls, "class_names", None)
        if isinstance(names, (list, tuple)) and len(names) == k:
            return [str(n) for n in names]
    return [f"class {i}" for i in range(k)]


# --- sampler options ------------------------------------------------------------------------------------
def shown_options(loaded: Loaded, mode: Mode) -> tuple[Option, ...]:
    """The prior's declared options for one call, bounds resolved; those an unconditional prior only takes at
    their default are left out."""
    options = loaded.prior.sampler_options.resolve(loaded.prior, mode)
    return tuple(o for o in options if not (o.conditional_only and loaded.cond_kind == "none"))


def start_value(option: Option, i: int | None = None) -> Any:
    """The value a control starts at: the default (its element `i`), else the lower bound, else 1."""
    value = option.default
    if isinstance(value, (tuple, list)):
        value = value[i or 0]
    if value is None:
        low = option.low[i or 0] if isinstance(option.low, (tuple, list)) else option.low
        value = low if low is not None and not option.low_open else (1 if option.type is int else 1.0)
    return option.type(value) if option.choices is None else value


def changed_options(options: Sequence[Option], values: Mapping[str, Any]) -> dict[str, Any]:
    """The values that differ from their option's default (what the command line needs to say)."""
    def same(option: Option, value: Any) -> bool:
        default = option.default
        if option.size and value is not None and default is not None and not isinstance(default, (tuple, list)):
            default = (default,) * option.size
        if isinstance(value, (tuple, list)) and isinstance(default, (tuple, list)):
            return tuple(value) == tuple(default)
        return value == default

    return {o.name: values[o.name] for o in options if o.name in values and not same(o, values[o.name])}


def yaml_text(value: Any) -> str:
    """A value as `scripts/sample.py` parses it back (YAML): None -> null, tuples -> [a,b]."""
    if value is None:
        return "null"
    if isinstance(value, (tuple, list)):
        return "[" + ",".join(yaml_text(v) for v in value) + "]"
    if isinstance(value, float):
        return repr(value)
    return str(value)


# --- sampling -------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Batch:
    """One call of `prior.sample`: as `scripts/sample.py` makes it from `argv`."""

    n: int
    cond: Any
    seed: int
    nrow: int
    argv: tuple[str, ...]  # the script's arguments besides -r and the sampler options


def sample_batches(loaded: Loaded, seed: int, batch_size: int, batches: int, label: int | Literal["all"] | None,
                   prompt: str | None) -> list[Batch]:
    """The calls that sample `batches` batches: batch b with seed `seed + b`, a class label (or a row of
    `batch_size` per class with 'all'), a caption, or none; each as `scripts/sample.py` would run it."""
    out = []
    for b in range(batches):
        s = seed + b
        if loaded.cond_kind == "class" and label == "all":
            k = loaded.prior.num_classes
            cond = torch.arange(k).repeat_interleave(batch_size)
            out.append(Batch(k * batch_size, cond, s, batch_size, ("--per-class", str(batch_size), "--seed", str(s))))
            continue
        argv: tuple[str, ...] = ("-n", str(batch_size), "--seed", str(s))
        cond = None
        if loaded.cond_kind == "class" and label is not None:
            cond = torch.full((batch_size,), int(label))
            argv += ("--cond", str(label))
        elif loaded.cond_kind == "text" and prompt:
            cond = prompt
            argv += ("--cond", prompt)
        out.append(Batch(batch_size, cond, s, int(batch_size ** 0.5), argv))
    return out


def command_line(script: str, source: str, argv: Sequence[str], options: Mapping[str, Any]) -> str:
    """The shell command that reproduces a result: `python scripts/<script> -r <source> ... key=value`."""
    words = ["python", f"scripts/{script}", "-r", source, *argv, *(f"{k}={yaml_text(v)}" for k, v in options.items())]
    return " ".join(shlex.quote(w) for w in words)


def run_sample(loaded: Loaded, batch: Batch, options: Mapping[str, Any], callback: Any = None) -> torch.Tensor:
    """One batch in [-1, 1], drawn exactly as `scripts/sample.py` draws it (a CPU generator seeded once)."""
    cond = batch.cond
    if isinstance(cond, str):
        cond = loaded.prior.user_cond(cond, batch.n)
    return loaded.prior.sample(batch.n, cond=cond, generator=torch.Generator().manual_seed(batch.seed),
                               callback=callback, **options).float().cpu()


def progress(info: Mapping[str, Any]) -> tuple[float, str]:
    """A sampler callback's dict as a fraction done and a line: 'step k of n', with the scale (ImageBART), the
    pass of an inpainting resample and the stage of a cascade where the sampler reports them."""
    i, steps = int(info.get("i", 0)), info.get("steps")
    text = f"step {i + 1} of {steps}" if steps else f"step {i + 1}"
    for key, word in (("scale", "scale"), ("pass", "pass"), ("stage", "stage")):
        if key in info and not (key == "pass" and not info[key]):
            text += f", {word} {info[key]}"
    if "active" in info:
        text += f", {int(info['active'].sum())} samples still changing"
    return (min(1.0, (i + 1) / steps) if steps else 0.0), text


def preview(prior: Any, info: Mapping[str, Any]) -> torch.Tensor | None:
    """The images behind a sampler step where they are complete and cheap to decode: the Gaussian prior's
    predicted x_0, or a token map with every token drawn (SUNDAE's every step, ImageBART's end of a scale,
    the absorbing prior's last step); None otherwise (masked tokens, a scale half drawn, another stage's size)."""
    if isinstance(info.get("pred_x0"), torch.Tensor) and prior.latent_kind == "continuous":
        latents = info["pred_x0"]
        return prior.decode(latents).float().cpu() if tuple(latents.shape[1:]) == tuple(prior.latent_shape) else None
    x = info.get("x")
    if not isinstance(x, torch.Tensor) or prior.latent_kind != "tokens" or x.is_floating_point():
        return None
    h, w = prior.latent_shape[-2:]
    codes = getattr(prior.first_stage_model, "n_embed", None)
    if x.dim() != 2 or x.shape[1] != h * w or codes is None or "position" in info and info["position"] != h * w - 1:
        return None
    if bool((x < 0).any() | (x >= int(codes)).any()):
        return None
    return prior.decode(x.reshape(-1, h, w)).float().cpu()


# --- images ---------------------------------------------------------------------------------------------
def png(images: torch.Tensor, nrow: int) -> bytes:
    """A grid of images in [-1, 1] as PNG bytes, made as `scripts/sample.py` writes its file."""
    buf = io.BytesIO()
    torchvision.utils.save_image((torchvision.utils.make_grid(images, nrow=nrow) + 1) / 2, buf, format="png")
    return buf.getvalue()


def png_zip(images: torch.Tensor, stem: str = "sample") -> bytes:
    """Every image as its own PNG (`<stem>_000.png`, ...) in one zip file."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
        for i, image in enumerate(images):
            one = io.BytesIO()
            torchvision.utils.save_image((image + 1) / 2, one, format="png")
            z.writestr(f"{stem}_{i:03d}.png", one.getvalue())
    return buf.getvalue()


def display(png_bytes: bytes, width: int = 640, height: int | None = None) -> tuple[Image.Image, int]:
    """A grid enlarged by a whole factor (nearest neighbour, at most 8) to fit `width` (and `height`) pixels,
    and the factor: a 32 x 32 sample shown at its size is a smudge."""
    image = Image.open(io.BytesIO(png_bytes))
    factor = max(1, min(8, width // image.width, (height or width * 8) // image.height))
    return image.resize((image.width * factor, image.height * factor), Image.NEAREST), factor


# --- uploads --------------------------------------------------------------------------------------------
class UploadError(ValueError):
    """An upload the app cannot use; the message says why, for the page."""


MODE_NOTES = {"CMYK": "CMYK converted to RGB", "P": "palette colours expanded to RGB",
              "I;16": "16-bit values scaled to 8 bits", "I;16B": "16-bit values scaled to 8 bits",
              "I;16L": "16-bit values scaled to 8 bits", "I": "32-bit integer values scaled to 8 bits",
              "L": "grayscale", "LA": "grayscale with alpha", "1": "1-bit black and white converted to RGB"}


def read_upload(data: bytes, name: str, shape: tuple[int, int, int], max_pixels: int = MAX_UPLOAD_PIXELS,
                max_side: int = MAX_UPLOAD_SIDE) -> tuple[torch.Tensor, list[str]]:
    """An uploaded PNG or JPEG as the prior's image (C, H, W) in [-1, 1], and the conversions applied in words.

    The file is decoded by the data sets' loader (`ldm.data.image_folder.load_image`: sizes checked from the
    header before decoding, every mode to RGB, transparency on white), then centre-cropped to a square and
    resized; anything unusable is an `UploadError` that says what was wrong.
    """
    if not data:
        raise UploadError(f"{name} is empty")
    try:
        with Image.open(io.BytesIO(data)) as header:
            fmt, mode, (w, h) = header.format, header.mode, header.size
            transparent = "transparency" in header.info
    except Image.DecompressionBombError as e:  # Pillow refuses to open it at all
        raise UploadError(f"{name} is too large to open ({e}); the app takes images up to {max_pixels:,} pixels and "
                          f"{max_side:,} pixels a side") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise UploadError(f"{name} is not a readable image (a corrupt file, or not PNG / JPEG): {e}") from None
    if fmt not in UPLOAD_FORMATS:
        raise UploadError(f"{name} is a {fmt} file; upload a PNG or JPEG")
    try:
        rgb = load_image(io.BytesIO(data), max_pixels=max_pixels, max_side=max_side)
    except ImageLoadError as e:
        if e.reason == "too_large":
            raise UploadError(f"{name} is {w} x {h} ({w * h:,} pixels); the app takes images up to {max_pixels:,} "
                              f"pixels and {max_side:,} pixels a side") from None
        what = "is truncated (the file ends early)" if e.reason == "truncated" else "cannot be decoded"
        raise UploadError(f"{name} {what}: it is a damaged {fmt} file") from None
    except (ValueError, TypeError) as e:  # a mode Pillow cannot convert to RGB
        raise UploadError(f"{name} has the image mode {mode}, which cannot be converted to RGB: {e}") from None
    notes = [f"read {fmt} {w} x {h}, mode {mode}"]
    if mode in ("RGBA", "LA", "PA") or transparent:
        notes.append("transparency composited on white")
    if mode in MODE_NOTES and mode not in ("L", "LA"):
        notes.append(MODE_NOTES[mode])
    x = torch.from_numpy(np.asarray(rgb, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0  # (3, h, w)
    image, more = fit_image(x, shape)
    return image, notes + more


def fit_image(x: torch.Tensor, shape: tuple[int, int, int]) -> tuple[torch.Tensor, list[str]]:
    """An image (C, h, w) in [-1, 1] as the prior's (C', H, W): channels to the prior's (grayscale by ITU-R 601
    weights, or repeated), the central square cropped and resized (bicubic, clamped); what was done, in words."""
    c, H, W = shape
    notes = []
    if x.shape[0] != c:
        if c == 1:
            x = (x[:3] * LUMA[: x.shape[0], None, None].to(x)).sum(0, keepdim=True) if x.shape[0] == 3 else x[:1]
            notes.append("converted to grayscale (the prior's images have 1 channel)")
        else:
            x = x[:1].expand(c, -1, -1)
            notes.append(f"grayscale repeated to {c} channels")
    h, w = x.shape[1:]
    if h != w:
        side = min(h, w)
        top, left = (h - side) // 2, (w - side) // 2
        x = x[:, top: top + side, left: left + side]
        notes.append(f"centre-cropped to {side} x {side}")
    if tuple(x.shape[1:]) != (H, W):
        notes.append(f"resized {x.shape[2]} x {x.shape[1]} -> {W} x {H} (bicubic)")
        x = F.interpolate(x[None], size=(H, W), mode="bicubic", align_corners=False, antialias=True)[0]
    return x.clamp(-1, 1).contiguous(), notes


# --- masks ----------------------------------------------------------------------------------------------
def preset_mask(label: str, n: int, h: int, w: int) -> torch.Tensor:
    """(n, 1, h, w), 1 = keep, for a preset the app offers (`MASK_PRESETS`)."""
    return named_mask(MASK_PRESETS[label], n, h, w)


def canvas_mask(rgba: np.ndarray | None, h: int, w: int) -> torch.Tensor:
    """A drawing (canvas RGBA, painted = the hole) as a mask (1, 1, h, w), 1 = keep: a pixel is a hole where
    more than half of the canvas area above it is painted."""
    if rgba is None:
        return torch.ones(1, 1, h, w)
    painted = torch.from_numpy((np.asarray(rgba)[..., 3] > 0).astype(np.float32))[None, None]
    covered = F.interpolate(painted, size=(h, w), mode="area")
    return (covered <= 0.5).float()


def latent_preview(loaded: Loaded, image: torch.Tensor, mask: torch.Tensor, size: int = 256) -> Image.Image:
    """The image with the latent cells the prior fills tinted red and the cell grid drawn, `size` pixels wide:
    a cell is known to the prior only where every pixel it covers is (`LatentPrior.latent_mask`)."""
    prior = loaded.prior
    known = prior.latent_mask(mask[:1].to(prior.device), image[None].to(prior.device))[0].cpu()  # (h, w) bool
    gray = ((image[:3].mean(0) if image.shape[0] != 3 else image.permute(1, 2, 0)) + 1) * 127.5
    rgb = np.asarray(gray.clamp(0, 255).to(torch.uint8))
    rgb = np.repeat(rgb[..., None], 3, axis=2) if rgb.ndim == 2 else rgb
    H, W = rgb.shape[:2]
    factor = max(1, size // W)
    big = np.kron(rgb, np.ones((factor, factor, 1), dtype=np.uint8)).astype(np.float32)
    h, w = known.shape
    cell = torch.from_numpy(np.kron((~known).numpy().astype(np.float32), np.ones((H * factor // h, W * factor // w))))
    tint = np.array([230.0, 40.0, 40.0])
    big = big * (1 - 0.55 * cell.numpy()[..., None]) + tint * 0.55 * cell.numpy()[..., None]
    step_y, step_x = H * factor // h, W * factor // w
    big[::step_y, :, :] = big[::step_y, :, :] * 0.5 + 60
    big[:, ::step_x, :] = big[:, ::step_x, :] * 0.5 + 60
    return Image.fromarray(big.clip(0, 255).astype(np.uint8))


# --- inpainting -----------------------------------------------------------------------------------------
def inpaint_cond(loaded: Loaded, n: int, label: int | None, prompt: str | None) -> Any:
    """The condition of an inpainting call: class labels, a caption, or None."""
    if loaded.cond_kind == "class" and label is not None:
        return torch.full((n,), int(label))
    if loaded.cond_kind == "text" and prompt:
        return prompt
    return None


def run_inpaint(loaded: Loaded, images: torch.Tensor, mask: torch.Tensor, cond: Any, samples: int, seed: int,
                options: Mapping[str, Any], callback: Any = None) -> list[torch.Tensor]:
    """Rows of the grid `scripts/inpaint.py` writes for one mask: the images, what the prior is shown (the hole
    grey), and one row of completions per seed `seed + k`."""
    prior = loaded.prior
    images, mask = images.to(prior.device), mask.to(prior.device)
    if isinstance(cond, torch.Tensor):
        cond = cond.to(prior.device)
    rows = [images, images * mask]
    for k in range(samples):
        g = torch.Generator(device=prior.device).manual_seed(seed + k)
        rows.append(prior.inpaint(images, mask, cond=cond, generator=g, callback=callback, **options))
    return [r.float().cpu() for r in rows]

"""Both apps driven through streamlit's AppTest over every prior (tiny random checkpoints): controls changed,
buttons pressed, images of the right count and size, the command line that reproduces a grid, and the
messages for bad checkpoints and bad uploads."""

from __future__ import annotations

import io
import shlex
import struct
import sys
import zipfile
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

pytest.importorskip("streamlit")
from streamlit.testing.v1 import AppTest  # noqa: E402

from ldm.apps import core  # noqa: E402
from ldm.cli import run  # noqa: E402
from tests.apps.conftest import PRIORS, SIZES  # noqa: E402
from tests.test_scripts import load  # noqa: E402

SCRIPTS = Path(__file__).resolve().parents[2] / "scripts"


def app(name: str, monkeypatch, *sources: str) -> AppTest:
    """The app `scripts/<name>.py` started with `sources` on its command line, after its first run."""
    monkeypatch.setattr(sys, "argv", [f"{name}.py", *sources])
    at = AppTest.from_file(str(SCRIPTS / f"{name}.py"), default_timeout=120).run()
    assert not at.exception, [e.value for e in at.exception]
    return at


def no_errors(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


def grid_size(data: bytes) -> tuple[int, int]:
    return Image.open(io.BytesIO(data)).size


# --- the sampling app -----------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRIORS)
def test_sample_app_samples_every_prior(name, checkpoint, monkeypatch):
    at = app("sample_app", monkeypatch, checkpoint(name))
    no_errors(at)
    side = SIZES.get(name, 16)
    at.number_input(key="batch_size").set_value(2)
    at.number_input(key="seed").set_value(7)
    if "a:class" in [s.key for s in at.selectbox]:
        at.selectbox(key="a:class").set_value(at.selectbox(key="a:class").options[4])  # class 3
    keys = {w.key for w in at.number_input}
    if "a:sample:steps" in keys:
        at.number_input(key="a:sample:steps").set_value(3)
    at.button(key="sample").click().run()
    no_errors(at)
    result = at.session_state["result:a"]
    assert result["count"] == 2 and result["size"] == (1, side, side)
    assert len(zipfile.ZipFile(io.BytesIO(result["zip"])).namelist()) == 2
    assert grid_size(result["grid"]) == (2 + 1 * (side + 2), 2 + 2 * (side + 2))  # nrow = int(sqrt(2)) = 1
    assert len(at.image) == 1 and len(at.get("download_button")) == 2
    assert len(at.code) == 1 and "--seed 7" in at.code[0].value
    if "a:sample:steps" in keys:
        assert "steps=3" in at.code[0].value


@pytest.mark.parametrize("alias,title", [("sample_imagebart", "Sample a latent prior"),
                                         ("inpaint_imagebart", "Inpaint with a latent prior")])
def test_imagebart_entry_names_open_the_apps(alias, title, checkpoint, monkeypatch):
    at = app(alias, monkeypatch, checkpoint("imagebart"))
    no_errors(at)
    assert at.title[0].value == title and "ImageBARTPrior" in at.subheader[0].value


def test_sample_app_grid_is_what_the_command_line_writes(checkpoint, monkeypatch, tmp_path):
    ckpt = checkpoint("absorbing")
    at = app("sample_app", monkeypatch, ckpt)
    at.number_input(key="batch_size").set_value(3)
    at.number_input(key="seed").set_value(5)
    at.selectbox(key="a:class").set_value("2: Pullover")
    at.number_input(key="a:sample:temperature").set_value(0.8)
    at.selectbox(key="a:sample:order").set_value("confidence")
    at.button(key="sample").click().run()
    no_errors(at)
    result = at.session_state["result:a"]
    (command,) = result["commands"]
    words = shlex.split(command)
    assert words[:4] == ["python", "scripts/sample.py", "-r", ckpt]
    assert "order=confidence" in words and "temperature=0.8" in words and words[words.index("--cond") + 1] == "2"
    out = tmp_path / "grid.png"
    assert run(lambda: load("sample").main([*words[2:], "--out", str(out)])) == 0
    assert out.read_bytes() == result["grid"]  # the same PNG, byte for byte


def test_sample_app_every_class_over_batches(checkpoint, monkeypatch):
    at = app("sample_app", monkeypatch, checkpoint("imagebart"))
    at.number_input(key="batch_size").set_value(1)
    at.number_input(key="batches").set_value(2)
    assert at.selectbox(key="a:class").value == "every class (a row each)"
    at.number_input(key="a:sample:temperature:1").set_value(0.5)  # per scale: the second scale's
    at.button(key="sample").click().run()
    no_errors(at)
    result = at.session_state["result:a"]
    assert result["count"] == 20  # a row of 1 per class, 10 classes, 2 batches
    assert [c.split("--seed ")[1].split()[0] for c in result["commands"]] == ["0", "1"]
    assert all("temperature=[1.0,0.5]" in c for c in result["commands"])


def test_sample_app_compares_two_priors_on_the_same_seed_and_class(checkpoint, monkeypatch):
    at = app("sample_app", monkeypatch, checkpoint("absorbing"), checkpoint("sundae"))
    at.checkbox(key="compare").check().run()
    at.selectbox(key="checkpoint:b").set_value(checkpoint("sundae"))
    at.number_input(key="batch_size").set_value(2)
    at.run()
    at.selectbox(key="a:class").set_value("5: Sandal")
    assert "b:class" not in [s.key for s in at.selectbox]  # one class selector serves both
    at.button(key="sample").click().run()
    no_errors(at)
    a, b = at.session_state["result:a"], at.session_state["result:b"]
    assert a["count"] == b["count"] == 2 and len(at.image) == 2
    assert all("--cond 5" in c and "--seed 0" in c for c in a["commands"] + b["commands"])


def test_a_model_loads_once_per_checkpoint(checkpoint, monkeypatch):
    from streamlit import cache_resource

    cache_resource.clear()
    calls = []
    original = core.load
    monkeypatch.setattr(core, "load", lambda *a, **k: calls.append(a) or original(*a, **k))
    at = app("sample_app", monkeypatch, checkpoint("absorbing"))
    for seed in (1, 2):
        at.number_input(key="seed").set_value(seed).run()
    at.button(key="sample").click().run()
    assert len(calls) == 1


def test_sample_app_says_what_is_wrong_with_a_checkpoint(checkpoint, monkeypatch, tmp_path):
    at = app("sample_app", monkeypatch, str(tmp_path / "missing.ckpt"))
    assert "checkpoint not found" in at.error[0].value
    at = app("sample_app", monkeypatch, checkpoint("first_stage"))
    assert "this is a first-stage checkpoint (ldm.first_stage.models.VQModel); the app needs a prior" in \
        at.error[0].value
    at = app("sample_app", monkeypatch, checkpoint("ldm_sr"))
    assert "super-resolution stage is sampled through a cascade's sampling config" in at.warning[0].value
    at = app("sample_app", monkeypatch, checkpoint("absorbing"))
    at.checkbox(key="a:sample:top_p:none").uncheck().run()
    at.number_input(key="a:sample:top_p").set_value(0.0)  # the open bound (0, 1]: refused on Sample
    at.button(key="sample").click().run()
    assert not at.exception and "result:a" not in at.session_state
    assert [e.value for e in at.error] == ["top_p must be a number in (0, 1] or None, got 0"]


# --- the inpainting app ---------------------------------------------------------------------------------
@pytest.mark.parametrize("name", PRIORS)
def test_inpaint_app_fills_validation_images_for_every_prior(name, checkpoint, monkeypatch):
    at = app("inpaint_app", monkeypatch, checkpoint(name))
    no_errors(at)
    side = SIZES.get(name, 16)
    at.radio(key="source").set_value("Validation split").run()
    at.number_input(key="count").set_value(2)
    at.number_input(key="samples").set_value(2)
    at.selectbox(key="preset").set_value("outpainting border")
    keys = {w.key for w in at.number_input}
    if "a:inpaint:steps" in keys:
        at.number_input(key="a:inpaint:steps").set_value(2)
    if "a:inpaint:resample" in keys:
        at.number_input(key="a:inpaint:resample").set_value(2)  # ImageBART's passes per scale
    if "a:prompt" in [t.key for t in at.text_input]:
        at.text_input(key="a:prompt").set_value("")  # unconditional, as inpaint.py runs a text prior
    at.button(key="inpaint").click().run()
    no_errors(at)
    result = at.session_state["result:a"]
    assert result["count"] == 4 and result["size"] == (1, side, side)
    assert grid_size(result["grid"]) == (2 + 2 * (side + 2), 2 + 4 * (side + 2))  # images, masked, 2 completions
    assert len(zipfile.ZipFile(io.BytesIO(result["zip"])).namelist()) == 4
    assert len(at.get("download_button")) == 2 and "--mask border" in at.code[0].value


def test_inpaint_app_grid_is_what_inpaint_py_writes(checkpoint, monkeypatch, tmp_path):
    ckpt = checkpoint("absorbing")
    at = app("inpaint_app", monkeypatch, ckpt)
    at.radio(key="source").set_value("Validation split").run()
    at.number_input(key="count").set_value(3)
    at.number_input(key="samples").set_value(2)
    at.number_input(key="seed").set_value(4)
    at.selectbox(key="preset").set_value("centre hole")
    at.number_input(key="a:inpaint:temperature").set_value(0.7)
    at.button(key="inpaint").click().run()
    no_errors(at)
    words = shlex.split(at.session_state["result:a"]["commands"][0])
    out = tmp_path / "inpaint.png"
    assert run(lambda: load("inpaint").main([*words[2:], "--out", str(out)])) == 0
    assert out.read_bytes() == at.session_state["result:a"]["grid"]


def png_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    buf = io.BytesIO()
    image.save(buf, format=fmt)
    return buf.getvalue()


def huge_png(w: int, h: int) -> bytes:
    """A valid PNG header that claims w x h pixels (the pixels themselves are never read)."""
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 0, 0, 0, 0)
    chunk = struct.pack(">I", len(ihdr)) + b"IHDR" + ihdr + struct.pack(">I", zlib.crc32(b"IHDR" + ihdr))
    return b"\x89PNG\r\n\x1a\n" + chunk + png_bytes(Image.new("L", (4, 4)))[33:]


GOOD = {
    "cmyk.jpg": (png_bytes(Image.new("CMYK", (40, 30), (0, 80, 160, 20)), "JPEG"), "CMYK converted to RGB"),
    "deep.png": (png_bytes(Image.fromarray(np.full((24, 24), 40000, dtype=np.uint16))), "16-bit values scaled"),
    "palette.png": (png_bytes(Image.new("RGB", (20, 20), (200, 10, 10)).convert("P")), "palette colours expanded"),
    "alpha.png": (png_bytes(Image.new("RGBA", (300, 100), (10, 200, 10, 128))), "transparency composited on white"),
}
BAD = {
    "corrupt.png": (b"\x89PNG\r\n\x1a\n" + b"garbage" * 20, "is not a readable image"),
    "truncated.png": (png_bytes(Image.effect_noise((64, 64), 50))[:300], "is truncated (the file ends early)"),
    "long.png": (huge_png(20000, 2), "is 20000 x 2 (40,000 pixels); the app takes images up to 40,000,000 pixels "
                                     "and 12,000 pixels a side"),
    "huge.png": (huge_png(30000, 30000), "is too large to open (Image size (900000000 pixels) exceeds limit"),
    "anim.jpg": (png_bytes(Image.new("RGB", (8, 8)), "GIF"), "is a GIF file; upload a PNG or JPEG"),
    "empty.png": (b"", "is empty"),
}


@pytest.mark.parametrize("name", ["absorbing", "ldm"])
def test_inpaint_app_takes_an_upload_of_any_mode_and_says_how_it_was_converted(name, checkpoint, monkeypatch):
    at = app("inpaint_app", monkeypatch, checkpoint(name))
    side = SIZES.get(name, 16)
    for file, (data, note) in GOOD.items():
        at.file_uploader(key="upload").set_value((file, data, "image/png")).run()
        no_errors(at)
        notes = " ".join(c.value for c in at.caption)
        assert note in notes and f"-> {side} x {side}" in notes and "grayscale" in notes, notes
    at.selectbox(key="preset").set_value("left half kept")
    at.button(key="inpaint").click().run()
    no_errors(at)
    result = at.session_state["result:a"]
    assert result["count"] == 3 and result["size"] == (1, side, side)  # 1 image, 3 completions (the default)
    assert not result["commands"] and "has no command line" in result["why_no_command"]


def test_inpaint_app_refuses_bad_uploads_with_a_message(checkpoint, monkeypatch):
    at = app("inpaint_app", monkeypatch, checkpoint("absorbing"))
    for file, (data, message) in BAD.items():
        at.file_uploader(key="upload").set_value((file, data, "image/png")).run()
        assert not at.exception, (file, [e.value for e in at.exception])
        assert len(at.error) == 1 and message in at.error[0].value, (file, [e.value for e in at.error])
        assert file in at.error[0].value
        at.button(key="inpaint").click().run()
        assert not at.exception and "result:a" not in at.session_state  # nothing to inpaint


def test_inpaint_app_drawn_masks_and_the_latent_grid(checkpoint, monkeypatch):
    at = app("inpaint_app", monkeypatch, checkpoint("absorbing"))
    at.radio(key="source").set_value("Validation split").run()
    at.radio(key="mask_mode").set_value("Rectangle").run()
    no_errors(at)  # a canvas with nothing drawn keeps everything, and says so
    assert any("keeps every pixel" in i.value for i in at.info)


# --- the pure pieces ------------------------------------------------------------------------------------
def test_canvas_paint_becomes_the_hole_and_the_border_preset_keeps_the_centre():
    rgba = np.zeros((64, 64, 4), dtype=np.uint8)
    rgba[:32, :, 3] = 150  # the upper half painted
    mask = core.canvas_mask(rgba, 16, 16)
    assert mask.shape == (1, 1, 16, 16) and mask[..., :8, :].sum() == 0 and bool((mask[..., 8:, :] == 1).all())
    assert core.canvas_mask(None, 8, 8).min() == 1
    border = core.preset_mask("outpainting border", 1, 16, 16)
    assert border[..., 4:12, 4:12].min() == 1 and border.sum() == 64


def test_option_values_round_trip_through_the_command_line():
    sample = load("sample")
    options = {"temperature": (1.0, 0.5), "top_k": None, "order": "raster", "steps": 3, "guidance_scale": 2.0}
    line = core.command_line("sample.py", "x.ckpt", ["-n", "4"], options)
    args = sample.parse_args(shlex.split(line)[2:])
    assert args.sampler_kw == {"temperature": [1.0, 0.5], "top_k": None, "order": "raster", "steps": 3,
                               "guidance_scale": 2.0}


@pytest.mark.parametrize("name", ["absorbing", "sundae", "imagebart", "ldm", "cascade"])
def test_progress_lines_and_intermediate_decodes(name, checkpoint):
    loaded = core.load(checkpoint(name))
    seen = []
    loaded.prior.sample(2, generator=torch.Generator().manual_seed(0),
                        callback=lambda info: seen.append((*core.progress(info), core.preview(loaded.prior, info))))
    assert seen[0][1].startswith("step 1 of ") and all(0 < f <= 1 for f, _, _ in seen)
    if name == "imagebart":
        assert "scale" in seen[0][1]
    if name == "cascade":
        assert seen[0][1].endswith("stage 0") and seen[-1][1].endswith("stage 1")
    previews = [p for _, _, p in seen if p is not None]
    assert previews and all(tuple(p.shape) == (2, *loaded.image_shape) for p in previews)
    if name != "cascade":  # the base stage's x_0 is another size: only the last stage's are decoded
        assert seen[-1][2] is not None  # the last step's map is complete

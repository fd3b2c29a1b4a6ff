"""Odd and broken image files are converted or skipped and counted, never replaced by another file; an
epoch never stops."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image, ImageFile
from torch.utils.data import DataLoader

from ldm.data.image_folder import CaptionedFolder, ClassFolder, ImageFolder
from ldm.data.skipped import Skipped, collate_good


def make_folder(root):
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 255, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(rgb).save(root / "rgb.jpg")
    Image.fromarray(rgb[..., 0]).save(root / "gray.png")
    Image.fromarray(rgb).convert("CMYK").save(root / "cmyk.jpg")
    rgba = np.concatenate([rgb, np.zeros((40, 50, 1), np.uint8)], -1)  # fully transparent
    Image.fromarray(rgba, "RGBA").save(root / "rgba.png")
    Image.fromarray(rgb).convert("P").save(root / "palette.png")
    Image.fromarray(rgb[..., 0].astype(np.uint16) * 257).save(root / "sixteen.png")
    (root / "sub").mkdir(exist_ok=True)
    Image.fromarray(rgb).save(root / "sub" / "nested.bmp")
    good = 7
    data = (root / "rgb.jpg").read_bytes()
    (root / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (root / "empty.jpg").write_bytes(b"")
    (root / "text.png").write_text("not an image")
    Image.fromarray(np.zeros((300, 300, 3), np.uint8)).save(root / "huge.png")
    return good


def test_converts_good_and_counts_bad(tmp_path):
    good = make_folder(tmp_path / "imgs")
    ds = ImageFolder(str(tmp_path / "imgs"), size=16, max_pixels=200 * 200)
    assert len(ds) == good + 4
    seen = []
    for batch in DataLoader(ds, batch_size=4, num_workers=0, collate_fn=collate_good):
        assert batch["image"].shape[1:] == (3, 16, 16)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        seen += batch["file_path_"]
    assert len(seen) == len(set(seen)) == good  # no file stands in for a bad one
    assert ds.skip_report() == {"truncated": 1, "unreadable": 2, "too_large": 1}
    rgba = ds[next(i for i, p in enumerate(ds.paths) if p.endswith("rgba.png"))]
    assert torch.allclose(rgba["image"], torch.ones(3, 16, 16))  # transparent -> white


def test_truncated_allowed_when_asked(tmp_path):
    make_folder(tmp_path / "imgs")
    ds = ImageFolder(str(tmp_path / "imgs"), size=16, max_pixels=200 * 200, allow_truncated=True)
    for i in range(len(ds)):
        ds[i]
    assert "truncated" not in ds.skip_report()


def test_all_bad_and_empty_folders_are_clear(tmp_path):
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "a.jpg").write_bytes(b"junk")
    with pytest.raises(ValueError, match="every image in .*bad is unreadable"):
        ImageFolder(str(tmp_path / "bad"), size=8)[0]
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no images found in .*empty"):
        ImageFolder(str(tmp_path / "empty"), size=8)


def test_split_list_and_class_folders(tmp_path):
    make_folder(tmp_path / "imgs")
    split = tmp_path / "train.txt"
    split.write_text("rgb.jpg\nsub/nested.bmp\n")
    ds = ImageFolder(str(tmp_path / "imgs"), size=8, split_file=str(split))
    assert [p.split("/")[-1] for p in ds.paths] == ["rgb.jpg", "nested.bmp"]
    for syn in ("n02", "n01"):
        (tmp_path / "in" / syn).mkdir(parents=True)
        Image.fromarray(np.zeros((10, 10, 3), np.uint8)).save(tmp_path / "in" / syn / "x.JPEG")
    cf = ClassFolder(str(tmp_path / "in"), size=8, synsets=["n02", "n01"])
    labels = {cf[i]["file_path_"].split("/")[-2]: cf[i]["class_label"] for i in range(2)}
    assert labels == {"n02": 0, "n01": 1}


@pytest.mark.parametrize("context", ["fork", pytest.param("spawn", marks=pytest.mark.slow)])
def test_skips_in_worker_processes_reach_the_parent(tmp_path, context):
    good = make_folder(tmp_path / "imgs")
    ds = ImageFolder(str(tmp_path / "imgs"), size=16, max_pixels=200 * 200)
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context, collate_fn=collate_good,
                        persistent_workers=context == "spawn")  # spawning is slow: once for both epochs
    images = sum(len(batch["image"]) for batch in loader if batch is not None)
    assert images == good and len(ds) == good + 4
    assert ds.skip_report() == {"truncated": 1, "unreadable": 2, "too_large": 1}  # each bad file once
    assert sorted(p.split("/")[-1] for p in ds.skipped_files()) == ["empty.jpg", "huge.png", "text.png",
                                                                    "truncated.jpg"]
    images = sum(len(batch["image"]) for batch in loader if batch is not None)
    assert images == good  # a second epoch finds the same files, already known bad: nothing counted twice
    assert sum(ds.skip_report().values()) == 4


def test_bad_file_gives_skipped_not_another_file(tmp_path):
    make_folder(tmp_path / "imgs")
    ds = ImageFolder(str(tmp_path / "imgs"), size=16, max_pixels=200 * 200)
    names = [p.split("/")[-1] for p in ds.paths]
    empty = ds[names.index("empty.jpg")]
    assert isinstance(empty, Skipped) and empty.reason == "unreadable" and "empty.jpg" in empty.detail
    assert ds[names.index("empty.jpg")] == ("unreadable", f"{ds.paths[names.index('empty.jpg')]}: found bad before")
    huge = ds[names.index("huge.png")]
    assert huge == ("too_large", f"{ds.paths[names.index('huge.png')]}: 300x300 has 90000 pixels, over "
                                 "max_pixels=40000")
    batch = collate_good([ds[names.index("rgb.jpg")], empty, ds[names.index("gray.png")]])
    assert [p.split("/")[-1] for p in batch["file_path_"]] == ["rgb.jpg", "gray.png"]  # one smaller
    assert collate_good([empty, huge]) is None


def test_a_long_thin_image_is_refused_from_its_header(tmp_path, monkeypatch):
    """A 1x200000 PNG is within max_pixels but over max_side; it is never decoded."""
    (tmp_path / "imgs").mkdir()
    Image.new("L", (1, 200_000)).save(tmp_path / "imgs" / "long.png")
    assert (tmp_path / "imgs" / "long.png").stat().st_size < 10_000
    Image.fromarray(np.zeros((20, 30, 3), np.uint8)).save(tmp_path / "imgs" / "ok.png")
    decoded = []
    load = ImageFile.ImageFile.load

    def recording_load(self):
        decoded.append(Path(self.filename).name)
        return load(self)

    monkeypatch.setattr(ImageFile.ImageFile, "load", recording_load)
    ds = ImageFolder(str(tmp_path / "imgs"), size=16)  # max_pixels 64M, max_side 16384
    long, ok = ds[0], ds[1]
    assert long == ("too_large", f"{tmp_path / 'imgs' / 'long.png'}: 1x200000 has a side over max_side=16384")
    assert ok["image"].shape == (3, 16, 16) and set(decoded) == {"ok.png"}
    assert ds.skip_report() == {"too_large": 1}
    # the limit is configurable; an image within it is cropped before it is scaled (memory stays size²)
    wide = ImageFolder(str(tmp_path / "imgs"), size=16, max_side=300_000)[0]
    assert wide["image"].shape == (3, 16, 16) and set(decoded) == {"ok.png", "long.png"}
    with pytest.raises(ValueError, match="max_pixels and max_side must be >= 1; got 64000000 and 0"):
        ImageFolder(str(tmp_path / "imgs"), size=16, max_side=0)


def test_training_through_the_data_module_passes_over_bad_files(tmp_path):
    """Batches of one: a bad file's batch is None, which Lightning passes over (training) and the
    model's evaluation step and the image logger ignore."""
    import pytorch_lightning as pl

    from ldm.callbacks import ImageLogger
    from ldm.data.datamodule import DataModuleFromConfig
    from ldm.first_stage.models import VQModel

    good = make_folder(tmp_path / "imgs")
    images = {"target": "ldm.data.image_folder.ImageFolder",
              "params": {"root": str(tmp_path / "imgs"), "size": 8, "max_pixels": 200 * 200}}
    data = DataModuleFromConfig(batch_size=1, train=images, validation=images, num_workers=0)
    dd = {"double_z": False, "z_channels": 4, "resolution": 8, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    loss = {"target": "ldm.first_stage.losses.VQLPIPSWithDiscriminator",
            "params": {"disc_start": 1000, "disc_in_channels": 3, "perceptual_weight": 0.0}}
    torch.manual_seed(0)
    model = VQModel(dd, loss, n_embed=8, embed_dim=4)
    model.learning_rate = 1e-3
    trainer = pl.Trainer(max_epochs=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                         default_root_dir=str(tmp_path / "run"),
                         callbacks=[ImageLogger(batch_frequency=2, max_images=1, log_first_step=True,
                                                    increase_log_steps=False)])
    trainer.fit(model, data)
    assert trainer.global_step == good  # one step per good file; the 4 bad ones are passed over
    assert data.datasets["train"].skip_report() == {"truncated": 1, "unreadable": 2, "too_large": 1}


def test_evaluation_leaves_unreadable_images_out(tmp_path):
    from ldm.first_stage.models import VQModel
    from ldm.metrics.eval_data import image_split
    from ldm.metrics.first_stage_eval import evaluate_first_stage
    from ldm.metrics.prior_eval import dataset_images

    good = make_folder(tmp_path / "imgs")
    (tmp_path / "imgs" / "0_first.jpg").write_bytes(b"")  # the first file, which image_split looks at
    images = {"target": "ldm.data.image_folder.ImageFolder",
              "params": {"root": str(tmp_path / "imgs"), "size": 16, "max_pixels": 200 * 200}}
    ds, _ = image_split({"data": {"params": {"test": images}}})
    assert len(dataset_images(ds, batch_size=3)) == good
    dd = {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 3, "out_ch": 3, "ch": 32,
          "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
    model = VQModel(dd, {"target": "torch.nn.Identity"}, n_embed=8, embed_dim=4)
    assert evaluate_first_stage(model, ds, batch_size=1, progress=False)["images"] == good
    assert ds.skip_report() == {"truncated": 1, "unreadable": 3, "too_large": 1}


def test_captioned_folder_reads_each_caption_and_refuses_an_image_without_one(tmp_path):
    root = tmp_path / "laion" / "00000"
    root.mkdir(parents=True)
    for i, text in enumerate(["a red fox in snow", "  Ünïcode café\n"]):
        Image.fromarray(np.full((12, 20, 3), 40 * i, np.uint8)).save(root / f"{i:05d}.jpg")
        (root / f"{i:05d}.txt").write_text(text, encoding="utf-8")
    (root / "00002.txt").write_text("a caption without its image")
    (root / "00003.jpg").write_bytes(b"")  # unreadable, with a caption: skipped like any bad image
    (root / "00003.txt").write_text("broken")
    ds = CaptionedFolder(str(tmp_path / "laion"), size=8)
    assert len(ds) == 3 and [ds[i]["caption"] for i in range(2)] == ["a red fox in snow", "Ünïcode café"]
    assert ds[0]["image"].shape == (3, 8, 8) and isinstance(ds[2], Skipped)
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(root / "00004.png")
    with pytest.raises(ValueError, match=r"1 image\(s\) in .*laion have no caption file \(\.txt of the same stem\), "
                                         r"e\.g\. .*00004\.png"):
        CaptionedFolder(str(tmp_path / "laion"), size=8)

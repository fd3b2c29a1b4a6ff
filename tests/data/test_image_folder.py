"""Odd and broken image files are converted or skipped and counted; an epoch never stops."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from ldm.data.image_folder import ClassFolder, ImageFolder


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
    seen = set()
    for batch in DataLoader(ds, batch_size=4, num_workers=0):
        assert batch["image"].shape[1:] == (3, 16, 16)
        assert batch["image"].min() >= -1 and batch["image"].max() <= 1
        seen.update(batch["file_path_"])
    assert len(seen) == good
    assert ds.skip_report() == {"truncated": 1, "unreadable": 2, "too_large": 1}
    rgba = next(ds[i] for i in range(len(ds)) if ds[i]["file_path_"].endswith("rgba.png"))
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
    loader = DataLoader(ds, batch_size=2, num_workers=2, multiprocessing_context=context,
                        persistent_workers=context == "spawn")  # spawning is slow: once for both epochs
    images = sum(len(batch["image"]) for batch in loader)
    assert images == len(ds) == good + 4
    assert ds.skip_report() == {"truncated": 1, "unreadable": 2, "too_large": 1}  # each bad file once
    assert sorted(p.split("/")[-1] for p in ds.skipped_files()) == ["empty.jpg", "huge.png", "text.png",
                                                                    "truncated.jpg"]
    for _ in loader:  # a second epoch finds the same files, already known bad: nothing counted twice
        pass
    assert sum(ds.skip_report().values()) == 4

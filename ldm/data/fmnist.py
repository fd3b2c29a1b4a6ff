"""Fashion-MNIST (Xiao et al. 2017): the default real data set, read from local idx files first."""

from __future__ import annotations

import gzip
import os
from pathlib import Path
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ldm.util import NonNegativeInt, PositiveInt

DEBIAN_ROOT = "/usr/share/datasets/fashion-mnist"
CACHE_ROOT = Path.home() / ".cache" / "latent-priors" / "fashion-mnist"
CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
_FILES = {"train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
          "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte")}
_ARRAYS: dict[str, np.ndarray] = {}


def _read_idx(path: Path) -> np.ndarray:
    """Parse an idx file (optionally gzipped): magic, dims, then uint8 data."""
    key = str(path)
    if key not in _ARRAYS:
        opener = gzip.open if path.suffix == ".gz" else open
        with opener(path, "rb") as f:
            data = f.read()
        ndim = data[3]
        dims = [int.from_bytes(data[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim)]
        _ARRAYS[key] = np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)
    return _ARRAYS[key]


def _find(root: Path, stem: str) -> Path | None:
    for candidate in (root / f"{stem}.gz", root / stem, root / "FashionMNIST" / "raw" / f"{stem}.gz",
                      root / "FashionMNIST" / "raw" / stem):
        if candidate.exists():
            return candidate
    return None


def locate(root: str | None, download: bool) -> Path:
    """The first folder holding the four idx files: `root`, $FMNIST_ROOT, Debian's, then a download."""
    tried = [Path(p) for p in (root, os.environ.get("FMNIST_ROOT"), DEBIAN_ROOT, CACHE_ROOT) if p]
    for r in tried:
        if all(_find(r, s) for files in _FILES.values() for s in files):
            return r
    if download:
        import torchvision

        torchvision.datasets.FashionMNIST(str(CACHE_ROOT), train=True, download=True)
        torchvision.datasets.FashionMNIST(str(CACHE_ROOT), train=False, download=True)
        return CACHE_ROOT
    raise FileNotFoundError(
        "Fashion-MNIST not found; looked in " + ", ".join(map(str, tried)) +
        ". Install it with `apt-get install dataset-fashion-mnist`, set FMNIST_ROOT, or pass download=True."
    )


class FashionMNIST(Dataset):
    """Items `{"image": (1, size, size) in [-1, 1], "class_label": int}`.

    `low_res` area-averages the image down to that size at the end (a cascade's base stage, trained on what
    `ldm.conditioning.LowResImage` makes of the full-size image). Splits: `train` = the first 60000 - `val_size`
    official training images, `validation` = the last `val_size` of them, `test` = the official 10000.
    """

    class_names = CLASS_NAMES

    def __init__(self, split: Literal["train", "validation", "test"] = "train", size: PositiveInt = 32,
                 resize_mode: Literal["pad", "resize"] = "pad", root: str | None = None, download: bool = True,
                 val_size: NonNegativeInt = 5000, flip: bool = False, limit: PositiveInt | None = None,
                 low_res: PositiveInt | None = None):
        if split not in ("train", "validation", "test"):
            raise ValueError(f"split must be train, validation or test; got {split!r}")
        if resize_mode not in ("pad", "resize"):
            raise ValueError(f"resize_mode must be 'pad' or 'resize'; got {resize_mode!r}")
        if resize_mode == "pad" and size < 28:
            raise ValueError(f"resize_mode 'pad' needs size >= 28, got {size}; use resize_mode: resize")
        if low_res is not None and low_res >= size:
            raise ValueError(f"low_res must be below size {size}, got {low_res}")
        self.root = locate(root, download)
        files = _FILES["test" if split == "test" else "train"]
        images = _read_idx(_find(self.root, files[0]))
        labels = _read_idx(_find(self.root, files[1]))
        if split == "train":
            images, labels = images[: len(images) - val_size], labels[: len(labels) - val_size]
        elif split == "validation":
            images, labels = images[len(images) - val_size:], labels[len(labels) - val_size:]
        if limit is not None:
            images, labels = images[:limit], labels[:limit]
        self.images, self.labels = images, labels
        self.split, self.size, self.resize_mode, self.flip, self.low_res = split, size, resize_mode, flip, low_res

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, i: int) -> dict:
        x = torch.from_numpy(self.images[i].astype(np.float32) / 127.5 - 1.0)[None]  # (1, 28, 28)
        if self.size != 28:
            if self.resize_mode == "pad":
                p = self.size - 28
                x = F.pad(x, (p // 2, p - p // 2, p // 2, p - p // 2), value=-1.0)
            else:
                x = F.interpolate(x[None], size=(self.size, self.size), mode="bilinear", align_corners=False)[0]
        if self.low_res is not None:  # a cascade's base sees what a super-resolution stage's input is made from
            x = F.interpolate(x[None], size=(self.low_res, self.low_res), mode="area")[0]
        if self.flip and torch.rand(()) < 0.5:
            x = x.flip(-1)
        return {"image": x, "class_label": int(self.labels[i])}

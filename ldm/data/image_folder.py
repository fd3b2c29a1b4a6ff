"""Image-folder datasets for paper-scale data (FFHQ, CelebA-HQ, LSUN, ImageNet layouts).

Files are listed from a folder (recursively) or from a split-list file of relative paths, as the
anchors ship them. Odd images are converted (grayscale, CMYK, palette, 16-bit, RGBA composited on
white); unreadable, truncated or oversized files are skipped and counted, never crashing an epoch and
never replaced by another file (see `ldm.data.skipped`). The record of skipped files lives in shared
memory, so what DataLoader worker processes find is what `skip_report()` returns in the parent.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from PIL import Image, ImageFile
from torch.utils.data import Dataset

from ldm.data.skipped import Skipped

log = logging.getLogger(__name__)
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".gif")
Crop = Literal["center", "random", "none"]
SkipReason = Literal["truncated", "unreadable", "too_large"]
SKIP_REASONS: tuple[SkipReason, ...] = ("truncated", "unreadable", "too_large")


class ImageLoadError(Exception):
    """A file that cannot be used as an image; `reason` is the counter key."""

    def __init__(self, reason: SkipReason, detail: str):
        super().__init__(detail)
        self.reason = reason


def to_rgb(img: Image.Image) -> Image.Image:
    """Any PIL mode to RGB; transparency is composited on white."""
    if img.mode in ("RGBA", "LA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        return Image.alpha_composite(background, img).convert("RGB")
    if img.mode in ("I;16", "I;16B", "I;16L", "I"):
        arr = np.asarray(img, dtype=np.float64)
        top = 65535.0 if arr.max() > 255 else 255.0
        return Image.fromarray((arr / top * 255.0).clip(0, 255).astype(np.uint8)).convert("RGB")
    return img.convert("RGB")


def check_size(path: str | Path, w: int, h: int, max_pixels: int, max_side: int) -> None:
    """Raise ImageLoadError when a side or the pixel count is over its limit (from the header: before decoding)."""
    if max(w, h) > max_side:
        raise ImageLoadError("too_large", f"{path}: {w}x{h} has a side over max_side={max_side}")
    if w * h > max_pixels:
        raise ImageLoadError("too_large", f"{path}: {w}x{h} has {w * h} pixels, over max_pixels={max_pixels}")


def load_image(path: str | Path, max_pixels: int, allow_truncated: bool = False,
               max_side: int = 16384) -> Image.Image:
    """Open an image, check its size from the header, then decode it; or raise ImageLoadError with a reason.

    `Image.open` reads only the header, so an image over a limit is never decoded: a 1x200000 PNG is
    small on disk and within the pixel limit, but scaling its short side to `size` made gigabytes.
    """
    try:
        with Image.open(path) as img:
            check_size(path, *img.size, max_pixels=max_pixels, max_side=max_side)
            previous = ImageFile.LOAD_TRUNCATED_IMAGES
            ImageFile.LOAD_TRUNCATED_IMAGES = allow_truncated
            try:
                img.load()
            finally:
                ImageFile.LOAD_TRUNCATED_IMAGES = previous
            return to_rgb(img)
    except ImageLoadError:
        raise
    except Image.DecompressionBombError as e:  # PIL's own limit, checked in Image.open
        raise ImageLoadError("too_large", f"{path}: {e}") from e
    except (OSError, SyntaxError, ValueError) as e:
        message = str(e).replace(str(path), "")  # the path itself may contain any word
        reason = "truncated" if "truncated" in message.lower() else "unreadable"
        raise ImageLoadError(reason, f"{path}: {e}") from e


class ImagePaths(Dataset):
    """Items `{"image": (3, size, size) in [-1, 1], "file_path_": str}` (+ `class_label` when given).

    A bad file gives `Skipped(reason, detail)` (never the next good file, whose content would then sit
    under the wrong index), which `ldm.data.skipped.collate_good` drops from its batch: a training batch
    is one smaller, and the latent cache leaves the index out and records it. Dropping at load time,
    rather than checking every header when the data set is built, costs nothing on a clean data set and
    also catches files whose data is cut off after a good header.

    Each bad file counts once, by reason, in `skip_report()`. Which file was skipped for which reason
    is one byte per file in a tensor in shared memory, created here: DataLoader workers (forked or
    spawned) write into the same memory the parent reads, and a file two workers both find bad still
    counts once. Sizes are checked from the header: `max_pixels` (width x height) and `max_side`.
    """

    def __init__(self, paths: Sequence[str | Path], size: int, labels: Sequence[int] | None = None,
                 crop: Crop = "center", flip: bool = False, max_pixels: int = 64_000_000,
                 allow_truncated: bool = False, root: str | Path | None = None, max_side: int = 16384):
        if crop not in ("center", "random", "none"):
            raise ValueError(f"crop must be center, random or none; got {crop!r}")
        if not paths:
            raise ValueError(f"no images found{f' in {root}' if root else ''}")
        self.paths = [str(p) for p in paths]
        self.labels = list(labels) if labels is not None else None
        self.size, self.crop, self.flip = size, crop, flip
        if max_pixels < 1 or max_side < 1:
            raise ValueError(f"max_pixels and max_side must be >= 1; got {max_pixels} and {max_side}")
        self.max_pixels, self.max_side, self.allow_truncated = max_pixels, max_side, allow_truncated
        self.root = root
        # 0: not known bad; 1 + i: skipped for SKIP_REASONS[i]
        self._skip_codes = torch.zeros(len(self.paths), dtype=torch.uint8).share_memory_()  # (N,)

    def __len__(self) -> int:
        return len(self.paths)

    def preprocess(self, img: Image.Image) -> torch.Tensor:
        """The square of the shorter side (centred or random) scaled to `size`, optional flip; (3, size, size)
        in [-1, 1]. Cropping before scaling (PIL's `box`) keeps memory at `size`² whatever the aspect ratio."""
        w, h = img.size
        if self.crop == "none":
            img = img.resize((self.size, self.size), Image.BICUBIC)
        else:
            side = min(w, h)
            if self.crop == "center":
                left, top = (w - side) // 2, (h - side) // 2
            else:
                left, top = random.randint(0, w - side), random.randint(0, h - side)
            img = img.resize((self.size, self.size), Image.BICUBIC, box=(left, top, left + side, top + side))
        x = torch.from_numpy(np.asarray(img, dtype=np.float32).copy()).permute(2, 0, 1) / 127.5 - 1.0
        if self.flip and random.random() < 0.5:
            x = x.flip(-1)
        return x

    def __getitem__(self, i: int) -> dict | Skipped:
        path = self.paths[i]
        if self._skip_codes[i]:
            return Skipped(SKIP_REASONS[int(self._skip_codes[i]) - 1], f"{path}: found bad before")
        try:
            img = load_image(path, self.max_pixels, self.allow_truncated, self.max_side)
        except ImageLoadError as e:
            reason = e.reason if e.reason in SKIP_REASONS else "unreadable"
            self._skip_codes[i] = 1 + SKIP_REASONS.index(reason)
            log.warning("skipping image (%s): %s", reason, e)
            if bool(self._skip_codes.all()):
                raise ValueError(f"every image{f' in {self.root}' if self.root else ''} is unreadable: "
                                 f"{self.skip_report()}") from None
            return Skipped(reason, str(e))
        item = {"image": self.preprocess(img), "file_path_": path}
        if self.labels is not None:
            item["class_label"] = int(self.labels[i])
        return item

    @property
    def skipped(self) -> Counter[str]:
        """Files skipped so far by reason, in this process and every DataLoader worker."""
        counts = torch.bincount(self._skip_codes.long(), minlength=len(SKIP_REASONS) + 1)[1:]
        return Counter({r: int(c) for r, c in zip(SKIP_REASONS, counts.tolist(), strict=True) if c})

    def skip_report(self) -> dict[str, int]:
        return dict(self.skipped)

    def skipped_files(self) -> dict[str, str]:
        """Path -> reason of every file skipped so far."""
        bad = self._skip_codes.nonzero().flatten().tolist()
        return {self.paths[j]: SKIP_REASONS[int(self._skip_codes[j]) - 1] for j in bad}


def list_images(root: str | Path, exts: Sequence[str] = IMAGE_EXTS) -> list[Path]:
    root = Path(root)
    if not root.is_dir():
        raise ValueError(f"image folder not found: {root}")
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in exts)


def read_split_list(root: str | Path, split_file: str | Path) -> list[Path]:
    """Relative paths, one per line (taming's ffhqtrain.txt, celebahqtrain.txt, LSUN lists)."""
    lines = [ln.strip() for ln in Path(split_file).read_text().splitlines() if ln.strip()]
    return [Path(root) / ln for ln in lines]


class ImageFolder(ImagePaths):
    """All images under `root`, or those a split list names (FFHQ, CelebA-HQ, LSUN)."""

    def __init__(self, root: str, size: int, split_file: str | None = None, crop: Crop = "center",
                 flip: bool = False, max_pixels: int = 64_000_000, allow_truncated: bool = False,
                 max_side: int = 16384):
        paths = read_split_list(root, split_file) if split_file else list_images(root)
        super().__init__(paths, size, crop=crop, flip=flip, max_pixels=max_pixels, allow_truncated=allow_truncated,
                         root=root, max_side=max_side)


class ClassFolder(ImagePaths):
    """ImageNet layout `root/<synset>/<file>`: the class is the index of the synset folder.

    `synsets` (a text file, one synset per line, or a list) fixes the order; default: sorted folders.
    """

    def __init__(self, root: str, size: int, synsets: str | Sequence[str] | None = None, crop: Crop = "center",
                 flip: bool = False, max_pixels: int = 64_000_000, allow_truncated: bool = False,
                 max_side: int = 16384):
        folders = sorted(p.name for p in Path(root).iterdir() if p.is_dir()) if Path(root).is_dir() else []
        if isinstance(synsets, str):
            synsets = [ln.split()[0] for ln in Path(synsets).read_text().splitlines() if ln.strip()]
        order = list(synsets) if synsets else folders
        index = {s: i for i, s in enumerate(order)}
        paths, labels = [], []
        for folder in folders:
            if folder not in index:
                raise ValueError(f"folder {folder!r} in {root} is not in the synset list")
            for p in list_images(Path(root) / folder):
                paths.append(p)
                labels.append(index[folder])
        self.synsets = order
        super().__init__(paths, size, labels=labels, crop=crop, flip=flip, max_pixels=max_pixels,
                         allow_truncated=allow_truncated, root=root, max_side=max_side)


class CaptionedFolder(ImagePaths):
    """Images under `root`, each with its caption in a text file of the same stem beside it (`00042.jpg` and
    `00042.txt`, the layout img2dataset writes for LAION): items carry `caption` (str). An image without its
    caption file is refused when the data set is built, naming it, rather than trained on unconditioned."""

    def __init__(self, root: str, size: int, crop: Crop = "center", flip: bool = False,
                 max_pixels: int = 64_000_000, allow_truncated: bool = False, max_side: int = 16384,
                 caption_ext: str = ".txt"):
        paths = list_images(root)
        missing = [p for p in paths if not p.with_suffix(caption_ext).is_file()]
        if missing:
            raise ValueError(f"{len(missing)} image(s) in {root} have no caption file ({caption_ext} of the same "
                             f"stem), e.g. {missing[0]}")
        self.caption_ext = caption_ext
        super().__init__(paths, size, crop=crop, flip=flip, max_pixels=max_pixels, allow_truncated=allow_truncated,
                         root=root, max_side=max_side)

    def __getitem__(self, i: int) -> dict | Skipped:
        item = super().__getitem__(i)
        if isinstance(item, dict):
            item["caption"] = Path(self.paths[i]).with_suffix(self.caption_ext).read_text(encoding="utf-8").strip()
        return item

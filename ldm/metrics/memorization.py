"""Memorisation check: samples beside their nearest training images in an extractor's feature space.

A prior that copies its training data puts samples much closer to some training image than held-out
images are; a grid shows which, and the ratio of median nearest-training distances (samples over test
images; well below 1 is a warning) says how much.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
import torchvision

from ldm.metrics.distribution import nearest
from ldm.metrics.features import from_uint8


def _like(images: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """uint8 images resized and given the channels of `target` (B, C, H, W), to sit in one grid."""
    x = from_uint8(images)
    if x.shape[1] != target.shape[1]:
        x = x.mean(1, keepdim=True) if target.shape[1] == 1 else x.expand(-1, target.shape[1], -1, -1)
    if x.shape[-2:] != target.shape[-2:]:
        x = F.interpolate(x, size=target.shape[-2:], mode="bilinear", align_corners=False, antialias=True)
    return x.clamp(-1, 1)


def nearest_training_grid(samples: torch.Tensor, sample_features: torch.Tensor, train_images: torch.Tensor,
                          train_features: torch.Tensor, path: str | Path, k: int = 3) -> torch.Tensor:
    """Write a PNG whose row i is sample i and its k nearest training images (closest first); the
    distances (S, k). Images are uint8 (N, C, H, W); features (N, D) of one extractor."""
    dist, idx = nearest(sample_features, train_features, k)  # (S, k)
    x = from_uint8(samples)
    rows = [torch.cat([x[i: i + 1], _like(train_images[idx[i]], x)]) for i in range(len(samples))]  # (1 + k, C, H, W)
    grid = torchvision.utils.make_grid(torch.cat(rows), nrow=1 + k, padding=2, pad_value=1.0)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((grid + 1) / 2, str(path))
    return dist


def memorization_scores(sample_features: torch.Tensor, test_features: torch.Tensor,
                        train_features: torch.Tensor) -> dict[str, Any]:
    """Median distance to the nearest training image of samples and of held-out test images, and their ratio."""
    s = float(nearest(sample_features, train_features, 1)[0].median())
    t = float(nearest(test_features, train_features, 1)[0].median())
    return {"nearest_train_distance": s, "test_nearest_train_distance": t,
            "nearest_train_ratio": s / t if t > 0 else None}

"""The curve the paper's custom schedules are read from: an image metric of decoded token maps against the share
A of tokens kept (the rest uniformly random codes), measured for a first stage on a data set.

For each of `levels` values A from 1 down to 0, every image's tokens are corrupted at that rate, decoded and
scored against the image: PSNR and SSIM per image (mean and standard deviation), FD_fmnist (the project's
classifier features, a Fréchet distance over the set; spread 0, as the original writes for FID). The table has
the layout of the original's `data/*_schedule_vs_metric.p` ({"bernoulli": {metric: [[value, spread], ...],
"alphacum": [...]}}), so `schedule_betas(kind="metric", table=...)` reads either.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from tqdm import tqdm

from ldm.metrics.image import psnr, ssim

PER_IMAGE = {"PSNR": psnr, "SSIM": ssim}
METRICS = (*PER_IMAGE, "FD_fmnist")


@torch.no_grad()
def measure_curve(first_stage: Any, images: torch.Tensor, levels: int = 20, metrics: Sequence[str] = ("PSNR", "SSIM"),
                  classifier: Any = None, generator: torch.Generator | None = None, batch_size: int = 250,
                  progress: bool = True) -> dict[str, Any]:
    """The table for `images` (N, C, H, W) in [-1, 1] through a VQ `first_stage` (encode_to_indices / decode_indices)."""
    unknown = [m for m in metrics if m not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric {unknown[0]!r}; choose from {', '.join(METRICS)}")
    if "FD_fmnist" in metrics and classifier is None:
        raise ValueError("FD_fmnist needs the Fashion-MNIST classifier")
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    from ldm.metrics.classifier import classifier_outputs
    from ldm.metrics.frechet import feature_statistics, frechet_distance

    device = next(first_stage.parameters()).device
    K = int(first_stage.n_embed)
    tokens = torch.cat([first_stage.encode_to_indices(images[i: i + batch_size].to(device))
                        for i in range(0, len(images), batch_size)])
    reference = feature_statistics(classifier_outputs(classifier, images)[0]) if "FD_fmnist" in metrics else None
    alphacum = torch.linspace(1.0, 0.0, levels, dtype=torch.float64).tolist()
    table: dict[str, Any] = {m: [] for m in metrics}
    gen_device = generator.device if generator is not None else device
    for keep in tqdm(alphacum, desc="levels", disable=not progress):
        decoded = []
        for i in range(0, len(tokens), batch_size):
            x0 = tokens[i: i + batch_size]
            u = torch.rand(x0.shape, generator=generator, device=gen_device).to(device)
            codes = torch.randint(0, K, x0.shape, generator=generator, device=gen_device).to(device)
            decoded.append(first_stage.decode_indices(torch.where(u < keep, x0, codes)).clamp(-1, 1).float().cpu())
        decoded = torch.cat(decoded)
        for m in metrics:
            if m in PER_IMAGE:
                scores = PER_IMAGE[m](decoded, images.float())
                table[m].append([float(scores.mean()), float(scores.std())])
            else:
                stats = feature_statistics(classifier_outputs(classifier, decoded)[0])
                table[m].append([float(frechet_distance(*stats, *reference)), 0.0])
    return {"bernoulli": {**table, "alphacum": alphacum}}

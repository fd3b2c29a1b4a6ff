"""Reconstruction quality of a first stage on a data split: PSNR, SSIM, rFD_fmnist, codebook health."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm.data.skipped import collate_good
from ldm.metrics.classifier import FMNISTClassifier
from ldm.metrics.frechet import feature_statistics, frechet_distance
from ldm.metrics.image import psnr, ssim


def codebook_stats(tokens: torch.Tensor, n_embed: int) -> dict[str, float]:
    """Fraction of the codebook used at least once and the perplexity of the code histogram."""
    counts = torch.bincount(tokens.flatten(), minlength=n_embed).double()
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"codebook_usage": float((counts > 0).double().mean()),
            "perplexity": float(torch.exp(-(nz * nz.log()).sum()))}


@torch.no_grad()
def evaluate_first_stage(model: Any, dataset: Dataset, classifier: FMNISTClassifier | None = None,
                         batch_size: int = 256, limit: int | None = None, device: str | torch.device = "cpu",
                         progress: bool = True) -> dict[str, Any]:
    """Reconstruct `dataset` through `encode_to_latent` / `decode_latent` and score it."""
    model = model.to(device).eval()
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate_good)  # unreadable: left out
    psnrs, ssims, tokens, feats_x, feats_r = [], [], [], [], []
    for batch in tqdm(loader, desc="reconstructing", disable=not progress):
        if batch is None:
            continue
        x = batch["image"].to(device)
        latent = model.encode_to_latent(x)
        rec = model.decode_latent(latent).clamp(-1, 1)
        psnrs.append(psnr(rec, x).cpu())
        ssims.append(ssim(rec, x).cpu())
        if model.latent_kind == "tokens":
            tokens.append(latent.cpu())
        if classifier is not None:
            feats_x.append(classifier.features(x).cpu())
            feats_r.append(classifier.features(rec).cpu())
    out: dict[str, Any] = {"images": sum(len(p) for p in psnrs), "psnr": float(torch.cat(psnrs).mean()),
                           "ssim": float(torch.cat(ssims).mean())}
    if tokens:
        out.update(codebook_stats(torch.cat(tokens), int(model.n_embed)), n_embed=int(model.n_embed))
    if classifier is not None:
        mu1, s1 = feature_statistics(torch.cat(feats_x))
        mu2, s2 = feature_statistics(torch.cat(feats_r))
        out["rFD_fmnist"] = frechet_distance(mu1, s1, mu2, s2)
    return out

"""Distances between a set of samples and a reference set, on features of one extractor
(`ldm.metrics.features`): Fréchet distance, KID, Inception Score, precision / recall / density / coverage.

All run on the CPU in chunks, so a 50k-sample set needs memory for its features and one chunk of
distances, not the full distance matrix (the `prdc` package holds three N x N matrices). The tests check
them against torch-fidelity and `prdc` on the same features.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from ldm.metrics.frechet import feature_statistics, frechet_distance

NEAREST_K = 5  # the k of precision / recall / density / coverage (Naeem et al. 2020's choice)
KID_SUBSETS, KID_SUBSET_SIZE = 100, 1000  # Binkowski et al. 2018 / torch-fidelity's defaults
IS_SPLITS = 10


@torch.no_grad()
def nearest(query: torch.Tensor, bank: torch.Tensor, k: int = 1, chunk: int = 2048,
            exclude_self: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Euclidean distances (Q, k) and indices (Q, k) of each query row's k nearest rows of `bank`, closest
    first; with `exclude_self` (query is bank) a row is not its own neighbour."""
    query, bank = query.float(), bank.float()
    chunk = max(1, min(chunk, 2**25 // max(1, len(bank))))  # at most 32M distances (128 MB) at a time
    dists, idx = [], []
    for start in range(0, len(query), chunk):
        d = torch.cdist(query[start: start + chunk], bank)  # (q, N)
        if exclude_self:
            rows = torch.arange(d.shape[0])
            d[rows, rows + start] = float("inf")
        v, i = d.topk(k, dim=1, largest=False)
        dists.append(v)
        idx.append(i)
    return torch.cat(dists), torch.cat(idx)


def knn_radii(features: torch.Tensor, k: int = NEAREST_K) -> torch.Tensor:
    """(N,) distance of each row to its k-th nearest other row: the radius of its ball in the manifold
    estimate of Kynkäänniemi et al. 2019."""
    if len(features) <= k:
        raise ValueError(f"need more than k = {k} feature vectors for the k-NN radii, got {len(features)}")
    return nearest(features, features, k, exclude_self=True)[0][:, -1]


@torch.no_grad()
def _count_inside(points: torch.Tensor, centres: torch.Tensor, radii: torch.Tensor, chunk: int = 2048
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """For each point: how many balls (centres, radii) contain it (distance < radius), and the distance
    to the nearest centre. (P,) long, (P,) float"""
    counts, closest = [], []
    centres = centres.float()
    chunk = max(1, min(chunk, 2**25 // max(1, len(centres))))
    for start in range(0, len(points), chunk):
        d = torch.cdist(points[start: start + chunk].float(), centres)  # (p, C)
        counts.append((d < radii[None]).sum(1))
        closest.append(d.min(1).values)
    return torch.cat(counts), torch.cat(closest)


@torch.no_grad()
def prdc(real: torch.Tensor, fake: torch.Tensor, k: int = NEAREST_K, real_radii: torch.Tensor | None = None
         ) -> dict[str, float]:
    """Precision and recall (Kynkäänniemi et al. 2019), density and coverage (Naeem et al. 2020), with the
    `prdc` package's conventions (strict inequality, k-th neighbour excluding the point itself).
    `real_radii` (knn_radii(real, k)) may be given, computed once for several sample sets."""
    real, fake = real.float(), fake.float()
    real_radii = knn_radii(real, k) if real_radii is None else real_radii
    fake_radii = knn_radii(fake, k)
    inside, _ = _count_inside(fake, real, real_radii)  # (F,) real balls holding each sample
    recalled, _ = _count_inside(real, fake, fake_radii)  # (R,) sample balls holding each real point
    # coverage: a real point whose nearest sample lies inside its own ball
    nearest_fake = nearest(real, fake, 1)[0][:, 0]  # (R,)
    return {"precision": float((inside > 0).double().mean()), "recall": float((recalled > 0).double().mean()),
            "density": float(inside.double().mean() / k),
            "coverage": float((nearest_fake < real_radii).double().mean())}


@torch.no_grad()
def kid(real: torch.Tensor, fake: torch.Tensor, subsets: int = KID_SUBSETS, subset_size: int = KID_SUBSET_SIZE,
        degree: int = 3, gamma: float | None = None, coef0: float = 1.0, seed: int = 0) -> tuple[float, float]:
    """Kernel Inception Distance (Binkowski et al. 2018): the unbiased MMD^2 estimate with the polynomial
    kernel (gamma x.y + coef0)^degree, gamma = 1/D, averaged over `subsets` random subsets of
    min(subset_size, |real|, |fake|) rows of each set; (mean, standard deviation over the subsets)."""
    x_all, y_all = real.double(), fake.double()
    m = min(subset_size, len(x_all), len(y_all))
    if m < 2:
        raise ValueError(f"KID needs at least two feature vectors in each set, got {len(x_all)} and {len(y_all)}")
    gamma = 1.0 / x_all.shape[1] if gamma is None else gamma
    g = torch.Generator().manual_seed(seed)
    mmds = []
    for _ in range(subsets):
        x = x_all[torch.randperm(len(x_all), generator=g)[:m]]  # (m, D)
        y = y_all[torch.randperm(len(y_all), generator=g)[:m]]
        kxx, kyy, kxy = ((a @ b.T * gamma + coef0) ** degree for a, b in ((x, x), (y, y), (x, y)))  # (m, m)
        off_diag = (kxx.sum() - kxx.diagonal().sum() + kyy.sum() - kyy.diagonal().sum()) / (m * (m - 1))
        mmds.append(float(off_diag - 2 * kxy.mean()))
    return float(np.mean(mmds)), float(np.std(mmds))


def inception_score(logits: torch.Tensor, splits: int = IS_SPLITS) -> tuple[float, float]:
    """exp E_x KL(p(y|x) || p(y)) (Salimans et al. 2016) over `splits` consecutive chunks of the samples
    (not shuffled: samples come in class order, so each chunk holds every class); (mean, std)."""
    logits = logits.double()
    if len(logits) < splits:
        raise ValueError(f"the Inception Score over {splits} splits needs at least {splits} samples, got {len(logits)}")
    scores = []
    n = len(logits)
    for i in range(splits):
        chunk = logits[i * n // splits: (i + 1) * n // splits]
        log_p = chunk.log_softmax(1)  # (b, K)
        log_marginal = log_p.exp().mean(0, keepdim=True).log()  # (1, K)
        scores.append(float((log_p.exp() * (log_p - log_marginal)).sum(1).mean().exp()))
    return float(np.mean(scores)), float(np.std(scores))


@dataclass
class Reference:
    """A reference set's features, once: their Gaussian fit (Fréchet distance, over all rows) and the k-NN
    radii of its first `manifold_rows` rows (precision / recall / density / coverage depend on the sizes of
    the two sets; Naeem et al. 2020 compare equal sizes, so give the number of samples)."""

    features: torch.Tensor  # (N, D)
    stats: tuple[np.ndarray, np.ndarray]
    manifold: torch.Tensor  # (M, D), the first M rows
    radii: torch.Tensor | None  # (M,); None for a set of k rows or fewer
    k: int = NEAREST_K

    @classmethod
    def of(cls, features: torch.Tensor, k: int = NEAREST_K, manifold_rows: int | None = None) -> Reference:
        features = features.float()
        manifold = features[:manifold_rows] if manifold_rows else features
        radii = knn_radii(manifold, k) if len(manifold) > k else None
        return cls(features, feature_statistics(features), manifold, radii, k)


def distribution_scores(features: torch.Tensor, logits: torch.Tensor, reference: Reference, fd_key: str,
                        suffix: str, kid_subsets: int = KID_SUBSETS, seed: int = 0) -> dict[str, Any]:
    """Every set-level score of one extractor's features (N, D) and logits (N, K) against `reference`:
    `fd_key`, KID{suffix} (and its std), IS{suffix} (and its std), precision, recall, density, coverage.
    Scores a set too small for them are None."""
    out: dict[str, Any] = {fd_key: frechet_distance(*feature_statistics(features), *reference.stats)}
    if min(len(features), len(reference.features)) >= 2:
        out[f"KID{suffix}"], out[f"KID{suffix}_std"] = kid(reference.features, features, subsets=kid_subsets,
                                                           seed=seed)
    else:
        out[f"KID{suffix}"] = out[f"KID{suffix}_std"] = None
    if len(logits) >= IS_SPLITS:
        out[f"IS{suffix}"], out[f"IS{suffix}_std"] = inception_score(logits)
    else:
        out[f"IS{suffix}"] = out[f"IS{suffix}_std"] = None
    if len(features) > reference.k and reference.radii is not None:
        out.update(prdc(reference.manifold, features, reference.k, reference.radii))
    else:
        out.update(dict.fromkeys(("precision", "recall", "density", "coverage")))
    return out

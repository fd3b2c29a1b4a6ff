"""Scores of a class-conditional prior on Fashion-MNIST: conditional accuracy, FD_fmnist, likelihood."""

from __future__ import annotations

import itertools
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm import tqdm

from ldm.data.skipped import collate_good
from ldm.metrics.classifier import FMNISTClassifier, classifier_outputs
from ldm.metrics.frechet import feature_statistics, frechet_distance


def batch_conditions(start: int, size: int, num_classes: int | None, class_conds: Sequence[Any] | None = None
                     ) -> tuple[torch.Tensor | None, Any]:
    """Labels (size,) of samples start.. (classes in turn when conditional, else None) and what the prior is
    given for them (`class_conds[label]` instead of the id when given: a text prior's caption)."""
    cond = torch.arange(start, start + size) % num_classes if num_classes else None
    return cond, (cond if class_conds is None or cond is None else [class_conds[int(c)] for c in cond])


@torch.no_grad()
def draw_batch(prior: Any, start: int, size: int, num_classes: int | None, seed: int = 0,
               class_conds: Sequence[Any] | None = None, report_steps: bool = True, **sampler_kw: Any
               ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Samples start..start+size-1 of a seeded evaluation (float32, on the CPU), their labels, and the network
    calls each took where the sampler reports them to its callback (SUNDAE's early stopping; else None; no callback
    without `report_steps`). The batch's seed is `seed + start`, so a sample does not depend on which process
    or run draws its batch."""
    last: dict[str, Any] = {}
    cond, given = batch_conditions(start, size, num_classes, class_conds)
    g = torch.Generator(device=prior.device).manual_seed(seed + start)
    extra = {"callback": last.update} if report_steps else {}
    images = prior.sample(size, cond=given, generator=g, **extra, **sampler_kw).float().cpu()
    taken = last["steps_taken"].cpu() if "steps_taken" in last else None
    return images, cond, taken


@torch.no_grad()
def generate(prior: Any, n: int, num_classes: int | None, batch_size: int = 100, seed: int = 0,
             progress: bool = True, steps_taken: list[torch.Tensor] | None = None,
             class_conds: Sequence[Any] | None = None, **sampler_kw: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`n` samples (float32, on the CPU; classes in turn when conditional) and their labels, seeded per batch.
    `class_conds` is what the prior is given for each class instead of its id (a text prior's caption).

    Only prior calls happen here, so a caller may wrap it in autocast. A sampler that stops samples early
    reports each sample's network calls in its callback's `steps_taken`; given a list, they are added to it."""
    images, labels = [], []
    for start in tqdm(range(0, n, batch_size), desc="sampling", disable=not progress):
        x, cond, taken = draw_batch(prior, start, min(batch_size, n - start), num_classes, seed, class_conds,
                                    report_steps=steps_taken is not None, **sampler_kw)
        images.append(x)
        if steps_taken is not None and taken is not None:
            steps_taken.append(taken)
        if cond is not None:
            labels.append(cond)
    return torch.cat(images), (torch.cat(labels) if labels else None)


def dataset_images(dataset: Dataset, limit: int | None = None, batch_size: int = 500) -> torch.Tensor:
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_good)  # unreadable images left out
    return torch.cat([b["image"] for b in loader if b is not None])


def sample_scores(images: torch.Tensor, labels: torch.Tensor | None, classifier: FMNISTClassifier,
                  reference_stats: tuple[Any, Any]) -> dict[str, float]:
    feats, preds = classifier_outputs(classifier, images)
    out = {"FD_fmnist": frechet_distance(*feature_statistics(feats), *reference_stats)}
    if labels is not None:
        out["conditional_accuracy"] = float((preds == labels).float().mean())
    return out


@torch.no_grad()
def elbo_bits(prior: Any, dataset: Dataset, batch_size: int = 250, limit: int | None = None, seed: int = 0,
              progress: bool = True, **nll_kw: Any) -> float:
    """Mean `prior.nll` (bits per latent dimension) over a split of cached latents or images."""
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    total, count = 0.0, 0
    loader = DataLoader(dataset, batch_size=batch_size, collate_fn=collate_good)  # unreadable images left out
    for i, batch in enumerate(tqdm(loader, desc="ELBO", disable=not progress)):
        if batch is None:
            continue
        batch = {k: v.to(prior.device) if torch.is_tensor(v) else v for k, v in batch.items()}
        bits = prior.nll(batch, generator=torch.Generator(device=prior.device).manual_seed(seed + i), **nll_kw)
        total += float(bits.sum())
        count += len(bits)
    return total / count


def sweep(settings: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """All combinations of sampler settings, e.g. {"temperature": [1, .9], "steps": [16, 64]}."""
    keys = list(settings)
    return [dict(zip(keys, values)) for values in itertools.product(*(settings[k] for k in keys))]


def set_scores(outputs: Mapping[str, Mapping[str, torch.Tensor]], labels: torch.Tensor | None,
               extractors: Sequence[Any], references: Mapping[str, Any], kid_subsets: int = 100,
               seed: int = 0) -> dict[str, Any]:
    """Scores of one image set from its features: FD_fmnist and the conditional accuracy from the classifier
    (`extractors[0]`, a `ldm.metrics.features.ClassifierFeatures`), and every distribution score of the last
    extractor (the classifier again, or Inception). `outputs` and `references` (`Reference`) are keyed by
    extractor name."""
    from ldm.metrics.distribution import distribution_scores

    classifier, main = extractors[0], extractors[-1]
    feats = outputs[classifier.name]
    out: dict[str, Any] = {"FD_fmnist": frechet_distance(*feature_statistics(feats["features"]),
                                                         *references[classifier.name].stats)}
    if labels is not None:
        out["conditional_accuracy"] = float((feats["logits"].argmax(1) == labels).float().mean())
    out.update(distribution_scores(outputs[main.name]["features"], outputs[main.name]["logits"],
                                   references[main.name], main.fd_key, main.suffix, kid_subsets, seed))
    return out

"""The data's own floor: the scores two sets of real images get against each other.

A prior's FD_fmnist is only as good as the distance between two samples of the data itself: the two
halves of the test split (same size, same distribution) and the test split against the training split
(what held-out images score). The scores are those of `evaluate.py`'s rows (`set_scores`), with the
same uint8 preprocessing and equal-size manifold references.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import DataLoader

from ldm.data.skipped import collate_good
from ldm.metrics.distribution import Reference
from ldm.metrics.features import FeatureExtractor, to_uint8
from ldm.metrics.prior_eval import set_scores


def images_and_labels(dataset: Any, limit: int | None = None, batch_size: int = 500
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """uint8 images (N, C, H, W) of a data set (unreadable ones left out) and their labels, if it has them."""
    if limit is not None:
        dataset = torch.utils.data.Subset(dataset, range(min(limit, len(dataset))))
    images, labels = [], []
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collate_good):
        if batch is None:
            continue
        images.append(to_uint8(batch["image"]))
        if "class_label" in batch:
            labels.append(torch.as_tensor(batch["class_label"]).long())
    return torch.cat(images), (torch.cat(labels) if labels else None)


def floor_scores(test: tuple[torch.Tensor, torch.Tensor | None], reference: tuple[torch.Tensor, torch.Tensor | None],
                 extractors: Sequence[FeatureExtractor], kid_subsets: int = 100, seed: int = 0
                 ) -> dict[str, dict[str, Any]]:
    """Scores of the test split's second half against its first, and of the whole test split against
    `reference` (the training split), each keyed like an evaluation row; `conditional_accuracy` is the
    classifier's accuracy on the real images."""
    images, labels = test
    half = len(images) // 2
    test_out = {e.name: e(images) for e in extractors}
    ref_images, _ = reference
    ref_out = {e.name: e(ref_images) for e in extractors}

    def part(outputs: dict, rows: slice) -> dict:
        return {name: {k: v[rows] for k, v in o.items()} for name, o in outputs.items()}

    first, second = part(test_out, slice(0, half)), part(test_out, slice(half, 2 * half))
    halves_ref = {e.name: Reference.of(first[e.name]["features"], manifold_rows=half) for e in extractors}
    train_ref = {e.name: Reference.of(ref_out[e.name]["features"], manifold_rows=len(images)) for e in extractors}
    second_labels = None if labels is None else labels[half:2 * half]
    return {
        "test_halves": {**set_scores(second, second_labels, extractors, halves_ref, kid_subsets, seed),
                        "images": half, "reference_images": half},
        "test_vs_train": {**set_scores(test_out, labels, extractors, train_ref, kid_subsets, seed),
                          "images": len(images), "reference_images": len(ref_images)},
    }

"""Items a data set cannot produce, and the collate function that drops them.

A data set returns `Skipped` (or None) for an item it cannot read instead of substituting another:
a substitute would put one file's content under another file's index (a latent cache then stores the
same latents twice and records nothing). The loader drops such items, so a batch may be smaller than
asked, and the latent cache records which indices it left out and why.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from torch.utils.data import default_collate


class Skipped(NamedTuple):
    """Stands for an item that was left out: `reason` is a short counter key, `detail` says which file and why."""

    reason: str
    detail: str = ""


def is_skipped(item: Any) -> bool:
    return item is None or isinstance(item, Skipped)


def as_skipped(item: Any) -> Skipped:
    """A data set that returns None gives no reason: it is recorded as `unknown`."""
    return item if isinstance(item, Skipped) else Skipped("unknown", "the data set returned None")


def collate_good(items: Sequence[Any]) -> Any:
    """`default_collate` of the items that are not skipped; None when every item of the batch was skipped.

    Lightning's training loop passes over a None batch (with a warning); the models' evaluation steps
    and the image logger return early on one. Under DDP the other ranks would wait for that rank's
    gradients: on data with many bad files, keep each rank's batch well above one image.
    """
    good = [item for item in items if not is_skipped(item)]
    return default_collate(good) if good else None

"""A LightningDataModule built from `train` / `validation` / `test` dataset configs (the anchors' shape)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ldm.data.skipped import collate_good
from ldm.util import NonNegativeInt, PositiveInt, check_config, instantiate_from_config

SPLITS = ("train", "validation", "test")
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ()}


class GlobalBatchSampler(DistributedSampler):
    """Each rank's contiguous slice of every global batch of one seeded permutation per epoch.

    With `num_replicas` ranks of `batch_size` each, global batch b is `perm[b*G:(b+1)*G]`, G =
    num_replicas * batch_size, and rank r gets its r-th block of `batch_size`: the ranks' batches,
    concatenated in rank order, are the batch one process with batch size G sees, so a DDP run and a
    single-process run with the same global batch train on the same data in the same order. The
    permutation depends only on `seed + epoch` (Lightning calls `set_epoch`), so it is the same on
    every rank and after a resume. A `DistributedSampler`, so Lightning keeps it instead of putting
    its own (interleaving, globally seeded) sampler in its place.

    `drop_last`: only whole global batches. Otherwise the last global batch is topped up from the
    start of the permutation when there are several ranks (every rank needs as many batches), and
    left short with one.
    """

    def __init__(self, dataset: Dataset, batch_size: int, num_replicas: int = 1, rank: int = 0,
                 shuffle: bool = True, seed: int = 0, drop_last: bool = False):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=shuffle, seed=seed,
                         drop_last=drop_last)
        self.batch_size = batch_size
        self.start_batch = 0  # batches of this epoch already consumed: the next iteration starts after them

    def _indices(self) -> list[int]:
        n = len(self.dataset)
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(n, generator=g).tolist()
        else:
            order = list(range(n))
        per_global = self.batch_size * self.num_replicas
        if self.drop_last:
            order = order[: n - n % per_global]
        elif self.num_replicas > 1 and n % per_global:
            pad = per_global - n % per_global
            order += (order * (pad // n + 1))[:pad]
        lo, hi = self.rank * self.batch_size, (self.rank + 1) * self.batch_size
        return [i for start in range(0, len(order), per_global) for i in order[start + lo: start + hi]]

    def __iter__(self):
        start, self.start_batch = self.start_batch * self.batch_size, 0
        return iter(self._indices()[start:])

    def __len__(self) -> int:
        return len(self._indices())


class ResumableLoader(DataLoader):
    """A training loader whose position Lightning checkpoints (`state_dict` / `load_state_dict`): the epoch
    and how many of its batches were consumed, so a run resumed mid-epoch continues the epoch where it
    stopped instead of replaying its first batches (and ends the epoch when the uninterrupted run would).

    Lightning draws exactly one batch per step from a loader of known length (no prefetch), so the batches
    this iterator handed out are the ones trained on when a checkpoint is written at a batch end. The
    iteration starts lazily, at the first batch: by then Lightning has set the sampler's epoch, which
    tells a resume mid-epoch (skip the consumed batches) from one at an epoch's end (start the next
    epoch whole).
    """

    sampler: GlobalBatchSampler

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.consumed = 0
        self._resume: dict[str, int] | None = None

    def __iter__(self):
        return self._batches()

    def _batches(self):
        sampler = self.sampler
        if self._resume is not None:
            if self._resume["epoch"] == sampler.epoch:
                sampler.start_batch = self._resume["batches"]
            self._resume = None
        self.consumed = sampler.start_batch
        for batch in super().__iter__():
            self.consumed += 1
            yield batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": int(self.sampler.epoch), "batches": int(self.consumed)}

    def load_state_dict(self, state: Mapping[str, int]) -> None:
        self._resume = {"epoch": int(state["epoch"]), "batches": int(state["batches"])}


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets are built lazily in `setup`; a split without a config has no loader.

    Items a data set skips (`ldm.data.skipped`: unreadable images) are dropped from their batch.
    """

    def __init__(self, batch_size: PositiveInt, train: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
                 num_workers: NonNegativeInt | None = None, shuffle_val: bool = False, pin_memory: bool = False,
                 drop_last: bool = True, seed: int = 0, eval_batch_size: PositiveInt | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.configs = {k: v for k, v in zip(SPLITS, (train, validation, test), strict=True) if v is not None}
        for split, config in self.configs.items():  # built later, in setup: checked now, before any run starts
            check_config(config, split, expected=Dataset)
        self.num_workers = min(2, os.cpu_count() or 1) if num_workers is None else num_workers
        self.shuffle_val, self.pin_memory, self.drop_last, self.seed = shuffle_val, pin_memory, drop_last, seed
        self.datasets: dict[str, Dataset] = {}
        if "validation" not in self.configs:
            self.val_dataloader = None  # Lightning then skips validation
        if "test" not in self.configs:
            self.test_dataloader = None
        self.has_test = "test" in self.configs

    def setup(self, stage: str | None = None) -> None:
        """Build the splits `stage` needs (all for None), so fitting never opens the test data."""
        for split in STAGE_SPLITS.get(stage, SPLITS):
            if split in self.configs:
                self.dataset(split)

    def dataset(self, split: str) -> Dataset:
        if split not in self.datasets:
            self.datasets[split] = instantiate_from_config(self.configs[split], key=f"data.params.{split}")
        return self.datasets[split]

    def _ranks(self) -> tuple[int, int]:
        """(world size, global rank) of the trainer this module serves; (1, 0) outside one."""
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, split: str, shuffle: bool, batch_size: int, drop_last: bool) -> DataLoader:
        self.dataset(split)
        # the generator seeds the workers (and would shuffle); the order comes from the sampler
        g = torch.Generator().manual_seed(self.seed)
        sampler = None
        if split == "train":
            world, rank = self._ranks()
            sampler = GlobalBatchSampler(self.datasets[split], batch_size, num_replicas=world, rank=rank,
                                         shuffle=shuffle, seed=self.seed, drop_last=drop_last)
            shuffle = False  # the sampler shuffles
        loader = ResumableLoader if sampler is not None else DataLoader
        return loader(self.datasets[split], batch_size=batch_size, shuffle=shuffle, sampler=sampler,
                      drop_last=drop_last, num_workers=self.num_workers, pin_memory=self.pin_memory,
                      generator=g, persistent_workers=self.num_workers > 0, collate_fn=collate_good)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.configs:
            raise ValueError("data.params.train is not configured; training needs a train split")
        return self._loader("train", True, self.batch_size, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.shuffle_val, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size, False)

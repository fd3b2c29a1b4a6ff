"""A LightningDataModule built from `train` / `validation` / `test` dataset configs (the anchors' shape)."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from ldm.util import instantiate_from_config

SPLITS = ("train", "validation", "test")
STAGE_SPLITS = {"fit": ("train", "validation"), "validate": ("validation",), "test": ("test",), "predict": ()}


class DataModuleFromConfig(pl.LightningDataModule):
    """Datasets are built lazily in `setup`; a split without a config has no loader."""

    def __init__(self, batch_size: int, train: Mapping[str, Any] | None = None,
                 validation: Mapping[str, Any] | None = None, test: Mapping[str, Any] | None = None,
                 num_workers: int | None = None, shuffle_val: bool = False, pin_memory: bool = False,
                 drop_last: bool = True, seed: int = 0, eval_batch_size: int | None = None):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size or batch_size
        self.configs = {k: v for k, v in zip(SPLITS, (train, validation, test), strict=True) if v is not None}
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

    def _loader(self, split: str, shuffle: bool, batch_size: int, drop_last: bool) -> DataLoader:
        self.dataset(split)
        g = torch.Generator().manual_seed(self.seed)
        return DataLoader(self.datasets[split], batch_size=batch_size, shuffle=shuffle, drop_last=drop_last,
                          num_workers=self.num_workers, pin_memory=self.pin_memory, generator=g,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        if "train" not in self.configs:
            raise ValueError("data.params.train is not configured; training needs a train split")
        return self._loader("train", True, self.batch_size, self.drop_last)

    def val_dataloader(self) -> DataLoader:
        return self._loader("validation", self.shuffle_val, self.eval_batch_size, False)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", False, self.eval_batch_size, False)

"""A tiny model and data module for testing the training entrypoint without a real network."""

from __future__ import annotations

import time

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset


class ToyImages(Dataset):
    def __init__(self, n: int = 64, size: int = 8):
        g = torch.Generator().manual_seed(0)
        self.x = torch.rand(n, 1, size, size, generator=g) * 2 - 1

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"image": self.x[i], "class_label": i % 10}


class ToyData(pl.LightningDataModule):
    def __init__(self, batch_size: int = 8, n: int = 64):
        super().__init__()
        self.batch_size, self.n = batch_size, n

    def train_dataloader(self):
        return DataLoader(ToyImages(self.n), batch_size=self.batch_size, shuffle=True)

    def val_dataloader(self):
        return DataLoader(ToyImages(16), batch_size=self.batch_size)

    def test_dataloader(self):
        return DataLoader(ToyImages(16), batch_size=self.batch_size)


class ToyAutoencoder(pl.LightningModule):
    """Linear autoencoder; `fail_at_step` raises inside training to exercise emergency checkpoints."""

    def __init__(self, size: int = 8, fail_at_step: int | None = None, monitor: str | None = "val/loss",
                 step_seconds: float = 0.0):
        super().__init__()
        self.step_seconds = step_seconds
        self.net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(size * size, size * size))
        self.size, self.fail_at_step, self.monitor = size, fail_at_step, monitor
        self.learning_rate = 1e-3

    def forward(self, x):
        return self.net(x).view_as(x)

    def training_step(self, batch, batch_idx):
        if self.fail_at_step is not None and self.global_step == self.fail_at_step:
            raise RuntimeError("injected failure")
        if self.step_seconds:
            time.sleep(self.step_seconds)
        loss = torch.mean((self(batch["image"]) - batch["image"]) ** 2)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        self.log("val/loss", torch.mean((self(batch["image"]) - batch["image"]) ** 2))

    def test_step(self, batch, batch_idx):
        self.log("test/loss", torch.mean((self(batch["image"]) - batch["image"]) ** 2))

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=self.learning_rate)

    def log_images(self, batch, N=8, **kwargs):
        x = batch["image"][:N]
        return {"inputs": x, "reconstructions": self(x).clamp(-1, 1)}


def build_from_config(path, **overrides):
    """The model of a config file, with dotted `key=value` overrides, built under seed 0."""
    import torch
    from omegaconf import OmegaConf

    from ldm.util import instantiate_from_config

    cfg = OmegaConf.load(path)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model, key="model")


def import_k_diffusion(module: str, monkeypatch=None):
    """k-diffusion's `sampling`, `external` or `layers` module without running its package `__init__`, which
    imports its training stack (and, through dctorch, pins numpy < 2); it is installed without its dependencies
    (`make setup`). `layers` imports dctorch for its DCT loss weighting, which the tests do not use: with
    `monkeypatch`, a stand-in module takes its place."""
    import importlib
    import importlib.util
    import sys
    import types

    import pytest

    if "k_diffusion" not in sys.modules:
        spec = importlib.util.find_spec("k_diffusion")
        if spec is None:
            pytest.skip("k-diffusion is not installed")
        package = types.ModuleType("k_diffusion")
        package.__path__ = list(spec.submodule_search_locations)
        sys.modules["k_diffusion"] = package
    if monkeypatch is not None and "dctorch" not in sys.modules and importlib.util.find_spec("dctorch") is None:
        stub = types.ModuleType("dctorch")
        stub.functional = types.ModuleType("dctorch.functional")
        monkeypatch.setitem(sys.modules, "dctorch", stub)
    return importlib.import_module(f"k_diffusion.{module}")

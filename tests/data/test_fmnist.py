from __future__ import annotations

import pytest
import torch

from ldm.data.datamodule import DataModuleFromConfig
from ldm.data.fmnist import FashionMNIST, locate
from ldm.util import ConfigError, instantiate_from_config


def fmnist_available() -> bool:
    try:
        locate(None, download=False)
        return True
    except FileNotFoundError:
        return False


needs_data = pytest.mark.skipif(not fmnist_available(), reason="Fashion-MNIST is not installed (make data)")


@needs_data
def test_splits_shapes_and_labels():
    train, val, test = (FashionMNIST(s) for s in ("train", "validation", "test"))
    assert (len(train), len(val), len(test)) == (55000, 5000, 10000)
    item = test[0]
    assert item["image"].shape == (1, 32, 32) and item["image"].dtype == torch.float32
    assert item["image"].min() == -1.0 and item["image"].max() <= 1.0
    assert item["class_label"] == 9  # the first test image is an ankle boot
    assert torch.all(item["image"][:, :2] == -1.0)  # padding is background
    assert FashionMNIST("test", size=32, resize_mode="resize")[0]["image"].shape == (1, 32, 32)
    assert torch.equal(FashionMNIST("test", limit=3)[2]["image"], test[2]["image"])
    assert set(int(c) for c in val.labels) == set(range(10))


def test_missing_root_is_clear(tmp_path, monkeypatch):
    monkeypatch.setattr("ldm.data.fmnist.DEBIAN_ROOT", str(tmp_path / "none"))
    monkeypatch.setattr("ldm.data.fmnist.CACHE_ROOT", tmp_path / "cache")
    monkeypatch.delenv("FMNIST_ROOT", raising=False)
    with pytest.raises(FileNotFoundError, match="apt-get install dataset-fashion-mnist"):
        FashionMNIST("test", root=str(tmp_path), download=False)


@needs_data
def test_datamodule_from_config():
    cfg = {"target": "ldm.data.fmnist.FashionMNIST", "params": {"split": "test", "limit": 20}}
    dm = DataModuleFromConfig(batch_size=8, train=cfg, validation=cfg, num_workers=0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["image"].shape == (8, 1, 32, 32) and batch["class_label"].shape == (8,)
    assert len(dm.val_dataloader()) == 3 and not dm.has_test and dm.test_dataloader is None


def test_datamodule_bad_param_names_key():
    """The splits are built lazily, in setup, but checked at construction: before a run folder exists."""
    bad = {"target": "ldm.data.fmnist.FashionMNIST", "params": {"splt": "test"}}
    with pytest.raises(ConfigError, match=r"^train.params: .*does not accept 'splt' \(did you mean 'split'\?\)"):
        DataModuleFromConfig(batch_size=8, train=bad, num_workers=0)
    with pytest.raises(ConfigError, match=r"^data.params.test.params.size: expected an integer >= 1, got -32 \(int\)"):
        instantiate_from_config({"target": "ldm.data.datamodule.DataModuleFromConfig", "params": {
            "batch_size": 8, "test": {**bad, "params": {"size": -32}}}}, key="data")


def test_fitting_never_opens_the_test_split():
    good = {"target": "ldm.data.cache.LatentCache", "params": {"root": "/nonexistent/train"}}
    missing = {"target": "ldm.data.cache.LatentCache", "params": {"root": "/nonexistent/test"}}
    dm = DataModuleFromConfig(batch_size=8, train=good, test=missing, num_workers=0)
    dm.datasets["train"] = list(range(4))  # built already
    dm.setup("fit")
    with pytest.raises(FileNotFoundError, match="no latent cache at /nonexistent/test"):
        dm.setup("test")

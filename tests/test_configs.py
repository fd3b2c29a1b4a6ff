"""Every config in configs/ builds: its model (weights skipped) and the classes its data section names."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import _without_ckpt_paths
from ldm.repro.spec import load_spec
from ldm.train import load_config
from ldm.util import check_params, get_obj_from_str, instantiate_from_config

REPO = Path(__file__).resolve().parents[1]
CONFIGS = sorted((REPO / "configs").rglob("*.yaml"))


def no_perceptual(node):
    """LPIPS needs VGG weights that tests cannot download."""
    if isinstance(node, dict):
        node = {k: no_perceptual(v) for k, v in node.items()}
        if str(node.get("target", "")).endswith("WithDiscriminator"):
            node["params"] = {**(node.get("params") or {}), "perceptual_weight": 0.0}
    return node


def check_node(node, key):
    cls = get_obj_from_str(node["target"], key=f"{key}.target")
    params = {k: v for k, v in (node.get("params") or {}).items()}
    check_params(cls, params, key)
    for k, v in params.items():
        if isinstance(v, dict) and "target" in v:
            check_node(v, f"{key}.params.{k}")


def check_config_builds(cfg):
    """Build the model on the meta device, check every class the data and callbacks name, build the Trainer.
    A sampling config (only `model`, assembling trained checkpoints) names a class built from one."""
    if set(cfg) == {"model"}:
        assert hasattr(get_obj_from_str(cfg["model"]["target"]), "from_sampling_config")
        return
    assert set(cfg) <= {"model", "data", "lightning"} and {"model", "data", "lightning"} <= set(cfg)
    with torch.device("meta"):
        model = instantiate_from_config(no_perceptual(_without_ckpt_paths(cfg["model"])), key="model")
    assert type(model) is get_obj_from_str(cfg["model"]["target"])
    assert sum(p.numel() for p in model.parameters()) > 0
    check_node(cfg["data"], "data")
    for name, cb in (cfg["lightning"].get("callbacks") or {}).items():
        check_node(cb, f"lightning.callbacks.{name}")
    trainer = {k: v for k, v in (cfg["lightning"].get("trainer") or {}).items()
               if k not in ("accelerator", "devices", "gpus", "strategy", "num_nodes")}
    built = pl.Trainer(**{**trainer, "accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False})
    assert built.max_steps == trainer.get("max_steps", -1)


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: str(p.relative_to(p.parents[1])))
def test_config_builds(path, monkeypatch):
    for var in ("OPENIMAGES_TRAIN", "OPENIMAGES_VAL", "FFHQ_ROOT", "FFHQ_TRAIN_LIST", "FIRST_STAGE_CKPT"):
        monkeypatch.delenv(var, raising=False)
    cfg = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    if "priors" in cfg:  # a reproduction (scripts/reproduce.py): its own schema, checked by its loader
        assert load_spec(path).priors
        return
    check_config_builds(cfg)


@pytest.mark.parametrize("prior", ["absorbing", "sundae"])
def test_demo_prior_overrides_build(prior):
    """`make demo` shrinks the prior config by dotted overrides; a misplaced key would only fail at its end."""
    spec = importlib.util.spec_from_file_location("demo", REPO / "scripts" / "demo.py")
    demo = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(demo)
    path = str(REPO / f"configs/{prior}/fmnist.yaml")
    config = load_config([path], demo.prior_overrides(path))
    check_config_builds(OmegaConf.to_container(config, resolve=True))
    if prior == "absorbing":
        assert demo.prior_overrides(path) == demo.PRIOR_OVERRIDES

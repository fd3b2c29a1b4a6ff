"""The paper's configs (LSUN churches, bedrooms, FFHQ) build with the paper's shapes and sizes."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from absorbing.unleashing import convert_sampler_state_dict, paper_parameter_count
from ldm.checkpoint import _without_ckpt_paths
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "absorbing"


@pytest.mark.parametrize("name", ["churches", "bedrooms", "ffhq"])
def test_paper_config(name):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=True)
    cfg["model"]["params"]["first_stage_config"]["params"]["lossconfig"]["params"]["perceptual_weight"] = 0.0
    with torch.device("meta"):
        prior = instantiate_from_config(_without_ckpt_paths(cfg["model"]), key="model")
    assert prior.latent_shape == (16, 16) and prior.process.num_timesteps == 256
    assert prior.process.loss_type == "reweighted_elbo" and prior.process.mask_schedule == "random"
    count = sum(p.numel() for p in prior.model.parameters())
    assert count == paper_parameter_count(1024, 256, 512, 24)
    assert cfg["data"]["params"]["batch_size"] == 20
    assert cfg["model"]["base_learning_rate"] == (1e-4 if name == "ffhq" else 2e-4)


def test_original_sampler_checkpoint_keys_convert(tmp_path):
    import json

    from tests.fixture_paths import fixture_dir

    root = fixture_dir("unleashing-transformers", "absorbing_transformer")
    layout = json.loads((root / "config.json").read_text())["sampler_state_dict_layout"]
    state = {k: torch.zeros(shape) for k, shape, _ in layout}
    converted = convert_sampler_state_dict(state)
    assert "process.Lt_history" in converted and "model.tok_emb.weight" in converted
    assert len(converted) == len(state)

"""The paper's configs (FFHQ-256, FFHQ-1024) build on the meta device with the original repository's shapes,
schedules and parameter counts; the Fashion-MNIST config uses the absorbing prior's first stage and cache."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import _without_ckpt_paths
from ldm.util import instantiate_from_config
from sundae.hourglass import original_parameter_count

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

# (config, tokens (h, w), codes, dim, depth, unroll steps, sampling defaults, batch, lr, count by the formula)
PAPER = {
    "ffhq256": ((16, 16), 1024, 1024, [2, 10, 2], 2,
                dict(steps=100, temperature=0.8, end_temperature=None, proportion=0.5, end_proportion=None), 64, 3e-5,
                178_430_032),
    "ffhq1024": ((32, 32), 8192, 1024, [2, 12, 2], 3,
                 dict(steps=50, temperature=1.0, end_temperature=0.7, proportion=0.5, end_proportion=None), 10, 5e-6,
                 214_109_264),
}


def build_on_meta(name: str):
    cfg = OmegaConf.to_container(OmegaConf.load(CONFIGS / "sundae" / f"{name}.yaml"), resolve=True)
    with torch.device("meta"):
        prior = instantiate_from_config(_without_ckpt_paths(cfg["model"]), key="model")
    return prior, cfg


@pytest.mark.parametrize("name", list(PAPER))
def test_paper_config(name, monkeypatch):
    monkeypatch.delenv("FIRST_STAGE_CKPT", raising=False)
    grid, codes, dim, depth, unroll, sampling, batch, lr, expected = PAPER[name]
    prior, cfg = build_on_meta(name)
    net = prior.model
    assert prior.latent_shape == grid and prior.codebook_size == codes and prior.num_classes is None
    assert prior.process.unroll_steps == unroll
    assert {k: prior.sample_defaults[k] for k in sampling} == sampling and prior.sample_defaults["min_steps"] == 10
    assert net.grids == [grid, (grid[0] // 2, grid[1] // 2)] and net.patches == [(2, 2)]
    assert net.rotary_mode == "original" and net.body.resample_groups == "raster"
    assert cfg["data"]["params"]["batch_size"] == batch and cfg["model"]["base_learning_rate"] == lr
    # the original counts every nn.Parameter, its frozen rotary frequencies (16 per stack, 5 stacks) included;
    # here they are buffers, and the two resampling stacks' (never used) are not kept
    formula = original_parameter_count(codes, grid[0] * grid[1], dim, depth, heads=8, dim_head=64, shorten_factor=4)
    ours = sum(p.numel() for p in net.parameters())
    buffers = sum(b.numel() for b in net.buffers())
    print(f"{name}: {ours:,} parameters (+{buffers} rotary frequencies); the original's count {formula:,}")
    assert formula == expected
    assert ours + buffers + 2 * 16 == formula


def test_fmnist_config_shares_the_absorbing_first_stage_and_cache():
    ours = OmegaConf.load(CONFIGS / "sundae" / "fmnist.yaml")
    theirs = OmegaConf.load(CONFIGS / "absorbing" / "fmnist.yaml")
    assert ours.model.params.first_stage_config == theirs.model.params.first_stage_config
    assert ours.model.params.first_stage_config.params.ckpt_path == "data/fmnist_vq.safetensors"
    assert ours.data == theirs.data
    assert ours.model.params.num_classes == 10 and ours.model.params.cond_drop_prob > 0
    prior, _ = build_on_meta("fmnist")
    assert prior.latent_shape == (8, 8) and prior.model.grids == [(8, 8), (4, 4)]
    assert 2e6 < sum(p.numel() for p in prior.model.parameters()) < 2.4e6

"""The Fashion-MNIST first stages the project ships (`data/fmnist_vq.safetensors`, `data/fmnist_kl.safetensors`,
each with its config): every Fashion-MNIST prior config trains on one of them, so they must load through the
public reader and reconstruct the test split as well as when they were trained (README, Measured)."""

from __future__ import annotations

from pathlib import Path

import pytest
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_from_checkpoint
from ldm.data.fmnist import FashionMNIST
from ldm.metrics.first_stage_eval import evaluate_first_stage
from tests.data.test_fmnist import needs_data

DATA = Path(__file__).resolve().parents[2] / "data"
CONFIGS = Path(__file__).resolve().parents[2] / "configs"


@needs_data
@pytest.mark.parametrize("name,min_psnr", [("fmnist_vq", 25.0), ("fmnist_kl", 27.5)])
def test_shipped_first_stage_reconstructs_the_test_split(name, min_psnr):
    model, config = instantiate_from_checkpoint(DATA / f"{name}.safetensors")
    assert config["model"] == OmegaConf.to_container(OmegaConf.load(CONFIGS / "first_stage" / f"{name}.yaml").model,
                                                      resolve=True)
    scores = evaluate_first_stage(model, FashionMNIST(split="test", size=32), limit=512, progress=False)
    assert scores["psnr"] > min_psnr
    if name == "fmnist_vq":
        assert scores["codebook_usage"] > 0.95  # nearly every code in use on 512 images


@pytest.mark.parametrize("prior,first_stage", [("absorbing/fmnist.yaml", "fmnist_vq"), ("sundae/fmnist.yaml", "fmnist_vq"),
                                               ("imagebart/fmnist.yaml", "fmnist_vq"), ("ldm/fmnist.yaml", "fmnist_kl"),
                                               ("ldm/fmnist_text.yaml", "fmnist_kl")])
def test_fashion_mnist_priors_name_the_shipped_first_stage(prior, first_stage):
    path = OmegaConf.load(CONFIGS / prior).model.params.first_stage_config.params.ckpt_path
    assert path == f"data/{first_stage}.safetensors"
    assert (DATA.parent / path).exists() and (DATA.parent / path).with_suffix(".yaml").exists()

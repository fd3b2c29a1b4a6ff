"""The Fashion-MNIST first stage the project ships (`data/fmnist_vq.safetensors` with its config): every discrete
Fashion-MNIST prior config trains on it, so they must load through the public reader and reconstruct the test
split as well as when they were trained (README, Measured)."""

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
@pytest.mark.parametrize("name,min_psnr", [("fmnist_vq", 25.0)])
def test_shipped_first_stage_reconstructs_the_test_split(name, min_psnr):
    model, config = instantiate_from_checkpoint(DATA / f"{name}.safetensors")
    assert config["model"] == OmegaConf.to_container(OmegaConf.load(CONFIGS / "first_stage" / f"{name}.yaml").model,
                                                      resolve=True)
    scores = evaluate_first_stage(model, FashionMNIST(split="test", size=32), limit=512, progress=False)
    assert scores["psnr"] > min_psnr
    if name == "fmnist_vq":
        assert scores["codebook_usage"] > 0.95  # nearly every code in use on 512 images


@pytest.mark.parametrize("prior", ["absorbing/fmnist.yaml", "sundae/fmnist.yaml", "imagebart/fmnist.yaml"])
def test_discrete_fashion_mnist_priors_name_the_shipped_first_stage(prior):
    path = OmegaConf.load(CONFIGS / prior).model.params.first_stage_config.params.ckpt_path
    assert path == "data/fmnist_vq.safetensors"
    assert (DATA.parent / path).exists() and (DATA.parent / path).with_suffix(".yaml").exists()

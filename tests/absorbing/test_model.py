"""The absorbing prior end to end: training through main.py, big samples, and the errors bad inputs get."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_from_checkpoint, read_checkpoint
from ldm.data.cache import LatentCache, build_cache
from ldm.train import main
from ldm.util import instantiate_from_config
from tests.data.test_fmnist import needs_data

CFG = Path(__file__).resolve().parents[2] / "configs" / "test" / "absorbing.yaml"


def build(**overrides):
    cfg = OmegaConf.load(CFG)
    for k, v in overrides.items():
        OmegaConf.update(cfg, k, v)
    torch.manual_seed(0)
    return instantiate_from_config(cfg.model, key="model")


@needs_data
def test_train_with_main_then_sample_from_checkpoint(tmp_path):
    main(["--base", str(CFG), "-t", "--no-test", "-l", str(tmp_path), "-n", "absorbing"])
    ckpt = glob.glob(str(tmp_path / "*_absorbing" / "checkpoints" / "last.ckpt"))[0]
    assert read_checkpoint(ckpt)["global_step"] == 4
    assert glob.glob(str(tmp_path / "*_absorbing" / "images" / "train" / "samples_*.png"))
    model, _ = instantiate_from_checkpoint(ckpt)
    images = model.sample(2, cond=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16)
    repo = CFG.parents[2]
    subprocess.run([sys.executable, "scripts/sample.py", "-r", ckpt, "--per-class", "1", "steps=2",
                    "--out", str(tmp_path / "grid.png")], cwd=repo, check=True, capture_output=True)
    assert (tmp_path / "grid.png").exists()
    bench = subprocess.run([sys.executable, "scripts/benchmark.py", "-r", ckpt, "--batch", "4", "--steps", "2",
                            "--repeats", "1"], cwd=repo, check=True, capture_output=True, text=True).stdout
    assert json.loads(bench[bench.index("{"):])["step_over_forward"] > 0
    subprocess.run([sys.executable, "scripts/evaluate.py", "-r", ckpt, "-n", "0", "--elbo-split", "validation",
                    "--elbo-limit", "8", "--elbo-strata", "2", "--bf16", "--out", str(tmp_path / "eval")],  # gets its .json suffix
                   cwd=repo, check=True, capture_output=True)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["elbo_items"] == 8 and result["elbo_strata"] == 2 and 0 < result["elbo_bits_per_dim"] < 50


def test_larger_than_training_samples():
    model = build().eval()
    images = model.sample(1, cond=[2], shape=(12, 10), steps=4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 1, 24, 20)  # f = 2 in the tiny first stage
    raster = model.sample_latents(1, model.user_cond([2], 1), torch.Generator().manual_seed(0), shape=(9, 9),
                                  order="raster", steps=81)
    assert raster.shape == (1, 9, 9)
    with pytest.raises(ValueError, match="at least the training shape"):
        model.sample(1, cond=[2], shape=(4, 4))


def test_codebook_mismatch_is_clear():
    with pytest.raises(ValueError, match="first stage has a codebook of 16 codes but the prior is configured for "
                                         "codebook_size=32"):
        build(**{"model.params.codebook_size": 32})


def test_cache_from_another_first_stage_is_refused(tmp_path):
    model = build()
    fp = model.first_stage_fingerprint()
    other = {**fp, "n_embed": 512}
    images = [{"image": torch.zeros(1, 16, 16), "class_label": 0}] * 2

    class Wrapped(torch.utils.data.Dataset):
        def __len__(self):
            return 2

        def __getitem__(self, i):
            return images[i]

    build_cache(model.first_stage_model, Wrapped(), tmp_path, other, progress=False)
    cache = LatentCache(str(tmp_path))
    with pytest.raises(ValueError, match="built with another first stage"):
        cache.check_compatible(fp)


def test_unconditional_prior_refuses_labels():
    model = build(**{"model.params.num_classes": None}).eval()
    with pytest.raises(ValueError, match="is unconditional"):
        model.sample(1, cond=[1])
    with pytest.raises(ValueError, match=r"cond must be a class label or one per sample, in 0..9"):
        build().eval().sample(2, cond=[1, 12])

"""The absorbing prior end to end: training through main.py, big samples, and the errors bad inputs get."""

from __future__ import annotations

import glob
import json
import math
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import instantiate_from_checkpoint, read_checkpoint
from ldm.data.cache import LatentCache, build_cache
from ldm.metrics.prior_eval import elbo_bits
from ldm.train import main
from ldm.util import instantiate_from_config
from tests.data.test_fmnist import needs_data
from tests.toy import build_from_config

CFG = Path(__file__).resolve().parents[2] / "configs" / "test" / "absorbing.yaml"


def build(**overrides):
    return build_from_config(CFG, **overrides)


def train(logroot: Path) -> str:
    main(["--base", str(CFG), "-t", "--no-test", "-l", str(logroot), "-n", "absorbing"])
    return glob.glob(str(logroot / "*_absorbing" / "checkpoints" / "last.ckpt"))[0]


@needs_data
def test_train_with_main_then_sample_from_checkpoint(tmp_path):
    """The entrypoint itself, kept in `make test`: a few steps, then sampling from the checkpoint alone."""
    ckpt = train(tmp_path)
    assert read_checkpoint(ckpt)["global_step"] == 4
    assert glob.glob(str(tmp_path / "*_absorbing" / "images" / "train" / "samples_*.png"))
    model, _ = instantiate_from_checkpoint(ckpt)
    images = model.sample(2, cond=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert images.shape == (2, 1, 16, 16)
    again = model.sample(2, cond=3, steps=2, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)


@needs_data
@pytest.mark.slow
def test_scripts_read_the_checkpoint(tmp_path):
    """sample.py, benchmark.py and evaluate.py on the checkpoint main.py wrote (each a fresh process)."""
    ckpt = train(tmp_path)
    repo = CFG.parents[2]
    subprocess.run([sys.executable, "scripts/sample.py", "-r", ckpt, "--per-class", "1", "steps=2",
                    "--out", str(tmp_path / "grid.png")], cwd=repo, check=True, capture_output=True)
    assert (tmp_path / "grid.png").exists()
    bench = subprocess.run([sys.executable, "scripts/benchmark.py", "-r", ckpt, "--batch", "4", "--steps", "4",
                            "--repeats", "1"], cwd=repo, check=True, capture_output=True, text=True).stdout
    bench = json.loads(bench[bench.index("{"):])
    assert (bench["batch"], bench["steps"]) == (4, 4) and bench["forward_s"] > 0 and bench["step_s"] > 0
    low, high = bench["step_over_forward_quartiles"]  # the median of the per-step ratios
    assert low <= bench["step_over_forward"] <= high
    subprocess.run([sys.executable, "scripts/evaluate.py", "-r", ckpt, "-n", "0", "--elbo-split", "validation",
                    "--elbo-limit", "8", "--elbo-strata", "2", "--bf16", "--out", str(tmp_path / "eval")],  # gets its .json suffix
                   cwd=repo, check=True, capture_output=True)
    result = json.loads((tmp_path / "eval.json").read_text())
    assert result["elbo_items"] == 8 and result["elbo_strata"] == 2
    # the reported ELBO is this checkpoint's on the first 8 validation items, with the script's seeds
    model, config = instantiate_from_checkpoint(ckpt)
    val = instantiate_from_config(config["data"]["params"]["validation"], key="data.params.validation")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        expected = elbo_bits(model, val, limit=8, seed=0, progress=False, strata=2)
    assert result["elbo_bits_per_dim"] == pytest.approx(expected, rel=1e-3)


def test_overfits_a_batch_below_uniform_bits():
    """Uniform guessing costs log2(16) = 4 bits per token; a prior trained on one batch must do far better.

    Each token map repeats one code, so any unmasked token gives the rest away: the ELBO of a fitted
    model is about 3 bits (which of 8 codes) spread over 64 tokens and T = 16 steps, near 0.2 bits
    (150 steps reach about 0.4; trained on the unmasked tokens instead, it stays above 1.5).
    """
    model = build(**{"model.params.use_ema": False})  # the trained weights are the ones scored
    h, w = model.latent_shape[-2:]
    x0 = torch.arange(8).view(8, 1, 1).expand(8, h, w).contiguous()  # (8, h, w) long
    cond = {"class_label": torch.zeros(8, dtype=torch.long)}  # one class for all: the label tells nothing
    uniform = math.log2(model.process.codebook_size)
    with torch.no_grad():
        before = float(model.eval().nll_latents(x0, cond, generator=torch.Generator().manual_seed(0)).mean())
    assert before > uniform - 0.5  # an untrained network does no better than about uniform
    opt = torch.optim.Adam(model.model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss, _ = model.compute_loss(x0, cond)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(model.eval().nll_latents(x0, cond, generator=torch.Generator().manual_seed(0)).mean())
    assert after < uniform - 3.0, (before, after)


def test_larger_than_training_samples():
    model = build().eval()
    images = model.sample(1, cond=[2], shape=(12, 10), steps=4, generator=torch.Generator().manual_seed(0))
    assert images.shape == (1, 1, 24, 20)  # f = 2 in the tiny first stage
    raster = model.sample_latents(1, model.user_cond([2], 1), torch.Generator().manual_seed(0), shape=(9, 9),
                                  order="raster", steps=81)
    assert raster.shape == (1, 9, 9)
    with pytest.raises(ValueError, match=re.escape("shape must be an integer or 2 integers >= (8, 8) or None, got (4, 4)")):
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

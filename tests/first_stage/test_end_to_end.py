"""`main.py` trains each first stage for a few steps on Fashion-MNIST; the scripts read its checkpoint."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest

from ldm.checkpoint import instantiate_from_checkpoint, read_checkpoint
from ldm.data.cache import LatentCache
from ldm.train import main
from tests.data.test_fmnist import needs_data

REPO = Path(__file__).resolve().parents[2]


@needs_data
@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_train_eval_cache(kind, tmp_path):
    logroot = tmp_path / "logs"
    main(["--base", str(REPO / f"configs/test/first_stage_{kind}.yaml"), "-t", "-l", str(logroot), "-n", kind])
    ckpt = glob.glob(str(logroot / f"*_{kind}" / "checkpoints" / "last.ckpt"))[0]
    saved = read_checkpoint(ckpt)
    assert saved["global_step"] == 4
    assert glob.glob(str(logroot / f"*_{kind}" / "images" / "train" / "reconstructions_*.png"))
    model, config = instantiate_from_checkpoint(ckpt)
    assert model.latent_kind == ("tokens" if kind == "vq" else "continuous")

    out = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "scripts/eval_first_stage.py", "-r", ckpt, "--limit", "16", "--out", str(out),
                    "--classifier", ""], cwd=REPO, check=True, capture_output=True)
    metrics = json.loads(out.read_text())
    assert metrics["images"] == 16 and metrics["psnr"] > 0
    assert ("codebook_usage" in metrics) == (kind == "vq")

    subprocess.run([sys.executable, "scripts/cache_latents.py", "-r", ckpt, "--split", "test", "--out",
                    str(tmp_path / "cache")], cwd=REPO, check=True, capture_output=True)
    cache = LatentCache(str(tmp_path / "cache"))
    key = "tokens" if kind == "vq" else "posterior_mean"
    assert len(cache) == 16 and cache[0][key].shape[-2:] == (16, 16)

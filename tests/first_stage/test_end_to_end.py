"""`main.py` trains each first stage for a few steps on Fashion-MNIST; the scripts read its checkpoint."""

from __future__ import annotations

import glob
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ldm.checkpoint import instantiate_from_checkpoint, read_checkpoint
from ldm.data.cache import LatentCache
from ldm.metrics.first_stage_eval import codebook_stats
from ldm.metrics.image import psnr, ssim
from ldm.train import main
from ldm.util import instantiate_from_config
from tests.data.test_fmnist import needs_data

REPO = Path(__file__).resolve().parents[2]


def train(kind: str, logroot: Path) -> str:
    main(["--base", str(REPO / f"configs/test/first_stage_{kind}.yaml"), "-t", "-l", str(logroot), "-n", kind])
    return glob.glob(str(logroot / f"*_{kind}" / "checkpoints" / "last.ckpt"))[0]


@needs_data
@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_train_with_main(kind, tmp_path):
    """The entrypoint itself, kept in `make test` (about 4 s each): a few steps, then the checkpoint
    rebuilds the model."""
    logroot = tmp_path / "logs"
    ckpt = train(kind, logroot)
    saved = read_checkpoint(ckpt)
    assert saved["global_step"] == 4
    assert glob.glob(str(logroot / f"*_{kind}" / "images" / "train" / "reconstructions_*.png"))
    model, config = instantiate_from_checkpoint(ckpt)
    assert model.latent_kind == ("tokens" if kind == "vq" else "continuous")
    assert torch.equal(model.state_dict()["decoder.conv_out.weight"], saved["state_dict"]["decoder.conv_out.weight"])


@needs_data
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_train_eval_cache(kind, tmp_path):
    """The scripts read the checkpoint main.py wrote (each a fresh Python process)."""
    ckpt = train(kind, tmp_path / "logs")
    model, config = instantiate_from_checkpoint(ckpt)

    out = tmp_path / "metrics.json"
    subprocess.run([sys.executable, "scripts/eval_first_stage.py", "-r", ckpt, "--limit", "16", "--out", str(out),
                    "--classifier", ""], cwd=REPO, check=True, capture_output=True)
    metrics = json.loads(out.read_text())
    # the script's numbers are those of this checkpoint on the first 16 test images, recomputed here
    test = instantiate_from_config(config["data"]["params"]["test"], key="data.params.test")
    x = torch.stack([test[i]["image"] for i in range(16)])
    with torch.no_grad():
        latent = model.encode_to_latent(x)
        rec = model.decode_latent(latent).clamp(-1, 1)
    assert metrics["images"] == 16
    assert metrics["psnr"] == pytest.approx(float(psnr(rec, x).mean()), rel=1e-4)
    assert metrics["ssim"] == pytest.approx(float(ssim(rec, x).mean()), rel=1e-4, abs=1e-5)
    assert ("codebook_usage" in metrics) == (kind == "vq")
    if kind == "vq":
        assert metrics["codebook_usage"] == codebook_stats(latent, model.n_embed)["codebook_usage"]

    subprocess.run([sys.executable, "scripts/cache_latents.py", "-r", ckpt, "--split", "test", "--out",
                    str(tmp_path / "cache")], cwd=REPO, check=True, capture_output=True)
    cache = LatentCache(str(tmp_path / "cache"))
    key = "tokens" if kind == "vq" else "posterior_mean"
    assert len(cache) == 16 and cache[0][key].shape[-2:] == (16, 16)

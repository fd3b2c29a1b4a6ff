"""The `make demo` job: train the Fashion-MNIST VQGAN on the CPU and write a reconstruction grid.

Runs the real entrypoint (`main.py`) on `configs/first_stage/fmnist_vq.yaml` for a bounded number
of steps, then reconstructs test images and reports PSNR, SSIM, codebook usage and, when the
project's classifier is present, rFD_fmnist.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def train(config: str, steps: int, logroot: str, name: str) -> str:
    cmd = [sys.executable, str(REPO / "main.py"), "--base", config, "-t", "--no-test", "-l", logroot, "-n", name,
           "--max_steps", str(steps)]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    runs = sorted(glob.glob(os.path.join(logroot, f"*_{name}")))
    return os.path.join(runs[-1], "checkpoints", "last.ckpt")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", default=str(REPO / "configs/first_stage/fmnist_vq.yaml"))
    p.add_argument("--steps", type=int, default=600, help="training steps of the first stage")
    p.add_argument("--logdir", default=str(REPO / "logs"))
    p.add_argument("--out", default=str(REPO / "outputs/demo"))
    p.add_argument("--eval-limit", type=int, default=2000, help="test images to evaluate")
    args = p.parse_args()

    import torch
    import torchvision

    from ldm.checkpoint import instantiate_from_checkpoint
    from ldm.data.fmnist import FashionMNIST
    from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier
    from ldm.metrics.first_stage_eval import evaluate_first_stage

    t0 = time.time()
    ckpt = train(args.config, args.steps, args.logdir, "demo_vq")
    train_s = time.time() - t0
    model, _ = instantiate_from_checkpoint(ckpt)

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    test = FashionMNIST(split="test", size=32)
    x = torch.stack([test[i]["image"] for i in range(32)])  # (32, 1, 32, 32)
    with torch.no_grad():
        rec = model.decode_latent(model.encode_to_latent(x)).clamp(-1, 1)
    grid = torchvision.utils.make_grid(torch.cat([x, rec]), nrow=16)
    torchvision.utils.save_image((grid + 1) / 2, out / "reconstructions.png")

    classifier = load_classifier(DEFAULT_CLASSIFIER_PATH) if Path(DEFAULT_CLASSIFIER_PATH).exists() else None
    metrics = evaluate_first_stage(model, test, classifier=classifier, batch_size=256, limit=args.eval_limit)
    metrics.update(train_seconds=round(train_s, 1), steps=args.steps, checkpoint=ckpt)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"Wrote {out / 'reconstructions.png'} (top: test images, bottom: reconstructions)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `make demo` job: on the CPU, train the Fashion-MNIST VQGAN, cache its tokens, train a small
class-conditional absorbing-diffusion prior on them (or SUNDAE: --prior-config configs/sundae/fmnist.yaml), and write a reconstruction grid, a sample grid
(one row per class) and the metrics of both stages.

Every stage runs the real tools (`main.py`, the latent cache, the prior's sampler) with the paper-scale
configs shrunk by command-line overrides, so the demo exercises what a full run uses.
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

# The demo's prior: a Fashion-MNIST prior config with a smaller network and a bounded run. The network's
# overrides depend on the prior (`--prior-config`, by its model.target); the run's are shared.
RUN_OVERRIDES = [
    "model.base_learning_rate=1e-3",
    "model.params.warmup_steps=200",
    "model.params.ema_decay=0.995",
    "lightning.trainer.max_time=null",
    "lightning.trainer.val_check_interval=500",
    "lightning.callbacks.image_logger.params.batch_frequency=1000",
]
NETWORK_OVERRIDES = {
    "absorbing.model.AbsorbingPrior": [
        "model.params.denoiser_config.params.dim=128",
        "model.params.denoiser_config.params.depth=4",
        "model.params.denoiser_config.params.heads=4",
        "model.params.denoiser_config.params.dropout=0.0",
    ],
    "sundae.model.SundaePrior": [  # two forwards per step (unrolled): a narrower, shallower hourglass
        "model.params.network_config.params.dim=96",
        "model.params.network_config.params.depth=[1,[2],1]",
        "model.params.network_config.params.heads=4",
        "model.params.network_config.params.dim_head=24",
    ],
}
PRIOR_OVERRIDES = NETWORK_OVERRIDES["absorbing.model.AbsorbingPrior"] + RUN_OVERRIDES  # the default prior's


def prior_overrides(config_path: str) -> list[str]:
    """The demo's overrides for the prior config at `config_path` (its model.target picks the network's)."""
    from omegaconf import OmegaConf

    target = OmegaConf.load(config_path).model.target
    if target not in NETWORK_OVERRIDES:
        raise SystemExit(f"--prior-config: the demo knows how to shrink {', '.join(NETWORK_OVERRIDES)}, not {target}")
    return NETWORK_OVERRIDES[target] + RUN_OVERRIDES


def train(configs: list[str], steps: int, logroot: str, name: str, overrides: list[str] = ()) -> str:
    """Run `main.py` for `steps` steps and return the run's last checkpoint."""
    cmd = [sys.executable, str(REPO / "main.py"), "--base", *configs, "-t", "--no-test", "-l", logroot, "-n", name,
           "--max_steps", str(steps), *overrides]
    print("$", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=REPO)
    runs = sorted(glob.glob(os.path.join(logroot, f"*_{name}")))
    return os.path.join(runs[-1], "checkpoints", "last.ckpt")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=str(REPO / "configs/first_stage/fmnist_vq.yaml"))
    p.add_argument("--prior-config", default=str(REPO / "configs/absorbing/fmnist.yaml"))
    p.add_argument("--steps", type=int, default=500, help="training steps of the first stage")
    p.add_argument("--prior-steps", type=int, default=1800, help="training steps of the prior (0 = skip it)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="classifier-free guidance of the samples")
    p.add_argument("--sample-steps", type=int, default=16, help="sampling steps of the prior")
    p.add_argument("--num-samples", type=int, default=1000, help="samples scored for accuracy and FD_fmnist")
    p.add_argument("--logdir", default=str(REPO / "logs"))
    p.add_argument("--out", default=str(REPO / "outputs/demo"))
    p.add_argument("--eval-limit", type=int, default=2000, help="test images to evaluate")
    args = p.parse_args()

    import torch
    import torchvision

    from ldm.checkpoint import instantiate_from_checkpoint
    from ldm.data.cache import cache_split
    from ldm.data.fmnist import FashionMNIST
    from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, classifier_outputs, load_classifier
    from ldm.metrics.first_stage_eval import evaluate_first_stage
    from ldm.metrics.frechet import feature_statistics
    from ldm.metrics.prior_eval import dataset_images, generate, sample_scores

    t_start = time.time()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    vq_ckpt = train([args.config], args.steps, args.logdir, "demo_vq")
    vq_seconds = time.time() - t_start
    model, _ = instantiate_from_checkpoint(vq_ckpt)

    test = FashionMNIST(split="test", size=32)
    x = torch.stack([test[i]["image"] for i in range(32)])  # (32, 1, 32, 32)
    with torch.no_grad():
        rec = model.decode_latent(model.encode_to_latent(x)).clamp(-1, 1)
    grid = torchvision.utils.make_grid(torch.cat([x, rec]), nrow=16)
    torchvision.utils.save_image((grid + 1) / 2, out / "reconstructions.png")
    print(f"Wrote {out / 'reconstructions.png'} (top: test images, bottom: reconstructions)")

    classifier = load_classifier(DEFAULT_CLASSIFIER_PATH)
    metrics = {"first_stage": {**evaluate_first_stage(model, test, classifier=classifier, batch_size=256,
                                                      limit=args.eval_limit),
                               "steps": args.steps, "train_seconds": round(vq_seconds, 1), "checkpoint": vq_ckpt}}
    print(json.dumps(metrics["first_stage"], indent=2), flush=True)

    if args.prior_steps:
        t0 = time.time()
        cache_root = Path(vq_ckpt).parents[1] / "cache"
        for split in ("train", "validation"):
            cache_split(vq_ckpt, split, cache_root / split)
        overrides = [f"model.params.first_stage_config.params.ckpt_path={vq_ckpt}",
                     f"data.params.train.params.root={cache_root / 'train'}",
                     f"data.params.validation.params.root={cache_root / 'validation'}", *prior_overrides(args.prior_config)]
        prior_ckpt = train([args.prior_config], args.prior_steps, args.logdir, f"demo_{Path(args.prior_config).parent.name}",
                           overrides)
        prior_seconds = time.time() - t0
        prior, _ = instantiate_from_checkpoint(prior_ckpt)

        t0 = time.time()
        sampler = {"steps": args.sample_steps, "guidance_scale": args.guidance_scale}
        g = torch.Generator().manual_seed(0)
        rows = prior.sample(100, cond=torch.arange(10).repeat_interleave(10), generator=g, **sampler)
        torchvision.utils.save_image((torchvision.utils.make_grid(rows, nrow=10) + 1) / 2, out / "samples.png")
        print(f"Wrote {out / 'samples.png'} (row k: class k)")
        images, labels = generate(prior, args.num_samples, prior.num_classes, batch_size=250, **sampler)
        reference = feature_statistics(classifier_outputs(classifier, dataset_images(test, args.eval_limit))[0])
        scores = sample_scores(images, labels, classifier, reference)
        metrics["prior"] = {**scores, **sampler, "num_samples": args.num_samples, "steps": args.prior_steps,
                            "fd_reference_test_images": args.eval_limit, "train_seconds": round(prior_seconds, 1),
                            "sample_seconds": round(time.time() - t0, 1), "checkpoint": prior_ckpt}
        print(json.dumps(metrics["prior"], indent=2), flush=True)

    metrics["wall_seconds"] = round(time.time() - t_start, 1)
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    print(f"demo finished in {metrics['wall_seconds']:.0f} s; metrics in {out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

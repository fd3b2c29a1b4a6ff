"""Measure the schedule-vs-metric table of a VQ first stage on a data set: the curve ImageBART's custom schedules
(A_t evenly spaced in a metric) are read from, as the paper's `data/*_schedule_vs_metric.p`.

    python scripts/schedule_metric.py -r data/fmnist_vq.safetensors --split validation --limit 1000 \
        --metrics PSNR,SSIM,FD_fmnist --out data/imagebart/fmnist_schedule_vs_metric.json

then `schedule: {kind: metric, table: data/imagebart/fmnist_schedule_vs_metric.json, metric: PSNR}` in a prior
config. The split is the checkpoint's own `data.params.<split>`; FD_fmnist uses the project's Fashion-MNIST
classifier (PSNR and SSIM need nothing).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from imagebart.schedule_table import METRICS, measure_curve  # noqa: E402
from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, needs, output_path, run  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier  # noqa: E402
from ldm.metrics.eval_data import image_split  # noqa: E402
from ldm.metrics.prior_eval import dataset_images  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, help="a VQ first-stage checkpoint")
    p.add_argument("--split", default="validation", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, default=1000, help="images measured")
    p.add_argument("--levels", type=int, default=20, help="values of A from 1 to 0 (the original: 20)")
    p.add_argument("--metrics", default="PSNR,SSIM", help=f"comma-separated, of {', '.join(METRICS)}")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH), help="for FD_fmnist")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="JSON table")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    at_least("--limit", args.limit)
    at_least("--levels", args.levels, 2)
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    unknown = [m for m in metrics if m not in METRICS]
    if not metrics or unknown:
        raise ValueError(f"--metrics: choose from {', '.join(METRICS)}, got {args.metrics!r}")
    out = output_path(args.out, (".json",))
    model, config = instantiate_from_checkpoint(args.resume, check_class=needs("first stage", "schedule_metric.py"))
    if not hasattr(model, "encode_to_indices"):
        raise ValueError(f"{type(model).__name__} has no tokens: schedule_metric.py needs a VQ first stage")
    classifier = load_classifier(args.classifier) if "FD_fmnist" in metrics else None
    try:
        dataset, _ = image_split(config, args.split)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    images = dataset_images(dataset, args.limit)
    table = measure_curve(model, images, args.levels, metrics, classifier,
                          generator=torch.Generator().manual_seed(args.seed))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1))
    for m in metrics:
        print(f"{m}: " + ", ".join(f"{v:.3g}" for v, _ in table["bernoulli"][m]))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

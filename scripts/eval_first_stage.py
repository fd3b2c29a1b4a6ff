"""Score a trained first stage on a split: PSNR, SSIM, rFD_fmnist, codebook usage and perplexity (JSON).

    python scripts/eval_first_stage.py -r logs/<run>/checkpoints/last.ckpt --split test --out results.json
    python scripts/eval_first_stage.py -r logs/<run>/checkpoints/last.ckpt --split validation --limit 1000 --classifier ''

The split (data set, image size, channels) is the checkpoint's own `data.params.<split>` (or that of
`--config`); the Fashion-MNIST classifier adapts size and channels itself (`ldm.metrics.classifier`).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, needs, output_path, run  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier  # noqa: E402
from ldm.metrics.eval_data import image_split  # noqa: E402
from ldm.metrics.first_stage_eval import evaluate_first_stage  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, help="a checkpoint written by main.py (or any, with --config)")
    p.add_argument("--config", help="config to build the model and data from (default: the one in the checkpoint)")
    p.add_argument("--split", default="test", choices=["train", "validation", "test"])
    p.add_argument("--limit", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH), help="'' to skip rFD_fmnist")
    p.add_argument("--out", default=None, help="JSON file (default: next to the checkpoint)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    at_least("--limit", args.limit)
    at_least("--batch-size", args.batch_size)
    out = output_path(args.out or Path(args.resume).with_suffix(f".{args.split}.json"), (".json",))
    config = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True) if args.config else None
    model, config = instantiate_from_checkpoint(args.resume, config, check_class=needs("first stage", "eval_first_stage.py"))
    try:
        dataset, _ = image_split(config, args.split)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    classifier = load_classifier(args.classifier) if args.classifier and Path(args.classifier).exists() else None
    if args.classifier and classifier is None:
        print(f"no classifier at {args.classifier}: rFD_fmnist skipped (train it with scripts/train_classifier.py)")
    metrics = evaluate_first_stage(model, dataset, classifier, args.batch_size, args.limit)
    metrics.update(checkpoint=str(args.resume), split=args.split)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(metrics, indent=2))
    print(json.dumps(metrics, indent=2))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

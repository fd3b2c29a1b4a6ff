"""Evaluate a trained prior on Fashion-MNIST: conditional accuracy and FD_fmnist of its samples against
the test split, the ELBO on the test split, over a sweep of sampler settings (a table as JSON and Markdown).

    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 1000 \
        --sweep temperature=1.0,0.9 steps=16,64 guidance_scale=1,2 --elbo-limit 2000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.data.fmnist import FashionMNIST  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, classifier_outputs, load_classifier  # noqa: E402
from ldm.metrics.frechet import feature_statistics  # noqa: E402
from ldm.metrics.prior_eval import dataset_images, elbo_bits, generate, sample_scores, sweep  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def parse_sweep(items: list[str]) -> dict[str, list]:
    out = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--sweep entries look like name=v1,v2; got {item!r}")
        k, v = item.split("=", 1)
        out[k] = [yaml.safe_load(x) for x in v.split(",")]
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True)
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--sweep", nargs="*", default=[], help="sampler settings, e.g. temperature=1.0,0.9 steps=16,64")
    p.add_argument("--elbo-limit", type=int, default=0, help="test items for the ELBO (0 = skip)")
    p.add_argument("--elbo-split", default="validation", help="data.params split holding the held-out latents")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH))
    p.add_argument("--test-limit", type=int, default=None, help="test images for the reference statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    prior, config = instantiate_from_checkpoint(args.resume)
    classifier = load_classifier(args.classifier)
    test = dataset_images(FashionMNIST("test", size=32), limit=args.test_limit)
    ref_stats = feature_statistics(classifier_outputs(classifier, test)[0])
    rows = []
    for setting in sweep(parse_sweep(args.sweep)) or [{}]:
        t0 = time.time()
        images, labels = generate(prior, args.num_samples, prior.num_classes, args.batch_size, args.seed, **setting)
        row = {**setting, **sample_scores(images, labels, classifier, ref_stats),
               "seconds": round(time.time() - t0, 1)}
        print(row, flush=True)
        rows.append(row)
    result = {"checkpoint": args.resume, "num_samples": args.num_samples, "rows": rows}
    if args.elbo_limit:
        split_cfg = config["data"]["params"][args.elbo_split]
        dataset = instantiate_from_config(split_cfg, key=f"data.params.{args.elbo_split}")
        result["elbo_bits_per_dim"] = elbo_bits(prior, dataset, limit=args.elbo_limit, seed=args.seed)
        result["elbo_items"] = min(args.elbo_limit, len(dataset))
        result["elbo_split"] = args.elbo_split
        print(f"ELBO: {result['elbo_bits_per_dim']:.4f} bits per dimension", flush=True)
    out = Path(args.out) if args.out else Path(args.resume).with_suffix(".eval.json")
    out.write_text(json.dumps(result, indent=2))
    keys = list(rows[0])
    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
              for r in rows]
    out.with_suffix(".md").write_text("\n".join(table) + "\n")
    print("\n".join(table))
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Evaluate a trained prior on Fashion-MNIST: conditional accuracy and FD_fmnist of its samples against
the test split, the ELBO on the test split, over a sweep of sampler settings (a table as JSON and Markdown).

    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 1000 \
        --sweep temperature=1.0,0.9 steps=16,64 guidance_scale=1,2 --elbo-limit 10000 --elbo-strata 4

`--bf16` runs the denoiser under bfloat16 autocast (about 2x faster on CPUs with AVX512-BF16); sampling
and the scores themselves stay in float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import yaml
from torch.utils.data import DataLoader, Subset

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


@torch.no_grad()
def reconstruction_scores(prior, n: int, classifier, ref_stats) -> dict:
    """The same scores for n first-stage reconstructions of test images: what a perfect prior would get."""
    test = FashionMNIST("test", size=32)
    batches = DataLoader(Subset(test, range(min(n, len(test)))), batch_size=250)
    images, labels = [], []
    for batch in batches:
        images.append(prior.decode(prior.encode(batch["image"].to(prior.device))).cpu())
        labels.append(batch["class_label"])
    return sample_scores(torch.cat(images), torch.cat(labels), classifier, ref_stats)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True)
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--sweep", nargs="*", default=[], help="sampler settings, e.g. temperature=1.0,0.9 steps=16,64")
    p.add_argument("--elbo-limit", type=int, default=0, help="test items for the ELBO (0 = skip)")
    p.add_argument("--elbo-split", default="test", help="data.params split holding the held-out latents")
    p.add_argument("--elbo-strata", type=int, default=None,
                   help="estimate the all-T ELBO from this many stratified timesteps per item (default: all T)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the networks")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH))
    p.add_argument("--test-limit", type=int, default=None, help="test images for the reference statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    prior, config = instantiate_from_checkpoint(args.resume)
    out = Path(args.out) if args.out else Path(args.resume).with_suffix(".eval.json")
    if out.suffix != ".json":  # the Markdown table goes beside it as <name>.md
        out = out.with_name(out.name + ".json")
    result: dict = {"checkpoint": args.resume, "num_samples": args.num_samples, "bf16": args.bf16, "rows": []}
    with torch.autocast(prior.device.type, dtype=torch.bfloat16, enabled=args.bf16):
        if args.elbo_limit:
            split_cfg = config["data"]["params"][args.elbo_split]
            dataset = instantiate_from_config(split_cfg, key=f"data.params.{args.elbo_split}")
            nll_kw = {"strata": args.elbo_strata} if args.elbo_strata else {}
            result["elbo_bits_per_dim"] = elbo_bits(prior, dataset, limit=args.elbo_limit, seed=args.seed, **nll_kw)
            result.update(elbo_strata=args.elbo_strata, elbo_items=min(args.elbo_limit, len(dataset)),
                          elbo_split=args.elbo_split)
            print(f"ELBO: {result['elbo_bits_per_dim']:.4f} bits per dimension", flush=True)
            out.write_text(json.dumps(result, indent=2))
        if args.num_samples:
            classifier = load_classifier(args.classifier)
            test = dataset_images(FashionMNIST("test", size=32), limit=args.test_limit)
            ref_stats = feature_statistics(classifier_outputs(classifier, test)[0])
            result["first_stage_reconstructions"] = reconstruction_scores(prior, args.num_samples, classifier,
                                                                          ref_stats)
            print("first-stage reconstructions:", result["first_stage_reconstructions"], flush=True)
            for setting in sweep(parse_sweep(args.sweep)) or [{}]:
                t0 = time.time()
                images, labels = generate(prior, args.num_samples, prior.num_classes, args.batch_size, args.seed,
                                          **setting)
                row = {**setting, **sample_scores(images, labels, classifier, ref_stats),
                       "seconds": round(time.time() - t0, 1)}
                print(row, flush=True)
                result["rows"].append(row)
                out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted sweep
    out.write_text(json.dumps(result, indent=2))
    if result["rows"]:
        keys = list(result["rows"][0])
        table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        table += ["| " + " | ".join(f"{r[k]:.4g}" if isinstance(r[k], float) else str(r[k]) for k in keys) + " |"
                  for r in result["rows"]]
        out.with_suffix(".md").write_text("\n".join(table) + "\n")
        print("\n".join(table))
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

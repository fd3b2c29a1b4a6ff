"""Evaluate a trained prior: conditional accuracy and FD_fmnist of its samples against the evaluation
split, the ELBO on held-out latents, over a sweep of sampler settings (a table as JSON and Markdown).

    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 1000 \
        --sweep temperature=1.0,0.9 steps=16,64 guidance_scale=1,2 --elbo-limit 10000 --elbo-strata 4
    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 0 --elbo-split validation --elbo-limit 8 --bf16

The reference images (and the first-stage reconstructions scored beside the samples) are the split
`--eval-split` of the checkpoint's own data config; for a prior trained on a latent cache, the images
that cache was encoded from. The Fashion-MNIST classifier adapts their size and channels itself
(`ldm.metrics.classifier`).

`--bf16` runs the prior (sampling, the ELBO, first-stage encoding and decoding) under bfloat16
autocast, about 2x faster on CPUs with AVX512-BF16; the classifier's features and predictions, and the
scores, stay float32.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, needs, output_path, run  # noqa: E402
from ldm.data.skipped import collate_good  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, classifier_outputs, load_classifier  # noqa: E402
from ldm.metrics.eval_data import class_prompts, image_split  # noqa: E402
from ldm.metrics.frechet import feature_statistics  # noqa: E402
from ldm.metrics.prior_eval import dataset_images, elbo_bits, generate, sample_scores, sweep  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def parse_sweep(items: list[str]) -> dict[str, list]:
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        if not k or not v or "" in v.split(","):
            raise SystemExit(f"--sweep entries look like name=v1,v2; got {item!r}")
        out[k] = [yaml.safe_load(x) for x in v.split(",")]
    return out


def check_counts(args: argparse.Namespace) -> None:
    """Counts that mean something, and a run that has something to do."""
    at_least("-n", args.num_samples, 0)
    at_least("--batch-size", args.batch_size)
    at_least("--elbo-limit", args.elbo_limit, 0)
    at_least("--elbo-strata", args.elbo_strata)
    at_least("--test-limit", args.test_limit)
    if not args.num_samples and not args.elbo_limit:
        raise ValueError("nothing to evaluate: -n 0 skips the samples and --elbo-limit 0 the ELBO")
    if args.sweep and not args.num_samples:
        raise ValueError("--sweep needs samples, but -n is 0")
    if args.elbo_strata is not None and not args.elbo_limit:
        raise ValueError("--elbo-strata needs --elbo-limit >= 1 (without it the ELBO is skipped)")


def result_path(args: argparse.Namespace) -> Path:
    """The JSON file (and the Markdown table beside it), checked writable before any work."""
    out = Path(args.out) if args.out else Path(args.resume).with_suffix(".eval.json")
    if out.suffix != ".json":  # the Markdown table goes beside it as <name>.md
        out = out.with_name(out.name + ".json")
    output_path(out.with_suffix(".md"), (".md",))
    return output_path(out, (".json",))


@torch.no_grad()
def reconstruct(prior: Any, dataset: Dataset, n: int, batch_size: int = 250
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """First-stage reconstructions (float32, on the CPU) of the first `n` images, and their labels if any:
    what a perfect prior would reach. Only prior calls happen here, so autocast may wrap it."""
    images, labels = [], []
    for batch in DataLoader(Subset(dataset, range(min(n, len(dataset)))), batch_size=batch_size,
                            collate_fn=collate_good):  # unreadable images left out
        if batch is None:
            continue
        images.append(prior.decode(prior.encode(batch["image"].to(prior.device))).float().cpu())
        if "class_label" in batch:
            labels.append(torch.as_tensor(batch["class_label"]).long())
    return torch.cat(images), (torch.cat(labels) if labels else None)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True)
    p.add_argument("-n", "--num-samples", type=int, default=1000)
    p.add_argument("--batch-size", type=int, default=100)
    p.add_argument("--sweep", nargs="*", default=[], help="sampler settings, e.g. temperature=1.0,0.9 steps=16,64")
    p.add_argument("--elbo-limit", type=int, default=0, help="held-out items for the ELBO (0 = skip)")
    p.add_argument("--elbo-split", default="test", help="data.params split holding the held-out latents")
    p.add_argument("--elbo-strata", type=int, default=None,
                   help="estimate the all-T ELBO from this many stratified timesteps per item (default: all T)")
    p.add_argument("--eval-split", default="test",
                   help="data.params split whose images are the reference for FD_fmnist and the reconstructions")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the prior (not the classifier)")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH))
    p.add_argument("--test-limit", type=int, default=None, help="reference images for the statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_counts(args)
    settings = sweep(parse_sweep(args.sweep)) or [{}]
    out = result_path(args)
    prior, config = instantiate_from_checkpoint(args.resume, check_class=needs("prior", "evaluate.py"))
    for setting in settings:  # every row's settings, before the first row is computed
        prior.check_sampler_options(setting)
    if args.elbo_limit and not getattr(prior, "has_likelihood", True):
        note = f" ({prior.likelihood_note})" if getattr(prior, "likelihood_note", None) else ""
        raise ValueError(f"--elbo-limit: {type(prior).__name__} has no likelihood{note}; use --elbo-limit 0")
    splits = [k for k, v in ((config.get("data") or {}).get("params") or {}).items() if isinstance(v, dict)]
    if args.elbo_limit and args.elbo_split not in splits:
        raise SystemExit(f"--elbo-split: the stored config has no data.params.{args.elbo_split}; choose a split "
                         f"it has ({', '.join(splits) or 'none'})")
    if args.num_samples:
        classifier = load_classifier(args.classifier)
        try:
            reference, source = image_split(config, args.eval_split)
        except ValueError as e:
            raise SystemExit(str(e)) from None
    out.parent.mkdir(parents=True, exist_ok=True)

    def prior_precision():
        """Autocast for prior calls only; the classifier switches it off for itself in any case."""
        return torch.autocast(prior.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    result: dict = {"checkpoint": args.resume, "num_samples": args.num_samples, "bf16": args.bf16, "rows": []}
    if args.elbo_limit:
        split_cfg = config["data"]["params"][args.elbo_split]
        dataset = instantiate_from_config(split_cfg, key=f"data.params.{args.elbo_split}")
        nll_kw = {"strata": args.elbo_strata} if args.elbo_strata else {}
        with prior_precision():
            result["elbo_bits_per_dim"] = elbo_bits(prior, dataset, limit=args.elbo_limit, seed=args.seed, **nll_kw)
        result.update(elbo_strata=args.elbo_strata, elbo_items=min(args.elbo_limit, len(dataset)),
                      elbo_split=args.elbo_split)
        print(f"ELBO: {result['elbo_bits_per_dim']:.4f} bits per dimension", flush=True)
        out.write_text(json.dumps(result, indent=2))
    if args.num_samples:
        result.update(eval_split=args.eval_split, reference_images=source)
        # a text prior trained on captions made from labels is given each class's caption and scored per class
        prompts = None if prior.num_classes else class_prompts(config, args.eval_split)
        num_classes = len(prompts) if prompts else prior.num_classes
        if prompts:
            result["class_prompts"] = prompts
        ref_stats = feature_statistics(classifier_outputs(classifier, dataset_images(reference, args.test_limit))[0])
        with prior_precision():
            images, labels = reconstruct(prior, reference, args.num_samples)
        result["first_stage_reconstructions"] = sample_scores(images, labels, classifier, ref_stats)
        print("first-stage reconstructions:", result["first_stage_reconstructions"], flush=True)
        for setting in settings:
            t0, taken = time.time(), []
            with prior_precision():
                images, labels = generate(prior, args.num_samples, num_classes, args.batch_size, args.seed,
                                          steps_taken=taken, class_conds=prompts, **setting)
            row = {**setting, **sample_scores(images, labels, classifier, ref_stats),
                   "seconds": round(time.time() - t0, 1)}
            if taken:  # a sampler that stops early (SUNDAE): the network calls samples actually took
                taken = torch.cat(taken).float()
                row.update(steps_mean=round(float(taken.mean()), 2), steps_max=int(taken.max()))
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
    sys.exit(run(main))

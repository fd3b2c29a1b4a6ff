"""Evaluate a trained prior: conditional accuracy and FD_fmnist of its samples against the evaluation
split, with KID, IS, precision / recall / density / coverage and the cost per sample, the ELBO on
held-out latents, over a sweep of sampler settings (a table as JSON and Markdown).

    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 1000 \
        --sweep temperature=1.0,0.9 steps=16,64 guidance_scale=1,2 --elbo-limit 10000 --elbo-strata 4
    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 0 --elbo-split validation --elbo-limit 8 --bf16
    python scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 10000 --memorization 16
    torchrun --nproc_per_node 4 scripts/evaluate.py -r logs/<prior run>/checkpoints/last.ckpt -n 50000 \
        --features inception --out outputs/eval/prior.json

The reference images (and the first-stage reconstructions scored beside the samples) are the split
`--eval-split` of the checkpoint's own data config; for a prior trained on a latent cache, the images
that cache was encoded from. Every image set is quantised to uint8 before its features are taken, and
each extractor resizes for itself (`ldm.metrics.features`: the offline Fashion-MNIST classifier by
default, `--features inception` for torch-fidelity's Inception, whose weights download on first use).

Samples are drawn in seeded batches (batch `start` seeded with `seed + start`) and each finished batch is
kept under `--work-dir` (default: `<out>.samples/` beside the JSON), keyed by the checkpoint, the setting
and the seed: a rerun after an interruption draws only the missing batches and gives the same numbers.
Under `torchrun` rank r draws every W-th batch from r, and rank 0 waits for the others' batches in that
folder and scores them all, so the numbers do not depend on the number of processes.

`--bf16` runs the prior (sampling, the ELBO, first-stage encoding and decoding) under bfloat16
autocast, about 2x faster on CPUs with AVX512-BF16; the features and the scores stay float32.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

import torch
import yaml
from torch.utils.data import DataLoader, Dataset, Subset

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, compile_prior, needs, output_path, run  # noqa: E402
from ldm.data.skipped import collate_good  # noqa: E402
from ldm.metrics.classifier import DEFAULT_CLASSIFIER_PATH, load_classifier  # noqa: E402
from ldm.metrics.distribution import KID_SUBSETS, Reference  # noqa: E402
from ldm.metrics.eval_data import class_prompts, image_split  # noqa: E402
from ldm.metrics.features import ClassifierFeatures, build_extractor, to_uint8  # noqa: E402
from ldm.metrics.memorization import memorization_scores, nearest_training_grid  # noqa: E402
from ldm.metrics.prior_eval import dataset_images, elbo_bits, set_scores, sweep  # noqa: E402
from ldm.metrics.sample_store import (  # noqa: E402
    BatchStore,
    batch_plan,
    collect,
    cost_scores,
    draw_record,
    ensure_batches,
    launch_rank,
    my_batches,
    run_key,
    wait_for,
)
from ldm.repro.table import cost_curves, svg_plot  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402


def parse_sweep(items: list[str]) -> dict[str, list]:
    """`name=v1,v2` to {name: [v1, v2]}; a bracketed value is one setting (`temperature=[1.0,0.8],0.9`: one
    temperature per scale, then 0.9 for all)."""
    out = {}
    for item in items:
        k, _, v = item.partition("=")
        values = re.findall(r"\[[^\[\]]*\]|[^,\[\]]+", v)
        if not k or not v or ",".join(values) != v:
            raise SystemExit(f"--sweep entries look like name=v1,v2 (a list in brackets is one value); got {item!r}")
        out[k] = [yaml.safe_load(x) for x in values]
    return out


def check_counts(args: argparse.Namespace) -> None:
    """Counts that mean something, and a run that has something to do."""
    at_least("-n", args.num_samples, 0)
    at_least("--batch-size", args.batch_size)
    at_least("--elbo-limit", args.elbo_limit, 0)
    at_least("--elbo-strata", args.elbo_strata)
    at_least("--test-limit", args.test_limit)
    at_least("--kid-subsets", args.kid_subsets)
    at_least("--memorization", args.memorization, 0)
    if not args.num_samples and not args.elbo_limit:
        raise ValueError("nothing to evaluate: -n 0 skips the samples and --elbo-limit 0 the ELBO")
    if args.sweep and not args.num_samples:
        raise ValueError("--sweep needs samples, but -n is 0")
    if args.elbo_strata is not None and not args.elbo_limit:
        raise ValueError("--elbo-strata needs --elbo-limit >= 1 (without it the ELBO is skipped)")
    if args.memorization and not args.num_samples:
        raise ValueError("--memorization needs samples, but -n is 0")
    if args.plot:
        if not args.num_samples:
            raise ValueError("--plot needs samples, but -n is 0")
        keys = [token.split("=", 1)[0] for token in args.sweep]
        if args.plot_along not in keys:
            raise ValueError(f"--plot-along {args.plot_along}: not a --sweep key ({', '.join(keys) or 'no --sweep'}); "
                             "each curve runs along one swept setting")
        output_path(args.plot, (".svg",), "--plot")


def result_path(args: argparse.Namespace) -> Path:
    """The JSON file (and the Markdown table beside it), checked writable before any work."""
    out = Path(args.out) if args.out else Path(args.resume).with_suffix(".eval.json")
    if out.suffix != ".json":  # the Markdown table goes beside it as <name>.md
        out = out.with_name(out.name + ".json")
    output_path(out.with_suffix(".md"), (".md",))
    return output_path(out, (".json",))


def pick_device(name: str) -> torch.device:
    """`auto`: this rank's GPU (LOCAL_RANK under torchrun) when there is one, else the CPU."""
    if name != "auto":
        return torch.device(name)
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0") or 0))
    return torch.device("cpu")


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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    keys = list(dict.fromkeys(k for r in rows for k in r))

    def cell(v: Any) -> str:
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    table = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    table += ["| " + " | ".join(cell(r.get(k)) for k in keys) + " |" for r in rows]
    return "\n".join(table) + "\n"


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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prior's networks first (minutes of compiling, faster sampling after)")
    p.add_argument("--bf16", action="store_true", help="bfloat16 autocast for the prior (not the classifier)")
    p.add_argument("--classifier", default=str(DEFAULT_CLASSIFIER_PATH))
    p.add_argument("--features", choices=("fmnist", "inception"), default="fmnist",
                   help="extractor of KID, IS, precision / recall / density / coverage (and FID): the offline "
                        "Fashion-MNIST classifier, or torch-fidelity's Inception (weights download on first use)")
    p.add_argument("--inception-weights", default=None, help="a local copy of torch-fidelity's Inception weights")
    p.add_argument("--kid-subsets", type=int, default=KID_SUBSETS, help="random subsets KID is averaged over")
    p.add_argument("--memorization", type=int, default=0, metavar="N",
                   help="a grid per row: its first N samples beside their 3 nearest training images (0: off)")
    p.add_argument("--memorization-split", default="train", help="data.params split searched for neighbours")
    p.add_argument("--work-dir", default=None, help="finished sample batches, kept to resume (default: <out>.samples)")
    p.add_argument("--device", default="auto", help="auto (this rank's GPU if any, else cpu), cpu, cuda:0, ...")
    p.add_argument("--test-limit", type=int, default=None, help="reference images for the statistics")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default=None)
    p.add_argument("--plot", default=None, metavar="SVG",
                   help="FD against seconds per sample: a curve per setting of the other sweep keys, points along "
                        "--plot-along")
    p.add_argument("--plot-along", default="steps", help="the sweep key that varies along each curve of --plot")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    check_counts(args)
    settings = sweep(parse_sweep(args.sweep)) or [{}]
    out = result_path(args)
    rank, world = launch_rank()
    device = pick_device(args.device)
    prior, config = instantiate_from_checkpoint(args.resume, check_class=needs("prior", "evaluate.py"))
    prior = prior.to(device)
    if args.compile:
        compile_prior(prior)
    for setting in settings:  # every row's settings, before the first row is computed
        prior.check_sampler_options(setting)
    has_likelihood = getattr(prior, "has_likelihood", True)
    if args.elbo_limit and not has_likelihood:
        note = f" ({prior.likelihood_note})" if getattr(prior, "likelihood_note", None) else ""
        raise ValueError(f"--elbo-limit: {type(prior).__name__} has no likelihood{note}; use --elbo-limit 0")
    splits = [k for k, v in ((config.get("data") or {}).get("params") or {}).items() if isinstance(v, dict)]
    if args.elbo_limit and args.elbo_split not in splits:
        raise SystemExit(f"--elbo-split: the stored config has no data.params.{args.elbo_split}; choose a split "
                         f"it has ({', '.join(splits) or 'none'})")
    if args.memorization and args.memorization_split not in splits:
        raise SystemExit(f"--memorization-split: the stored config has no data.params.{args.memorization_split}; "
                         f"choose a split it has ({', '.join(splits) or 'none'})")
    if args.num_samples:
        classifier = load_classifier(args.classifier, device)
        try:
            reference, source = image_split(config, args.eval_split)
        except ValueError as e:
            raise SystemExit(str(e)) from None
        extractors = [ClassifierFeatures(classifier)]
        if args.features != "fmnist":
            extractors.append(build_extractor(args.features, classifier, args.inception_weights, device))
        main_extractor = extractors[-1]
    out.parent.mkdir(parents=True, exist_ok=True)

    def prior_precision():
        """Autocast for prior calls only; the extractors switch it off for themselves in any case."""
        return torch.autocast(prior.device.type, dtype=torch.bfloat16, enabled=args.bf16)

    result: dict = {"checkpoint": args.resume, "num_samples": args.num_samples, "bf16": args.bf16, "rows": []}
    # a row names only its swept options: the rest are these (a config's sample_defaults included)
    result["sampler_defaults"] = {o.name: o.default for o in prior.sampler_options.resolve(prior)}
    result["nll_unit"] = "bits per token" if getattr(prior, "latent_kind", None) == "tokens" else "bits per dimension"
    if args.elbo_limit and rank == 0:
        split_cfg = config["data"]["params"][args.elbo_split]
        dataset = instantiate_from_config(split_cfg, key=f"data.params.{args.elbo_split}")
        nll_kw = {"strata": args.elbo_strata} if args.elbo_strata else {}
        with prior_precision():
            result["elbo_bits_per_dim"] = elbo_bits(prior, dataset, limit=args.elbo_limit, seed=args.seed, **nll_kw)
        result.update(elbo_strata=args.elbo_strata, elbo_items=min(args.elbo_limit, len(dataset)),
                      elbo_split=args.elbo_split)
        print(f"ELBO: {result['elbo_bits_per_dim']:.4f} bits per dimension", flush=True)
        out.write_text(json.dumps(result, indent=2))
    nll = result.get("elbo_bits_per_dim", None if has_likelihood else "n/a")
    if args.num_samples:
        work = Path(args.work_dir) if args.work_dir else out.with_suffix(".samples")
        result.update(eval_split=args.eval_split, reference_images=source, features=main_extractor.name,
                      preprocessing="uint8", work_dir=str(work), processes=world)
        # a text prior trained on captions made from labels is given each class's caption and scored per class
        prompts = None if prior.num_classes else class_prompts(config, args.eval_split)
        num_classes = len(prompts) if prompts else prior.num_classes
        if prompts:
            result["class_prompts"] = prompts
        plan = batch_plan(args.num_samples, args.batch_size)
        if rank == 0:
            ref_images = to_uint8(dataset_images(reference, args.test_limit))
            ref_outputs = {e.name: e(ref_images) for e in extractors}
            # precision / recall / density / coverage against as many reference images as samples
            references = {e.name: Reference.of(ref_outputs[e.name]["features"], manifold_rows=args.num_samples)
                          for e in extractors}
            with prior_precision():
                images, labels = reconstruct(prior, reference, args.num_samples)
            rec = to_uint8(images)
            result["first_stage_reconstructions"] = set_scores({e.name: e(rec) for e in extractors}, labels,
                                                               extractors, references, args.kid_subsets, args.seed)
            print("first-stage reconstructions:", result["first_stage_reconstructions"], flush=True)
            if args.memorization:
                train, _ = image_split(config, args.memorization_split)
                train_images = to_uint8(dataset_images(train))
                train_features = main_extractor(train_images)["features"]
        for i, setting in enumerate(settings):
            t0 = time.time()
            store = BatchStore(work, run_key(args.resume, setting=setting, seed=args.seed, batch_size=args.batch_size,
                                             bf16=args.bf16, device=device.type, num_classes=num_classes,
                                             class_conds=prompts))

            def draw(start: int, size: int, setting: dict = setting) -> dict:
                return draw_record(prior, start, size, num_classes, args.seed, prompts, prior_precision, **setting)

            ensure_batches(store, my_batches(plan), draw, extractors, progress=True)
            if rank != 0:
                continue
            wait_for(store, plan)
            got = collect(store, plan, extractors)
            row = {**setting, **set_scores(got["features"], got["labels"], extractors, references, args.kid_subsets,
                                           args.seed)}
            row.update(nll_bits=nll, **cost_scores(got), seconds=round(time.time() - t0, 1))
            if got["steps_taken"] is not None:  # a sampler that stops early (SUNDAE): the calls samples took
                taken = got["steps_taken"].float()
                row.update(steps_mean=round(float(taken.mean()), 2), steps_max=int(taken.max()))
            if args.memorization:
                k = min(args.memorization, len(got["images"]))
                grid = out.with_name(f"{out.stem}.nearest{i}.png")
                sample_feats = got["features"][main_extractor.name]["features"]
                nearest_training_grid(got["images"][:k], sample_feats[:k], train_images, train_features, grid)
                row.update(memorization_scores(sample_feats, references[main_extractor.name].features,
                                               train_features), memorization_grid=str(grid))
            print(row, flush=True)
            result["rows"].append(row)
            out.write_text(json.dumps(result, indent=2))  # partial results survive an interrupted sweep
    if rank != 0:
        return 0
    out.write_text(json.dumps(result, indent=2))
    if result["rows"]:
        table = markdown_table(result["rows"])
        out.with_suffix(".md").write_text(table)
        print(table, end="")
    if args.plot and result["rows"]:
        along = args.plot_along
        curves = cost_curves(result["rows"], [k for k in settings[0] if k != along], along)
        Path(args.plot).write_text(svg_plot(curves, y_key=main_extractor.fd_key))
        print(f"wrote {args.plot}")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

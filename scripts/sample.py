"""Sample a grid from any trained prior; the checkpoint carries its config.

    python scripts/sample.py -r logs/<prior run>/checkpoints/last.ckpt --per-class 8 --steps 32 --guidance_scale 2
    python scripts/sample.py -r logs/<prior run>/checkpoints/last.ckpt -n 16 steps=32 temperature=0.9 shape=[12,12]
    python scripts/sample.py -r logs/<prior run>/checkpoints/last.ckpt --list-options

Sampler options of the prior follow as `key=value`, `--key value` or `--key=value` (values parsed as YAML);
`--list-options` prints the ones the checkpoint's prior declares, with their ranges and defaults.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch
import torchvision
from omegaconf import OmegaConf
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import instantiate_from_checkpoint  # noqa: E402
from ldm.cli import at_least, compile_prior, needs, output_path, run, sampler_kwargs  # noqa: E402
from ldm.sampler_options import describe  # noqa: E402

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


def build_parser() -> argparse.ArgumentParser:
    # no abbreviations: an unknown --option is a sampler option, never a prefix of one of these
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                allow_abbrev=False)
    p.add_argument("-r", "--resume", required=True, help="prior checkpoint written by main.py (or any, with --config)")
    p.add_argument("--config", help="config to build the prior from, for a checkpoint that carries none")
    p.add_argument("-n", "--num", type=int, default=16, help="samples (unconditional, or with --cond)")
    p.add_argument("--cond", default=None,
                   help="one condition for every sample: a class label, or a caption for a text-conditioned prior")
    p.add_argument("--per-class", type=int, default=None, help="a row of this many samples per class (instead of -n)")
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the prior's networks first (minutes of compiling, faster sampling after)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-ema", action="store_true", help="use the trained instead of the EMA weights")
    p.add_argument("--out", default=None, help="PNG (or JPEG) path (default: next to the checkpoint)")
    p.add_argument("--list-options", action="store_true", help="print the prior's sampler options and stop")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The script's options, plus `sampler_kw` from everything the parser does not know."""
    args, rest = build_parser().parse_known_args(argv)
    args.sampler_kw = sampler_kwargs(rest)
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    at_least("-n", args.num)
    at_least("--per-class", args.per_class)
    if not args.list_options:
        out = output_path(args.out or Path(args.resume).with_name(f"samples_seed{args.seed}.png"), IMAGE_SUFFIXES)
    config = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True) if args.config else None
    prior, _ = instantiate_from_checkpoint(args.resume, config, check_class=needs("prior", "sample.py"))
    if args.list_options:
        print(describe(prior.sampler_options.resolve(prior)))
        return 0
    options = prior.check_sampler_options(args.sampler_kw)
    if args.compile:
        compile_prior(prior)
    k = prior.num_classes
    caption = args.cond is not None and not args.cond.lstrip("-").isdigit()
    if args.per_class and not k:
        raise SystemExit("--per-class needs a class-conditional prior")
    if args.cond is not None and not caption:
        if not k:
            raise SystemExit("--cond with a class label needs a class-conditional prior")
        if not 0 <= int(args.cond) <= k:
            raise ValueError(f"--cond must be a class label in 0..{k - 1} (or {k}, the null class), got {args.cond}")
    if args.per_class:
        cond = torch.arange(prior.num_classes).repeat_interleave(args.per_class)
        nrow = args.per_class
    else:
        cond = None if args.cond is None else args.cond if caption else torch.full((args.num,), int(args.cond))
        nrow = int(args.num**0.5)
    if caption:  # checked by the prior's conditioner: a class prior refuses a caption in one sentence
        cond = prior.user_cond(cond, args.num)
    n = len(next(iter(cond.values()))) if isinstance(cond, dict) else len(cond) if cond is not None else args.num
    bar = tqdm(desc="sampling")

    def progress(info: dict) -> None:
        bar.total = info.get("steps")
        bar.update(1)

    images = prior.sample(n, cond=cond, generator=torch.Generator().manual_seed(args.seed), use_ema=not args.no_ema,
                          callback=progress, **options)
    bar.close()
    out.parent.mkdir(parents=True, exist_ok=True)
    torchvision.utils.save_image((torchvision.utils.make_grid(images, nrow=nrow) + 1) / 2, out)
    print(f"wrote {out} ({n} samples)")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

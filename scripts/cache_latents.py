"""Encode a data split once with a trained first stage into a token / latent cache for the priors.

    python scripts/cache_latents.py -r logs/<vq run>/checkpoints/last.ckpt --split train --out cache/fmnist_vq/train
    python scripts/cache_latents.py -r logs/<vq run>/checkpoints/last.ckpt --kind continuous --split train --out cache/fmnist_vq_z/train
    python scripts/cache_latents.py -r logs/<kl run>/checkpoints/last.ckpt --split test --out cache/fmnist_kl/test

`--kind` picks what the prior will model: `tokens` (VQ only) or `continuous` (the VQ pre-quantisation
latent, or the KL posterior's mean and log-variance); the default is the first stage's own kind.
Safe to interrupt and rerun: finished shards are kept and the build continues after them. A folder
that holds anything else (another split, data config, first stage or kind, or files that are not a
cache) is refused and left as it is. Unreadable images are left out and listed at the end.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.cli import run  # noqa: E402
from ldm.data.cache import cache_split  # noqa: E402
from ldm.data.cache_meta import read_meta, summary  # noqa: E402


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, help="first-stage checkpoint written by main.py")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--out", required=True)
    p.add_argument("--kind", default=None, choices=["tokens", "continuous"],
                   help="latent kind to cache (default: the first stage's default)")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    p.add_argument("--num-workers", type=int, default=0, help="DataLoader worker processes that read the images")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    out = cache_split(args.resume, args.split, args.out, args.batch_size, device=args.device, kind=args.kind,
                      num_workers=args.num_workers)
    print(f"cache ready: {out}: {summary(read_meta(out))}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

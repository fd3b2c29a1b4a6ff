"""Encode a data split once with a trained first stage into a token / latent cache for the priors.

    python scripts/cache_latents.py -r logs/<vq run>/checkpoints/last.ckpt --split train --out cache/fmnist_vq/train

Safe to interrupt and rerun: finished shards are kept and the build continues after them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.data.cache import cache_split  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-r", "--resume", required=True, help="first-stage checkpoint written by main.py")
    p.add_argument("--split", default="train", choices=["train", "validation", "test"])
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--device", default="cpu")
    args = p.parse_args()
    try:
        out = cache_split(args.resume, args.split, args.out, args.batch_size, device=args.device)
    except ValueError as e:
        raise SystemExit(str(e)) from None
    print(f"cache ready: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

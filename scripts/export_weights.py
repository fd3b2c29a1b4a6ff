"""Export a checkpoint's weights to safetensors, with its config beside them.

    python scripts/export_weights.py logs/<run>/checkpoints/last.ckpt --out exports/vq_f4
    python scripts/export_weights.py model.ckpt --config configs/first_stage/kl-f8.yaml --out exports/kl-f8
    python scripts/export_weights.py last.ckpt --ema --out exports/prior_ema

Reads every format the project reads (main.py checkpoints, the released Lightning 1.x checkpoints of
taming-transformers and latent-diffusion through the restricted reader, `.th`, safetensors) and
writes <out>.safetensors (the state dict) and <out>.yaml (the config stored in the checkpoint, or
--config). Every script then reads the pair as one checkpoint: `scripts/sample.py -r <out>.safetensors`
finds the config beside the weights.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import CheckpointError, export_weights  # noqa: E402
from ldm.cli import run  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=".ckpt/.pt/.pth/.th/.safetensors file")
    p.add_argument("--out", default=None, help="output name without suffix (default: beside the checkpoint)")
    p.add_argument("--config", default=None, help="config to write as <out>.yaml (default: the checkpoint's)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (model_ema.*) as the model's weights")
    args = p.parse_args(argv)

    path = Path(args.checkpoint)
    config = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True) if args.config else None
    try:
        weights, yaml_path = export_weights(path, args.out or path.with_suffix(""), config, args.ema)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    print(f"wrote {weights}")
    if yaml_path is None:
        print(f"{path} carries no config: pass --config to write {weights.with_suffix('.yaml')}")
    else:
        print(f"wrote {yaml_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

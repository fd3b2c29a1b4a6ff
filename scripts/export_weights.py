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
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from omegaconf import OmegaConf  # noqa: E402

from ldm.checkpoint import CheckpointError, export_safetensors, read_checkpoint, state_dict_in  # noqa: E402
from ldm.cli import run  # noqa: E402
from ldm.ema import ema_state_dict  # noqa: E402


def stored_config(obj: Any) -> dict | None:
    config = obj.get("config") if isinstance(obj, dict) else None
    return dict(config) if isinstance(config, dict) and "model" in config else None


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help=".ckpt/.pt/.pth/.th/.safetensors file")
    p.add_argument("--out", default=None, help="output name without suffix (default: beside the checkpoint)")
    p.add_argument("--config", default=None, help="config to write as <out>.yaml (default: the checkpoint's)")
    p.add_argument("--ema", action="store_true", help="export the EMA weights (model_ema.*) as the model's weights")
    args = p.parse_args(argv)

    path = Path(args.checkpoint)
    name = args.out.removesuffix(".safetensors") if args.out else str(path.with_suffix(""))
    weights, yaml_path = Path(f"{name}.safetensors"), Path(f"{name}.yaml")
    try:
        obj = read_checkpoint(path)
        state = state_dict_in(obj, path)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    if not state:
        raise SystemExit(f"{path} holds no tensors to export")
    if args.ema:
        state, replaced = ema_state_dict(state)
        if not replaced:
            raise SystemExit(f"{path} has no EMA weights (model_ema.*) matching its parameters")
        print(f"EMA weights for {replaced} parameters")
    if args.config:
        config = OmegaConf.to_container(OmegaConf.load(args.config), resolve=True)
    else:
        config = stored_config(obj)
    meta = {"source": path.name}
    if isinstance(obj, dict):
        meta.update({k: obj[k] for k in ("global_step", "epoch") if isinstance(obj.get(k), int)})
    weights.parent.mkdir(parents=True, exist_ok=True)
    export_safetensors(state, weights, metadata=meta)
    print(f"wrote {weights} ({len(state)} tensors)")
    if config is None:
        print(f"{path} carries no config: pass --config to write {yaml_path}")
    else:
        OmegaConf.save(OmegaConf.create(config), yaml_path)
        print(f"wrote {yaml_path}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

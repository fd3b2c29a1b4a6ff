"""Convert an original Unleashing Transformers sampler checkpoint (`absorbing_*.th`) to a project checkpoint.

    python scripts/convert_unleashing.py absorbing_ema_1400000.th --config configs/absorbing/churches.yaml \\
        --out checkpoints/churches_absorbing.ckpt model.params.first_stage_config.params.ckpt_path=vqgan.ckpt
    python scripts/sample.py -r checkpoints/churches_absorbing.ckpt -n 4

The `.th` holds ``AbsorbingDiffusion.state_dict()``: the loss-history buffers and the denoiser under
``_denoise_fn.``. The config must use the paper's denoiser (`absorbing.unleashing.UnleashingTransformer`)
with the checkpoint's sizes; its first stage loads from its own `ckpt_path` (the `.th` has none) and is
stored in the output, which holds ``{"state_dict", "config"}`` and loads with ``weights_only=True``.
Dotted `key=value` overrides after the flags change the config (they are saved with it).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402
from omegaconf import OmegaConf  # noqa: E402

from absorbing.unleashing import convert_sampler_state_dict  # noqa: E402
from ldm.checkpoint import CheckpointError, load_into, read_checkpoint, state_dict_in  # noqa: E402
from ldm.cli import run  # noqa: E402
from ldm.util import instantiate_from_config  # noqa: E402

PAPER_DENOISER = "absorbing.unleashing.UnleashingTransformer"


def sampler_weights(path: str) -> dict[str, torch.Tensor]:
    """The `.th` state dict in the prior's keys (``model.*``, ``process.*``)."""
    state = state_dict_in(read_checkpoint(path), path)
    if not any(k.startswith("_denoise_fn.") for k in state):
        raise CheckpointError(f"{path} has no _denoise_fn.* keys: not an Unleashing Transformers sampler checkpoint "
                              f"(its keys start with: {', '.join(sorted({k.split('.')[0] for k in state})[:6])})")
    return convert_sampler_state_dict(state)


def load_config(path: str, overrides: list[str]) -> dict[str, Any]:
    config = OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(overrides))
    config = OmegaConf.to_container(config, resolve=True)
    target = config["model"]["params"].get("denoiser_config", {}).get("target")
    if target != PAPER_DENOISER:
        raise SystemExit(f"{path}: the denoiser is {target!r}; the paper's weights need {PAPER_DENOISER}")
    return config


def convert(th: str, config: dict[str, Any], ema_th: str | None = None) -> torch.nn.Module:
    """The prior of `config` holding the `.th` weights (its EMA shadow from `ema_th`, else the same weights)."""
    prior = instantiate_from_config(config["model"], key="model")
    state = sampler_weights(th)
    ema = getattr(prior, "model_ema", None)
    if ema is not None:
        shadow_source = sampler_weights(ema_th) if ema_th else state
        for name, s_name in ema.flat_names.items():
            if f"model.{name}" in shadow_source:
                state[f"model_ema.{s_name}"] = shadow_source[f"model.{name}"]
    elif ema_th:
        raise SystemExit("--ema-th given, but the config's prior keeps no EMA (use_ema: false)")
    # the first stage keeps the weights of its own ckpt_path; the EMA's decay/step counters start afresh
    load_into(prior, state, source=th, allow_missing=("first_stage_model.", "model_ema.decay", "model_ema.num_updates"))
    return prior.eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", help="the original sampler checkpoint, e.g. absorbing_1400000.th")
    p.add_argument("--config", required=True, help="project config with the paper's denoiser, e.g. configs/absorbing/churches.yaml")
    p.add_argument("--out", required=True, help="project checkpoint to write (.ckpt)")
    p.add_argument("--ema-th", default=None, help="the matching absorbing_ema_*.th, for the prior's EMA weights")
    p.add_argument("overrides", nargs="*", help="config overrides key.path=value")
    return p.parse_intermixed_args(argv)  # overrides may follow the flags


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    config = load_config(args.config, args.overrides)
    try:
        prior = convert(args.checkpoint, config, args.ema_th)
    except CheckpointError as e:
        raise SystemExit(str(e)) from None
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    torch.save({"state_dict": prior.state_dict(), "config": config, "source": os.path.basename(args.checkpoint)}, tmp)
    tmp.replace(out)
    n = sum(p.numel() for p in prior.model.parameters())
    print(f"wrote {out}: {type(prior.model).__name__} ({n / 1e6:.2f}M parameters) from {args.checkpoint}")
    return 0


if __name__ == "__main__":
    sys.exit(run(main))

"""Exponential moving average of weights, stored in latent-diffusion's `LitEma` layout.

The state dict holds `decay`, `num_updates` and one entry per trainable parameter named with the
dots removed, so `model_ema.*` keys of existing checkpoints load unchanged.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn


class EMA(nn.Module):
    """A separate averaged copy of a network (Polyak averaging), with warm-up `min(decay, (1+n)/(10+n))`.

    Sampling and validation call the copy (`ema(x)` or `ema.averaged`); the trained weights are never
    swapped. Call `update(model)` once per optimizer step. The copy is not a registered submodule:
    its parameters are written to and read from the state dict in latent-diffusion's LitEma layout.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, warmup: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer("num_updates", torch.tensor(0 if warmup else -1, dtype=torch.int))
        averaged = copy.deepcopy(model).eval().requires_grad_(False)
        object.__setattr__(self, "averaged", averaged)
        self.flat_names = {name: name.replace(".", "") for name, p in model.named_parameters() if p.requires_grad}

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.averaged(*args, **kwargs)

    def train(self, mode: bool = True) -> EMA:
        super().train(mode)
        self.averaged.eval()  # the averaged copy never runs dropout
        return self

    def _apply(self, fn: Any, recurse: bool = True) -> EMA:
        super()._apply(fn, recurse)
        self.averaged._apply(fn, recurse)
        return self

    def current_decay(self) -> float:
        if int(self.num_updates) < 0:
            return float(self.decay)
        n = int(self.num_updates)
        return min(float(self.decay), (1 + n) / (10 + n))

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        """One step of averaging towards `model`'s current weights; the rest is copied as it is."""
        if int(self.num_updates) >= 0:
            self.num_updates += 1
        one_minus = 1.0 - self.current_decay()
        live = dict(model.named_parameters())
        for name, avg in self.averaged.named_parameters():
            if name in self.flat_names:
                avg.lerp_(live[name].detach().to(avg.dtype), one_minus)
        self.copy_untracked_from(model)

    @torch.no_grad()
    def reset_to(self, model: nn.Module) -> None:
        """Start the average afresh from `model`'s weights (a checkpoint that carried no EMA)."""
        live = dict(model.named_parameters())
        for name, avg in self.averaged.named_parameters():
            avg.copy_(live[name])
        self.copy_untracked_from(model)

    @torch.no_grad()
    def copy_untracked_from(self, model: nn.Module) -> None:
        """Buffers and frozen parameters (e.g. an EMA-updated codebook) follow the live network as they are."""
        live = dict(model.named_buffers()) | dict(model.named_parameters())
        untracked = [*self.averaged.named_buffers(),
                     *((n, p) for n, p in self.averaged.named_parameters() if n not in self.flat_names)]
        for name, t in untracked:
            if name in live:
                t.copy_(live[name])

    def _save_to_state_dict(self, destination: dict, prefix: str, keep_vars: bool) -> None:
        super()._save_to_state_dict(destination, prefix, keep_vars)
        for name, p in self.averaged.named_parameters():
            if name in self.flat_names:
                destination[prefix + self.flat_names[name]] = p if keep_vars else p.detach()

    def _load_from_state_dict(self, state_dict: dict, prefix: str, local_metadata: dict, strict: bool,
                              missing_keys: list, unexpected_keys: list, error_msgs: list) -> None:
        flat = {prefix + s: n for n, s in self.flat_names.items()}
        own = {k: v for k, v in state_dict.items() if k not in flat}
        super()._load_from_state_dict(own, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs)
        params = dict(self.averaged.named_parameters())
        for key, name in flat.items():
            if key not in state_dict:
                missing_keys.append(key)
                continue
            value, p = state_dict[key], params[name]
            if value.shape != p.shape:
                error_msgs.append(f"size mismatch for {key}: {tuple(value.shape)} in the checkpoint, "
                                  f"{tuple(p.shape)} in the model")
                continue
            with torch.no_grad():
                p.copy_(value)


def ema_state_dict(state: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], int]:
    """`state` with each parameter replaced by its EMA copy and the `<name>_ema.*` entries dropped, and
    how many were replaced: inference weights for code that knows nothing of EMAs.

    An entry of `<name>_ema.` is named after the parameter relative to `<name>.` (a prior's network,
    latent-diffusion's `model.`) or to the top (a first stage's parts), dots removed:
    ``model.diffusion_model.out.2.weight`` -> ``model_ema.diffusion_modelout2weight``.
    """
    heads = {k.split(".", 1)[0] for k in state if k.split(".", 1)[0].endswith("_ema")}
    shadows = {h: {k[len(h) + 1:]: v for k, v in state.items() if k.startswith(h + ".")} for h in heads}
    out: dict[str, torch.Tensor] = {}
    replaced = 0
    for key, value in state.items():
        if key.split(".", 1)[0] in heads:
            continue
        for head, shadow in shadows.items():
            tracked = head[: -len("_ema")] + "."
            name = (key[len(tracked):] if key.startswith(tracked) else key).replace(".", "")
            if name in shadow and name not in ("decay", "num_updates") and shadow[name].shape == value.shape:
                value, replaced = shadow[name], replaced + 1
                break
        out[key] = value
    return out, replaced

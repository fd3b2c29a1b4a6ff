"""Exponential moving average of weights, stored in latent-diffusion's `LitEma` layout.

Buffers are `decay`, `num_updates` and one buffer per trainable parameter named with the dots
removed, so `model_ema.*` keys of existing checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import torch
from torch import nn


class LitEma(nn.Module):
    """EMA shadow of a module's trainable parameters, with warm-up `min(decay, (1+n)/(10+n))`."""

    def __init__(self, model: nn.Module, decay: float = 0.9999, use_num_updates: bool = True):
        super().__init__()
        if not 0.0 <= decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {decay}")
        self.register_buffer("decay", torch.tensor(decay, dtype=torch.float32))
        self.register_buffer(
            "num_updates", torch.tensor(0 if use_num_updates else -1, dtype=torch.int)
        )
        self.m_name2s_name: dict[str, str] = {}
        for name, p in model.named_parameters():
            if p.requires_grad:
                s_name = name.replace(".", "")
                self.m_name2s_name[name] = s_name
                self.register_buffer(s_name, p.detach().clone().data)
        self._stash: list[torch.Tensor] = []

    @torch.no_grad()
    def forward(self, model: nn.Module) -> None:
        """One EMA update from the model's current weights."""
        decay = float(self.decay)
        if self.num_updates >= 0:
            self.num_updates += 1
            n = int(self.num_updates)
            decay = min(decay, (1 + n) / (10 + n))
        one_minus = 1.0 - decay
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                s = shadow[self.m_name2s_name[name]]
                s.sub_(one_minus * (s - p.detach().to(s.dtype)))

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        shadow = dict(self.named_buffers())
        for name, p in model.named_parameters():
            if name in self.m_name2s_name:
                p.data.copy_(shadow[self.m_name2s_name[name]].data)

    def store(self, parameters: Iterator[nn.Parameter]) -> None:
        self._stash = [p.detach().clone() for p in parameters]

    def restore(self, parameters: Iterator[nn.Parameter]) -> None:
        for saved, p in zip(self._stash, parameters, strict=True):
            p.data.copy_(saved.data)
        self._stash = []


@contextmanager
def ema_scope(model: nn.Module, ema: LitEma | None, enabled: bool = True):
    """Run a block with the EMA weights swapped in, restoring the trained weights after."""
    if ema is None or not enabled:
        yield
        return
    ema.store(model.parameters())
    ema.copy_to(model)
    try:
        yield
    finally:
        ema.restore(model.parameters())


def ema_state_dict(state: Mapping[str, torch.Tensor], ema_prefix: str = "model_ema.") -> tuple[dict[str, torch.Tensor], int]:
    """`state` with each parameter replaced by its EMA shadow and the shadow buffers dropped, and how
    many were replaced: inference weights for code that knows nothing of `LitEma`.

    A shadow is named after the parameter relative to the module the EMA tracks, dots removed: the
    whole first stage (``encoder.conv_in.weight`` -> ``encoderconv_inweight``) or a prior's / latent
    diffusion's ``model.`` (``model.diffusion_model.out.2.weight`` -> ``diffusion_modelout2weight``).
    """
    shadow = {k[len(ema_prefix):]: v for k, v in state.items() if k.startswith(ema_prefix)}
    out: dict[str, torch.Tensor] = {}
    replaced = 0
    for key, value in state.items():
        if key.startswith(ema_prefix):
            continue
        for tracked in ("model.", ""):
            name = key[len(tracked):].replace(".", "") if key.startswith(tracked) else None
            if name in shadow and name not in ("decay", "num_updates") and shadow[name].shape == value.shape:
                value, replaced = shadow[name], replaced + 1
                break
        out[key] = value
    return out, replaced

"""Exponential moving average of weights, stored in latent-diffusion's `LitEma` layout.

Buffers are `decay`, `num_updates` and one buffer per trainable parameter named with the dots
removed, so `model_ema.*` keys of existing checkpoints load unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
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

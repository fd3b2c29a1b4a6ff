"""Optimizers built one way for every model: Adam(W) as one fused kernel over all parameters where their device
has it (CUDA, and the CPU since torch 2.4), the per-tensor loop elsewhere. The update is the same rule either way;
only the rounding of its floating-point operations differs."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn


def fused_devices() -> tuple[str, ...]:
    """Device types whose Adam(W) has a fused kernel in this torch."""
    try:
        from torch.optim.optimizer import _get_fused_kernels_supported_devices
    except ImportError:  # an older torch: CUDA only
        return ("cuda",)
    return tuple(_get_fused_kernels_supported_devices())


def fusable(params: list[nn.Parameter]) -> bool:
    """Every parameter is a floating-point tensor on a device with the fused kernel."""
    devices = fused_devices()
    return bool(params) and all(p.is_floating_point() and p.device.type in devices for p in params)


def _build(cls: type[torch.optim.Optimizer], params: Iterable[nn.Parameter], fused: bool | None,
           **kwargs: Any) -> torch.optim.Optimizer:
    params = list(params)
    if fused is None:
        fused = fusable(params)
    elif fused and not fusable(params):
        where = sorted({p.device.type for p in params})
        raise ValueError(f"fused_optimizer: true needs every parameter on a device with a fused {cls.__name__} "
                         f"({', '.join(fused_devices())}); these are on {', '.join(where) or 'nothing'}")
    return cls(params, fused=fused, **kwargs)


def adamw(params: Iterable[nn.Parameter], fused: bool | None = None, **kwargs: Any) -> torch.optim.AdamW:
    """AdamW, fused where available (`fused=None`), on request (True: refused where it is not), or never."""
    return _build(torch.optim.AdamW, params, fused, **kwargs)


def adam(params: Iterable[nn.Parameter], fused: bool | None = None, **kwargs: Any) -> torch.optim.Adam:
    """Adam, as `adamw` (the first stages' optimizer)."""
    return _build(torch.optim.Adam, params, fused, **kwargs)

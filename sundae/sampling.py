"""The SUNDAE sampler (Savinov et al. 2022, Sec. 3.2; McKinney & Willcocks 2022, Sec. 3.3).

Start from uniformly random tokens. At every step the network proposes a token for every position (a
draw at a temperature, optionally restricted by top-k / top-p, optionally guided); each proposal is
accepted with a probability, the proportion, and only the accepted positions are drawn. Temperature and
proportion run linearly from their start to their end value over the steps, as in the original. A sample
stops on its own once a step leaves it unchanged, after `min_steps` steps (the original's self-stopping);
the network then runs only on the samples still changing. Inpainting holds the known tokens fixed at every step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ldm.conditioning import Cond, index_cond
from ldm.logits import guided_logits, sample_categorical

Callback = Callable[[dict[str, Any]], None]


def schedule(start: float, end: float | None, steps: int) -> list[float]:
    """`steps` values from `start` to `end` (None: constant), both ends included (torch.linspace's)."""
    return torch.linspace(start, start if end is None else end, steps, dtype=torch.float64).tolist()


@torch.no_grad()
def sample(
    net: Callable[[torch.Tensor, Cond], torch.Tensor],
    shape: tuple[int, int],
    codebook_size: int,
    steps: int,
    cond: Cond | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    *,
    temperature: float = 1.0,
    end_temperature: float | None = None,
    proportion: float = 1.0,
    end_proportion: float | None = None,
    min_steps: int | None = 10,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    null_cond: Cond | None = None,
    x_init: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    return_steps: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, N); with `return_steps` also the network calls each sample took (B,) long.

    `net(x (b, N) long, cond) -> logits (b, N, K)`. `min_steps=None` never stops early. With `known`
    (B, N) bool the tokens of `x_init` there are kept (inpainting) and only the rest is sampled.
    """
    b, n = shape
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    for name, value in (("proportion", proportion), ("end_proportion", end_proportion)):
        if value is not None and not 0.0 < value <= 1.0:
            raise ValueError(f"{name} must be in (0, 1], got {value}")
    if device is None:
        device = next(iter(cond.values())).device if cond else torch.device("cpu")
    device = torch.device(device)
    gen_device = generator.device if generator is not None else device
    x = torch.randint(0, codebook_size, (b, n), generator=generator, device=gen_device).to(device)
    if known is not None:
        if x_init is None or known.shape != (b, n) or x_init.shape != (b, n):
            raise ValueError(f"inpainting needs x_init and known of shape {(b, n)}, got "
                             f"{None if x_init is None else tuple(x_init.shape)} and {tuple(known.shape)}")
        known = known.to(device)
        x = torch.where(known, x_init.to(device), x)

    def call(xs: torch.Tensor, t: torch.Tensor, c: Cond) -> torch.Tensor:  # the shared guidance takes a time
        return net(xs, c)

    temperatures, proportions = schedule(temperature, end_temperature, steps), schedule(proportion, end_proportion, steps)
    active = torch.ones(b, dtype=torch.bool, device=device)
    taken = torch.zeros(b, dtype=torch.long, device=device)
    whole = True  # no sample has stopped yet: the step runs on the batch as it is, with no gathers
    for i, (temp, prop) in enumerate(zip(temperatures, proportions)):
        if whole:
            idx, xs, c, nc = slice(None), x, cond, null_cond
        else:
            idx = active.nonzero().squeeze(1)  # the samples still changing
            xs = x[idx]  # (b', N)
            c = index_cond(cond, idx) if cond else None
            nc = index_cond(null_cond, idx) if null_cond else None
        logits = guided_logits(call, xs, torch.zeros(len(xs), dtype=torch.long, device=device), c, nc, guidance_scale)
        if prop >= 1.0 and known is None:  # every proposal is accepted: one draw per position, nothing to select
            new = sample_categorical(logits, temp, top_k, top_p, generator).to(device)
        else:
            accept = torch.rand(xs.shape, generator=generator, device=gen_device).to(device) < prop  # (b', N)
            if known is not None:
                accept &= ~known[idx]
            new = xs.clone()  # only the accepted positions are drawn: the rest would be thrown away
            new[accept] = sample_categorical(logits[accept], temp, top_k, top_p, generator).to(device)
        taken[idx] += 1
        if min_steps is not None and i >= min_steps:
            unchanged = (new == xs).all(1)
            if bool(unchanged.any()):
                active[torch.arange(b, device=device)[idx][unchanged]] = False
                whole = False
        x[idx] = new
        if callback is not None:
            callback({"i": i, "steps": steps, "x": x, "temperature": temp, "proportion": prop,
                      "active": active.clone(), "steps_taken": taken.clone(),
                      "evaluated": len(xs)})
        if not whole and not bool(active.any()):
            break
    return (x, taken) if return_steps else x

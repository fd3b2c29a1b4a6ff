"""Samplers for absorbing diffusion. Each takes the denoiser `net(x_t, t, cond) -> logits (B, N, K)`,
`cond` a conditioning dict (`ldm.conditioning`).

`sample` runs the paper's reverse process with any number of steps S <= T: at step s = S..1 every
still-masked token is revealed with probability 1/s (so all are revealed at s = 1), its value drawn
from the denoiser's prediction of x_0. `order="confidence"` reveals instead the most confident
predictions on a cosine schedule (MaskGIT, Chang et al. 2022), with MaskGIT's annealed Gumbel noise on the
confidences as an option (`confidence_noise`); `order="raster"` reveals tokens in raster order, evenly over
the steps (one per step when steps = N, as in the paper's big samples). `schedule` sets how many tokens a
step reveals whatever the order: "uniform" (the paper's 1/s per token in random order, an even share of
what is left otherwise) or "cosine" (a fraction cos(pi/2 (i+1)/S) still masked after step i).

A denoiser that ignores t (the paper's; `time_invariant=True`) gives a row that did not change since its
last evaluation the same logits again, so only the rows a step changed are evaluated at the next one and
the rest reuse their logits: the same samples for the same seed, with fewer network evaluations (with
random order and many steps most rows change at only a fraction of the steps).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, Literal

import torch

from ldm.conditioning import Cond, index_cond
from ldm.logits import filter_logits, guided_logits, gumbel_noise, sample_categorical

Callback = Callable[[dict[str, Any]], None]
Order = Literal["random", "confidence", "raster"]
Schedule = Literal["uniform", "cosine"]
ORDERS: tuple[Order, ...] = ("random", "confidence", "raster")
SCHEDULES: tuple[Schedule, ...] = ("uniform", "cosine")


def default_schedule(order: str) -> Schedule:
    """The schedule each order had where it was introduced: MaskGIT's cosine for confidence, uniform else."""
    return "cosine" if order == "confidence" else "uniform"


def _time_for_step(step: int, steps: int, num_timesteps: int) -> int:
    """The diffusion time whose masking rate matches `step` of `steps` (t = s when S = T)."""
    return max(1, round(step * num_timesteps / steps))


def _draw_all(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
              generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """Tokens (B, N) drawn at every position and their probabilities under the filtered distribution (the
    confidence order ranks every position by them)."""
    x = sample_categorical(logits, temperature, top_k, top_p, generator)
    probs = logits.float().softmax(-1) if temperature == 0 else \
        filter_logits(logits.float() / temperature, top_k, top_p).softmax(-1)
    return x, probs.gather(-1, x.unsqueeze(-1)).squeeze(-1)


@torch.no_grad()
def sample(
    net: Callable[..., torch.Tensor],
    shape: tuple[int, int],
    mask_id: int,
    num_timesteps: int,
    steps: int | None = None,
    cond: Cond | None = None,
    generator: torch.Generator | None = None,
    callback: Callback | None = None,
    *,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    guidance_scale: float = 1.0,
    null_cond: Cond | None = None,
    order: Order = "random",
    schedule: Schedule | None = None,
    confidence_noise: float = 0.0,
    x_init: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    time_invariant: bool = False,
) -> torch.Tensor:
    """Generate tokens (B, N); with `known` (B, N) bool the tokens of `x_init` there are kept (inpainting).

    `schedule` None is the order's own (`default_schedule`). `confidence_noise` tau adds
    tau (1 - (i+1)/S) Gumbel noise to the log-confidences that rank positions in confidence order (MaskGIT's
    randomised choice: early steps explore, the last ones are greedy). The callback's `evaluated` is the number
    of rows the network ran on at that step.
    """
    b, n = shape
    steps = num_timesteps if steps is None else steps  # 0 is refused below, not taken for the default
    if order not in ORDERS:
        raise ValueError(f"order must be 'random', 'confidence' or 'raster', got {order!r}")
    schedule = default_schedule(order) if schedule is None else schedule
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be 'uniform' or 'cosine', got {schedule!r}")
    most = n if order == "raster" else num_timesteps
    if not 1 <= steps <= most:
        raise ValueError(f"steps must be in 1..{most} ({'the tokens' if order == 'raster' else 'the trained T'}), "
                         f"got {steps}")
    if device is None:
        device = next(iter(cond.values())).device if cond else torch.device("cpu")
    device = torch.device(device)
    x = torch.full((b, n), mask_id, dtype=torch.long, device=device)
    if known is not None:
        if x_init is None or known.shape != (b, n) or x_init.shape != (b, n):
            raise ValueError(f"inpainting needs x_init and known of shape {(b, n)}")
        x = torch.where(known, x_init.to(device), x)
    unmasked = x != mask_id  # (B, N) bool
    n_start_masked = (~unmasked).sum(1)  # (B,)
    logits: torch.Tensor | None = None  # the last evaluation of every row (reused when time_invariant)
    changed = torch.ones(b, dtype=torch.bool, device=device)  # rows changed since their last evaluation

    for i, s in enumerate(range(steps, 0, -1)):
        t = torch.full((b,), _time_for_step(s, steps, num_timesteps), dtype=torch.long, device=device)
        if time_invariant and logits is not None:
            rows = changed.nonzero().squeeze(1)  # only these rows' logits can differ from their last evaluation
            if len(rows):
                logits[rows] = guided_logits(net, x[rows], t[rows], index_cond(cond, rows) if cond else None,
                                             index_cond(null_cond, rows) if null_cond else None, guidance_scale)
            evaluated = len(rows)
        else:
            logits = guided_logits(net, x, t, cond, null_cond, guidance_scale)  # (B, N, K)
            evaluated = b
        n_masked = (~unmasked).sum(1)  # (B,)
        if order == "random" and schedule == "uniform":  # the paper's: each masked token with probability 1/s
            reveal = (torch.rand((b, n), device=device, generator=generator) < 1.0 / s) & ~unmasked
        else:
            if schedule == "cosine":  # fraction still masked after this step = cos(pi/2 * (i+1)/steps)
                keep_masked = torch.floor(n_start_masked.float() * math.cos(math.pi / 2 * (i + 1) / steps)).long()
                n_reveal = (n_masked - keep_masked).clamp(min=0)
            else:  # an even share of what is left over the s steps to go
                n_reveal = torch.ceil(n_masked.float() / s).long()
            if order == "confidence":
                x0_hat, conf = _draw_all(logits, temperature, top_k, top_p, generator)
                score = conf.clamp_min(1e-30).log()
                if confidence_noise > 0:
                    score = score + confidence_noise * (1.0 - (i + 1) / steps) * gumbel_noise(conf.shape, generator, device)
            elif order == "random":
                score = torch.rand((b, n), device=device, generator=generator)
            else:  # raster: earlier positions first
                score = -torch.arange(n, device=device, dtype=torch.float).expand(b, n)
            rank = score.masked_fill(unmasked, -math.inf).argsort(dim=1, descending=True, stable=True).argsort(dim=1)
            reveal = (rank < n_reveal.unsqueeze(1)) & ~unmasked
        if order == "confidence":
            x = torch.where(reveal, x0_hat, x)
        else:
            x = x.clone()  # only the revealed positions are drawn: the rest of a full draw would be thrown away
            x[reveal] = sample_categorical(logits[reveal], temperature, top_k, top_p, generator)
        unmasked = unmasked | reveal
        changed = reveal.any(1)  # (B,)
        if callback is not None:
            callback({"i": i, "steps": steps, "t": t, "x": x, "evaluated": evaluated})
    return x

"""Samplers for absorbing diffusion. Each takes the denoiser `net(x_t, t, cond) -> logits (B, N, K)`,
`cond` a conditioning dict (`ldm.conditioning`).

`sample` runs the paper's reverse process with any number of steps S <= T: at step s = S..1 every
still-masked token is revealed with probability 1/s (so all are revealed at s = 1), its value drawn
from the denoiser's prediction of x_0. `order="confidence"` reveals instead the most confident
predictions on a cosine schedule (MaskGIT, Chang et al. 2022); `order="raster"` reveals tokens in
raster order, evenly over the steps (one per step when steps = N, as in the paper's big samples).

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
from ldm.logits import filter_logits, guided_logits, sample_categorical

Callback = Callable[[dict[str, Any]], None]
Order = Literal["random", "confidence", "raster"]


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
    x_init: torch.Tensor | None = None,
    known: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    time_invariant: bool = False,
) -> torch.Tensor:
    """Generate tokens (B, N); with `known` (B, N) bool the tokens of `x_init` there are kept (inpainting).

    The callback's `evaluated` is the number of rows the network ran on at that step.
    """
    b, n = shape
    steps = num_timesteps if steps is None else steps  # 0 is refused below, not taken for the default
    if order not in ("random", "confidence", "raster"):
        raise ValueError(f"order must be 'random', 'confidence' or 'raster', got {order!r}")
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
        if order == "confidence":
            x0_hat, conf = _draw_all(logits, temperature, top_k, top_p, generator)
            # cosine schedule: fraction still masked after this step = cos(pi/2 * (i+1)/steps)
            keep_masked = torch.floor(n_start_masked.float() * math.cos(math.pi / 2 * (i + 1) / steps)).long()
            n_reveal = ((~unmasked).sum(1) - keep_masked).clamp(min=0)  # (B,)
            score = conf.masked_fill(unmasked, -1.0)
            rank = score.argsort(dim=1, descending=True).argsort(dim=1)
            reveal = (rank < n_reveal.unsqueeze(1)) & ~unmasked
            x = torch.where(reveal, x0_hat, x)
        else:
            if order == "random":
                u = torch.rand((b, n), device=device, generator=generator)
                reveal = (u < 1.0 / s) & ~unmasked
            else:  # raster
                n_reveal = torch.ceil((~unmasked).sum(1).float() / s).long()  # spread what is left over s steps
                rank = torch.cumsum((~unmasked).long(), dim=1)  # 1-based rank among masked, raster order
                reveal = ~unmasked & (rank <= n_reveal.unsqueeze(1))
            x = x.clone()  # only the revealed positions are drawn: the rest of a full draw would be thrown away
            x[reveal] = sample_categorical(logits[reveal], temperature, top_k, top_p, generator)
        unmasked = unmasked | reveal
        changed = reveal.any(1)  # (B,)
        if callback is not None:
            callback({"i": i, "steps": steps, "t": t, "x": x, "evaluated": evaluated})
    return x

"""Logit processing shared by the token samplers: temperature, top-k / top-p, classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ldm.conditioning import Cond, cat_cond


def filter_logits(logits: torch.Tensor, top_k: int | None = None, top_p: float | None = None) -> torch.Tensor:
    """Keep the `top_k` largest logits and the smallest set whose probability reaches `top_p` (nucleus)."""
    if top_k is not None:
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        k = min(top_k, logits.shape[-1])
        kth = torch.topk(logits, k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        sorted_logits, order = torch.sort(logits, descending=True, dim=-1)
        cum = sorted_logits.softmax(-1).cumsum(-1)
        drop_sorted = cum - sorted_logits.softmax(-1) >= top_p  # keep the token that crosses top_p
        drop = drop_sorted.scatter(-1, order, drop_sorted)
        logits = logits.masked_fill(drop, float("-inf"))
    return logits


def categorical_from_uniform(logits: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """One code per row of `logits` (..., K) -> (...) long, by inverting the CDF of softmax(logits) at `u` (...).

    One uniform per row and a search in the cumulative sum: cheaper than `torch.multinomial` on wide rows,
    and the same draw for the same `u` whatever the batch around it.
    """
    cdf = logits.float().softmax(-1).cumsum(-1)
    idx = torch.searchsorted(cdf, (u * cdf[..., -1]).unsqueeze(-1).contiguous(), right=True).squeeze(-1)
    return idx.clamp(max=logits.shape[-1] - 1)


def gumbel_noise(shape: tuple[int, ...], generator: torch.Generator | None = None,
                 device: torch.device | str | None = None) -> torch.Tensor:
    """Standard Gumbel noise: argmax(logits + G) over the last axis is a draw of softmax(logits) (Gumbel-max)."""
    gen_device = generator.device if generator is not None else device
    u = torch.rand(shape, generator=generator, device=gen_device).to(device)
    return -torch.log(-torch.log(u.clamp_min(torch.finfo(u.dtype).tiny)))  # finite: u = 0 gives -4.5, not -inf


def sample_categorical(logits: torch.Tensor, temperature: float = 1.0, top_k: int | None = None,
                       top_p: float | None = None, generator: torch.Generator | None = None,
                       u: torch.Tensor | None = None, gumbel: torch.Tensor | None = None) -> torch.Tensor:
    """Draw one index per row of `logits` (..., K); temperature 0 is argmax. Noise drawn beforehand replaces
    the generator: `u` (...) uniforms for the inverse CDF, or `gumbel` (..., K) for the Gumbel-max draw (two
    operations: what a sampler drawing a few rows at a time, one network step each, wants)."""
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits.float() if temperature == 1.0 else logits.float() / temperature
    logits = filter_logits(logits, top_k, top_p)
    if gumbel is not None:
        return (logits + gumbel).argmax(-1)
    if u is None:
        gen_device = generator.device if generator is not None else logits.device
        u = torch.rand(logits.shape[:-1], generator=generator, device=gen_device).to(logits.device)
    return categorical_from_uniform(logits, u)


def guided_logits(net: Callable[..., torch.Tensor], x: torch.Tensor, t: torch.Tensor, cond: Cond | None,
                  null_cond: Cond | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance on log-probabilities: log p_u + s (log p_c - log p_u), renormalised.

    `net(x, t, cond)` returns logits (B, N, K); `cond` is a conditioning dict, and the conditional
    and unconditional passes run as one batch. Scale 1 (or no conditioning) is the plain model.
    """
    if scale == 1.0 or not cond:
        return net(x, t, cond or {})
    if null_cond is None:
        raise ValueError("classifier-free guidance needs a null condition (train with conditioning dropout)")
    both = net(torch.cat([x, x]), torch.cat([t, t]), cat_cond(cond, null_cond))
    cond_lp, uncond_lp = both.float().log_softmax(-1).chunk(2)
    return (uncond_lp + scale * (cond_lp - uncond_lp)).log_softmax(-1)

"""ImageBART's sampler: from x_T (uniform noise) through every scale t = T..1, each transition drawn token by
token in raster order by its autoregressive network.

Per scale: temperature, top-k and top-p; classifier-free guidance mixes the conditional and unconditional
next-token log-probabilities (both halves run as one doubled batch and are fed the same token). With a
key/value cache (`use_cache`, the default) each token costs one decoder step on one new position; without it
the whole decoder reruns on the prefix (the reference, equal within float rounding).

Inpainting / editing (Esser et al. 2021, Sec. 3.3): the known tokens of x_{t-1} are forced at every scale to a
draw of q(x_{t-1} | x_0) from the known x_0 (exactly x_0 at t = 1), so the decoder conditions on them as it
goes and the encoder sees both sides of every hole in x_t; `resample` passes per scale re-noise the result
to x_t with q(x_t | x_{t-1}) and draw x_{t-1} again, to harmonise the filled region with the known one.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any, Protocol

import torch

from imagebart.process import MultinomialDiffusion
from ldm.conditioning import Cond
from ldm.logits import gumbel_noise, sample_categorical

Callback = Callable[[dict[str, Any]], None]


class Transition(Protocol):
    """What `EncoderDecoder` and `DecoderOnly` offer for drawing x_{t-1} given x_t."""

    def start(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> Any: ...
    def next_logits(self, state: Any, token: torch.Tensor | None) -> torch.Tensor: ...
    def prefix_logits(self, state: Any, prefix: torch.Tensor) -> torch.Tensor: ...


def _labels(cond: Cond | None) -> torch.Tensor | None:
    return None if not cond else cond.get("class_label")


def guided(log_probs: torch.Tensor, scale: float) -> torch.Tensor:
    """Doubled-batch logits (2B, K) -> guided log-probabilities (B, K): log p_u + s (log p_c - log p_u)."""
    cond_lp, uncond_lp = log_probs.float().log_softmax(-1).chunk(2)
    return (uncond_lp + scale * (cond_lp - uncond_lp)).log_softmax(-1)


@torch.no_grad()
def sample_scale(net: Transition, x_t: torch.Tensor, t: int, cond: Cond | None = None,
                 generator: torch.Generator | None = None, *, temperature: float = 1.0, top_k: int | None = None,
                 top_p: float | None = None, guidance_scale: float = 1.0, null_cond: Cond | None = None,
                 forced: torch.Tensor | None = None, known: torch.Tensor | None = None, use_cache: bool = True,
                 callback: Callback | None = None, info: dict[str, Any] | None = None) -> torch.Tensor:
    """x_{t-1} (B, N) drawn from `net` given x_t (B, N); positions where `known` (B, N) is set take `forced`."""
    b, n = x_t.shape
    guide = guidance_scale != 1.0 and bool(cond)
    if guide and null_cond is None:
        raise ValueError("classifier-free guidance needs a null condition (train with conditioning dropout)")
    labels = _labels(cond)
    if guide:
        x_in, labels = torch.cat([x_t, x_t]), torch.cat([labels, _labels(null_cond)])
    else:
        x_in = x_t
    ts = torch.full((x_in.shape[0],), t, dtype=torch.long, device=x_t.device)
    out = torch.empty_like(x_t)
    state = net.start(x_in, ts, labels)
    token = None
    noise = None  # Gumbel noise (B, K) per token, drawn in as few calls as memory allows
    for i in range(n):
        fed, length, position = token, state.length, state.position
        if use_cache:
            logits = net.next_logits(state, token)
        else:
            prefix = out[:, :i] if not guide else torch.cat([out[:, :i], out[:, :i]])
            logits = net.prefix_logits(state, prefix)
        if guide:
            logits = guided(logits, guidance_scale)
        if noise is None:
            noise = _noise_per_token(n, b, logits.shape[-1], generator, x_t.device)
        drawn = sample_categorical(logits, temperature, top_k, top_p, gumbel=next(noise)).to(x_t.device)
        if known is not None:
            drawn = torch.where(known[:, i], forced[:, i], drawn)
        out[:, i] = drawn
        token = torch.cat([drawn, drawn]) if guide else drawn
        if callback is not None:
            replay = _step_replay(net, state, x_in, ts, labels, fed, length, position, first=i == 0,
                                  prefix=None if use_cache else prefix)
            callback({**(info or {}), "position": i, "x": out, "t": t, "replay": replay})
    return out


def _noise_per_token(n: int, b: int, k: int, generator: torch.Generator | None, device: torch.device,
                     max_elements: int = 1 << 22) -> Iterator[torch.Tensor]:
    """Gumbel noise (b, k) for each of a scale's n tokens, drawn in chunks of at most `max_elements` (a token's
    draw then costs an add and an argmax; the same noise whether the decoder is cached or not)."""
    per = max(1, max_elements // (b * k))
    for start in range(0, n, per):
        yield from gumbel_noise((min(per, n - start), b, k), generator, device)


def _step_replay(net: Transition, state: Any, x_in: torch.Tensor, ts: torch.Tensor, labels: torch.Tensor | None,
                 fed: torch.Tensor | None, length: int, position: int, first: bool,
                 prefix: torch.Tensor | None) -> Callable[[], None]:
    """The network evaluation of the step just taken, to run again on its very inputs (`benchmark.py` times it
    beside the step). A cached step is rerun from the cache as it was: it rewrites the same keys and values
    at the same slots, so sampling goes on unchanged; a scale's first step starts the scale again (the encoder)
    on a fresh state."""

    def replay() -> None:
        with torch.no_grad():
            if first:
                fresh = net.start(x_in, ts, labels)
                net.next_logits(fresh, None) if prefix is None else net.prefix_logits(fresh, prefix)
            elif prefix is not None:
                net.prefix_logits(state, prefix)
            else:
                after = state.length, state.position
                state.length, state.position = length, position
                net.next_logits(state, fed)
                state.length, state.position = after

    return replay


def per_scale(value: Any, n_scales: int) -> list[Any]:
    """One value for every scale, or a sequence of one per scale t = 1..T."""
    if isinstance(value, Sequence) and not isinstance(value, str):
        if len(value) != n_scales:
            raise ValueError(f"expected one value or {n_scales} (one per scale), got {list(value)}")
        return list(value)
    return [value] * n_scales


@torch.no_grad()
def sample(transition: Callable[[int], Transition], process: MultinomialDiffusion, shape: tuple[int, int],
           cond: Cond | None = None, generator: torch.Generator | None = None, callback: Callback | None = None, *,
           temperature: float | Sequence[float] = 1.0, top_k: int | None | Sequence[int | None] = None,
           top_p: float | None | Sequence[float | None] = None, guidance_scale: float = 1.0,
           null_cond: Cond | None = None, x0_known: torch.Tensor | None = None, known: torch.Tensor | None = None,
           resample: int = 0, use_cache: bool = True, device: torch.device | str = "cpu") -> torch.Tensor:
    """Tokens x_0 (B, N). `transition(t)` is the network of scale t. Per-scale settings are one value or one
    per scale t = 1..T. With `known` (B, N) bool the tokens of `x0_known` there are kept (inpainting)."""
    b, n = shape
    T = process.n_scales
    temps, ks, ps = (per_scale(v, T) for v in (temperature, top_k, top_p))
    if known is not None:
        if x0_known is None or tuple(known.shape) != (b, n) or tuple(x0_known.shape) != (b, n):
            raise ValueError(f"inpainting needs x0_known and known of shape {(b, n)}, got "
                             f"{None if x0_known is None else tuple(x0_known.shape)} and {tuple(known.shape)}")
        known, x0_known = known.to(device), x0_known.to(device)
    gen_device = generator.device if generator is not None else torch.device(device)
    x = torch.randint(0, process.codebook_size, (b, n), generator=generator, device=gen_device).to(device)
    total = T * n * (1 + resample)
    done = 0
    for t in range(T, 0, -1):
        kw = dict(temperature=temps[t - 1], top_k=ks[t - 1], top_p=ps[t - 1], guidance_scale=guidance_scale,
                  null_cond=null_cond, known=known, use_cache=use_cache)
        x_t = x
        for rep in range(1 + (resample if known is not None else 0)):
            forced = None
            if known is not None:
                tt = torch.full((b,), t - 1, dtype=torch.long, device=x.device)
                forced = process.q_sample(x0_known, tt, generator)
            info = {"steps": total, "scale": t, "pass": rep}
            step_cb = None
            if callback is not None:
                def step_cb(d: dict[str, Any], base: int = done) -> None:
                    callback({**d, "i": base + d["position"]})
            x_prev = sample_scale(transition(t), x_t, t, cond, generator, forced=forced, callback=step_cb, info=info,
                                  **kw)
            done += n
            if rep < resample and known is not None:  # re-noise to x_t and draw again
                x_t = process.q_step(x_prev, torch.full((b,), t, dtype=torch.long, device=x.device), generator)
        x = x_prev
    return x

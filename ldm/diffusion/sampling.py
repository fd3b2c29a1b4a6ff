"""Samplers of the Gaussian latent prior. Each takes a model function `model(x_t, t) -> network output` (the
process's parameterisation; `guided` binds the conditioning and classifier-free guidance, one forward over the
doubled batch), the shape or the starting noise, the number of network evaluations it may spend, a generator
and a `callback` that sees every step.

- `ddpm`: ancestral sampling through all T steps (Ho et al. 2020).
- `ddim`: Song et al. 2021 on latent-diffusion's uniform sub-sequence (t_i = i T / S + 1) with `eta`.
- `plms`: latent-diffusion's pseudo linear multistep (Liu et al. 2022) on the same sub-sequence.
- `dpm_solver_pp`: DPM-Solver++(2M) (Lu et al. 2022), data prediction, second-order multistep, first order at
  the first and last steps; timesteps evenly spaced from T-1 to 0 (diffusers' "linspace").
- `euler`, `heun`: Karras et al. 2022's samplers on a σ schedule (`karras_sigmas`) with churn, over the
  denoiser D(x, σ) that `VPDenoiser` makes of the discrete model.

Each is checked against an independent implementation on the same network in `tests/diffusion/test_sampling.py`
(diffusers' DDIM, PNDM and DPMSolverMultistep schedulers, k-diffusion's `sample_euler` / `sample_heun`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from ldm.conditioning import Cond, cat_cond
from ldm.diffusion.process import GaussianDiffusion

ModelFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
Callback = Callable[[dict[str, Any]], None]


def guided(net: Callable[[torch.Tensor, torch.Tensor, Cond], torch.Tensor], cond: Cond | None,
           null_cond: Cond | None = None, scale: float = 1.0, rescale: float = 0.0) -> ModelFn:
    """`net(x, t, cond)` bound to its conditioning; with `scale` != 1, classifier-free guidance u + s (c - u) from
    one forward over the doubled batch, and with `rescale` φ > 0 its output's per-sample standard deviation pulled
    back towards the conditional one's (Lin et al. 2023): φ · out · std(c) / std(out) + (1 − φ) · out."""
    if scale == 1.0 or not cond:
        return lambda x, t: net(x, t, cond or {})
    if null_cond is None:
        raise ValueError("classifier-free guidance needs a null condition (train with conditioning dropout)")
    both_cond = cat_cond(cond, null_cond)

    def model(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        c, u = net(torch.cat([x, x]), torch.cat([t, t]), both_cond).chunk(2)
        out = u + scale * (c - u)
        if rescale > 0:
            dims = tuple(range(1, out.dim()))
            out = rescale * out * (c.std(dims, keepdim=True) / out.std(dims, keepdim=True)) + (1 - rescale) * out
        return out

    return model


def with_x0_transform(model: ModelFn, process: GaussianDiffusion,
                      transform: Callable[[torch.Tensor], torch.Tensor] | None) -> ModelFn:
    """The model with its x_0 prediction passed through `transform` (static clipping, dynamic thresholding) and
    turned back into its parameterisation, so every discrete-time sampler uses the transformed x_0."""
    if transform is None:
        return model

    def transformed(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        x0 = transform(process.predict_x0(x, t, model(x, t)))
        return process.output_from_x0(x, t, x0)

    return transformed


def _noise(shape: tuple[int, ...], generator: torch.Generator | None, device: torch.device) -> torch.Tensor:
    gen_device = generator.device if generator is not None else device
    return torch.randn(shape, generator=generator, device=gen_device).to(device)


def _report(callback: Callback | None, i: int, steps: int, x: torch.Tensor, x0: torch.Tensor | None, t: Any) -> None:
    if callback is not None:
        callback({"i": i, "steps": steps, "x": x, "pred_x0": x0, "t": t})


def ddim_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """latent-diffusion's uniform sub-sequence: 1, 1 + c, 1 + 2c, ... with c = T // steps."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps} (the model's T), got {steps}")
    c = num_timesteps // steps
    return [i + 1 for i in range(0, num_timesteps, c)][:steps]


@torch.no_grad()
def ddpm(model: ModelFn, process: GaussianDiffusion, x_T: torch.Tensor, generator: torch.Generator | None = None,
         callback: Callback | None = None) -> torch.Tensor:
    """Ancestral sampling through t = T-1..0 with the posterior's variance."""
    x, T = x_T, process.num_timesteps
    for i, step in enumerate(range(T - 1, -1, -1)):
        t = torch.full((x.shape[0],), step, device=x.device, dtype=torch.long)
        x0 = process.predict_x0(x, t, model(x, t))
        mean, _, logvar = process.q_posterior(x0, x, t)
        x = mean + torch.exp(0.5 * logvar) * _noise(x.shape, generator, x.device) if step > 0 else mean
        _report(callback, i, T, x, x0, step)
    return x


def _ddim_alphas(process: GaussianDiffusion, ts: list[int]) -> tuple[list[float], list[float]]:
    ac = process.alphas_cumprod
    a = [float(ac[t]) for t in ts]
    return a, [float(ac[0])] + a[:-1]


@torch.no_grad()
def ddim(model: ModelFn, process: GaussianDiffusion, x_T: torch.Tensor, steps: int,
         generator: torch.Generator | None = None, callback: Callback | None = None, eta: float = 0.0,
         before_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """`before_step(x, t)`, where given, replaces x before each step (inpainting's blend of the known region)."""
    ts = ddim_timesteps(process.num_timesteps, steps)
    alphas, alphas_prev = _ddim_alphas(process, ts)
    x = x_T
    for i in reversed(range(len(ts))):
        t = torch.full((x.shape[0],), ts[i], device=x.device, dtype=torch.long)
        if before_step is not None:
            x = before_step(x, t)
        out = model(x, t)
        eps, x0 = process.predict_eps(x, t, out), process.predict_x0(x, t, out)
        a, a_prev = alphas[i], alphas_prev[i]
        sigma = eta * math.sqrt((1 - a_prev) / (1 - a) * (1 - a / a_prev))
        x = math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev - sigma**2) * eps
        if sigma > 0:
            x = x + sigma * _noise(x.shape, generator, x.device)
        _report(callback, len(ts) - 1 - i, len(ts), x, x0, ts[i])
    return x


@torch.no_grad()
def plms(model: ModelFn, process: GaussianDiffusion, x_T: torch.Tensor, steps: int,
         generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """latent-diffusion's PLMS: the first step averages two evaluations (improved Euler), later steps combine
    up to four past eps (Adams-Bashforth), each applied as a deterministic DDIM step."""
    ts = ddim_timesteps(process.num_timesteps, steps)
    alphas, alphas_prev = _ddim_alphas(process, ts)
    x, old = x_T, []

    def step(x: torch.Tensor, eps: torch.Tensor, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, a_prev = alphas[i], alphas_prev[i]
        x0 = (x - math.sqrt(1 - a) * eps) / math.sqrt(a)
        return math.sqrt(a_prev) * x0 + math.sqrt(1 - a_prev) * eps, x0

    def eps_at(x: torch.Tensor, t_value: int) -> torch.Tensor:
        t = torch.full((x.shape[0],), t_value, device=x.device, dtype=torch.long)
        return process.predict_eps(x, t, model(x, t))

    for n, i in enumerate(reversed(range(len(ts)))):
        e = eps_at(x, ts[i])
        if not old:
            if i > 0:
                x_next, _ = step(x, e, i)
                e_prime = (e + eps_at(x_next, ts[i - 1])) / 2
            else:
                e_prime = e
        elif len(old) == 1:
            e_prime = (3 * e - old[-1]) / 2
        elif len(old) == 2:
            e_prime = (23 * e - 16 * old[-1] + 5 * old[-2]) / 12
        else:
            e_prime = (55 * e - 59 * old[-1] + 37 * old[-2] - 9 * old[-3]) / 24
        x, x0 = step(x, e_prime, i)
        old = (old + [e])[-3:]
        _report(callback, n, len(ts), x, x0, ts[i])
    return x


def linspace_timesteps(num_timesteps: int, steps: int) -> list[int]:
    """T-1 .. 0 in `steps` evenly spaced, rounded steps (the last one, 0, is where sampling ends)."""
    if not 1 <= steps <= num_timesteps:
        raise ValueError(f"steps must be in 1..{num_timesteps} (the model's T), got {steps}")
    return torch.linspace(0, num_timesteps - 1, steps + 1, dtype=torch.float64).round().long().flip(0)[:-1].tolist()


@torch.no_grad()
def dpm_solver_pp(model: ModelFn, process: GaussianDiffusion, x_T: torch.Tensor, steps: int,
                  generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M), `steps` network evaluations, ending at σ = 0 (the last x_0 prediction)."""
    ts = linspace_timesteps(process.num_timesteps, steps)
    ac = process.alphas_cumprod.double()
    sig = [math.sqrt((1 - float(ac[t])) / float(ac[t])) for t in ts] + [0.0]
    alpha = [1 / math.sqrt(s**2 + 1) for s in sig]  # VP alpha_t
    sigma = [s * a for s, a in zip(sig, alpha)]  # VP sigma_t
    lam = [math.log(a) - math.log(s) if s > 0 else math.inf for a, s in zip(alpha, sigma)]
    x, x0s = x_T, []
    for i, tv in enumerate(ts):
        t = torch.full((x.shape[0],), tv, device=x.device, dtype=torch.long)
        x0 = process.predict_x0(x, t, model(x, t))
        x0s.append(x0)
        if sig[i + 1] == 0:
            x = x0  # the final step lands on the data prediction
        else:
            h = lam[i + 1] - lam[i]
            coeff = alpha[i + 1] * (math.exp(-h) - 1)
            x = (sigma[i + 1] / sigma[i]) * x - coeff * x0
            if i > 0:  # second order from the two latest data predictions
                r = (lam[i] - lam[i - 1]) / h
                x = x - 0.5 * coeff * (x0 - x0s[-2]) / r
        x0s = x0s[-2:]
        _report(callback, i, len(ts), x, x0, tv)
    return x


def karras_sigmas(n: int, sigma_min: float, sigma_max: float, rho: float = 7.0, device: Any = "cpu") -> torch.Tensor:
    """Karras et al.'s σ_0 > ... > σ_{n-1} (n values, then 0 appended): evenly spaced in σ^(1/ρ)."""
    ramp = torch.linspace(0, 1, n)
    lo, hi = sigma_min ** (1 / rho), sigma_max ** (1 / rho)
    sigmas = (hi + ramp * (lo - hi)) ** rho
    return torch.cat([sigmas, sigmas.new_zeros(1)]).to(device)


class VPDenoiser:
    """D(x, σ) = x_0 prediction of a discrete VP model seen in σ-space (x = x_0 + σ ε): the input is scaled by
    1/sqrt(σ² + 1) and the time is σ's position among the model's discrete σ_t, interpolated in log σ."""

    def __init__(self, model: ModelFn, process: GaussianDiffusion,
                 x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None):
        self.model, self.process, self.x0_transform = model, process, x0_transform
        ac = process.alphas_cumprod.double()
        self.sigmas = ((1 - ac) / ac).sqrt()  # increasing in t
        self.log_sigmas = self.sigmas.log()

    @property
    def sigma_min(self) -> float:
        return float(self.sigmas[0])

    @property
    def sigma_max(self) -> float:
        return float(self.sigmas[-1])

    def sigma_to_t(self, sigma: torch.Tensor) -> torch.Tensor:
        log_sigma = sigma.double().log()
        dists = log_sigma[:, None] - self.log_sigmas.to(sigma.device)[None]
        low = dists.ge(0).cumsum(1).argmax(1).clamp(max=len(self.log_sigmas) - 2)
        high = low + 1
        lo, hi = self.log_sigmas.to(sigma.device)[low], self.log_sigmas.to(sigma.device)[high]
        w = ((lo - log_sigma) / (lo - hi)).clamp(0, 1)
        return ((1 - w) * low + w * high).float()

    def __call__(self, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """sigma (B,)."""
        c_in = (1 / (sigma**2 + 1).sqrt()).to(x.dtype)[:, None, None, None]
        t = self.sigma_to_t(sigma)
        x_t = x * c_in
        out = self.model(x_t, t)
        eps = self.process_eps(x_t, t, out)
        x0 = x - sigma.to(x.dtype)[:, None, None, None] * eps
        return self.x0_transform(x0) if self.x0_transform is not None else x0

    def process_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps from the output at a fractional t (the schedule interpolated linearly between its steps)."""
        p = self.process
        if p.parameterization == "eps":
            return out
        ac = p.alphas_cumprod.to(t.device)
        low = t.floor().long().clamp(max=len(ac) - 1)
        high = (low + 1).clamp(max=len(ac) - 1)
        w = (t - low).to(x_t.dtype)
        a = ((1 - w) * ac[low] + w * ac[high])[:, None, None, None]
        if p.parameterization == "v":
            return a.sqrt() * out + (1 - a).sqrt() * x_t
        return (x_t - a.sqrt() * out) / (1 - a).sqrt()


def _churn(x: torch.Tensor, sigma: float, i: int, n: int, s_churn: float, s_tmin: float, s_tmax: float,
           s_noise: float, generator: torch.Generator | None) -> tuple[torch.Tensor, float]:
    gamma = min(s_churn / n, 2**0.5 - 1) if s_tmin <= sigma <= s_tmax else 0.0
    sigma_hat = sigma * (gamma + 1)
    if gamma > 0:
        x = x + _noise(x.shape, generator, x.device) * s_noise * (sigma_hat**2 - sigma**2) ** 0.5
    return x, sigma_hat


@torch.no_grad()
def euler(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
          generator: torch.Generator | None = None, callback: Callback | None = None, s_churn: float = 0.0,
          s_tmin: float = 0.0, s_tmax: float = float("inf"), s_noise: float = 1.0, heun: bool = False) -> torch.Tensor:
    """Karras et al.'s Algorithm 2 (`heun=True`: the second-order correction on every step but the last).
    `x` starts at noise × sigmas[0]."""
    n = len(sigmas) - 1
    ones = x.new_ones(x.shape[0])
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x, sigma_hat = _churn(x, sigma, i, n, s_churn, s_tmin, s_tmax, s_noise, generator)
        x0 = denoiser(x, sigma_hat * ones)
        d = (x - x0) / sigma_hat
        dt = sigma_next - sigma_hat
        if not heun or sigma_next == 0:
            x = x + d * dt
        else:
            x2 = x + d * dt
            d2 = (x2 - denoiser(x2, sigma_next * ones)) / sigma_next
            x = x + (d + d2) / 2 * dt
        _report(callback, i, n, x, x0, sigma)
    return x


def heun(denoiser: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x: torch.Tensor, sigmas: torch.Tensor,
         generator: torch.Generator | None = None, callback: Callback | None = None, **churn: float) -> torch.Tensor:
    return euler(denoiser, x, sigmas, generator, callback, heun=True, **churn)

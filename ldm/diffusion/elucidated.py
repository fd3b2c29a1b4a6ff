"""Elucidated diffusion (Karras et al. 2022, "Elucidating the Design Space of Diffusion-Based Generative Models"):
the σ-parameterised preconditioning that makes a network F a denoiser D(x; σ), its training distribution of σ and
loss weight (Table 1, the "ours" column), and the σ-space samplers the prior runs besides `sampling.euler` /
`sampling.heun`. The network is an argument, as in `process.py`.

    D(x; σ) = c_skip(σ) x + c_out(σ) F(c_in(σ) x; c_noise(σ))
    c_skip = σ_d² / (σ² + σ_d²)   c_out = σ σ_d / sqrt(σ² + σ_d²)   c_in = 1 / sqrt(σ² + σ_d²)   c_noise = ln(σ) / 4
    ln σ ~ N(P_mean, P_std²)      λ(σ) = (σ² + σ_d²) / (σ σ_d)² = 1 / c_out²

c_noise is what the UNet's sinusoidal timestep embedding receives (frequencies 1 down to 1e-4 per unit), as in
EDM's own DDPM++ positional embedding: over σ in [0.002, 80] it spans [-1.55, 1.10] (training's log-normal
mostly [-1.5, 0.9]), inside (-π/2, π/2), so the fastest sine channel alone is monotone in σ and the slower
channels are close to linear in c_noise: a smooth, one-to-one code of σ for the time MLP. (The discrete model's
t in 0..T-1 instead winds the fast channels many times round.)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields
from typing import Any

import torch

from ldm.diffusion.sampling import Callback, _noise, _report, karras_sigmas

NetFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # F(c_in x (B, C, h, w), c_noise (B,))
DenoiserFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x (B, C, h, w), σ (B,)) -> x_0


def _bc(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(B,) -> (B, 1, 1, 1) in x's dtype."""
    return v.to(x.dtype).reshape(-1, *([1] * (x.dim() - 1)))


@dataclass(frozen=True)
class Elucidated:
    """EDM's training and sampling constants: σ_data (the data's standard deviation; ~1 for latents scaled by
    the prior's scale_factor, 0.5 for images in [-1, 1]), the log-normal of training σ, the Karras schedule."""

    sigma_data: float = 0.5
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    def __post_init__(self) -> None:
        for f in fields(self):
            v = getattr(self, f.name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                raise ValueError(f"{f.name} must be a finite number, got {v!r}")
            object.__setattr__(self, f.name, float(v))
        for name in ("sigma_data", "p_std", "sigma_min", "rho"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name} must be > 0, got {getattr(self, name):g}")
        if self.sigma_min >= self.sigma_max:
            raise ValueError(f"sigma_min ({self.sigma_min:g}) must be below sigma_max ({self.sigma_max:g})")

    @classmethod
    def from_config(cls, config: Mapping[str, Any]) -> Elucidated:
        names = [f.name for f in fields(cls)]
        unknown = [k for k in config if k not in names]
        if unknown:
            raise ValueError(f"no key {unknown[0]!r}; keys: {', '.join(names)}")
        return cls(**config)

    # --- preconditioning (Table 1) ----------------------------------------------------------------
    def scalings(self, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """c_skip, c_out, c_in, c_noise, each (B,) for σ (B,)."""
        sd2 = self.sigma_data**2
        total = sigma**2 + sd2
        return sd2 / total, sigma * self.sigma_data / total.sqrt(), 1 / total.sqrt(), sigma.log() / 4

    def loss_weight(self, sigma: torch.Tensor) -> torch.Tensor:
        """λ(σ) = (σ² + σ_d²) / (σ σ_d)²: every σ then starts training at unit loss."""
        return (sigma**2 + self.sigma_data**2) / (sigma * self.sigma_data) ** 2

    def denoise(self, net: NetFn, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """D(x; σ), x (B, C, h, w), σ (B,)."""
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        return _bc(c_skip, x) * x + _bc(c_out, x) * net(x * _bc(c_in, x), c_noise)

    def denoiser(self, net: NetFn, x0_transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> DenoiserFn:
        """D for the samplers; `x0_transform` (clipping, dynamic thresholding) acts on D's output."""
        if x0_transform is None:
            return lambda x, sigma: self.denoise(net, x, sigma)
        return lambda x, sigma: x0_transform(self.denoise(net, x, sigma))

    # --- training ---------------------------------------------------------------------------------
    def draw_sigma(self, n: int, generator: torch.Generator | None = None, device: Any = "cpu") -> torch.Tensor:
        """(n,) σ with ln σ ~ N(P_mean, P_std²)."""
        return (torch.randn(n, generator=generator, device=device) * self.p_std + self.p_mean).exp()

    def loss(self, net: NetFn, x0: torch.Tensor, sigma: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """Per-sample λ(σ) · mean ||D(x_0 + σ n; σ) - x_0||² (B,), computed as mean ||F - (x_0 - c_skip x) / c_out||²
        (the same number, since λ = 1 / c_out², without D's cancellation at small σ)."""
        x = x0 + _bc(sigma, x0) * noise
        c_skip, c_out, c_in, c_noise = self.scalings(sigma)
        out = net(x * _bc(c_in, x), c_noise)
        target = (x0 - _bc(c_skip, x) * x) / _bc(c_out, x)
        return (out.float() - target.float()).pow(2).flatten(1).mean(1)

    # --- sampling ---------------------------------------------------------------------------------
    def sigmas(self, steps: int, device: Any = "cpu") -> torch.Tensor:
        """Karras et al.'s schedule σ_max .. σ_min (steps values) then 0."""
        return karras_sigmas(steps, self.sigma_min, self.sigma_max, self.rho, device=device)


@torch.no_grad()
def ddim(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor, generator: torch.Generator | None = None,
         callback: Callback | None = None, eta: float = 0.0,
         before_step: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """DDIM in σ-space (Song et al. 2021, as Karras et al. Sec. 3 read it): with eta = 0 the Euler step of the
    probability-flow ODE; with eta > 0 DDIM's noise σ_up = eta σ' sqrt(σ² - σ'²) / σ re-injected after an Euler
    step to σ_down = sqrt(σ'² - σ_up²) (k-diffusion's `sample_euler_ancestral`). `before_step(x, σ)`, where
    given, replaces x before each step (inpainting's blend). `x` starts at noise × sigmas[0]."""
    n = len(sigmas) - 1
    ones = x.new_ones(x.shape[0])
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        if before_step is not None:
            x = before_step(x, sigma * ones)
        x0 = denoiser(x, sigma * ones)
        up = min(sigma_next, eta * (sigma_next**2 * (sigma**2 - sigma_next**2) / sigma**2) ** 0.5)
        down = (sigma_next**2 - up**2) ** 0.5
        x = x0 + (down / sigma) * (x - x0)
        if up > 0:
            x = x + up * _noise(x.shape, generator, x.device)
        _report(callback, i, n, x, x0, sigma)
    return x


@torch.no_grad()
def dpm_solver_pp_2m(denoiser: DenoiserFn, x: torch.Tensor, sigmas: torch.Tensor,
                     generator: torch.Generator | None = None, callback: Callback | None = None) -> torch.Tensor:
    """DPM-Solver++(2M) (Lu et al. 2022) in σ-space with t = -ln σ, as k-diffusion's `sample_dpmpp_2m`: first order
    at the first step and the last (to σ = 0), second order from the two latest x_0 predictions between."""
    n = len(sigmas) - 1
    ones = x.new_ones(x.shape[0])
    old = None
    for i in range(n):
        sigma, sigma_next = float(sigmas[i]), float(sigmas[i + 1])
        x0 = denoiser(x, sigma * ones)
        if sigma_next == 0:
            x = x0
        else:
            h = math.log(sigma) - math.log(sigma_next)
            d = x0
            if old is not None:
                r = (math.log(float(sigmas[i - 1])) - math.log(sigma)) / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * old
            x = (sigma_next / sigma) * x - math.expm1(-h) * d
        old = x0
        _report(callback, i, n, x, x0, sigma)
    return x

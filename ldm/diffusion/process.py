"""The Gaussian diffusion of latent diffusion (Ho et al. 2020; Rombach et al. 2022): noise schedules, the forward
process, the posterior, the three parameterisations and the training loss; the network is an argument.

Schedules are latent-diffusion's `make_beta_schedule` (linear, cosine, sqrt_linear, sqrt) computed in float64 and
kept as the float32 buffers its checkpoints hold (`SCHEDULE_KEYS`), so a checkpoint's schedule can be compared
with the config's exactly. The network predicts eps, x_0 or v = sqrt(A_t) eps - sqrt(1 - A_t) x_0
(`parameterization`); the loss is l2 or l1 to that target, optionally weighted by min-SNR-gamma (Hang et al.
2023), which caps the weight of the low-noise steps.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
import torch

Schedule = Literal["linear", "cosine", "sqrt_linear", "sqrt"]
Parameterization = Literal["eps", "x0", "v"]
LossType = Literal["l1", "l2"]
SCHEDULE_KEYS = ("betas", "alphas_cumprod", "alphas_cumprod_prev", "sqrt_alphas_cumprod",
                 "sqrt_one_minus_alphas_cumprod", "log_one_minus_alphas_cumprod", "sqrt_recip_alphas_cumprod",
                 "sqrt_recipm1_alphas_cumprod", "posterior_variance", "posterior_log_variance_clipped",
                 "posterior_mean_coef1", "posterior_mean_coef2")


def make_beta_schedule(schedule: Schedule, timesteps: int, linear_start: float = 1e-4, linear_end: float = 2e-2,
                       cosine_s: float = 8e-3) -> np.ndarray:
    """b_1..b_T (T,) float64, as latent-diffusion computes them."""
    if timesteps < 1:
        raise ValueError(f"timesteps must be >= 1, got {timesteps}")
    # torch's float64 linspace and cos, as the original (numpy's differ in the last bit)
    if schedule == "linear":
        return (torch.linspace(linear_start**0.5, linear_end**0.5, timesteps, dtype=torch.float64, device="cpu") ** 2).numpy()
    if schedule == "cosine":
        t = torch.arange(timesteps + 1, dtype=torch.float64, device="cpu") / timesteps + cosine_s
        a = torch.cos(t / (1 + cosine_s) * np.pi / 2).pow(2)
        a = a / a[0]
        return np.clip((1 - a[1:] / a[:-1]).numpy(), 0, 0.999)
    if schedule == "sqrt_linear":
        return torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64, device="cpu").numpy()
    if schedule == "sqrt":
        return (torch.linspace(linear_start, linear_end, timesteps, dtype=torch.float64, device="cpu") ** 0.5).numpy()
    raise ValueError(f"beta_schedule must be one of linear, cosine, sqrt_linear, sqrt; got {schedule!r}")


def schedule_arrays(betas: np.ndarray, v_posterior: float = 0.0) -> dict[str, np.ndarray]:
    """The twelve schedule arrays of a latent-diffusion checkpoint, in float64."""
    alphas = 1.0 - betas
    ac = np.cumprod(alphas)
    acp = np.append(1.0, ac[:-1])
    post_var = (1 - v_posterior) * betas * (1.0 - acp) / (1.0 - ac) + v_posterior * betas
    return {
        "betas": betas, "alphas_cumprod": ac, "alphas_cumprod_prev": acp,
        "sqrt_alphas_cumprod": np.sqrt(ac), "sqrt_one_minus_alphas_cumprod": np.sqrt(1.0 - ac),
        "log_one_minus_alphas_cumprod": np.log(1.0 - ac), "sqrt_recip_alphas_cumprod": np.sqrt(1.0 / ac),
        "sqrt_recipm1_alphas_cumprod": np.sqrt(1.0 / ac - 1), "posterior_variance": post_var,
        "posterior_log_variance_clipped": np.log(np.maximum(post_var, 1e-20)),
        "posterior_mean_coef1": betas * np.sqrt(acp) / (1.0 - ac),
        "posterior_mean_coef2": (1.0 - acp) * np.sqrt(alphas) / (1.0 - ac),
    }


def extract(arr: torch.Tensor, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """arr[t] (B,) reshaped to broadcast against `shape` (B, ...)."""
    return arr.to(t.device)[t].reshape(t.shape[0], *([1] * (len(shape) - 1)))


class GaussianDiffusion:
    """The forward process q(x_t | x_0) = N(sqrt(A_t) x_0, (1 - A_t) I), t = 0..T-1 (latent-diffusion's indexing)."""

    def __init__(self, timesteps: int = 1000, beta_schedule: Schedule = "linear", linear_start: float = 1e-4,
                 linear_end: float = 2e-2, cosine_s: float = 8e-3, parameterization: Parameterization = "eps",
                 loss_type: LossType = "l2", min_snr_gamma: float | None = None, v_posterior: float = 0.0):
        if parameterization not in ("eps", "x0", "v"):
            raise ValueError(f"parameterization must be eps, x0 or v; got {parameterization!r}")
        if loss_type not in ("l1", "l2"):
            raise ValueError(f"loss_type must be l1 or l2; got {loss_type!r}")
        if min_snr_gamma is not None and min_snr_gamma <= 0:
            raise ValueError(f"min_snr_gamma must be > 0, got {min_snr_gamma}")
        betas = make_beta_schedule(beta_schedule, timesteps, linear_start, linear_end, cosine_s)
        self.num_timesteps = int(timesteps)
        self.parameterization, self.loss_type, self.min_snr_gamma = parameterization, loss_type, min_snr_gamma
        self.arrays64 = schedule_arrays(betas, v_posterior)
        # float32 buffers, as a checkpoint holds them; computations use these
        self.buffers = {k: torch.tensor(v, dtype=torch.float32, device="cpu") for k, v in self.arrays64.items()}
        for k, v in self.buffers.items():
            setattr(self, k, v)

    # --- forward process and posterior ---------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        return extract(self.sqrt_alphas_cumprod, t, x0.shape) * x0 + \
            extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * noise

    def q_posterior(self, x0: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Mean, variance and clipped log-variance of q(x_{t-1} | x_t, x_0)."""
        mean = extract(self.posterior_mean_coef1, t, x_t.shape) * x0 + extract(self.posterior_mean_coef2, t, x_t.shape) * x_t
        return mean, extract(self.posterior_variance, t, x_t.shape), extract(self.posterior_log_variance_clipped, t, x_t.shape)

    # --- parameterisations -----------------------------------------------------------------------
    def predict_x0(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """x_0 from the network's output under this process's parameterisation."""
        if self.parameterization == "eps":
            return extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - \
                extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape) * out
        if self.parameterization == "x0":
            return out
        return extract(self.sqrt_alphas_cumprod, t, x_t.shape) * x_t - \
            extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * out

    def predict_eps(self, x_t: torch.Tensor, t: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """eps from the network's output under this process's parameterisation."""
        if self.parameterization == "eps":
            return out
        if self.parameterization == "v":
            return extract(self.sqrt_alphas_cumprod, t, x_t.shape) * out + \
                extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape) * x_t
        return (extract(self.sqrt_recip_alphas_cumprod, t, x_t.shape) * x_t - out) / \
            extract(self.sqrt_recipm1_alphas_cumprod, t, x_t.shape)

    def output_from_x0(self, x_t: torch.Tensor, t: torch.Tensor, x0: torch.Tensor) -> torch.Tensor:
        """The network output that predicts `x0` at x_t (after x_0 was clipped or thresholded)."""
        if self.parameterization == "x0":
            return x0
        a, s = extract(self.sqrt_alphas_cumprod, t, x_t.shape), extract(self.sqrt_one_minus_alphas_cumprod, t, x_t.shape)
        if self.parameterization == "eps":
            return (x_t - a * x0) / s
        return (a * x_t - x0) / s  # v

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """What the network is trained to output."""
        if self.parameterization == "eps":
            return noise
        if self.parameterization == "x0":
            return x0
        return extract(self.sqrt_alphas_cumprod, t, x0.shape) * noise - \
            extract(self.sqrt_one_minus_alphas_cumprod, t, x0.shape) * x0

    def snr(self, t: torch.Tensor) -> torch.Tensor:
        ac = self.alphas_cumprod.to(t.device)[t]
        return ac / (1 - ac)

    def loss_weights(self, t: torch.Tensor) -> torch.Tensor:
        """Per-sample weights (B,): 1, or min-SNR-gamma's min(SNR, gamma) expressed for the parameterisation
        (divided by SNR for eps, by SNR + 1 for v)."""
        if self.min_snr_gamma is None:
            return torch.ones(t.shape[0], device=t.device)
        snr = self.snr(t)
        capped = snr.clamp(max=self.min_snr_gamma)
        return {"eps": capped / snr, "x0": capped, "v": capped / (snr + 1)}[self.parameterization]

    def training_loss(self, out: torch.Tensor, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Per-sample loss (B,): mean over dimensions of l2 / l1 to the target, weighted."""
        diff = out.float() - self.target(x0, noise, t).float()
        per = diff.pow(2) if self.loss_type == "l2" else diff.abs()
        return per.flatten(1).mean(1) * self.loss_weights(t)


def dynamic_threshold(x0: torch.Tensor, percentile: float) -> torch.Tensor:
    """Imagen's dynamic thresholding: s = the `percentile` quantile of |x_0| per sample (at least 1); x_0 clipped to
    [-s, s] and divided by s, so saturated pixels are pulled in instead of piling up at ±1."""
    s = torch.quantile(x0.detach().abs().flatten(1).float(), percentile, dim=1).clamp(min=1.0).to(x0.dtype)
    s = s.view(-1, *([1] * (x0.dim() - 1)))
    return x0.clamp(-s, s) / s

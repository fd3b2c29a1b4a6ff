"""The diagonal Gaussian posterior of the KL autoencoder (Kingma & Welling 2014; latent-diffusion's layout)."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class DiagonalGaussianDistribution:
    """`parameters` (B, 2C, h, w) = mean and log-variance along dim 1; log-variance clamped to [-30, 20]."""

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), or against N(0, I) when `other` is None, summed per sample (B,)."""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device)
        return 0.5 * torch.sum(np.log(2.0 * np.pi) + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

"""The diagonal Gaussian posterior of the KL autoencoder (Kingma & Welling 2014), as latent-diffusion's
`DiagonalGaussianDistribution`: same clamping, same reductions, so losses and samples match."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

LOG_2PI = math.log(2.0 * math.pi)


class DiagonalGaussianDistribution:
    """`parameters` (B, 2C, h, w): mean and log-variance stacked on dim 1; log-variance clamped to [-30, 20].

    `deterministic=True` makes it a point mass at the mean (std = var = 0, kl = nll = 0).
    """

    def __init__(self, parameters: torch.Tensor, deterministic: bool = False):
        if parameters.dim() < 2 or parameters.shape[1] % 2 != 0:
            raise ValueError("expected parameters of shape (B, 2C, ...) with mean and log-variance on dim 1; "
                             f"got {tuple(parameters.shape)}")
        self.parameters = parameters
        self.mean, logvar = torch.chunk(parameters, 2, dim=1)  # (B, C, h, w) each
        self.logvar = torch.clamp(logvar, -30.0, 20.0)
        self.deterministic = deterministic
        self.std = torch.exp(0.5 * self.logvar)
        self.var = torch.exp(self.logvar)
        if deterministic:
            self.var = self.std = torch.zeros_like(self.mean)

    def sample(self, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * eps, eps ~ N(0, I) drawn from `generator` when given. (B, C, h, w)"""
        eps = torch.randn(self.mean.shape, generator=generator, device=self.mean.device, dtype=self.mean.dtype)
        return self.mean + self.std * eps

    def mode(self) -> torch.Tensor:
        return self.mean

    def kl(self, other: DiagonalGaussianDistribution | None = None) -> torch.Tensor:
        """KL(self || other), or KL(self || N(0, I)) when `other` is None, summed over dims 1, 2, 3. (B,)"""
        if self.deterministic:
            return torch.zeros(self.mean.shape[0], device=self.mean.device, dtype=self.mean.dtype)
        dims = [1, 2, 3]
        if other is None:
            return 0.5 * torch.sum(self.mean.pow(2) + self.var - 1.0 - self.logvar, dim=dims)
        return 0.5 * torch.sum((self.mean - other.mean).pow(2) / other.var + self.var / other.var - 1.0
                               - self.logvar + other.logvar, dim=dims)

    def nll(self, sample: torch.Tensor, dims: Sequence[int] = (1, 2, 3)) -> torch.Tensor:
        """-log N(sample; mean, var) summed over `dims`. (B,) for the default dims."""
        if self.deterministic:
            return torch.zeros(sample.shape[0], device=sample.device, dtype=sample.dtype)
        return 0.5 * torch.sum(LOG_2PI + self.logvar + (sample - self.mean).pow(2) / self.var, dim=list(dims))

"""Step-unrolled denoising (SUNDAE, Savinov et al. 2022) over token sequences, as McKinney & Willcocks 2022
train it on VQGAN tokens.

Corruption: each sequence draws a rate r ~ U(0, 1) and each of its tokens is replaced, with probability r,
by a code drawn uniformly from the codebook (which may be the same code). The network denoises the
corrupted sequence; its own sample (a categorical draw from its logits, no gradient through the draw) is
fed back for `unroll_steps - 1` more steps, so it learns to correct the mistakes it makes when sampling.
The loss is the cross-entropy against the clean tokens summed over the unrolled steps (Savinov et al.
Eq. 5; the original code averages over the steps instead, a constant factor 1 / unroll_steps).

Random draws (rates, positions, replacement codes, the unrolled samples) are made for the global batch
through `ldm.distributed.draw_local`, so a DDP run draws what one process with the same batch draws; the
unrolled samples are drawn from uniforms by inverting the categorical CDF for the same reason. SUNDAE has
no tractable likelihood: the unrolled loss (nats per token) is what a test split reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from ldm.conditioning import Cond
from ldm.distributed import uniform_local
from ldm.logits import categorical_from_uniform

# net(x (B, N) long, cond dict) -> logits (B, N, K)
Denoiser = Callable[[torch.Tensor, Cond], torch.Tensor]


class UnrolledDenoising:
    """Corruption and the unrolled training loss; the network is an argument (`net(x, cond) -> logits`)."""

    def __init__(self, codebook_size: int, unroll_steps: int = 2):
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        if unroll_steps < 1:
            raise ValueError(f"unroll_steps must be >= 1, got {unroll_steps}")
        self.codebook_size, self.unroll_steps = int(codebook_size), int(unroll_steps)

    def corrupt(self, x0: torch.Tensor, generator: torch.Generator | None = None
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x_0 (B, N) long -> (x_c (B, N) long, replaced (B, N) bool, rate r (B,))."""
        b, n = x0.shape
        rate = uniform_local((b,), generator, x0.device)  # (B,)
        replaced = uniform_local((b, n), generator, x0.device) < rate[:, None]  # (B, N) bool
        codes = (uniform_local((b, n), generator, x0.device) * self.codebook_size).long().clamp(max=self.codebook_size - 1)
        return torch.where(replaced, codes, x0), replaced, rate

    def training_losses(self, net: Denoiser, x0: torch.Tensor, cond: Cond | None = None,
                        generator: torch.Generator | None = None) -> dict[str, Any]:
        """The loss (sum over the unrolled steps of the mean cross-entropy, nats per token) and what to log:
        each step's loss and token accuracy, and the first step's loss by quartile of the rate r."""
        cond = cond or {}
        x, _, rate = self.corrupt(x0, generator)
        out: dict[str, Any] = {}
        total = x0.new_zeros((), dtype=torch.float32)
        correct = 0.0
        for step in range(1, self.unroll_steps + 1):
            logits = net(x, cond)  # (B, N, K)
            ce = F.cross_entropy(logits.float().transpose(1, 2), x0, reduction="none")  # (B, N)
            total = total + ce.mean()
            with torch.no_grad():
                acc = (logits.argmax(-1) == x0).float().mean()
                out[f"loss_step{step}"], out[f"acc_step{step}"] = ce.mean().detach(), acc
                correct += float(acc)
                if step == 1:
                    per_seq = ce.mean(1)
                    quartile = (rate * 4).long().clamp(max=3)
                    for q in range(4):
                        if bool((quartile == q).any()):
                            out[f"loss_r_q{q + 1}"] = per_seq[quartile == q].mean()
                if step < self.unroll_steps:  # the network's own sample is the next input; no gradient through it
                    x = categorical_from_uniform(logits.detach(), uniform_local(tuple(x0.shape), generator, x0.device))
        out["loss"] = total
        out["accuracy"] = torch.tensor(correct / self.unroll_steps)
        return out

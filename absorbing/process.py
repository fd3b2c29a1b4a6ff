"""The absorbing-state discrete diffusion of Bond-Taylor et al. 2022 ("Unleashing Transformers").

Forward process: each token of x_0 is replaced by the mask token (id = codebook size) with
probability t/T, independently (the "random" schedule), or exactly round(t/T * N) tokens are masked
(the "fixed" schedule). The network predicts x_0 at masked positions; the ELBO is
sum_t (1/t) E[-log p(x_0 | x_t) at masked positions].

The process holds no parameters, only the per-timestep loss history that importance sampling of t
uses, as buffers with the original names (`Lt_history`, `Lt_count`, `loss_history`) so they load
from the original checkpoints. Its methods take the denoiser as an argument.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from ldm.distributed import draw_local, gather_global

MaskSchedule = Literal["random", "fixed"]
LossType = Literal["elbo", "reweighted_elbo", "mlm"]
TimeSampling = Literal["uniform", "importance"]

# denoiser(x_t (B, N) long, t (B,) long, cond) -> logits (B, N, K) over the codebook (no mask logit)
Denoiser = Callable[..., torch.Tensor]


def _check_choice(name: str, value: str, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}; got {value!r}")


class AbsorbingDiffusion(nn.Module):
    """Absorbing-state diffusion over flattened token sequences (B, N) with mask id K."""

    def __init__(
        self,
        codebook_size: int,
        num_timesteps: int = 256,
        mask_schedule: MaskSchedule = "random",
        loss_type: LossType = "reweighted_elbo",
        time_sampling: TimeSampling = "uniform",
        importance_min_count: int = 10,
    ):
        super().__init__()
        _check_choice("mask_schedule", mask_schedule, ("random", "fixed"))
        _check_choice("loss_type", loss_type, ("elbo", "reweighted_elbo", "mlm"))
        _check_choice("time_sampling", time_sampling, ("uniform", "importance"))
        if codebook_size < 2 or num_timesteps < 1:
            raise ValueError(f"need codebook_size >= 2 and num_timesteps >= 1, got {codebook_size}, {num_timesteps}")
        self.codebook_size = codebook_size
        self.mask_id = codebook_size
        self.num_timesteps = num_timesteps
        self.mask_schedule = mask_schedule
        self.loss_type = loss_type
        self.time_sampling = time_sampling
        self.importance_min_count = importance_min_count
        T1 = num_timesteps + 1
        self.register_buffer("Lt_history", torch.zeros(T1))
        self.register_buffer("Lt_count", torch.zeros(T1))
        self.register_buffer("loss_history", torch.zeros(T1))

    # --- time -------------------------------------------------------------------------------
    def sample_time(self, b: int, device: torch.device, generator: torch.Generator | None = None,
                    method: TimeSampling | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """t in {1..T} and its probability p(t): uniform, or proportional to sqrt(E[L_t^2]).

        Importance sampling starts once every t in 1..T has been seen `importance_min_count`
        times (the original checks index 0 too, which is never updated, so it never switches on).
        """
        method = method or self.time_sampling
        T = self.num_timesteps
        if method == "importance" and bool((self.Lt_count[1:] > self.importance_min_count).all()):
            weights = torch.sqrt(self.Lt_history + 1e-10) + 1e-4
            weights[0] = 0.0  # t = 0 is never drawn
            pt_all = weights / weights.sum()
            gen_device = generator.device if generator is not None else pt_all.device
            t = draw_local(lambda m: torch.multinomial(pt_all.to(gen_device), m, replacement=True,
                                                       generator=generator), b, device).to(device)
            return t, pt_all.to(device).gather(0, t)
        gen_device = generator.device if generator is not None else device
        t = draw_local(lambda m: torch.randint(1, T + 1, (m,), device=gen_device, generator=generator), b, device).to(device)
        return t, torch.full((b,), 1.0 / T, device=device)

    # --- forward process ----------------------------------------------------------------------
    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None,
                 schedule: MaskSchedule | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Mask x_0 (B, N) at time t (B,): returns x_t (B, N) long and the mask (B, N) bool."""
        schedule = schedule or self.mask_schedule
        b, n = x0.shape
        gen_device = generator.device if generator is not None else x0.device
        u = draw_local(lambda m: torch.rand((m, n), device=gen_device, generator=generator), b, x0.device).to(x0.device)
        if schedule == "random":
            mask = u < (t.float().unsqueeze(-1) / self.num_timesteps)
        else:
            count = torch.round(t.float() / self.num_timesteps * n).long().clamp(min=1, max=n)  # (B,)
            # rank of i.i.d. uniforms is a uniformly random permutation: mask the `count` smallest
            ranks = u.argsort(dim=1).argsort(dim=1)
            mask = ranks < count.unsqueeze(-1)
        xt = x0.masked_fill(mask, self.mask_id)
        return xt, mask

    # --- losses -------------------------------------------------------------------------------
    def masked_cross_entropy(self, logits: torch.Tensor, x0: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Sum over masked positions of -log p(x_0) in nats, per sample (B,)."""
        ce = F.cross_entropy(logits.transpose(1, 2).float(), x0, reduction="none")  # (B, N)
        return (ce * mask).sum(1)

    def losses_from_ce(self, ce_sum: torch.Tensor, t: torch.Tensor, pt: torch.Tensor, mask: torch.Tensor,
                       n_tokens: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-sample training loss and ELBO estimate in bits per token, from masked CE sums (B,)."""
        denom = math.log(2) * n_tokens
        vb = ce_sum / t.float() / pt / denom  # unbiased estimate of the ELBO, bits per token
        if self.loss_type == "elbo":
            loss = vb
        elif self.loss_type == "reweighted_elbo":
            loss = (1 - t.float() / self.num_timesteps) * ce_sum / denom
        else:  # mlm
            loss = ce_sum / mask.sum(1).clamp(min=1).float()
        return loss, vb

    @torch.no_grad()
    def update_history(self, t: torch.Tensor, loss: torch.Tensor, vb: torch.Tensor) -> None:
        """Running E[L_t^2] per timestep for importance sampling, and a loss-by-t history to plot.

        The statistics of every rank's samples are gathered first, so all ranks keep the history one
        process with the global batch would (improved-diffusion's LossAwareSampler does the same).
        """
        t, loss, vb = (gather_global(v.detach()) for v in (t, loss, vb))
        dtype = self.loss_history.dtype
        prev = self.loss_history.gather(0, t)
        self.loss_history.scatter_(0, t, (0.1 * loss.detach() + 0.9 * prev).to(dtype))
        lt2 = vb.detach().pow(2)
        prev = self.Lt_history.gather(0, t)
        self.Lt_history.scatter_(0, t, (0.1 * lt2 + 0.9 * prev).to(dtype))
        self.Lt_count.scatter_add_(0, t, torch.ones_like(lt2, dtype=dtype))

    def training_losses(self, denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None = None,
                        generator: torch.Generator | None = None) -> dict[str, torch.Tensor]:
        """One Monte-Carlo step of the configured loss; the ELBO (bits per token) is always returned."""
        b, n = x0.shape
        t, pt = self.sample_time(b, x0.device, generator)
        xt, mask = self.q_sample(x0, t, generator)
        logits = denoiser(xt, t, cond)  # (B, N, K)
        ce_sum = self.masked_cross_entropy(logits, x0, mask)
        loss, vb = self.losses_from_ce(ce_sum, t, pt, mask, n)
        if self.training:
            self.update_history(t, loss, vb)
        return {"loss": loss.mean(), "elbo_bpt": vb.mean(), "t": t}

    @torch.no_grad()
    def elbo(self, denoiser: Denoiser, x0: torch.Tensor, cond: torch.Tensor | None = None,
             generator: torch.Generator | None = None, timesteps: list[int] | None = None,
             strata: int | None = None) -> torch.Tensor:
        """The ELBO over all T steps, -log p(x_0) bound in bits per token, per sample (B,).

        Sums (1/t) * E[masked CE at t] over t = 1..T with one masking draw per t (the paper's
        evaluation). `timesteps` restricts the sum (with the same 1/t weights) for quick checks.
        `strata=k` instead estimates the full sum without bias from k denoiser calls: 1..T is cut into
        k equal strata, each sample draws its own t in each stratum, and the term is weighted by the
        stratum's size, so whole test splits can be scored at a fraction of T calls per item.
        """
        b, n = x0.shape
        total = torch.zeros(b, device=x0.device)
        if strata is not None:
            if not 1 <= strata <= self.num_timesteps:
                raise ValueError(f"strata must be in 1..{self.num_timesteps}, got {strata}")
            edges = torch.linspace(0, self.num_timesteps, strata + 1).round().long().tolist()
            draws = [(lo, hi) for lo, hi in zip(edges[:-1], edges[1:]) if hi > lo]
        else:
            draws = [(s - 1, s) for s in (timesteps or range(1, self.num_timesteps + 1))]
        for lo, hi in draws:  # t uniform in lo+1..hi, weighted by the stratum size
            if hi - lo == 1:
                t = torch.full((b,), hi, device=x0.device, dtype=torch.long)
            else:
                u = torch.rand(b, device=x0.device, generator=generator)
                t = (lo + 1 + (u * (hi - lo)).long()).clamp(max=hi)
            xt, mask = self.q_sample(x0, t, generator, schedule="random")
            ce_sum = self.masked_cross_entropy(denoiser(xt, t, cond), x0, mask)
            total += (hi - lo) * ce_sum / t
        return total / (math.log(2) * n)

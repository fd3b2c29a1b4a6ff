"""ImageBART's forward process (Esser et al. 2021, Sec. 3): a multinomial diffusion over token maps.

At scale t = 1..T every token is independently kept with probability a_t = 1 - b_t and otherwise replaced
by a code drawn uniformly from the K codes (possibly the same one):

    q(x_t | x_{t-1}) = Cat((1 - b_t) onehot(x_{t-1}) + b_t / K),   q(x_t | x_0) = Cat(A_t onehot(x_0) + (1 - A_t) / K)

with A_t = prod_{s <= t} a_s (b_0 = 0, A_0 = 1). A schedule that reaches A_T = 0 makes x_T pure noise. The
posterior of one step back is closed-form and factorises over positions:

    q(x_{t-1} | x_t, x_0) ∝ (A_{t-1} onehot(x_0) + (1 - A_{t-1}) / K) * (a_t onehot(x_t) + (1 - a_t) / K).

The transition p(x_{t-1} | x_t) of every scale is an autoregressive transformer; its loss is
alpha * KL(q(x_{t-1} | x_t, x_0) || p) + (1 - alpha) * cross-entropy against the drawn x_{t-1} (the
original's soft and hard losses). Summed over the scales, the KL terms (with the t = 1 term, where the
posterior is x_0 itself, the reconstruction cross-entropy) and KL(q(x_T | x_0) || uniform) bound
-log p(x_0): `nll_terms`.

Schedules (`schedule_betas`) are typed options: `geometric` (b_t = 1 / (T - t + 1), the original's
"geometric"), `constant` (b_t = beta), `alphacum` (an explicit A_0..A_T list) and `metric` (the paper's
custom schedules: A_t evenly spaced in a perceptual metric measured against A, from a table such as
`data/imagebart/ffhq_schedule_vs_metric.json` or one written by `scripts/schedule_metric.py`).
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F

from ldm.distributed import randint_local, uniform_local

ScheduleKind = Literal["geometric", "constant", "alphacum", "metric"]


def metric_roots(alphacum: np.ndarray, values: np.ndarray) -> np.ndarray:
    """Where the piecewise-linear curve `values` (over `alphacum`) crosses zero, in order along the curve."""
    sign_change = np.abs(np.diff(np.sign(values))).astype(bool)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.abs(values[1:][sign_change] / values[:-1][sign_change])
    return alphacum[:-1][sign_change] + np.diff(alphacum)[sign_change] / (ratio + 1)


def read_metric_table(path: str | Path) -> dict[str, Any]:
    """A schedule-vs-metric table: {dist: {metric: [[value, spread], ...], "alphacum": [...]}} (JSON)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"schedule table {path} does not exist (see scripts/schedule_metric.py to measure one)")
    return json.loads(path.read_text())


def metric_alphacum(table: dict[str, Any], dist: str, metric: str, n_scales: int) -> np.ndarray:
    """A_0..A_T evenly spaced in `metric`: for each of T + 1 levels from the metric's minimum to its maximum,
    the first A at which the measured curve reaches it."""
    if dist not in table or metric not in table[dist]:
        have = {d: sorted(k for k in v if k != "alphacum") for d, v in table.items()}
        raise ValueError(f"schedule table has no {dist}/{metric}; it has {have}")
    alphacum = np.asarray(table[dist]["alphacum"], dtype=np.float64)
    values = np.asarray(table[dist][metric], dtype=np.float64)[:, 0]
    out = []
    for level in np.linspace(values.min(), values.max(), n_scales + 1):
        roots = metric_roots(alphacum, values - level)
        if roots.size == 0:
            raise ValueError(f"the {dist}/{metric} curve never reaches {level}")
        out.append(roots[0])
    return np.asarray(out)


def betas_from_alphacum(alphacum: Sequence[float] | np.ndarray) -> np.ndarray:
    """b_0..b_T from A_0..A_T (b_0 = 0; b_t = 1 - A_t / A_{t-1})."""
    ac = np.asarray(alphacum, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        steps = ac[1:] / ac[:-1]
    return np.concatenate([[0.0], 1.0 - steps])


def schedule_betas(n_scales: int, kind: ScheduleKind = "geometric", beta: float | None = None,
                   alphacum: Sequence[float] | None = None, table: str | Path | None = None,
                   dist: str = "bernoulli", metric: str = "PSIM") -> torch.Tensor:
    """b_0..b_T (T + 1,) float32 for T = `n_scales`; a schedule whose A_t increases anywhere is refused."""
    if n_scales < 1:
        raise ValueError(f"n_scales must be >= 1, got {n_scales}")
    if kind == "geometric":
        betas = torch.cat([torch.zeros(1, device="cpu"), 1.0 / torch.arange(n_scales, 0, -1, device="cpu")])
    elif kind == "constant":
        if beta is None or not 0.0 < beta <= 1.0:
            raise ValueError(f"schedule kind 'constant' needs beta in (0, 1], got {beta}")
        betas = torch.cat([torch.zeros(1, device="cpu"), beta * torch.ones(n_scales, device="cpu")])
    elif kind == "alphacum":
        if alphacum is None or len(alphacum) != n_scales + 1:
            raise ValueError(f"schedule kind 'alphacum' needs n_scales + 1 = {n_scales + 1} values A_0..A_T, "
                             f"got {None if alphacum is None else list(alphacum)}")
        if float(alphacum[0]) != 1.0:
            raise ValueError(f"schedule alphacum must start at A_0 = 1 (no noise), got {list(alphacum)}")
        check_monotone(alphacum)
        betas = torch.tensor([1.0 - a for a in [1.0] + [t / s for s, t in zip(alphacum[:-1], alphacum[1:])]],
                             device="cpu")
    elif kind == "metric":
        if table is None:
            raise ValueError("schedule kind 'metric' needs table: a schedule-vs-metric JSON file")
        ac = metric_alphacum(read_metric_table(table), dist, metric, n_scales)
        betas = torch.from_numpy(betas_from_alphacum(ac).astype(np.float32))
    else:
        raise ValueError(f"schedule kind must be one of geometric, constant, alphacum, metric; got {kind!r}")
    betas = betas.float()
    if not torch.isfinite(betas).all() or (betas < 0).any() or (betas > 1).any():
        raise ValueError(f"schedule betas must lie in [0, 1], got {betas.tolist()}")
    return betas


def check_monotone(alphacum: Sequence[float]) -> None:
    """A_0..A_T must not increase: noise is only ever added."""
    values = [float(a) for a in alphacum]
    for t, (prev, cur) in enumerate(zip(values[:-1], values[1:]), start=1):
        if cur > prev or cur < 0.0 or (prev == 0.0 and t > 1):
            raise ValueError(f"schedule is not monotone: A_{t} = {cur} after A_{t - 1} = {prev} (the kept share "
                             f"A_t must fall from 1 towards 0 over t = 0..T), in {values}")


class MultinomialDiffusion:
    """The forward process, its posterior and the per-scale losses; networks are arguments."""

    def __init__(self, codebook_size: int, betas: torch.Tensor):
        if codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {codebook_size}")
        betas = torch.as_tensor(betas, dtype=torch.float32, device="cpu")  # a schedule, not a weight: never on meta
        if betas.dim() != 1 or betas.numel() < 2 or float(betas[0]) != 0.0:
            raise ValueError(f"betas must be b_0..b_T with b_0 = 0, got {betas.tolist()}")
        self.codebook_size = int(codebook_size)
        self.n_scales = betas.numel() - 1
        self.betas = betas
        self.alphas = 1.0 - betas  # a_t
        self.alphacum = torch.cumprod(self.alphas, 0)  # A_t
        check_monotone(self.alphacum.tolist())

    # --- forward process ---------------------------------------------------------------------
    def _replace(self, x: torch.Tensor, keep_prob: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        """Each token of `x` (B, N) kept with probability `keep_prob` (B,), else a uniform code."""
        u = uniform_local(tuple(x.shape), generator, x.device)
        codes = randint_local(self.codebook_size, tuple(x.shape), generator, x.device)
        return torch.where(u < keep_prob.to(x.device)[:, None], x, codes)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_0) for x_0 (B, N) long and t (B,) long in 0..T."""
        return self._replace(x0, self.alphacum.to(x0.device)[t], generator)

    def q_step(self, x_prev: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """x_t ~ q(x_t | x_{t-1}), t (B,) in 1..T."""
        return self._replace(x_prev, self.alphas.to(x_prev.device)[t], generator)

    def q_pair(self, x0: torch.Tensor, t: torch.Tensor, generator: torch.Generator | None = None
               ) -> tuple[torch.Tensor, torch.Tensor]:
        """(x_{t-1}, x_t) drawn jointly from the forward chain, t (B,) in 1..T."""
        prev = self.q_sample(x0, t - 1, generator)
        return prev, self.q_step(prev, t, generator)

    # --- distributions -----------------------------------------------------------------------
    def _mix(self, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        """keep * onehot(x) + (1 - keep) / K, (B, N, K) float32 for x (B, N) and keep (B,)."""
        keep = keep.to(x.device)[:, None, None]
        return keep * F.one_hot(x, self.codebook_size).float() + (1.0 - keep) / self.codebook_size

    def posterior(self, x0: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """q(x_{t-1} | x_t, x_0) as probabilities (B, N, K), t (B,) in 1..T."""
        p = self._mix(x0, self.alphacum.to(x0.device)[t - 1]) * self._mix(xt, self.alphas.to(x0.device)[t])
        return p / p.sum(-1, keepdim=True)

    def kernel_log_probs(self, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """log(a_t onehot(x_t) + (1 - a_t) / K), (B, N, K): the residual the scaled network adds to its logits."""
        return self._mix(xt, self.alphas.to(xt.device)[t]).log()

    def prior_kl(self, x0: torch.Tensor) -> torch.Tensor:
        """KL(q(x_T | x_0) || uniform) summed over positions, (B,) nats (0 when A_T = 0)."""
        q = self._mix(x0, self.alphacum.to(x0.device)[torch.full((x0.shape[0],), self.n_scales, device=x0.device)])
        return (q * (q * self.codebook_size).clamp_min(1e-30).log()).sum((1, 2))

    # --- losses ------------------------------------------------------------------------------
    @staticmethod
    def kl_per_position(logits: torch.Tensor, posterior: torch.Tensor) -> torch.Tensor:
        """KL(posterior || softmax(logits)) per position (B, N), nats (codes the posterior rules out add 0)."""
        log_p = logits.float().log_softmax(-1)
        return torch.where(posterior > 0, posterior * (posterior.clamp_min(1e-38).log() - log_p), 0.0).sum(-1)

    def losses(self, logits: torch.Tensor, target: torch.Tensor, posterior: torch.Tensor,
               alpha: float) -> dict[str, torch.Tensor]:
        """The original's loss: alpha * soft (KL to the posterior) + (1 - alpha) * hard (cross-entropy to the
        drawn x_{t-1}); each a per-sample mean over positions, (B,)."""
        soft = self.kl_per_position(logits, posterior).mean(-1)
        hard = F.cross_entropy(logits.float().transpose(1, 2), target, reduction="none").mean(-1)
        return {"loss": alpha * soft + (1.0 - alpha) * hard, "loss_soft": soft, "loss_hard": hard}

    def nll_terms(self, transition: Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
                  x0: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The bound on -log p(x_0) summed over positions, (B,) nats: for every scale t one joint draw of
        (x_{t-1}, x_t) and the KL of the posterior to `transition(x_tm1, x_t, t) -> logits (B, N, K)` (the
        network run teacher-forced on x_{t-1}), plus KL(q(x_T | x_0) || uniform)."""
        total = self.prior_kl(x0)
        for step in range(1, self.n_scales + 1):
            t = torch.full((x0.shape[0],), step, dtype=torch.long, device=x0.device)
            prev, xt = self.q_pair(x0, t, generator)
            total = total + self.kl_per_position(transition(prev, xt, t), self.posterior(x0, xt, t)).sum(-1)
        return total


def bits(nats: torch.Tensor, n: int) -> torch.Tensor:
    """Nats summed over `n` positions to bits per position."""
    return nats / (n * math.log(2.0))

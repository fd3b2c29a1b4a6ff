"""Collectives over `torch.distributed` that are the identity in a single process, and randomness that
does not depend on how a global batch is split over processes.

Statistics that drive training are global (STYLE.md #17): a rank that learns something from its
share of the batch reduces it with the other ranks, so every rank, and a single process with the
same global batch, makes the same update. Each rank holds one contiguous block of every global
batch, in rank order (`ldm.data.datamodule.GlobalBatchSampler`). Random draws are made for the
whole global batch from a generator every rank holds in the same state, and each rank keeps its
block, so a DDP run draws what one process would, and a resumed run what the uninterrupted one drew.
Every function here is a collective when a process group of more than one rank is initialised: all
ranks must call it, in the same order.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def world_size() -> int:
    return dist.get_world_size() if is_distributed() else 1


def rank() -> int:
    return dist.get_rank() if is_distributed() else 0


def all_reduce_sum_(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks, in place."""
    if is_distributed():
        dist.all_reduce(t)
    return t


def broadcast_(t: torch.Tensor, src: int = 0) -> torch.Tensor:
    """Rank `src`'s tensor on every rank, in place."""
    if is_distributed():
        dist.broadcast(t, src=src)
    return t


def global_count(n: int, device: torch.device | str = "cpu") -> tuple[int, int]:
    """(rows on all ranks together, offset of this rank's rows in their concatenation in rank order)."""
    if not is_distributed():
        return n, 0
    sizes = torch.zeros(world_size(), dtype=torch.long, device=device)
    sizes[rank()] = n
    all_reduce_sum_(sizes)
    return int(sizes.sum()), int(sizes[: rank()].sum())


@torch.no_grad()
def random_global_rows(x: torch.Tensor, n: int) -> torch.Tensor:
    """`n` rows drawn with replacement from the concatenation over ranks (in rank order) of each rank's
    `x` (N_r, D); the same rows on every rank, and the same rows a single process holding the whole
    global batch draws from the same RNG state. (n, D)

    The picks come from the default generator (seeded alike on every rank) and are then taken from
    rank 0, so ranks agree even if their generators drifted; only the picked rows travel.
    """
    total, offset = global_count(x.shape[0], x.device)
    pick = broadcast_(torch.randint(0, total, (n,), device=x.device))  # (n,) indices into the global batch
    local = pick - offset
    mine = (local >= 0) & (local < x.shape[0])
    rows = torch.zeros(n, x.shape[1], dtype=x.dtype, device=x.device)
    rows[mine] = x[local[mine]]
    return all_reduce_sum_(rows)  # each row is non-zero on exactly one rank


def draw_local(draw: Callable[[int], torch.Tensor], n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`draw(rows)` made for the global batch; this rank's `n` rows of it. `device`: where the
    collective that counts the rows runs (the process group's device)."""
    if not is_distributed():
        return draw(n)
    total, offset = global_count(n, device)
    return draw(total)[offset: offset + n]


def uniform_local(shape: tuple[int, ...], generator: torch.Generator | None,
                  device: torch.device | str) -> torch.Tensor:
    """U(0, 1) of `shape` (the global batch first) drawn for the global batch: this rank's rows, on `device`."""
    gen_device = generator.device if generator is not None else device
    return draw_local(lambda m: torch.rand((m, *shape[1:]), generator=generator, device=gen_device),
                      shape[0], device).to(device)


def randint_local(high: int, shape: tuple[int, ...], generator: torch.Generator | None,
                  device: torch.device | str) -> torch.Tensor:
    """Integers in [0, high) of `shape` (the global batch first) drawn for the global batch: this rank's rows."""
    gen_device = generator.device if generator is not None else device
    return draw_local(lambda m: torch.randint(0, high, (m, *shape[1:]), generator=generator, device=gen_device),
                      shape[0], device).to(device)


def gather_global(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` (n_r, ...) joined in rank order: the global batch's."""
    if not is_distributed():
        return x
    total, offset = global_count(x.shape[0], x.device)
    out = torch.zeros(total, *x.shape[1:], dtype=x.dtype, device=x.device)
    out[offset: offset + x.shape[0]] = x
    return all_reduce_sum_(out)  # each row is non-zero on one rank only


def mix_seed(seed: int, *counters: int) -> int:
    """One seed from the run's seed and a position in training (counters >= -1)."""
    mixed = int(seed)
    for c in counters:
        mixed = (mixed * 1_000_003 + int(c) + 1) % (2**63 - 1)
    return mixed


def step_generator(seed: int, *counters: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the run's seed and the position in training (the same on every rank)."""
    return torch.Generator(device=device).manual_seed(mix_seed(seed, *counters))

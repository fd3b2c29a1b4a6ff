"""Collectives over `torch.distributed` that are the identity in a single process.

Statistics that drive training are global (STYLE.md #17): a rank that learns something from its
share of the batch reduces it with the other ranks, so every rank, and a single process with the
same global batch, makes the same update. Every function here is a collective when a process group
of more than one rank is initialised: all ranks must call it, in the same order.
"""

from __future__ import annotations

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

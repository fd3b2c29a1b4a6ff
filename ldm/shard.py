"""Randomness and statistics that do not depend on how a global batch is split over processes.

Under DDP each rank holds the rows `rank::world` of the global batch (the order Lightning's
DistributedSampler deals them in). Draws are made for the whole global batch from a generator
every rank holds in the same state, and each rank keeps its own rows; statistics gathered from
the ranks are put back in global order. A DDP run then draws and learns what one process with the
same global batch would, and a resumed run draws what the uninterrupted one drew.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.distributed as dist


def rank_world() -> tuple[int, int]:
    """(rank, world size) of the default process group; (0, 1) without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def draw_local(draw: Callable[[int], torch.Tensor], n: int) -> torch.Tensor:
    """`draw(global_rows)` made for the global batch; this rank's `n` rows of it."""
    rank, world = rank_world()
    if world == 1:
        return draw(n)
    return draw(n * world)[rank::world]


def gather_global(x: torch.Tensor) -> torch.Tensor:
    """Every rank's rows of `x` (n, ...) joined in global-batch order (all ranks must hold n rows)."""
    rank, world = rank_world()
    if world == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(parts, x.contiguous())
    return torch.stack(parts, 1).reshape(-1, *x.shape[1:])  # row j of rank r -> global row j * world + r


def step_generator(seed: int, *counters: int, device: torch.device | str = "cpu") -> torch.Generator:
    """A generator seeded from the run's seed and the position in training (same on every rank)."""
    g = torch.Generator(device=device)
    mixed = seed
    for c in counters:
        mixed = (mixed * 1_000_003 + int(c) + 1) % (2**63 - 1)
    return g.manual_seed(mixed)

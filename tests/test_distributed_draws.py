"""Two gloo processes draw, drop and learn exactly what one process with the same global batch does."""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from absorbing.process import AbsorbingDiffusion
from ldm.conditioning import ClassLabel
from ldm.distributed import draw_local, gather_global, step_generator

GLOBAL_BATCH, N_TOKENS, K, T = 6, 8, 5, 10


def x0_global() -> torch.Tensor:
    return torch.randint(0, K, (GLOBAL_BATCH, N_TOKENS), generator=torch.Generator().manual_seed(7))


def denoiser():
    torch.manual_seed(3)
    emb, head = torch.nn.Embedding(K + 1, 4), torch.nn.Linear(4, K)
    return lambda xt, t, cond: head(emb(xt))  # (B, N, K)


def run_steps(rows: slice) -> dict[str, torch.Tensor]:
    """Two training steps of the absorbing process (importance sampling on from the start) and a
    conditioning dropout, on the rows of the global batch this process holds."""
    process = AbsorbingDiffusion(K, T, time_sampling="importance", importance_min_count=0).train()
    process.Lt_count.fill_(1.0)  # importance sampling is active at once
    process.Lt_history.copy_(torch.linspace(0.1, 1.0, T + 1))
    net, x0 = denoiser(), x0_global()[rows]
    out: dict[str, torch.Tensor] = {}
    for step in range(2):
        g = step_generator(11, 0, step)
        res = process.training_losses(net, x0, None, g)
        out[f"t{step}"] = gather_global(res["t"])
    labels = {"class_label": torch.arange(GLOBAL_BATCH)[rows]}
    out["dropped"] = gather_global(ClassLabel(3).drop(labels, 0.5, step_generator(5))["class_label"])
    out["uniform"] = gather_global(draw_local(lambda m: torch.rand(m, generator=step_generator(9)), x0.shape[0]))
    out.update(Lt_history=process.Lt_history.clone(), Lt_count=process.Lt_count.clone(),
               loss_history=process.loss_history.clone())
    return out


def _worker(rank: int, world: int, store: str, results: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world)
    try:
        per_rank = GLOBAL_BATCH // world  # each rank holds one contiguous block of the global batch
        torch.save(run_steps(slice(rank * per_rank, (rank + 1) * per_rank)), f"{results}.{rank}")
    finally:
        dist.destroy_process_group()


def test_two_ranks_match_one_process(tmp_path):
    single = run_steps(slice(None))
    mp.spawn(_worker, args=(2, str(tmp_path / "store"), str(tmp_path / "out")), nprocs=2, join=True)
    ranks = [torch.load(tmp_path / f"out.{r}", weights_only=True) for r in range(2)]
    for key, value in single.items():
        for r, result in enumerate(ranks):
            assert torch.equal(result[key], value), f"rank {r} differs from one process in {key}"
    assert not torch.equal(single["t0"], single["t1"])  # the steps draw anew
    assert single["Lt_count"][1:].sum() == T + 2 * GLOBAL_BATCH  # every global row counted once per step

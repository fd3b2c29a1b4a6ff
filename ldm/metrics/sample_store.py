"""Evaluation samples drawn batch by batch, kept on disk, shared out over processes, with their cost.

A sampler setting's samples are a fixed list of batches (`batch_plan`): batch `start` holds samples
start..start+size-1, seeded with `seed + start` (`ldm.metrics.prior_eval.draw_batch`). Each finished
batch is written at once (atomically) to a folder keyed by everything that determines its samples:
the checkpoint (path, size and modification time), the sampler setting, the seed, the batch size,
bfloat16, the device type and the conditions. So

- a rerun after an interruption draws only the batches that are missing and scores the same samples
  as an uninterrupted run (the numbers are equal);
- under `torchrun`, rank r of W draws batches r, r + W, r + 2W, ... of the plan (`my_batches`); the
  samples do not depend on the number of processes, and rank 0 waits for the other ranks' batches in the
  folder (`wait_for`) and scores them all (ranks must share it: one machine, or a shared file system).
  Ranks coordinate through the folder only, with no process group: the priors' random draws
  (`ldm.distributed.draw_local`) would otherwise combine different ranks' batches as one training batch;
- a larger `-n` later reuses the batches it has in common with a smaller one.

A stored batch holds the samples as uint8 (`ldm.metrics.features.to_uint8`: what is scored), their
labels, the network calls each sample took where the sampler reports them, the features of every
extractor that has seen it (by extractor name), and its cost measured when it was drawn: seconds,
rows the prior's networks ran on (`count_network_rows`) and peak memory (`peak_memory`).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import sys
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import AbstractContextManager, contextmanager, nullcontext
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm import tqdm

from ldm.metrics.features import FeatureExtractor, to_uint8
from ldm.metrics.prior_eval import draw_batch

Record = dict[str, Any]


def batch_plan(n: int, batch_size: int) -> list[tuple[int, int]]:
    """(start, size) of every batch of an evaluation of `n` samples."""
    return [(start, min(batch_size, n - start)) for start in range(0, n, batch_size)]


def launch_rank() -> tuple[int, int]:
    """(rank, world size) as `torchrun` sets them in the environment; (0, 1) in a plain process."""
    return int(os.environ.get("RANK", "0") or 0), int(os.environ.get("WORLD_SIZE", "1") or 1)


def my_batches(plan: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """This process's share of the plan: every world-size-th batch from its rank (all of it alone)."""
    rank, world = launch_rank()
    return list(plan[rank::world])


def prior_networks(prior: nn.Module) -> list[nn.Module]:
    """The trained networks (and their EMA copies) of a prior and of any prior inside it (a cascade's stages):
    what a network evaluation runs."""
    from ldm.prior import LatentPrior

    found: dict[int, nn.Module] = {}
    for module in prior.modules():
        if isinstance(module, LatentPrior):
            for name in module.network_names:
                for ema in (False, True):
                    net = module.network(name, ema=ema)
                    found[id(net)] = net
    return list(found.values())


@contextmanager
def count_network_rows(prior: nn.Module) -> Iterator[list[int]]:
    """Count the rows (batch entries) the prior's networks run on inside the block: `[rows]`. A sampler that
    skips unchanged rows (absorbing) or stopped samples (SUNDAE) is charged what it ran; a guided step that
    runs the conditional and unconditional halves counts both. A network that is not evaluated through its
    `forward` while sampling (an autoregressive decoder stepping through a key/value cache) names what one
    evaluation runs in `evaluation_modules()`: one evaluation per decoded token."""
    counter = [0]

    def hook(module: nn.Module, args: tuple, kwargs: dict, output: Any) -> None:
        first = next((a for a in (*args, *kwargs.values()) if torch.is_tensor(a) and a.dim() > 0), None)
        if first is not None:
            counter[0] += int(first.shape[0])

    modules = [m for net in prior_networks(prior)
               for m in (net.evaluation_modules() if hasattr(net, "evaluation_modules") else [net])]
    handles = [m.register_forward_hook(hook, with_kwargs=True) for m in modules]
    try:
        yield counter
    finally:
        for h in handles:
            h.remove()


def _cpu_peak_bytes() -> int:
    """The process's peak resident memory so far (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


@contextmanager
def peak_memory(device: torch.device) -> Iterator[dict[str, int | None]]:
    """Peak memory inside the block: on CUDA the peak allocated (`peak_bytes`) and its rise above what was
    allocated at the start (`added_bytes`: what the batch itself needed); on the CPU the process's peak
    resident memory so far, which includes the model and data, and no `added_bytes` (not measurable there)."""
    out: dict[str, int | None] = {"peak_bytes": None, "added_bytes": None}
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        try:
            yield out
        finally:
            torch.cuda.synchronize(device)
            out["peak_bytes"] = int(torch.cuda.max_memory_allocated(device))
            out["added_bytes"] = out["peak_bytes"] - before
    else:
        try:
            yield out
        finally:
            out["peak_bytes"] = _cpu_peak_bytes()


def run_key(checkpoint: str | os.PathLike, **what: Any) -> dict[str, Any]:
    """Everything that determines an evaluation's samples; the checkpoint by path, size and modification time,
    so a checkpoint written anew (a training that went on) never reuses old samples."""
    path = Path(checkpoint).resolve()
    stat = path.stat()
    return {"checkpoint": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns, **what}


class BatchStore:
    """Finished batches of one run key under `root/<hash of the key>/`, one file per batch."""

    def __init__(self, root: str | os.PathLike, key: Mapping[str, Any]):
        text = json.dumps(key, sort_keys=True, default=str)
        self.key = dict(key)
        self.folder = Path(root) / hashlib.sha256(text.encode()).hexdigest()[:16]

    def path(self, start: int, size: int) -> Path:
        return self.folder / f"batch-{start:08d}-{size}.pt"

    def has(self, start: int, size: int) -> bool:
        return self.path(start, size).exists()

    def load(self, start: int, size: int) -> Record:
        return torch.load(self.path(start, size), weights_only=True)

    def save(self, start: int, size: int, record: Record) -> None:
        """Written to a temporary name and renamed: a batch file is complete or absent."""
        self.folder.mkdir(parents=True, exist_ok=True)
        key_file = self.folder / "key.json"
        if not key_file.exists():  # what these batches are, for a reader
            _atomic_write(key_file, lambda p: p.write_text(json.dumps(self.key, indent=2, default=str)))
        _atomic_write(self.path(start, size), lambda p: torch.save(record, p))


def _atomic_write(path: Path, write: Callable[[Path], None]) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def add_features(record: Record, extractors: Sequence[FeatureExtractor]) -> bool:
    """Features of the record's images by every extractor that has not seen them; whether any was added."""
    feats = record.setdefault("features", {})
    missing = [e for e in extractors if e.name not in feats]
    for e in missing:
        feats[e.name] = e(record["images"])
    return bool(missing)


def draw_record(prior: Any, start: int, size: int, num_classes: int | None, seed: int,
                class_conds: Sequence[Any] | None, precision: Callable[[], AbstractContextManager] | None = None,
                **sampler_kw: Any) -> Record:
    """One batch drawn and measured: uint8 images, labels, steps taken, seconds, network rows, memory."""
    with count_network_rows(prior) as rows, peak_memory(prior.device) as memory:
        t0 = time.perf_counter()
        with (precision or nullcontext)():
            images, labels, taken = draw_batch(prior, start, size, num_classes, seed, class_conds, **sampler_kw)
        if prior.device.type == "cuda":
            torch.cuda.synchronize(prior.device)
        seconds = time.perf_counter() - t0
    return {"images": to_uint8(images), "labels": labels, "steps_taken": taken, "seconds": seconds,
            "network_rows": rows[0], **memory}


def ensure_batches(store: BatchStore, batches: Sequence[tuple[int, int]], draw: Callable[[int, int], Record],
                   extractors: Sequence[FeatureExtractor] = (), progress: bool = False) -> int:
    """Draw and store every batch of `batches` the store lacks (features included); the number drawn."""
    drawn = 0
    for start, size in tqdm(batches, desc="sampling", disable=not progress):
        if not store.has(start, size):
            record = draw(start, size)
            add_features(record, extractors)
            store.save(start, size, record)
            drawn += 1
    return drawn


def wait_for(store: BatchStore, plan: Sequence[tuple[int, int]], poll_s: float = 2.0,
             timeout_s: float | None = None) -> None:
    """Return once every batch of the plan is in the store (other ranks draw theirs); a TimeoutError after
    `timeout_s` names how many are missing. torchrun stops every rank when one fails, so no rank waits forever
    on a crashed one."""
    t0 = time.monotonic()
    while missing := sum(not store.has(*b) for b in plan):
        if timeout_s is not None and time.monotonic() - t0 > timeout_s:
            raise TimeoutError(f"{missing} of {len(plan)} batches still missing from {store.folder} after "
                               f"{timeout_s:.0f} s; do all ranks write to this folder?")
        time.sleep(poll_s)


def collect(store: BatchStore, plan: Sequence[tuple[int, int]], extractors: Sequence[FeatureExtractor] = ()
            ) -> dict[str, Any]:
    """Every batch of the plan, in order, joined: images (N, C, H, W) uint8, labels (N,) or None, steps taken
    or None, features {extractor name: {"features", "logits"}} and the summed cost. Features an extractor
    has not computed yet are added (and stored)."""
    missing = [b for b in plan if not store.has(*b)]
    if missing:
        raise FileNotFoundError(f"{len(missing)} of {len(plan)} batches are missing from {store.folder} (first: "
                                f"samples {missing[0][0]}..); under torchrun every rank must write to the same folder")
    records = []
    for start, size in plan:
        record = store.load(start, size)
        if add_features(record, extractors):
            store.save(start, size, record)
        records.append(record)
    labels = [r["labels"] for r in records if r["labels"] is not None]
    taken = [r["steps_taken"] for r in records if r.get("steps_taken") is not None]
    names = {e.name for e in extractors}
    out: dict[str, Any] = {
        "images": torch.cat([r["images"] for r in records]),
        "labels": torch.cat(labels) if labels else None,
        "steps_taken": torch.cat(taken) if taken else None,
        "features": {name: {k: torch.cat([r["features"][name][k] for r in records]) for k in ("features", "logits")}
                     for name in names},
        "seconds": sum(r["seconds"] for r in records),
        "network_rows": sum(r["network_rows"] for r in records),
        "peak_bytes": max((r["peak_bytes"] for r in records if r.get("peak_bytes") is not None), default=None),
        "added_bytes_per_sample": max((r["added_bytes"] / len(r["images"]) for r in records
                                       if r.get("added_bytes") is not None), default=None),
    }
    return out


def cost_scores(collected: Mapping[str, Any]) -> dict[str, Any]:
    """Per-sample cost of a collected evaluation, measured when its batches were drawn."""
    n = len(collected["images"])
    mib = 2.0**20
    peak, added = collected["peak_bytes"], collected["added_bytes_per_sample"]
    return {"network_evaluations_per_sample": round(collected["network_rows"] / n, 2),
            "seconds_per_sample": collected["seconds"] / n,
            "peak_memory_mb": None if peak is None else round(peak / mib, 1),
            "peak_memory_mb_per_sample": None if added is None else round(added / mib, 3)}

"""Training throughput of a prior: optimizer steps fed from its latent cache against the same steps fed the
images the cache was built from, which the frozen first stage encodes on the fly (training without a cache).

The two are interleaved step by step, so drift of the machine's speed affects both alike; a step's time
includes fetching its batch (data loading is part of what the cache saves). The weights change as they would
in training; a benchmark never saves them.
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

from ldm.data.skipped import collate_good


def activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes of the distinct tensors autograd saves while `fn()` runs its forward pass (any device)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return sum(seen.values())


def drain(device: torch.device | str) -> None:
    """Wait for the device's queued work (a CUDA clock read is otherwise only the launch time)."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> float:
    """Seconds of `fn()`, the device's queue drained before and after."""
    drain(device)
    t0 = time.perf_counter()
    fn()
    drain(device)
    return time.perf_counter() - t0


def timed_backward(fn: Callable[[], torch.Tensor], model: nn.Module, device: torch.device) -> float:
    """Seconds of one forward + backward of the loss `fn()` returns."""
    model.zero_grad(set_to_none=True)
    return timed_call(lambda: fn().backward(), device)


def cuda_peak_bytes(fn: Callable[[], torch.Tensor], model: nn.Module, device: torch.device) -> int:
    """Peak bytes the CUDA allocator held above the weights during one forward + backward."""
    model.zero_grad(set_to_none=True)
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn().backward()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device) - base


def endless(dataset: Dataset, batch_size: int, seed: int = 0) -> Iterator[Any]:
    """Shuffled batches as the training loader makes them (bad items dropped), epoch after epoch."""
    if len(dataset) < batch_size:
        raise ValueError(f"a batch of {batch_size} needs at least as many items; the data set has {len(dataset)}")
    g = torch.Generator().manual_seed(seed)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=True, drop_last=True, generator=g,
                        collate_fn=collate_good)
    while True:
        for batch in loader:
            if batch is not None:
                yield batch


def training_throughput(prior: Any, sources: Mapping[str, Dataset], batch_size: int, steps: int,
                        warmup: int = 2) -> dict[str, Any]:
    """Median seconds per optimizer step (batch fetch, loss, backward, the prior's own optimizer) for each data
    source, and the images and latent tokens (positions of the latent grid) per second that makes."""
    prior.train()
    optimizer = prior.build_optimizer()
    generator = torch.Generator(device=prior.device).manual_seed(0)
    feeds = {name: endless(dataset, batch_size) for name, dataset in sources.items()}
    times: dict[str, list[float]] = {name: [] for name in sources}

    def step(name: str) -> float:
        t0 = time.perf_counter()
        batch = next(feeds[name])
        loss, _ = prior.training_loss(batch, generator)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        return time.perf_counter() - t0

    for _ in range(warmup):
        for name in sources:
            step(name)
    for _ in range(steps):
        for name in sources:
            times[name].append(step(name))
    prior.eval()
    tokens = math.prod(prior.latent_shape[-2:])
    result: dict[str, Any] = {"batch": batch_size, "steps": steps, "tokens_per_image": tokens}
    for name, ts in times.items():
        per_step = statistics.median(ts)
        result[name] = {"step_s": per_step, "images_per_s": batch_size / per_step,
                        "tokens_per_s": batch_size * tokens / per_step}
    return result


def random_latents(prior: Any, n: int, generator: torch.Generator) -> torch.Tensor:
    """`n` latents of the prior's kind and shape: uniform codes, or standard normal values."""
    if prior.latent_kind == "tokens":
        return torch.randint(0, prior.codebook_size, (n, *prior.latent_shape[-2:]), generator=generator,
                             device=generator.device).to(prior.device)
    return torch.randn((n, *prior.latent_shape), generator=generator, device=generator.device).to(prior.device)


def classes_in_turn(prior: Any, n: int) -> Any:
    """The prior's condition for `n` samples whose classes go 0, 1, 2, ... in turn (none if unconditional)."""
    return prior.user_cond((torch.arange(n) % prior.num_classes).tolist() if prior.num_classes else None, n)


def training_cost(prior: Any, batch: int, repeats: int = 3, versus: Any = None) -> dict[str, Any]:
    """Forward + backward of one training loss on random latents at the prior's latent shape, and one step of
    the prior's own optimizer: median seconds, the activations autograd keeps and, on CUDA, the allocator's peak
    above the weights. `versus`, the same prior built another way (channels-last, an unfused optimizer), is
    timed interleaved with it, so the ratios of its times to these come from one run."""
    device = torch.device(prior.device)
    runs = [prior] + ([versus] if versus is not None else [])
    latents = random_latents(prior, batch, torch.Generator(device=device).manual_seed(0))
    cond = classes_in_turn(prior, batch)

    def loss_of(model: Any) -> Callable[[], torch.Tensor]:
        return lambda: model.compute_loss(latents, cond, generator=torch.Generator(device=device).manual_seed(1))[0]

    losses = [loss_of(model) for model in runs]
    optimizers = []
    for model, loss in zip(runs, losses):
        model.train()
        optimizers.append(model.build_optimizer())
        timed_backward(loss, model, device)  # warm-up, and gradients for the optimizer's first step
        optimizers[-1].step()
    row: dict[str, Any] = {"tokens": math.prod(prior.latent_shape[-2:]), "latent_shape": list(prior.latent_shape),
                           "batch": batch, "parameters": sum(p.numel() for p in prior.trained_parameters()),
                           "activation_bytes": activation_bytes(losses[0])}
    if device.type == "cuda":
        row["cuda_peak_bytes"] = cuda_peak_bytes(losses[0], prior, device)
    backward: list[list[float]] = [[] for _ in runs]
    stepped: list[list[float]] = [[] for _ in runs]
    for _ in range(repeats):
        for i, (model, loss, optimizer) in enumerate(zip(runs, losses, optimizers)):
            backward[i].append(timed_backward(loss, model, device))
            stepped[i].append(timed_call(optimizer.step, device))
    row["forward_backward_s"], row["optimizer_step_s"] = statistics.median(backward[0]), statistics.median(stepped[0])
    if versus is not None:
        fb, st = statistics.median(backward[1]), statistics.median(stepped[1])
        row["versus"] = {"forward_backward_s": fb, "optimizer_step_s": st,
                         "forward_backward_ratio": fb / row["forward_backward_s"],
                         "optimizer_step_ratio": st / row["optimizer_step_s"]}
    return row


def _cloned(value: Any) -> Any:
    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, Mapping):
        return {k: _cloned(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_cloned(v) for v in value)
    return value


class CallRecorder:
    """Records every call of the given networks (copies of their inputs) while a sampler runs, so that the very
    calls a sampling step made can be replayed on the bare networks and timed: like against like, whatever the
    sampler fed them (the rows it kept, the doubled batch under guidance). Use as a context manager."""

    def __init__(self, networks: list[nn.Module]):
        self.networks, self.calls, self.replaying, self.handles = networks, [], False, []

    def __enter__(self) -> CallRecorder:
        self.handles = [net.register_forward_pre_hook(self._record, with_kwargs=True) for net in self.networks]
        return self

    def __exit__(self, *exc: Any) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []

    def _record(self, module: nn.Module, args: tuple, kwargs: dict) -> None:
        if not self.replaying:
            self.calls.append((module, _cloned(args), _cloned(kwargs)))

    def take(self) -> list[tuple[nn.Module, tuple, dict]]:
        """The calls recorded since the last `take`."""
        calls, self.calls = self.calls, []
        return calls

    @staticmethod
    def rows(calls: list[tuple[nn.Module, tuple, dict]]) -> int:
        """Batch rows the calls ran the networks on (their first tensor argument's leading size)."""
        firsts = [next((a for a in (*args, *kwargs.values()) if isinstance(a, torch.Tensor)), None)
                  for _, args, kwargs in calls]
        return sum(int(t.shape[0]) for t in firsts if t is not None and t.dim())

    @torch.no_grad()
    def replay(self, calls: list[tuple[nn.Module, tuple, dict]]) -> float:
        """Seconds the bare networks take on the recorded calls, one after another."""
        self.replaying = True
        try:
            device = next((p.device for m, _, _ in calls for p in m.parameters()), torch.device("cpu"))

            def run() -> None:
                for module, args, kwargs in calls:
                    module(*args, **kwargs)

            return timed_call(run, device)
        finally:
            self.replaying = False


class PeakMemory:
    """Peak memory of a run: the CUDA allocator's peak since `reset` on a GPU; on a CPU the process's peak
    resident set (which cannot be reset: the largest of everything the process ran)."""

    def __init__(self, device: torch.device | str):
        self.device = torch.device(device)

    def reset(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)

    def mib(self) -> float:
        if self.device.type == "cuda":
            return torch.cuda.max_memory_allocated(self.device) / 2**20
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**10  # KiB on Linux

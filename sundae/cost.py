"""What the hourglass saves: forward + backward time and memory of an hourglass against a plain transformer
of the same width and total depth (Nawrot et al. 2021's comparison), at given sequence lengths.

Both networks are built from the same settings; the plain one has every layer at full length (depth
[pre + valley + post], attention resampling layers not counted in the depth). Timings are interleaved in
one run so their ratio holds on a shared machine. Memory is what autograd keeps for the backward pass
(the activations, measured through saved-tensor hooks, any device), and on CUDA also the peak the
allocator saw above the weights.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ldm.throughput import activation_bytes, cuda_peak_bytes, timed_backward
from ldm.util import ConfigError
from sundae.hourglass import (
    HourglassTransformer,
    level_grids,
    levels,
    parse_depth,
    parse_shorten_factors,
    total_depth,
)


def square_grid(length: int, flag: str = "--cost-lengths") -> tuple[int, int]:
    side = math.isqrt(length)
    if length < 1 or side * side != length:
        raise ValueError(f"{flag}: {length} tokens are not a square map; give square numbers (256 = 16x16)")
    return side, side


def check_lengths(hparams: dict[str, Any], lengths: Sequence[int]) -> None:
    """Every length is a square map that the network's shorten factors divide (before any timing)."""
    spec = parse_depth(hparams["depth"])
    patches = parse_shorten_factors(hparams["shorten_factor"], levels(spec))
    for n in lengths:
        try:
            level_grids(square_grid(n), patches)
        except ConfigError as e:
            raise ValueError(f"--cost-lengths {n}: {e}") from None


def _loss(model: HourglassTransformer, x: torch.Tensor, cond: torch.Tensor | None, target: torch.Tensor):
    return lambda: F.cross_entropy(model(x, cond).float().transpose(1, 2), target)


def compare_with_plain(net: HourglassTransformer, lengths: Sequence[int], batch: int = 8, repeats: int = 3,
                       device: torch.device | str = "cpu", seed: int = 0) -> list[dict[str, Any]]:
    """One row per length: seconds and memory of forward + backward for both networks, and their ratios."""
    hp = dict(net.hparams)
    check_lengths(hp, lengths)
    plain_hp = {**hp, "depth": [total_depth(parse_depth(hp["depth"]))]}
    device = torch.device(device)
    rows = []
    for n in lengths:
        grid = square_grid(n)
        torch.manual_seed(seed)
        nets = {"hourglass": HourglassTransformer(net.vocab_size, grid, **hp).to(device),
                "plain": HourglassTransformer(net.vocab_size, grid, **plain_hp).to(device)}
        g = torch.Generator(device="cpu").manual_seed(seed)
        x = torch.randint(0, net.vocab_size, (batch, n), generator=g).to(device)
        target = torch.randint(0, net.vocab_size, (batch, n), generator=g).to(device)
        cond = torch.zeros(batch, dtype=torch.long, device=device) if hp.get("num_classes") else None
        loss = {name: _loss(model, x, cond, target) for name, model in nets.items()}

        row: dict[str, Any] = {"length": n, "grid": list(grid), "batch": batch}
        for name, model in nets.items():
            timed_backward(loss[name], model, device)  # warm-up
            row[f"{name}_params"] = sum(p.numel() for p in model.parameters())
            row[f"{name}_activation_bytes"] = activation_bytes(loss[name])
            if device.type == "cuda":
                row[f"{name}_cuda_peak_bytes"] = cuda_peak_bytes(loss[name], model, device)
        times: dict[str, list[float]] = {name: [] for name in nets}
        for _ in range(repeats):  # interleaved, so drift on a shared machine affects both
            for name, model in nets.items():
                times[name].append(timed_backward(loss[name], model, device))
        for name in nets:
            row[f"{name}_s"] = statistics.median(times[name])
        row["time_ratio"] = row["hourglass_s"] / row["plain_s"]
        row["activation_ratio"] = row["hourglass_activation_bytes"] / row["plain_activation_bytes"]
        if device.type == "cuda":
            row["cuda_peak_ratio"] = row["hourglass_cuda_peak_bytes"] / row["plain_cuda_peak_bytes"]
        rows.append(row)
        del nets, loss
    return rows

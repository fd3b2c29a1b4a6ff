"""Token maps larger than the training shape: run the denoiser on overlapping training-size windows
and average each position's log-probabilities over the windows that cover it (the paper's big
samples, Bond-Taylor et al. 2022, Sec. 4.4)."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

from ldm.conditioning import Cond


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Window offsets along one axis covering [0, size), the last one flush with the edge."""
    if window > size:
        raise ValueError(f"window {window} is larger than the map {size}")
    starts = list(range(0, size - window + 1, stride))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def windowed_denoiser(net: Callable[..., torch.Tensor], big_hw: tuple[int, int], win_hw: tuple[int, int],
                      stride: int | Sequence[int] | None = None) -> Callable[..., torch.Tensor]:
    """Wrap `net(x (B, h*w), t, cond)` into a denoiser of (B, H*W) maps; all windows run as one batch."""
    H, W = big_hw
    h, w = win_hw
    sh, sw = (stride, stride) if isinstance(stride, int) else tuple(stride or (max(1, h // 2), max(1, w // 2)))
    offsets = [(i, j) for i in window_starts(H, h, sh) for j in window_starts(W, w, sw)]

    def denoise(x: torch.Tensor, t: torch.Tensor, cond: Cond | None) -> torch.Tensor:
        b = x.shape[0]
        grid = x.view(b, H, W)
        crops = torch.stack([grid[:, i:i + h, j:j + w] for i, j in offsets], 1)  # (B, nW, h, w)
        nw = len(offsets)
        window_cond = {k: v.repeat_interleave(nw, 0) for k, v in (cond or {}).items()}
        logp = net(crops.reshape(b * nw, h * w), t.repeat_interleave(nw, 0), window_cond)
        logp = logp.float().log_softmax(-1)  # (B*nW, h*w, K)
        k = logp.shape[-1]
        logp = logp.view(b, nw, h, w, k)
        total = torch.zeros(b, H, W, k, device=x.device)
        count = torch.zeros(1, H, W, 1, device=x.device)
        for n, (i, j) in enumerate(offsets):
            total[:, i:i + h, j:j + w] += logp[:, n]
            count[:, i:i + h, j:j + w] += 1
        return (total / count).view(b, H * W, k)

    return denoise

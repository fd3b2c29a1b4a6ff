"""Inpainting masks as users give them: checked once, so a 0/255 mask or a mask of another size is refused
instead of silently keeping everything (or nothing)."""

from __future__ import annotations

import torch

MASK_VALUES = "{0, 1} (bool or integers) or [0, 1] (floats), 1 = keep"


def check_mask(mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
    """`mask` (B, 1, H, W) or (B, H, W) for images (B, C, H, W), as float (B, 1, H, W) in [0, 1].

    A float mask is a weight: the prior keeps a pixel where it is > 0.5, and pasting blends with it
    (soft edges stay soft).
    """
    mask = torch.as_tensor(mask)
    given = tuple(mask.shape)
    b, _, h, w = images.shape
    if mask.dim() == 3:
        mask = mask[:, None]
    if mask.dim() != 4 or tuple(mask.shape) != (b, 1, h, w):
        raise ValueError(f"mask must have shape (B, 1, H, W) = {(b, 1, h, w)} or (B, H, W) = {(b, h, w)} to match "
                         f"the images {tuple(images.shape)}, got {given}")
    if mask.dtype == torch.bool:
        return mask.float()
    values = mask.float()
    if mask.is_floating_point():
        bad = ~torch.isfinite(values) | (values < 0) | (values > 1)
    else:
        bad = (values != 0) & (values != 1)
    if bool(bad.any()):
        if not bool(torch.isfinite(values).all()):
            raise ValueError(f"mask values must be in {MASK_VALUES}, got non-finite values")
        raise ValueError(f"mask values must be in {MASK_VALUES}, got {str(mask.dtype).replace('torch.', '')} values "
                         f"in [{float(values.min()):g}, {float(values.max()):g}]")
    return values


NAMED_MASKS = ("upper", "lower", "left", "centre", "border")


def named_mask(name: str, n: int, h: int, w: int) -> torch.Tensor:
    """A standard inpainting mask (n, 1, h, w), 1 = keep: `upper` keeps the upper half (the lower is filled),
    `lower` the lower half, `left` the left half, `centre` everything but a centred square of half the size,
    `border` only that centred square (outpainting: a border of a quarter of each side is filled)."""
    mask = torch.zeros(n, 1, h, w)
    if name == "upper":
        mask[..., : h // 2, :] = 1
    elif name == "lower":
        mask[..., h // 2:, :] = 1
    elif name == "left":
        mask[..., :, : w // 2] = 1
    elif name == "centre":
        mask[:] = 1
        mask[..., h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 0
    elif name == "border":
        mask[..., h // 4: h // 4 + h // 2, w // 4: w // 4 + w // 2] = 1
    else:
        raise ValueError(f"mask must be one of {', '.join(NAMED_MASKS)}, got {name!r}")
    return mask

"""Scaled dot-product attention for every network of the project, in float32 on CPUs.

On a CPU, PyTorch's fused attention kernel is slower in bfloat16 than in float32: about 1.6x in the forward
and 4x in forward plus backward (8 heads of 32 features over 66 tokens, batch 43, two cores; torch 2.14), so
under bf16 autocast on a CPU the attention itself runs in float32 and hands back the caller's dtype. On a GPU
the low-precision kernels are the fast ones and are used as they are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: torch.Tensor | None = None,
              dropout_p: float = 0.0) -> torch.Tensor:
    """`F.scaled_dot_product_attention(q, k, v, attn_mask, dropout_p)`, computed in float32 on a CPU."""
    if q.device.type != "cpu" or q.dtype == torch.float64:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, dropout_p=dropout_p)
    if attn_mask is not None and attn_mask.dtype != torch.bool:
        attn_mask = attn_mask.float()
    with torch.autocast("cpu", enabled=False):
        out = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=attn_mask,
                                             dropout_p=dropout_p)
    return out.to(q.dtype)

"""The shared attention: float32 on a CPU under bf16 autocast, the caller's dtype back, the plain kernel otherwise."""

import pytest
import torch
import torch.nn.functional as F

from ldm.nn.attention import attention


def _qkv(dtype=torch.float32, n=12):
    g = torch.Generator().manual_seed(0)
    return [torch.randn(3, 4, n, 8, generator=g).to(dtype).requires_grad_() for _ in range(3)]


@pytest.mark.parametrize("mask", [None, "bool", "float"])
def test_float32_inputs_give_the_plain_kernels_answer(mask):
    q, k, v = _qkv()
    m = None
    if mask is not None:
        m = torch.ones(12, 12).tril().bool()
        m = m if mask == "bool" else torch.zeros(12, 12).masked_fill(~m, float("-inf"))
    torch.testing.assert_close(attention(q, k, v, attn_mask=m), F.scaled_dot_product_attention(q, k, v, attn_mask=m),
                               rtol=0, atol=0)


def test_under_cpu_bf16_autocast_it_computes_in_float32_and_returns_bf16_with_gradients():
    q, k, v = _qkv(torch.bfloat16)
    mask = torch.ones(12, 12).tril().bool()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = attention(q, k, v, attn_mask=mask)
    assert out.dtype == torch.bfloat16
    want = F.scaled_dot_product_attention(q.float(), k.float(), v.float(), attn_mask=mask)
    torch.testing.assert_close(out.float(), want.to(torch.bfloat16).float(), rtol=0, atol=0)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the bf16 kernel: a coarser answer than float32's
        bf16 = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    assert (bf16.float() - want).abs().max() >= (out.float() - want).abs().max()
    out.float().square().sum().backward()
    assert all(t.grad is not None and t.grad.dtype == torch.bfloat16 and t.grad.abs().sum() > 0 for t in (q, k, v))

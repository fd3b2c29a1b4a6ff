"""The quantiser's anti-collapse options and codebook statistics."""

from __future__ import annotations

import pytest
import torch

from ldm.first_stage.quantize import VectorQuantizer


def grid(z_flat: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors as a (1, D, 1, N) feature map."""
    return z_flat.t()[None, :, None, :].contiguous()


def test_ema_update_closed_form():
    q = VectorQuantizer(2, 2, ema_update=True, decay=0.5, eps=0.0).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [10.0, 10.0]]))
        q.ema_embed_sum.copy_(q.embedding.weight)
        q.ema_cluster_size.fill_(1.0)
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]])  # two vectors to code 0, one to code 1
    q(grid(z))
    # sizes 0.5*1 + 0.5*[2, 1] = [1.5, 1.0]; sums 0.5*e + 0.5*[[4,4],[9,9]] = [[2,2],[9.5,9.5]]
    torch.testing.assert_close(q.ema_cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.embedding.weight, torch.tensor([[2 / 1.5, 2 / 1.5], [9.5, 9.5]]))
    assert not q.embedding.weight.requires_grad


def test_init_from_data_then_saved_flag():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 3, init_from_data=True).train()
    z = torch.randn(50, 3)
    q(grid(z))
    rows = {tuple(r.tolist()) for r in z}
    assert all(tuple(e.tolist()) in rows for e in q.embedding.weight)
    assert float(q.state_dict()["initialized"]) == 1.0
    before = q.embedding.weight.clone()
    q(grid(torch.randn(50, 3)))
    assert torch.equal(before, q.embedding.weight)  # only once


def test_dead_codes_are_restarted_from_data():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, restart_dead_codes=True, dead_threshold=1.0, decay=0.5).train()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.full((8, 2), 100.0))
        q.embedding.weight[0] = 0.0
    z = torch.randn(64, 2) * 0.1  # all nearest to code 0
    for _ in range(4):
        q(grid(z))
    far = (q.embedding.weight.abs() > 50).any(1)
    assert not far.any(), "unused codes far from the data should have been moved onto it"


def test_l2_normalised_lookup_is_cosine():
    q = VectorQuantizer(3, 2, l2_normalize=True).eval()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]]))
    z = torch.tensor([[10.0, 1.0], [0.1, 3.0], [-2.0, -2.5]])
    _, _, (_, _, idx) = q(grid(z))
    assert idx.tolist() == [0, 1, 2]


def test_low_dimensional_lookup_shapes_and_gradients():
    q = VectorQuantizer(16, 8, codebook_dim=2).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    zq, loss, (_, _, idx) = q(z)
    assert zq.shape == z.shape and q.embedding.weight.shape == (16, 2)
    (zq.sum() + loss).backward()
    assert z.grad is not None and q.in_proj.weight.grad is not None and q.out_proj.weight.grad is not None
    torch.testing.assert_close(q.get_codebook_entry(idx, (2, 3, 3, 8)), zq, atol=1e-6, rtol=1e-5)


def test_straight_through_and_usage_stats():
    q = VectorQuantizer(4, 2).eval()
    with torch.no_grad():
        q.embedding.weight.copy_(torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]]))
    z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.2], [0.2, 0.1]], requires_grad=True)
    zq, _, (perplexity, _, idx) = q(grid(z))
    zq.sum().backward()
    assert torch.equal(z.grad, torch.ones_like(z))  # identity gradient through the quantiser
    assert idx.tolist() == [0, 1, 2, 0]
    stats = q.usage_stats()  # codes 0 (twice), 1, 2 used; 3 never
    assert stats["usage"] == 0.75
    p = torch.tensor([0.5, 0.25, 0.25])
    assert stats["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    assert float(perplexity) == pytest.approx(stats["perplexity"], rel=1e-5)

"""The quantiser's anti-collapse options, codebook statistics, layout and error messages."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from safetensors.torch import load_file, save_file

from ldm.first_stage.quantize import VectorQuantizer


def grid(z_flat: torch.Tensor) -> torch.Tensor:
    """(N, D) vectors as a (1, D, 1, N) feature map, so position i is row i."""
    return z_flat.t()[None, :, None, :].contiguous()


def set_codes(q: VectorQuantizer, codes) -> None:
    with torch.no_grad():
        q.embedding.weight.copy_(torch.as_tensor(codes, dtype=torch.float32))
        if q.ema_update:
            q.ema_embed_sum.copy_(q.embedding.weight)
            q.ema_cluster_size.fill_(1.0)


def test_default_layout_is_taming_and_options_add_buffers():
    assert list(VectorQuantizer(8, 4).state_dict()) == ["embedding.weight"]
    q = VectorQuantizer(8, 4, ema_update=True, init_from_data=True, restart_dead_codes=True, codebook_dim=2)
    assert set(q.state_dict()) == {"embedding.weight", "ema_cluster_size", "ema_embed_sum", "initialized",
                                   "code_usage", "in_proj.weight", "in_proj.bias", "out_proj.weight",
                                   "out_proj.bias"}
    assert q.embedding.weight.shape == (8, 2) and not q.embedding.weight.requires_grad
    # tracked, but neither saved nor a buffer (DDP would overwrite each rank's counts with rank 0's)
    assert isinstance(q.usage_counts, torch.Tensor) and "usage_counts" not in dict(q.named_buffers())


def test_ema_update_closed_form():
    q = VectorQuantizer(2, 2, ema_update=True, decay=0.5, eps=0.0, beta=0.25).train()
    set_codes(q, [[0.0, 0.0], [10.0, 10.0]])
    z = torch.tensor([[1.0, 1.0], [3.0, 3.0], [9.0, 9.0]], requires_grad=True)  # codes 0, 0, 1
    zq, loss, (_, _, idx) = q(grid(z))
    assert idx.tolist() == [0, 0, 1]
    # sizes 0.5*1 + 0.5*[2, 1] = [1.5, 1]; sums 0.5*e + 0.5*[[4, 4], [9, 9]] = [[2, 2], [9.5, 9.5]]
    torch.testing.assert_close(q.ema_cluster_size, torch.tensor([1.5, 1.0]))
    torch.testing.assert_close(q.ema_embed_sum, torch.tensor([[2.0, 2.0], [9.5, 9.5]]))
    torch.testing.assert_close(q.embedding.weight, torch.tensor([[2 / 1.5, 2 / 1.5], [9.5, 9.5]]))
    # only the commitment term, against the codes before the update: beta * mean((e - z)^2)
    expected = 0.25 * torch.tensor([1.0, 1.0, 9.0, 9.0, 1.0, 1.0]).mean()
    torch.testing.assert_close(loss, expected)
    (zq.sum() + loss).backward()
    assert q.embedding.weight.grad is None  # EMA codes are not trained by gradient
    # straight-through 1 from zq, plus the commitment gradient beta * 2 (z - e) / numel
    e = torch.tensor([[0.0, 0.0], [0.0, 0.0], [10.0, 10.0]])
    torch.testing.assert_close(z.grad, 1 + 0.25 * 2 * (z.detach() - e) / z.numel())


def test_ema_moves_codes_toward_assigned_means_and_spares_unused_codes():
    torch.manual_seed(0)
    q = VectorQuantizer(3, 2, ema_update=True, decay=0.9).train()
    set_codes(q, [[0.0, 0.0], [5.0, 5.0], [-50.0, 50.0]])
    a, b = torch.tensor([1.0, -1.0]), torch.tensor([4.0, 6.0])
    z = torch.cat([a + 0.01 * torch.randn(32, 2), b + 0.01 * torch.randn(32, 2)])
    for _ in range(100):
        q(grid(z))
    means = torch.stack([z[:32].mean(0), z[32:].mean(0)])
    torch.testing.assert_close(q.embedding.weight[:2], means, atol=1e-3, rtol=1e-3)
    # an unused code's sum and size decay alike: it keeps its direction and does not blow up (the
    # Laplace smoothing only shrinks it slowly; here to about 0.73 of its length after 100 steps)
    unused, start = q.embedding.weight[2], torch.tensor([-50.0, 50.0])
    assert torch.nn.functional.cosine_similarity(unused, start, dim=0) > 0.999
    assert 0.5 < float(unused.norm() / start.norm()) <= 1.0


def test_eval_mode_leaves_codebook_alone():
    q = VectorQuantizer(4, 2, ema_update=True, init_from_data=True, restart_dead_codes=True).eval()
    before = {k: v.clone() for k, v in q.state_dict().items()}
    q(grid(torch.randn(16, 2)))
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_init_from_data_once_and_restored_from_state_dict():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 3, init_from_data=True).train()
    z = torch.randn(50, 3)
    q(grid(z))
    rows = {tuple(r.tolist()) for r in z}
    assert all(tuple(e.tolist()) in rows for e in q.embedding.weight)
    assert float(q.state_dict()["initialized"]) == 1.0
    before = q.embedding.weight.detach().clone()
    q(grid(torch.randn(50, 3) + 10))
    assert torch.equal(before, q.embedding.weight)  # only the first batch
    # a resumed run loads the flag and does not re-initialise
    resumed = VectorQuantizer(4, 3, init_from_data=True).train()
    resumed.load_state_dict(q.state_dict(), strict=True)
    resumed(grid(torch.randn(50, 3) + 10))
    assert torch.equal(resumed.embedding.weight, before)


def test_dead_codes_are_restarted_from_data():
    torch.manual_seed(0)
    q = VectorQuantizer(8, 2, restart_dead_codes=True, dead_threshold=1.0, decay=0.5).train()
    set_codes(q, torch.full((8, 2), 100.0))
    with torch.no_grad():
        q.embedding.weight[0] = 0.0
    z = torch.randn(64, 2) * 0.1  # all nearest to code 0
    q(grid(z))
    assert (q.embedding.weight[1:] == 100.0).all()  # usage starts above the threshold
    for _ in range(3):
        q(grid(z))
    rows = {tuple(r.tolist()) for r in z}
    assert all(tuple(e.tolist()) in rows for e in q.embedding.weight[1:]), "dead codes should sit on data"
    assert q.code_usage[1:].min() >= 1.0  # restarted codes get time before the next check


def test_l2_normalised_lookup_is_max_cosine():
    q = VectorQuantizer(3, 2, l2_normalize=True).eval()
    set_codes(q, [[1.0, 0.0], [0.0, 5.0], [-1.0, -1.0]])
    z = torch.tensor([[10.0, 1.0], [0.1, 3.0], [-2.0, -2.5], [0.5, 0.6]])
    zq, _, (_, _, idx) = q(grid(z))
    cos = torch.nn.functional.normalize(z, dim=1) @ torch.nn.functional.normalize(q.embedding.weight, dim=1).t()
    assert idx.tolist() == cos.argmax(1).tolist() == [0, 1, 2, 1]
    # an unnormalised Euclidean lookup would pick code 0 for the last vector
    assert (torch.cdist(z, q.embedding.weight).argmin(1)).tolist()[3] == 0
    torch.testing.assert_close(zq[0, :, 0].t().norm(dim=1), torch.ones(4))  # unit-length codes


def test_low_dimensional_lookup_shapes_and_gradients():
    torch.manual_seed(0)
    q = VectorQuantizer(16, 8, codebook_dim=2).train()
    z = torch.randn(2, 8, 3, 3, requires_grad=True)
    zq, loss, (_, _, idx) = q(z)
    assert zq.shape == z.shape and q.embedding.weight.shape == (16, 2) and idx.shape == (18,)
    (zq.sum() + loss).backward()
    for name, p in q.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    assert z.grad is not None and z.grad.abs().sum() > 0
    torch.testing.assert_close(q.get_codebook_entry(idx, (2, 3, 3, 8)), zq.detach(), atol=1e-6, rtol=1e-5)
    assert q.get_codebook_entry(idx.view(2, 9), None).shape == (2, 9, 8)


def test_straight_through_gradient_reaches_encoder_output():
    q = VectorQuantizer(4, 2, beta=0.25).train()
    set_codes(q, [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.2], [0.2, 0.1]], requires_grad=True)
    zq, loss, _ = q(grid(z))
    zq.sum().backward(retain_graph=True)
    assert torch.equal(z.grad, torch.ones_like(z))  # identity through the quantiser
    z.grad = None
    loss.backward()  # legacy: d/dz mean((sg[e] - z)^2) = 2 (z - e) / numel; the beta term has no z gradient
    e = q.embedding.weight.detach()[[0, 1, 2, 0]]
    torch.testing.assert_close(z.grad, 2 * (z.detach() - e) / z.numel())


@pytest.mark.parametrize("legacy", [True, False])
def test_loss_weights(legacy):
    q = VectorQuantizer(2, 1, beta=0.25, legacy=legacy)
    set_codes(q, [[0.0], [4.0]])
    z = torch.tensor([[1.0], [3.0]], requires_grad=True)  # both at squared distance 1
    zq, loss, _ = q(grid(z))
    assert float(loss.detach()) == pytest.approx(1.25)  # (1 + beta) * 1 either way; the split differs
    loss.backward()
    commit_weight = 1.0 if legacy else 0.25
    torch.testing.assert_close(z.grad, commit_weight * 2 * (z.detach() - torch.tensor([[0.0], [4.0]])) / 2)


def test_usage_stats_and_perplexity():
    q = VectorQuantizer(4, 2).eval()
    set_codes(q, [[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [5.0, 5.0]])
    assert q.usage_stats() == {"usage": 0.0, "perplexity": 0.0, "used_codes": 0}
    z = torch.tensor([[0.1, 0.0], [0.9, 0.1], [0.0, 1.2], [0.2, 0.1]])
    _, _, (perplexity, _, idx) = q(grid(z))
    assert idx.tolist() == [0, 1, 2, 0]
    p = torch.tensor([0.5, 0.25, 0.25])
    expected = float(torch.exp(-(p * p.log()).sum()))  # 2**1.5
    assert float(perplexity) == pytest.approx(expected, rel=1e-5)
    stats = q.usage_stats()
    assert stats["usage"] == 0.75 and stats["used_codes"] == 3
    assert stats["perplexity"] == pytest.approx(expected, rel=1e-5)
    q(grid(torch.tensor([[5.0, 5.0]] * 4)))  # accumulates: counts [2, 1, 1, 4]
    p = torch.tensor([2.0, 1.0, 1.0, 4.0]) / 8
    assert q.usage_stats()["usage"] == 1.0
    assert q.usage_stats()["perplexity"] == pytest.approx(float(torch.exp(-(p * p.log()).sum())), rel=1e-5)
    q.reset_usage()
    assert q.usage_stats()["used_codes"] == 0


def test_bad_arguments_are_clear(tmp_path):
    with pytest.raises(FileNotFoundError, match="codebook remap file not found: .*missing.npy"):
        VectorQuantizer(16, 4, remap=str(tmp_path / "missing.npy"))
    np.save(tmp_path / "floats.npy", np.array([0.5, 1.5]))
    with pytest.raises(ValueError, match="non-empty 1-D integer array .* dtype float64"):
        VectorQuantizer(16, 4, remap=str(tmp_path / "floats.npy"))
    np.save(tmp_path / "big.npy", np.array([1, 20]))
    with pytest.raises(ValueError, match="indices outside \\[0, 16\\)"):
        VectorQuantizer(16, 4, remap=str(tmp_path / "big.npy"))
    (tmp_path / "junk.npy").write_text("not numpy")
    with pytest.raises(ValueError, match="not a readable .npy array"):
        VectorQuantizer(16, 4, remap=str(tmp_path / "junk.npy"))
    np.save(tmp_path / "used.npy", np.array([1, 2, 3]))
    with pytest.raises(ValueError, match="unknown_index must be 'random', 'extra' or an int in \\[0, 3\\)"):
        VectorQuantizer(16, 4, remap=str(tmp_path / "used.npy"), unknown_index="extar")
    with pytest.raises(ValueError, match="expected z of shape \\(B, 4, H, W\\); got \\(1, 3, 2, 2\\)"):
        VectorQuantizer(16, 4)(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="GumbelQuantize"):
        VectorQuantizer(16, 4)(torch.zeros(1, 4, 2, 2), temp=0.5)
    with pytest.raises(ValueError, match="decay must be in \\[0, 1\\)"):
        VectorQuantizer(16, 4, ema_update=True, decay=1.5)


# --- several processes: every rank must make the same codebook update -------------------------------
def _rank_main(rank: int, world: int, init_file: str, out_dir: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        torch.manual_seed(100 + rank)  # different data and different random picks per rank
        z = torch.randn(2, 4, 3, 3) + rank
        q = VectorQuantizer(6, 4, ema_update=True, decay=0.5, init_from_data=True, restart_dead_codes=True,
                            dead_threshold=100.0).train()  # every code counts as dead after one step
        q(z)
        init = q.embedding.weight.detach().clone()
        q(z)
        q(z)
        save_file({"init": init, "final": q.embedding.weight.detach().contiguous(),
                   "usage": q.code_usage, "size": q.ema_cluster_size},
                  os.path.join(out_dir, f"rank{rank}.safetensors"))
    finally:
        dist.destroy_process_group()


@pytest.mark.slow  # spawns two processes that import torch: 3 to 11 s on a shared 2-core machine
@pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")
def test_ranks_agree_on_codebook_updates(tmp_path):
    mp.spawn(_rank_main, args=(2, str(tmp_path / "init"), str(tmp_path)), nprocs=2, join=True)
    r0, r1 = (load_file(str(tmp_path / f"rank{r}.safetensors")) for r in range(2))
    for key in r0:
        assert torch.equal(r0[key], r1[key]), key
    assert float(r0["size"].sum()) > 0

"""Unrolled denoising: the corruption's statistics, the unrolled loss's forward passes and gradients, and
that it trains."""

from __future__ import annotations

import pytest
import torch

from ldm.logits import categorical_from_uniform
from sundae.hourglass import HourglassTransformer
from sundae.process import UnrolledDenoising

K = 8


def test_rate_is_uniform_and_the_replaced_fraction_follows_it():
    proc = UnrolledDenoising(K)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randint(0, K, (400, 2000), generator=g)
    xc, replaced, rate = proc.corrupt(x0, g)
    # r ~ U(0, 1): its deciles hold a tenth each (400 draws), mean 1/2
    counts = torch.histc(rate, bins=10, min=0, max=1)
    assert counts.min() >= 20 and counts.max() <= 65 and abs(float(rate.mean()) - 0.5) < 0.05
    # per sequence the replaced fraction is r (2000 tokens: binomial sd <= 0.011)
    frac = replaced.float().mean(1)
    assert (frac - rate).abs().max() < 0.05
    # replaced tokens are uniform codes, so 1/K of them keep their value; the rest are left alone
    assert torch.equal(xc[~replaced], x0[~replaced])
    same = (xc[replaced] == x0[replaced]).float().mean()
    assert abs(float(same) - 1 / K) < 0.01
    changed = (xc != x0).float().mean(1)
    assert (changed - rate * (K - 1) / K).abs().max() < 0.05
    codes = torch.bincount(xc[replaced], minlength=K).float()
    assert (codes / codes.sum() - 1 / K).abs().max() < 0.01


class CountingNet(torch.nn.Module):
    """A tiny network that records its inputs and outputs."""

    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(K, K)
        self.calls: list[tuple[torch.Tensor, torch.Tensor]] = []

    def forward(self, x, cond):
        logits = self.emb(x) * 3
        logits.retain_grad()
        self.calls.append((x, logits))
        return logits


@pytest.mark.parametrize("unroll", [1, 2, 3])
def test_unrolled_loss_runs_unroll_steps_forwards_and_sums_their_losses(unroll):
    torch.manual_seed(0)
    net, proc = CountingNet(), UnrolledDenoising(K, unroll)
    x0 = torch.randint(0, K, (4, 16))
    out = proc.training_losses(net, x0, {}, torch.Generator().manual_seed(1))
    assert len(net.calls) == unroll
    steps = [out[f"loss_step{i}"] for i in range(1, unroll + 1)]
    assert torch.allclose(out["loss"], torch.stack(steps).sum())
    assert all(0 <= float(out[f"acc_step{i}"]) <= 1 for i in range(1, unroll + 1))
    assert 0 <= float(out["accuracy"]) <= 1
    quartiles = {k for k in out if k.startswith("loss_r_q")}  # the first step's loss by rate, where present
    assert quartiles and quartiles <= {"loss_r_q1", "loss_r_q2", "loss_r_q3", "loss_r_q4"}
    for x_next, _ in net.calls[1:]:
        assert x_next.dtype == torch.long and not x_next.requires_grad and x_next.shape == x0.shape


def test_each_step_is_fed_the_networks_own_sample():
    """A network certain that token v becomes v + 1: every step's input is the previous input + 1, not x_0."""
    inputs = []

    def net(x, cond):
        inputs.append(x)
        return torch.nn.functional.one_hot((x + 1) % K, K).float() * 100

    x0 = torch.randint(0, K, (4, 16))
    UnrolledDenoising(K, 3).training_losses(net, x0, {}, torch.Generator().manual_seed(1))
    assert torch.equal(inputs[1], (inputs[0] + 1) % K) and torch.equal(inputs[2], (inputs[0] + 2) % K)


def test_no_gradient_flows_through_the_sampled_inputs():
    """The second step's loss reaches the network's weights through the second forward only: nothing of it
    goes back through the first step's logits, from which its input was drawn."""
    torch.manual_seed(0)
    net, proc = CountingNet(), UnrolledDenoising(K, 2)
    x0 = torch.randint(0, K, (4, 16))
    proc.training_losses(net, x0, {}, torch.Generator().manual_seed(1))
    first_logits, second_logits = net.calls[0][1], net.calls[1][1]
    # the second step's term of the loss (the logged loss_step2 is a detached copy)
    torch.nn.functional.cross_entropy(second_logits.transpose(1, 2), x0).backward()
    assert first_logits.grad is None and second_logits.grad is not None
    assert net.emb.weight.grad is not None and net.emb.weight.grad.abs().sum() > 0


def test_loss_gradient_reaches_both_steps_forwards():
    torch.manual_seed(0)
    net, proc = CountingNet(), UnrolledDenoising(K, 2)
    out = proc.training_losses(net, torch.randint(0, K, (4, 16)), {}, torch.Generator().manual_seed(1))
    out["loss"].backward()
    assert all(logits.grad is not None and logits.grad.abs().sum() > 0 for _, logits in net.calls)


def test_unrolled_samples_follow_the_network():
    """categorical_from_uniform draws from softmax(logits): a certain network's sample is its argmax, a flat
    one's is uniform."""
    logits = torch.full((2, 3000, K), -1e4)
    logits[..., 5] = 0
    u = torch.rand(2, 3000, generator=torch.Generator().manual_seed(0))
    assert (categorical_from_uniform(logits, u) == 5).all()
    flat = categorical_from_uniform(torch.zeros(2, 3000, K), u)
    assert (torch.bincount(flat.flatten(), minlength=K).float() / 6000 - 1 / K).abs().max() < 0.02


def test_overfits_one_tiny_batch():
    torch.manual_seed(0)
    net = HourglassTransformer(K, (4, 4), dim=32, depth=[1, [1], 1], heads=2, dim_head=16, num_classes=4)
    proc = UnrolledDenoising(K, 2)
    x0 = torch.randint(0, K, (4, 16), generator=torch.Generator().manual_seed(3))
    cond = torch.arange(4)  # one sequence per class: even a fully corrupted input can be restored
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    losses = []
    for step in range(60):
        out = proc.training_losses(lambda x, c: net(x, cond), x0, {}, torch.Generator().manual_seed(step))
        opt.zero_grad()
        out["loss"].backward()
        opt.step()
        losses.append(out["loss"].item())
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    print(f"unrolled loss {first:.3f} -> {last:.3f} nats (2 steps; uniform guess {2 * torch.log(torch.tensor(8.)):.3f})")
    assert last < 0.5 * first

"""The SUNDAE sampler: seeded determinism, self-stopping per sample, the annealed schedules, the accepted
proportion, inpainting, top-k and guidance."""

from __future__ import annotations

import pytest
import torch

from sundae.sampling import sample, schedule

K, N = 6, 10


def fixed_net(logits_per_pos, calls=None):
    def net(x, cond):
        if calls is not None:
            calls.append((x.clone(), cond))
        return logits_per_pos.expand(x.shape[0], -1, -1)

    return net


def copy_net(calls=None):
    """A network certain that every token is already right: it proposes the input itself."""
    def net(x, cond):
        if calls is not None:
            calls.append(x.clone())
        return torch.nn.functional.one_hot(x, K).float() * 50
    return net


def test_seeded_sampling_is_deterministic():
    net = fixed_net(torch.randn(1, N, K, generator=torch.Generator().manual_seed(0)))
    run = [sample(net, (3, N), K, 8, generator=torch.Generator().manual_seed(s), temperature=1.0, proportion=0.5)
           for s in (0, 0, 1)]
    assert torch.equal(run[0], run[1]) and not torch.equal(run[0], run[2])
    assert run[0].dtype == torch.long and run[0].min() >= 0 and run[0].max() < K


def test_a_sample_that_does_not_change_stops_after_min_steps():
    calls = []
    x, taken = sample(copy_net(calls), (4, N), K, 50, generator=torch.Generator().manual_seed(0), min_steps=3,
                      return_steps=True)
    assert taken.tolist() == [4, 4, 4, 4]  # steps 0..2 run regardless; step 3 finds it unchanged and stops
    assert len(calls) == 4
    # never before min_steps, and never with min_steps=None
    _, taken = sample(copy_net(), (2, N), K, 7, generator=torch.Generator().manual_seed(0), min_steps=None,
                      return_steps=True)
    assert taken.tolist() == [7, 7]


def test_each_sample_stops_on_its_own_and_the_rest_keep_running():
    """Rows 0-1 are frozen by a certain network, rows 2-3 keep changing: only these reach the last step, and
    the network is called on the still-changing rows alone."""
    sizes, seen, evaluated = [], [], []

    def net(x, cond):
        sizes.append(x.shape[0])
        certain = torch.nn.functional.one_hot(x, K).float() * 50
        noisy = torch.zeros_like(certain)
        rows = cond["row"]
        return torch.where((rows < 2)[:, None, None], certain, noisy)

    x, taken = sample(net, (4, N), K, 12, cond={"row": torch.arange(4)}, generator=torch.Generator().manual_seed(0),
                      min_steps=2, proportion=1.0, return_steps=True,
                      callback=lambda d: (seen.append(d["steps_taken"].clone()), evaluated.append(d["evaluated"])))
    assert taken.tolist() == [3, 3, 12, 12]
    assert sizes[:3] == [4, 4, 4] and set(sizes[3:]) == {2}
    assert evaluated == sizes  # the callback says how many rows each step ran the network on
    assert seen[-1].tolist() == taken.tolist() and len(seen) == 12


def test_temperature_and_proportion_run_linearly_from_start_to_end():
    seen = []
    sample(fixed_net(torch.zeros(1, N, K)), (1, N), K, 5, generator=torch.Generator().manual_seed(0),
           temperature=1.0, end_temperature=0.6, proportion=0.2, end_proportion=1.0, min_steps=None,
           callback=lambda d: seen.append((d["temperature"], d["proportion"])))
    assert [t for t, _ in seen] == pytest.approx([1.0, 0.9, 0.8, 0.7, 0.6])
    assert [p for _, p in seen] == pytest.approx([0.2, 0.4, 0.6, 0.8, 1.0])
    assert schedule(0.5, None, 3) == [0.5, 0.5, 0.5]


def test_a_proportion_of_the_proposals_is_accepted():
    """A network sure of code 0 everywhere: after one step, the share of 0s is p + (1 - p) / K."""
    logits = torch.full((1, 4000, K), -50.0)
    logits[..., 0] = 50.0
    for p in (0.25, 0.5, 1.0):
        x = sample(fixed_net(logits), (2, 4000), K, 1, generator=torch.Generator().manual_seed(0), proportion=p)
        assert abs(float((x == 0).float().mean()) - (p + (1 - p) / K)) < 0.02


def test_inpainting_keeps_known_tokens_exactly():
    logits = torch.randn(1, N, K, generator=torch.Generator().manual_seed(0))
    x_init = torch.randint(0, K, (3, N), generator=torch.Generator().manual_seed(1))
    known = torch.zeros(3, N, dtype=torch.bool)
    known[:, :4] = True
    known[2, 7] = True
    frames = []
    x = sample(fixed_net(logits), (3, N), K, 6, generator=torch.Generator().manual_seed(2), x_init=x_init,
               known=known, proportion=1.0, min_steps=None, callback=lambda d: frames.append(d["x"].clone()))
    assert all(torch.equal(f[known], x_init[known]) for f in frames)
    assert torch.equal(x[known], x_init[known])
    assert not torch.equal(x[~known], x_init[~known])  # the rest is sampled
    with pytest.raises(ValueError, match=r"inpainting needs x_init and known of shape \(3, 10\)"):
        sample(fixed_net(logits), (3, N), K, 2, x_init=x_init, known=known[:, :5])


def test_top_k_one_and_temperature_zero_take_the_most_likely_token():
    logits = torch.randn(1, N, K, generator=torch.Generator().manual_seed(0))
    best = logits.argmax(-1).expand(2, -1)
    for kw in ({"top_k": 1}, {"temperature": 0.0}, {"top_p": 1e-6}):
        x = sample(fixed_net(logits), (2, N), K, 1, generator=torch.Generator().manual_seed(0), proportion=1.0, **kw)
        assert torch.equal(x, best), kw


def test_guidance_runs_the_conditional_and_null_rows_together():
    calls = []
    cond, null = {"class_label": torch.tensor([1, 2])}, {"class_label": torch.tensor([9, 9])}
    sample(fixed_net(torch.zeros(1, N, K), calls), (2, N), K, 2, cond=cond, generator=torch.Generator().manual_seed(0),
           guidance_scale=3.0, null_cond=null, min_steps=None)
    assert len(calls) == 2 and calls[0][0].shape == (4, N)
    assert calls[0][1]["class_label"].tolist() == [1, 2, 9, 9]
    calls.clear()
    sample(fixed_net(torch.zeros(1, N, K), calls), (2, N), K, 1, cond=cond, generator=torch.Generator().manual_seed(0))
    assert calls[0][0].shape == (2, N)  # scale 1: the conditional model alone


def test_bad_values_are_refused():
    net = fixed_net(torch.zeros(1, N, K))
    with pytest.raises(ValueError, match="steps must be >= 1, got 0"):
        sample(net, (1, N), K, 0)
    with pytest.raises(ValueError, match=r"end_proportion must be in \(0, 1\], got 0"):
        sample(net, (1, N), K, 2, end_proportion=0.0)

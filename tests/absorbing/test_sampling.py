"""Absorbing samplers: the unmasking rule, inpainting, guidance, windows, determinism."""

from __future__ import annotations

import pytest
import torch

from absorbing.sampling import sample
from absorbing.windows import window_starts, windowed_denoiser
from ldm.logits import filter_logits, guided_logits

K, MASK = 6, 6


def fixed_net(logits_per_pos):
    calls = []

    def net(x, t, cond):
        calls.append((x.clone(), t.clone()))
        return logits_per_pos.expand(x.shape[0], -1, -1)

    return net, calls


@pytest.mark.parametrize("order", ["random", "confidence", "raster"])
def test_all_tokens_revealed_and_never_changed_afterwards(order):
    torch.manual_seed(0)
    net, calls = fixed_net(torch.randn(1, 10, K))
    seen = []
    x = sample(net, (3, 10), MASK, num_timesteps=20, steps=5 if order != "raster" else 10,
               generator=torch.Generator().manual_seed(1), order=order, callback=lambda d: seen.append(d["x"].clone()))
    assert (x != MASK).all() and x.max() < K
    assert len(calls) == len(seen) == (5 if order != "raster" else 10)
    for before, after in zip(seen, seen[1:]):
        fixed = before != MASK
        assert torch.equal(after[fixed], before[fixed])


def test_random_order_reveals_one_over_s_in_expectation():
    net, calls = fixed_net(torch.zeros(1, 4000, K))
    sample(net, (1, 4000), MASK, num_timesteps=4, steps=4, generator=torch.Generator().manual_seed(0))
    masked = [int((x == MASK).sum()) for x, _ in calls]  # before each step: 4000, ~3000, ~2000, ~1000
    assert masked[0] == 4000
    for got, want in zip(masked[1:], [3000, 2000, 1000]):
        assert abs(got - want) < 120
    assert [int(t[0]) for _, t in calls] == [4, 3, 2, 1]


def test_steps_fewer_than_T_pass_matching_times():
    net, calls = fixed_net(torch.zeros(1, 8, K))
    sample(net, (2, 8), MASK, num_timesteps=256, steps=4, generator=torch.Generator().manual_seed(0))
    assert [int(t[0]) for _, t in calls] == [256, 192, 128, 64]


def test_inpainting_keeps_known_tokens():
    net, _ = fixed_net(torch.randn(1, 12, K))
    x_init = torch.randint(0, K, (2, 12))
    known = torch.zeros(2, 12, dtype=torch.bool)
    known[:, :5] = True
    x = sample(net, (2, 12), MASK, 10, 10, generator=torch.Generator().manual_seed(0), x_init=x_init, known=known)
    assert torch.equal(x[known], x_init[known]) and (x != MASK).all()


def test_seeded_determinism_and_temperature_zero_is_argmax():
    logits = torch.randn(1, 9, K)
    net, _ = fixed_net(logits)
    a = sample(net, (2, 9), MASK, 8, 8, generator=torch.Generator().manual_seed(3))
    b = sample(net, (2, 9), MASK, 8, 8, generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)
    greedy = sample(net, (2, 9), MASK, 8, 8, generator=torch.Generator().manual_seed(3), temperature=0.0)
    assert torch.equal(greedy, logits.argmax(-1).expand(2, -1))


def test_top_k_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    assert torch.isinf(filter_logits(logits, top_k=2)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.7)).tolist() == [[False, False, True, True]]
    assert torch.isinf(filter_logits(logits, top_p=0.5)).tolist() == [[False, True, True, True]]


def test_guidance_closed_form():
    def net(x, t, cond):  # class 0 prefers token 0, the null class (2) is uniform
        out = torch.zeros(x.shape[0], x.shape[1], 3)
        out[cond["class_label"] == 0, :, 0] = 1.0
        return out

    x, t = torch.zeros(1, 2, dtype=torch.long), torch.ones(1, dtype=torch.long)
    c, null = {"class_label": torch.zeros(1, dtype=torch.long)}, {"class_label": torch.tensor([2])}
    lp = guided_logits(net, x, t, c, null, scale=3.0)
    # log p_u + 3 (log p_c - log p_u) = const + 3 * [1, 0, 0] before renormalising
    expected = torch.tensor([3.0, 0.0, 0.0]).log_softmax(-1)
    torch.testing.assert_close(lp[0, 0], expected)
    torch.testing.assert_close(guided_logits(net, x, t, c, null, 1.0), net(x, t, c))


def test_windows_cover_and_average():
    assert window_starts(10, 4, 2) == [0, 2, 4, 6]
    assert window_starts(9, 4, 4) == [0, 4, 5]

    def position_net(x, t, cond):  # log-prob of token 0 = the first token's value in the window
        out = torch.zeros(x.shape[0], x.shape[1], 2)
        out[..., 0] = x[:, :1].float()
        return out

    big = windowed_denoiser(position_net, (4, 6), (2, 2), stride=1)
    x = torch.arange(24).view(1, 24) % 5
    out = big(x, torch.ones(1, dtype=torch.long), None)
    assert out.shape == (1, 24, 2)
    # position (0, 0) is covered by one window only: the one starting there
    lp = torch.tensor([float(x[0, 0]), 0.0]).log_softmax(-1)
    torch.testing.assert_close(out[0, 0], lp)


@pytest.mark.parametrize("order,guidance", [("random", 1.0), ("random", 2.0), ("confidence", 1.0), ("raster", 1.0)])
def test_time_invariant_reuses_unchanged_rows_and_gives_the_same_samples(order, guidance):
    """A denoiser that ignores t: evaluating only the rows the last step changed gives exactly the samples of
    evaluating every row (same seed), with fewer rows evaluated when steps outnumber what changes."""
    torch.manual_seed(0)
    emb, head = torch.nn.Embedding(K + 1, 8), torch.nn.Linear(8, K)
    label_emb = torch.nn.Embedding(3, 8)
    rows_run = []

    def net(x, t, cond):  # a token-dependent network, each row on its own (mean over its positions)
        rows_run.append(x.shape[0])
        h = emb(x) + emb(x).mean(1, keepdim=True) + label_emb(cond["class_label"])[:, None]
        return head(h)

    cond, null = {"class_label": torch.tensor([0, 1, 0, 1])}, {"class_label": torch.tensor([2, 2, 2, 2])}
    kw = dict(num_timesteps=40, steps=40 if order != "raster" else 12, cond=cond, null_cond=null,
              guidance_scale=guidance, order=order)
    with torch.no_grad():
        full = sample(net, (4, 12), MASK, generator=torch.Generator().manual_seed(3), **kw)
        n_full = sum(rows_run)
        rows_run.clear()
        evaluated = []
        reused = sample(net, (4, 12), MASK, generator=torch.Generator().manual_seed(3), time_invariant=True,
                        callback=lambda d: evaluated.append(d["evaluated"]), **kw)
    assert torch.equal(full, reused)
    assert sum(rows_run) == sum(evaluated) * (2 if guidance != 1.0 else 1)
    if order == "random":  # 12 tokens over 40 steps: most steps change nothing in a row
        assert sum(rows_run) < 0.6 * n_full


def masked_before_each_step(calls):
    return [(x == MASK).sum(1).tolist() for x, _ in calls]


@pytest.mark.parametrize("order", ["random", "confidence", "raster"])
def test_cosine_schedule_leaves_a_cosine_fraction_masked(order):
    """Whatever the order, a cosine schedule leaves floor(N cos(pi/2 (i+1)/S)) tokens masked after step i."""
    import math

    net, calls = fixed_net(torch.randn(1, 40, K))
    x = sample(net, (2, 40), MASK, num_timesteps=40, steps=5, generator=torch.Generator().manual_seed(0),
               order=order, schedule="cosine")
    want = [40] + [math.floor(40 * math.cos(math.pi / 2 * (i + 1) / 5)) for i in range(4)]
    assert masked_before_each_step(calls) == [[m, m] for m in want] and (x != MASK).all()


@pytest.mark.parametrize("order", ["confidence", "raster"])
def test_uniform_schedule_reveals_an_even_share_of_what_is_left(order):
    net, calls = fixed_net(torch.randn(1, 10, K))
    sample(net, (1, 10), MASK, num_timesteps=10, steps=4, generator=torch.Generator().manual_seed(0), order=order,
           schedule="uniform")
    assert masked_before_each_step(calls) == [[10], [7], [4], [2]]  # ceil(10/4) = 3, ceil(7/3) = 3, ceil(4/2) = 2


def test_random_order_with_cosine_schedule_picks_positions_uniformly():
    """The first of 4 cosine steps reveals 16 - floor(16 cos(pi/8)) = 2 tokens: over many draws every position
    is picked about equally often (a chi-squared bound at the 1e-4 level, 15 degrees of freedom: 44.3)."""
    net, calls = fixed_net(torch.randn(1, 16, K))
    sample(net, (4000, 16), MASK, num_timesteps=16, steps=4, generator=torch.Generator().manual_seed(0),
           schedule="cosine")
    first_revealed = (calls[1][0] != MASK).float()  # (4000, 16), two positions per row
    assert first_revealed.sum(1).eq(2).all()
    counts = first_revealed.sum(0)
    chi2 = float(((counts - 500.0) ** 2 / 500.0).sum())
    assert chi2 < 44.3


def test_confidence_noise_explores_early_and_is_greedy_without_it():
    """Without noise the first step reveals the most confident positions; MaskGIT's annealed Gumbel noise makes
    other positions come first in some rows, and the result stays seeded."""
    logits = torch.zeros(1, 8, K)
    logits[0, :, 0] = torch.linspace(0.0, 6.0, 8)  # later positions are more confident
    net, calls = fixed_net(logits)
    kw = dict(num_timesteps=8, steps=4, order="confidence", temperature=0.0)
    sample(net, (200, 8), MASK, generator=torch.Generator().manual_seed(0), **kw)
    greedy_first = calls[1][0] != MASK
    assert greedy_first[:, -1].all() and not greedy_first[:, 0].any()
    calls.clear()
    a = sample(net, (200, 8), MASK, generator=torch.Generator().manual_seed(0), confidence_noise=4.5, **kw)
    noisy_first = calls[1][0] != MASK
    assert noisy_first.sum(1).eq(greedy_first.sum(1)).all()  # the schedule decides how many, the noise which
    assert noisy_first[:, 0].any() and not noisy_first[:, -1].all()
    b = sample(net, (200, 8), MASK, generator=torch.Generator().manual_seed(0), confidence_noise=4.5, **kw)
    assert torch.equal(a, b)


def test_a_bad_schedule_is_refused():
    net, _ = fixed_net(torch.zeros(1, 4, K))
    with pytest.raises(ValueError, match="schedule must be 'uniform' or 'cosine', got 'linear'"):
        sample(net, (1, 4), MASK, num_timesteps=4, schedule="linear")

"""The shared categorical draw (inverse CDF) samples softmax(logits / temperature) within top-k / top-p: per-position
token histograms against the exact probabilities, a chi-squared test at significance 1e-6 (a correct sampler fails
it once in a million runs; a draw from the wrong distribution, e.g. a missed temperature, fails it surely)."""

import pytest
import torch
from scipy.stats import chi2

from ldm.logits import filter_logits, sample_categorical
from sundae.sampling import sample as sundae_sample

K, DRAWS = 12, 20000


def chi_squared_ok(drawn: torch.Tensor, probs: torch.Tensor) -> bool:
    """`drawn` (DRAWS,) codes against `probs` (K,): Pearson's statistic over the codes of non-zero probability,
    below the 1 - 1e-6 quantile; a code of probability 0 must never appear."""
    counts = torch.bincount(drawn, minlength=len(probs)).double()
    support = probs > 0
    if counts[~support].sum() > 0:
        return False
    expected = probs[support].double() * len(drawn)
    stat = float(((counts[support] - expected) ** 2 / expected).sum())
    return stat < chi2.ppf(1 - 1e-6, int(support.sum()) - 1)


LOGITS = torch.randn(3, K, generator=torch.Generator().manual_seed(0)) * 2


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.5, None, None), (1.0, 4, None),
                                                     (1.5, None, 0.8)])
def test_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    rows = LOGITS.repeat_interleave(DRAWS, 0).view(3, DRAWS, K)  # 3 positions, DRAWS draws each
    drawn = sample_categorical(rows, temperature, top_k, top_p, torch.Generator().manual_seed(1))
    probs = filter_logits(LOGITS / temperature, top_k, top_p).softmax(-1)
    assert all(chi_squared_ok(drawn[i], probs[i]) for i in range(3))
    # the test can fail: the same draws are not the distribution at another temperature
    other = filter_logits(LOGITS / (temperature * 2), top_k, top_p).softmax(-1)
    assert not all(chi_squared_ok(drawn[i], other[i]) for i in range(3))


def test_sundae_draws_only_accepted_positions_from_the_network():
    """One SUNDAE step with proportion 0.5: the accepted positions carry draws of softmax(logits / T) (per
    position, the same law as drawing every position and keeping the accepted ones); the rest keep their
    token; half are accepted."""
    n = 3

    def net(x, cond):  # logits that do not depend on the input: position i has LOGITS[i]
        return LOGITS.unsqueeze(0).expand(x.shape[0], n, K)

    batch = DRAWS
    g = torch.Generator().manual_seed(2)
    start = torch.randint(0, K, (batch, n), generator=torch.Generator().manual_seed(2))  # the sampler's x_T
    out = sundae_sample(net, (batch, n), K, 1, generator=g, temperature=0.7, proportion=0.5, min_steps=None)
    changed = out != start
    assert abs(float(changed.float().mean()) - 0.5 * (1 - 1 / K)) < 0.01  # accepted, and not redrawn the same
    probs = (LOGITS / 0.7).softmax(-1)
    # positions whose token did not change were either rejected or redrew the same code; test the accepted
    # draws through the identical-law mixture: P(out = k) = 0.5 P(start = k) + 0.5 p_k, start uniform
    mixture = 0.5 / K + 0.5 * probs
    assert all(chi_squared_ok(out[:, i], mixture[i]) for i in range(n))
    assert not all(chi_squared_ok(out[:, i], probs[i]) for i in range(n))


@pytest.mark.parametrize("order", ["random", "raster"])
def test_absorbing_draws_only_revealed_positions_from_the_network(order):
    """The absorbing sampler draws only the positions it reveals; in one step it reveals every position, each a
    draw of the filtered softmax(logits / T)."""
    from absorbing.sampling import sample as absorbing_sample

    n, mask_id = 3, K

    def net(x, t, cond):
        return LOGITS.unsqueeze(0).expand(x.shape[0], n, K)

    out = absorbing_sample(net, (DRAWS, n), mask_id, 4, steps=1, generator=torch.Generator().manual_seed(3),
                           temperature=0.8, top_k=6, order=order)
    probs = filter_logits(LOGITS / 0.8, 6).softmax(-1)
    assert all(chi_squared_ok(out[:, i], probs[i]) for i in range(n))
    assert not all(chi_squared_ok(out[:, i], LOGITS[i].softmax(-1)) for i in range(n))


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, None, None), (0.5, None, None), (1.5, None, 0.8)])
def test_gumbel_max_draws_follow_the_filtered_softmax(temperature, top_k, top_p):
    """The Gumbel-max draw (noise drawn beforehand, as ImageBART's sampler does) has the inverse CDF's law."""
    from ldm.logits import gumbel_noise

    rows = LOGITS.repeat_interleave(DRAWS, 0).view(3, DRAWS, K)
    drawn = sample_categorical(rows, temperature, top_k, top_p,
                               gumbel=gumbel_noise(rows.shape, torch.Generator().manual_seed(2)))
    probs = filter_logits(LOGITS / temperature, top_k, top_p).softmax(-1)
    assert all(chi_squared_ok(drawn[i], probs[i]) for i in range(3))
    other = filter_logits(LOGITS / (temperature * 2), top_k, top_p).softmax(-1)
    assert not all(chi_squared_ok(drawn[i], other[i]) for i in range(3))

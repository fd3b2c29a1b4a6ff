"""Absorbing diffusion: the original's losses and bookkeeping, and the ELBO's closed form."""

from __future__ import annotations

import math

import pytest
import torch
from safetensors.torch import load_file

from absorbing.process import AbsorbingDiffusion
from tests.fixture_paths import fixture_dir


@pytest.fixture(scope="module")
def io():
    return load_file(str(fixture_dir("unleashing-transformers", "absorbing_transformer") / "io.safetensors"))


@pytest.mark.parametrize("schedule", ["random", "fixed"])
@pytest.mark.parametrize("loss_type", ["elbo", "reweighted_elbo", "mlm"])
def test_losses_and_history_match_original(io, schedule, loss_type):
    proc = AbsorbingDiffusion(codebook_size=16, num_timesteps=256, mask_schedule=schedule, loss_type=loss_type)
    x0, t, pt, mask = io["x_0"], io[f"{schedule}/t"], io[f"{schedule}/pt"], io[f"{schedule}/mask"]
    assert torch.equal(x0.masked_fill(mask, 16), io[f"{schedule}/x_t"])
    ce = proc.masked_cross_entropy(io[f"{schedule}/x_0_hat_logits"], x0, mask)
    torch.testing.assert_close(ce, io[f"{schedule}/cross_entropy_sum"], atol=1e-5, rtol=1e-5)
    loss, vb = proc.losses_from_ce(ce, t, pt, mask, n_tokens=16)
    torch.testing.assert_close(loss.mean().view(1), io[f"{schedule}/{loss_type}/loss"], atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(vb.mean().view(1), io[f"{schedule}/{loss_type}/vb_loss"], atol=1e-6, rtol=1e-5)
    proc.update_history(t, loss, vb)
    for name in ("Lt_history", "Lt_count", "loss_history"):
        torch.testing.assert_close(getattr(proc, name), io[f"{schedule}/{loss_type}/{name}_after"])


def test_fixed_schedule_masks_exact_count():
    proc = AbsorbingDiffusion(codebook_size=8, num_timesteps=100, mask_schedule="fixed")
    x0 = torch.randint(0, 8, (5, 40))
    t = torch.tensor([1, 10, 50, 99, 100])
    xt, mask = proc.q_sample(x0, t, torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [1, 4, 20, 40, 40]
    assert torch.equal(xt[mask], torch.full_like(xt[mask], 8)) and torch.equal(xt[~mask], x0[~mask])


def test_random_schedule_masking_rate():
    proc = AbsorbingDiffusion(codebook_size=8, num_timesteps=10)
    x0 = torch.zeros(2000, 50, dtype=torch.long)
    _, mask = proc.q_sample(x0, torch.full((2000,), 3), torch.Generator().manual_seed(0))
    assert mask.float().mean().item() == pytest.approx(0.3, abs=0.005)


def test_elbo_equals_nll_for_independent_tokens_with_true_marginals():
    """Independent tokens + a denoiser returning the true marginals: the ELBO is the exact NLL."""
    g = torch.Generator().manual_seed(0)
    K, N, T = 5, 12, 20
    marg = torch.softmax(torch.randn(N, K, generator=g), -1)  # (N, K) per-position marginals
    x0 = torch.multinomial(marg, 64, replacement=True, generator=g).T  # (64, N)
    logp = marg.log()

    def true_marginals(xt, t, cond):
        return logp.expand(xt.shape[0], N, K)

    proc = AbsorbingDiffusion(codebook_size=K, num_timesteps=T)
    nll_bits = -logp.gather(1, x0.T).T.sum(1) / (math.log(2) * N)  # (64,) exact, bits per token
    # The ELBO's expectation over masks equals the NLL; average many draws to check it.
    draws = torch.stack([proc.elbo(true_marginals, x0, generator=g) for _ in range(200)])
    torch.testing.assert_close(draws.mean(0).mean(), nll_bits.mean(), atol=0.01, rtol=0.01)
    # per sample too: the draws' mean is within 0.1 bits (about 4.5 standard errors) of each sample's own
    # NLL, while the NLLs themselves spread over more than a bit, so a mix-up of samples shows
    assert float(nll_bits.max() - nll_bits.min()) > 1.0
    torch.testing.assert_close(draws.mean(0), nll_bits, atol=0.1, rtol=0)
    # at t = T every token is masked (u < T/T always), so that one term is exactly NLL / T, draw or not
    torch.testing.assert_close(proc.elbo(true_marginals, x0, generator=g, timesteps=[T]), nll_bits / T)
    # the stratified estimate (4 calls instead of T) is unbiased too
    strat = torch.stack([proc.elbo(true_marginals, x0, generator=g, strata=4) for _ in range(400)])
    torch.testing.assert_close(strat.mean(0).mean(), nll_bits.mean(), atol=0.02, rtol=0.02)
    with pytest.raises(ValueError, match="strata must be in 1..20, got 21"):
        proc.elbo(true_marginals, x0, strata=21)


def test_importance_sampling_switches_on_after_history():
    proc = AbsorbingDiffusion(codebook_size=4, num_timesteps=4, time_sampling="importance", importance_min_count=2)
    t, pt = proc.sample_time(1000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert torch.allclose(pt, torch.full_like(pt, 0.25))  # uniform until every t was seen
    proc.Lt_count[1:] = 3
    proc.Lt_history[1:] = torch.tensor([1.0, 4.0, 9.0, 16.0])  # sqrt -> 1:2:3:4
    t, pt = proc.sample_time(20000, torch.device("cpu"), torch.Generator().manual_seed(0))
    assert t.min() >= 1
    freq = torch.bincount(t, minlength=5)[1:].float() / len(t)
    torch.testing.assert_close(freq, torch.tensor([0.1, 0.2, 0.3, 0.4]), atol=0.01, rtol=0)


def test_bad_options_are_clear():
    with pytest.raises(ValueError, match="loss_type must be one of elbo, reweighted_elbo, mlm; got 'elb'"):
        AbsorbingDiffusion(codebook_size=4, loss_type="elb")

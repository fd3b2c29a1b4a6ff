"""The Gaussian process: latent-diffusion's schedules exactly (`../shared/fixtures/latent-diffusion/ddpm_schedules`),
the parameterisations converting into each other, the posterior by Bayes' rule, min-SNR-gamma in closed form."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from safetensors.numpy import load_file as load_numpy
from safetensors.torch import load_file

from ldm.diffusion.process import SCHEDULE_KEYS, GaussianDiffusion
from tests.fixture_paths import fixture_dir


@pytest.mark.parametrize("kind", ["linear", "cosine"])
def test_schedules_match_latent_diffusion_exactly(kind):
    root = fixture_dir("latent-diffusion", "ddpm_schedules")
    process = GaussianDiffusion(1000, kind, linear_start=0.0015, linear_end=0.0155, cosine_s=8e-3)
    f32, f64 = load_file(str(root / f"{kind}_float32.safetensors")), load_numpy(str(root / f"{kind}_float64.safetensors"))
    for key in SCHEDULE_KEYS:
        assert torch.equal(process.buffers[key], f32[key]), key
        # float64 to a few units in the last place: libm's log/sqrt may round the last bit differently
        np.testing.assert_allclose(process.arrays64[key], f64[key], rtol=4e-16, atol=0, err_msg=key)


@pytest.mark.parametrize("parameterization", ["eps", "x0", "v"])
def test_parameterisations_recover_x0_and_eps(parameterization):
    process = GaussianDiffusion(100, "cosine", parameterization=parameterization)
    g = torch.Generator().manual_seed(0)
    x0, noise = torch.randn(4, 3, 4, 4, generator=g), torch.randn(4, 3, 4, 4, generator=g)
    t = torch.tensor([0, 10, 50, 90])
    x_t = process.q_sample(x0, t, noise)
    out = process.target(x0, noise, t)  # a perfect network
    torch.testing.assert_close(process.predict_x0(x_t, t, out), x0, atol=2e-4, rtol=1e-4)
    torch.testing.assert_close(process.predict_eps(x_t, t, out), noise, atol=2e-3, rtol=1e-3)
    assert process.training_loss(out, x0, noise, t).abs().max() == 0


def test_posterior_is_the_gaussian_product():
    """q(x_{t-1} | x_t, x_0) ∝ q(x_t | x_{t-1}) q(x_{t-1} | x_0): its precision and mean in closed form."""
    process = GaussianDiffusion(50, "linear")
    x0, x_t, t = torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.randn(2, 1, 2, 2, dtype=torch.float64), torch.tensor([5, 30])
    a = process.arrays64
    for i in range(2):
        ti = int(t[i])
        acp, beta = a["alphas_cumprod_prev"][ti], a["betas"][ti]
        precision = 1 / (1 - acp) + (1 - beta) / beta
        mean = (np.sqrt(acp) / (1 - acp) * x0[i].numpy() + np.sqrt(1 - beta) / beta * x_t[i].numpy()) / precision
        m, var, _ = process.q_posterior(x0[i:i + 1].float(), x_t[i:i + 1].float(), t[i:i + 1])
        np.testing.assert_allclose(var.item(), 1 / precision, rtol=1e-5)
        np.testing.assert_allclose(m[0].numpy(), mean, rtol=1e-4, atol=1e-5)


def test_min_snr_gamma_weights():
    process = GaussianDiffusion(1000, "linear", parameterization="eps", min_snr_gamma=5.0)
    t = torch.tensor([0, 200, 999])
    snr = process.alphas_cumprod[t] / (1 - process.alphas_cumprod[t])
    torch.testing.assert_close(process.loss_weights(t), torch.minimum(snr, torch.tensor(5.0)) / snr)
    assert process.loss_weights(t)[0] < 0.01 and process.loss_weights(t)[-1] == 1.0
    v = GaussianDiffusion(1000, "linear", parameterization="v", min_snr_gamma=5.0)
    torch.testing.assert_close(v.loss_weights(t), torch.minimum(snr, torch.tensor(5.0)) / (snr + 1))


@pytest.mark.parametrize("kwargs, message", [
    (dict(beta_schedule="quadratic"), "beta_schedule must be one of linear, cosine, sqrt_linear, sqrt"),
    (dict(parameterization="score"), "parameterization must be eps, x0 or v"),
    (dict(loss_type="huber"), "loss_type must be l1 or l2"),
    (dict(min_snr_gamma=0.0), "min_snr_gamma must be > 0"),
    (dict(timesteps=0), "timesteps must be >= 1"),
])
def test_bad_settings_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        GaussianDiffusion(**kwargs)

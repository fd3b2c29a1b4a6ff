"""Elucidated diffusion (Karras et al. 2022): the preconditioning and loss weight in closed form, the denoiser, loss
and samplers against k-diffusion on the same network and noise, the log-normal σ, and the EDM prior end to end
(training, seeding, checkpoints, the errors bad settings get)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from ldm.diffusion import sampling as samplers
from ldm.diffusion.elucidated import Elucidated, ddim, dpm_solver_pp_2m
from ldm.util import ConfigError
from tests.toy import build_from_config, import_k_diffusion

CFG = Path(__file__).resolve().parents[2] / "configs" / "test" / "ldm_edm.yaml"
TOL = dict(atol=1e-5, rtol=1e-5)  # float32, the same operations in another order


def k_diffusion(module: str, monkeypatch: pytest.MonkeyPatch):
    return import_k_diffusion(module, monkeypatch)


class Net(torch.nn.Module):
    """A fixed smooth random F(x, c_noise): a 1x1 conv mixing channels, modulated by c_noise."""

    def __init__(self, channels: int = 3):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(channels, channels, generator=g) / channels**0.5
        self.b = torch.randn(channels, generator=g)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor) -> torch.Tensor:
        h = torch.einsum("oc,bchw->bohw", self.w, x)
        return torch.tanh(h) * (1 + c_noise.view(-1, 1, 1, 1)) + self.b.view(1, -1, 1, 1) * c_noise.sin().view(-1, 1, 1, 1)


def noise(n: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 8, 8, generator=torch.Generator().manual_seed(seed))


def build(**overrides):
    return build_from_config(CFG, **overrides)


# --- closed forms ------------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_data", [0.5, 1.0])
def test_scalings_and_loss_weight_in_closed_form(sigma_data):
    edm = Elucidated(sigma_data=sigma_data)
    sd = torch.tensor([sigma_data], dtype=torch.float64)
    c_skip, c_out, c_in, c_noise = edm.scalings(sd)  # at σ = σ_d
    torch.testing.assert_close(c_skip, sd.new_tensor([0.5]))
    torch.testing.assert_close(c_out, sd / math.sqrt(2))
    torch.testing.assert_close(c_in, 1 / (sd * math.sqrt(2)))
    torch.testing.assert_close(c_noise, sd.log() / 4)
    torch.testing.assert_close(edm.loss_weight(sd), 2 / sd**2)
    # at every σ: unit-variance network input and training target (data of std σ_d), λ = 1 / c_out²
    sigma = torch.tensor([0.002, 0.1, 1.0, 7.0, 80.0], dtype=torch.float64)
    c_skip, c_out, c_in, _ = edm.scalings(sigma)
    torch.testing.assert_close(c_in**2 * (sigma**2 + sigma_data**2), torch.ones_like(sigma))
    target_var = ((1 - c_skip) ** 2 * sigma_data**2 + c_skip**2 * sigma**2) / c_out**2
    torch.testing.assert_close(target_var, torch.ones_like(sigma))
    torch.testing.assert_close(edm.loss_weight(sigma), 1 / c_out**2)


def test_karras_sigmas_run_from_sigma_max_to_sigma_min_then_zero():
    s = Elucidated(sigma_min=0.01, sigma_max=10.0, rho=3.0).sigmas(5)
    assert len(s) == 6 and s[-1] == 0 and torch.all(s[:-2] > s[1:-1])
    torch.testing.assert_close(s[[0, 4]], torch.tensor([10.0, 0.01]))
    torch.testing.assert_close(s[2] ** (1 / 3), torch.tensor((10 ** (1 / 3) + 0.01 ** (1 / 3)) / 2))


def test_log_normal_sigma_draw():
    edm = Elucidated(p_mean=-1.2, p_std=1.2)
    log_sigma = edm.draw_sigma(200_000, torch.Generator().manual_seed(0)).log()
    # standard errors 1.2 / sqrt(N) = 0.0027 (mean) and 1.2 / sqrt(2N) = 0.0019 (std): about 5 of them
    assert abs(float(log_sigma.mean()) + 1.2) < 0.015
    assert abs(float(log_sigma.std()) - 1.2) < 0.01


# --- against k-diffusion -------------------------------------------------------------------------------
def k_denoiser(net: Net, sigma_data: float, monkeypatch):
    layers = k_diffusion("layers", monkeypatch)
    return layers.Denoiser(lambda x, sigma: net(x, sigma.log() / 4), sigma_data=sigma_data)


def test_denoiser_and_loss_match_k_diffusion(monkeypatch):
    net, edm = Net(), Elucidated(sigma_data=0.7)
    theirs = k_denoiser(net, 0.7, monkeypatch)
    x, n = noise(3, 1), noise(3, 2)
    sigma = torch.tensor([0.01, 0.9, 40.0])
    torch.testing.assert_close(edm.denoise(net, x, sigma), theirs(x, sigma), **TOL)
    torch.testing.assert_close(edm.loss(net, x, sigma, n), theirs.loss(x, n, sigma), **TOL)
    # the loss is λ(σ) · mean ||D(x + σ n; σ) - x||²
    direct = edm.loss_weight(sigma) * (edm.denoise(net, x + sigma.view(-1, 1, 1, 1) * n, sigma) - x).pow(2).flatten(1).mean(1)
    torch.testing.assert_close(edm.loss(net, x, sigma, n), direct, **TOL)


@pytest.mark.parametrize("s_churn", [0.0, 4.0])
def test_heun_with_churn_matches_k_diffusion(s_churn, monkeypatch):
    ks = k_diffusion("sampling", monkeypatch)
    net, edm = Net(), Elucidated(sigma_data=0.5, sigma_min=0.02, sigma_max=20.0)
    theirs = k_denoiser(net, 0.5, monkeypatch)
    sigmas = edm.sigmas(8)
    x = noise() * sigmas[0]
    kw = dict(s_churn=s_churn, s_noise=1.007)
    torch.manual_seed(3)  # k-diffusion draws churn noise from the global generator: ours does too when given none
    ours = samplers.heun(edm.denoiser(net), x, sigmas, **kw)
    torch.manual_seed(3)
    ref = ks.sample_heun(theirs, x, sigmas, disable=True, **kw)
    torch.testing.assert_close(ours, ref, **TOL)


def test_sigma_space_ddim_and_dpm_solver_match_k_diffusion(monkeypatch):
    ks = k_diffusion("sampling", monkeypatch)
    net, edm = Net(), Elucidated(sigma_data=0.5, sigma_min=0.02, sigma_max=20.0)
    den, theirs = edm.denoiser(net), k_denoiser(net, 0.5, monkeypatch)
    sigmas = edm.sigmas(6)
    x = noise() * sigmas[0]
    torch.testing.assert_close(dpm_solver_pp_2m(den, x, sigmas), ks.sample_dpmpp_2m(theirs, x, sigmas, disable=True),
                               **TOL)
    torch.testing.assert_close(ddim(den, x, sigmas, eta=0.0), samplers.euler(den, x, sigmas), **TOL)  # Euler on the ODE
    torch.manual_seed(4)
    ours = ddim(den, x, sigmas, eta=0.6)
    torch.manual_seed(4)
    torch.testing.assert_close(ours, ks.sample_euler_ancestral(theirs, x, sigmas, eta=0.6, disable=True),
                               **TOL)


def test_the_prior_samples_as_k_diffusion_does_on_its_unet(monkeypatch):
    """The prior's heun with churn against k-diffusion's on the prior's UNet (output layer made non-zero)."""
    ks = k_diffusion("sampling", monkeypatch)
    layers = k_diffusion("layers", monkeypatch)
    model = build().eval()
    with torch.no_grad():
        for p in model.model.out.parameters():
            p.copy_(torch.randn(p.shape, generator=torch.Generator().manual_seed(5)) * 0.1)
    labels = torch.tensor([3, 7])
    cond = model.user_cond([3, 7], 2)
    steps, kw = 5, dict(s_churn=3.0, s_tmin=0.0, s_noise=1.0)
    torch.manual_seed(6)  # the prior draws its start and churn noise from the global generator when given none
    ours = model.sample_latents(2, cond, None, ema=False, sampler="heun", steps=steps, **kw)
    theirs = layers.Denoiser(lambda x, sigma: model.model(x, sigma.log() / 4, y=labels), sigma_data=1.0)
    sigmas = model.edm.sigmas(steps)
    torch.manual_seed(6)
    x = torch.randn(2, *model.latent_shape) * sigmas[0]
    with torch.no_grad():
        ref = ks.sample_heun(theirs, x, sigmas, disable=True, **kw)
    torch.testing.assert_close(ours, ref, **TOL)


# --- the EDM prior ---------------------------------------------------------------------------------------
def test_one_batch_loss_goes_down():
    model = build().train()
    batch = {"image": torch.rand(4, 1, 32, 32, generator=torch.Generator().manual_seed(0)) * 2 - 1,
             "class_label": torch.tensor([0, 1, 2, 3])}
    latents, cond = model.get_latents(batch), model.get_cond(batch)
    opt = torch.optim.Adam(model.trained_parameters(), lr=2e-3)

    def loss() -> torch.Tensor:  # the same σ and noise every step: one fixed objective
        return model.compute_loss(latents, cond, torch.Generator().manual_seed(1))[0]

    start = float(loss().detach())
    for _ in range(25):
        opt.zero_grad()
        value = loss()
        value.backward()
        opt.step()
    assert math.isfinite(start) and float(loss().detach()) < 0.5 * start


def test_seeded_training_draws_and_samples_are_deterministic():
    model = build().eval()
    latents = torch.randn(3, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    cond = model.user_cond([1, 2, 3], 3)
    a = model.compute_loss(latents, cond, torch.Generator().manual_seed(2))[0]
    assert torch.equal(a, model.compute_loss(latents, cond, torch.Generator().manual_seed(2))[0])
    assert not torch.equal(a, model.compute_loss(latents, cond, torch.Generator().manual_seed(3))[0])
    for sampler in ("ddim", "dpm++2m", "euler", "heun"):
        kw = dict(cond=[1, 2], sampler=sampler, steps=3, guidance_scale=2.0, eta=0.5, s_churn=2.0)
        x = model.sample(2, generator=torch.Generator().manual_seed(0), **kw)
        assert torch.equal(x, model.sample(2, generator=torch.Generator().manual_seed(0), **kw))
        assert not torch.equal(x, model.sample(2, generator=torch.Generator().manual_seed(1), **kw))


def test_churn_window_and_sampling_forward():
    model = build().eval()
    kw = dict(cond=[1, 2], sampler="euler", steps=4)
    plain = model.sample(2, generator=torch.Generator().manual_seed(0), **kw)
    outside = model.sample(2, generator=torch.Generator().manual_seed(0), s_churn=5.0, s_tmin=100.0, **kw)
    inside = model.sample(2, generator=torch.Generator().manual_seed(0), s_churn=5.0, s_tmax=100.0, **kw)
    assert torch.equal(plain, outside) and not torch.equal(plain, inside)
    out = model.sampling_forward(2, cond=[1, 2], guidance_scale=2.0)()
    assert out.shape == (2, *model.latent_shape)  # guided: one forward over the doubled batch, combined


def test_inpainting_blends_in_sigma_space():
    model = build().eval()
    latents = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    known = torch.zeros(2, *model.latent_shape[1:], dtype=torch.bool)
    known[:, :8] = True
    out = model.inpaint_latents(latents, known, model.user_cond([3, 4], 2), torch.Generator().manual_seed(1),
                                steps=3, eta=0.3)
    assert torch.equal(out[:, :, :8], latents[:, :, :8]) and not torch.equal(out[:, :, 8:], latents[:, :, 8:])


def test_pixel_space_edm_clips_the_denoiser_output():
    pixel = build_from_config(CFG.parent / "ldm_pixel.yaml", **{"model.params.parameterization": "eps",
                                                                "model.params.elucidated": {"sigma_data": 0.5}}).eval()
    seen = []
    pixel.sample(2, cond=[1, 2], guidance_scale=10.0, clip_x0=1.0, sampler="dpm++2m", steps=3,
                 generator=torch.Generator().manual_seed(0), callback=seen.append)
    assert len(seen) == 3 and all(s["pred_x0"].abs().max() <= 1.0 for s in seen)
    x = pixel.sample(2, cond=[1, 2], guidance_scale=10.0, dynamic_threshold=0.9, steps=3,
                     generator=torch.Generator().manual_seed(0))
    assert torch.isfinite(x).all()


def test_checkpoint_round_trip(tmp_path):
    from omegaconf import OmegaConf

    from ldm.checkpoint import config_from_checkpoint, instantiate_from_checkpoint

    model = build().eval()
    path = tmp_path / "edm.ckpt"
    torch.save({"state_dict": model.state_dict(), "config": OmegaConf.to_container(OmegaConf.load(CFG))}, path)
    assert config_from_checkpoint(path)["model"]["params"]["elucidated"]["sigma_data"] == 1.0
    torch.manual_seed(1234)
    loaded, _ = instantiate_from_checkpoint(path)
    loaded.eval()
    assert loaded.edm == model.edm
    kw = dict(cond=[1, 2], steps=3, generator=torch.Generator().manual_seed(0))
    x = model.sample(2, **kw)
    assert torch.equal(x, loaded.sample(2, **{**kw, "generator": torch.Generator().manual_seed(0)}))


def test_bad_settings_are_refused():
    edm_key = "model.params.elucidated"
    with pytest.raises(ConfigError, match=r"model.params.elucidated: sigma_min \(80\) must be below sigma_max \(1\)"):
        build(**{edm_key: {"sigma_min": 80.0, "sigma_max": 1.0}})
    with pytest.raises(ConfigError, match=r"model.params.elucidated: sigma_data must be > 0, got -0.5"):
        build(**{edm_key: {"sigma_data": -0.5}})
    with pytest.raises(ConfigError, match=r"model.params.elucidated: no key 'sigma'; keys: sigma_data, p_mean"):
        build(**{edm_key: {"sigma": 1.0}})
    with pytest.raises(ConfigError, match=r"replace parameterization, loss_type and min_snr_gamma"):
        build(**{"model.params.parameterization": "v"})
    with pytest.raises(ConfigError, match=r"sample_defaults: sampler 'plms' walks the discrete schedule"):
        build(**{"model.params.sample_defaults": {"sampler": "plms"}})
    model = build().eval()
    for sampler in ("plms", "ddpm"):
        with pytest.raises(ValueError, match=rf"sampler '{sampler}' walks the discrete schedule; an elucidated "
                                             r"\(EDM\) prior samples with ddim, dpm\+\+2m, euler, heun"):
            model.sample(1, cond=1, sampler=sampler)
    images = torch.zeros(1, 1, 32, 32)
    with pytest.raises(ValueError, match=r"inpaint_method 'repaint' walks the discrete chain"):
        model.inpaint(images, torch.ones(1, 32, 32), cond=1, inpaint_method="repaint")
    assert not model.has_likelihood
    with pytest.raises(NotImplementedError, match=r"an elucidated \(EDM\) prior has no nll"):
        model.nll({"image": images, "class_label": torch.tensor([1])})
    with pytest.raises(ValueError, match=r"s_noise must be a number >= 0, got -1"):
        model.sample(1, cond=1, s_noise=-1.0)

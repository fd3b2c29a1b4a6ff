"""The samplers against independent implementations on the same network: diffusers' DDIMScheduler,
PNDMScheduler (PLMS) and DPMSolverMultistepScheduler, k-diffusion's sample_euler / sample_heun, its Karras
σ schedule and its CompVis denoiser wrapper. The network is a small fixed random function of (x, t), so the
comparison checks the samplers' arithmetic, not a model's quality; tolerances are float32 rounding over the
steps (stated per test)."""

from __future__ import annotations

import pytest
import torch

from ldm.diffusion.process import GaussianDiffusion
from ldm.diffusion.sampling import (
    VPDenoiser,
    ddim,
    ddim_timesteps,
    ddpm,
    dpm_solver_pp,
    euler,
    guided,
    heun,
    karras_sigmas,
    plms,
)
from tests.toy import import_k_diffusion

diffusers = pytest.importorskip("diffusers")


def k_diffusion(module: str):
    return import_k_diffusion(module)
T = 1000
# latent-diffusion's "linear" schedule is diffusers' "scaled_linear" (linspace of square roots, squared)
LD = dict(beta_start=0.0015, beta_end=0.0155, beta_schedule="scaled_linear", num_train_timesteps=T)


def process(parameterization="eps"):
    return GaussianDiffusion(T, "linear", linear_start=0.0015, linear_end=0.0155, parameterization=parameterization)


class Net(torch.nn.Module):
    """A fixed smooth random function of (x, t): a 1x1 conv mixing channels, modulated by t."""

    def __init__(self):
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.w = torch.randn(4, 4, generator=g) * 0.3
        self.b = torch.randn(4, generator=g) * 0.1

    def forward(self, x, t):
        s = torch.sin(t.float() / 100.0)[:, None, None, None]
        return torch.einsum("oc,bchw->bohw", self.w, x) * (1 + 0.3 * s) + self.b[None, :, None, None] * s


def noise():
    return torch.randn(2, 4, 6, 6, generator=torch.Generator().manual_seed(1))


def run_diffusers(scheduler, net, steps, x, eta=None, noises=None):
    scheduler.set_timesteps(steps)
    for i, t in enumerate(scheduler.timesteps):
        out = net(x, torch.full((x.shape[0],), int(t)))
        kw = {} if eta is None else {"eta": eta, "variance_noise": noises[i]}
        x = scheduler.step(out, t, x, **kw).prev_sample
    return x


@pytest.mark.parametrize("parameterization, prediction_type", [("eps", "epsilon"), ("v", "v_prediction")])
@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_ddim_matches_diffusers(parameterization, prediction_type, eta):
    """latent-diffusion's DDIM is diffusers' with leading spacing, steps_offset 1 and the final alpha A_0."""
    net, steps = Net(), 20
    assert ddim_timesteps(T, steps)[:3] == [1, 51, 101]
    draws = torch.randn(steps, 2, 4, 6, 6, generator=torch.Generator().manual_seed(2))
    it = iter(draws)
    ours_noise = iter(draws)  # ours draws the same noise, in the same order
    import ldm.diffusion.sampling as sampling

    real = sampling._noise
    sampling._noise = lambda shape, generator, device: next(ours_noise)
    try:
        ours = ddim(net, process(parameterization), noise(), steps, eta=eta)
    finally:
        sampling._noise = real
    sched = diffusers.DDIMScheduler(**LD, clip_sample=False, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading", prediction_type=prediction_type)
    theirs = run_diffusers(sched, net, steps, noise(), eta=eta, noises=list(it))
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)  # float64 coefficients here, float32 there


def test_plms_matches_diffusers_pndm():
    net, steps = Net(), 25
    ours = plms(net, process(), noise(), steps)
    sched = diffusers.PNDMScheduler(**LD, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1,
                                    timestep_spacing="leading")
    theirs = run_diffusers(sched, net, steps, noise())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("steps", [10, 20])
def test_dpm_solver_pp_matches_diffusers(steps):
    net = Net()
    ours = dpm_solver_pp(net, process(), noise(), steps)
    sched = diffusers.DPMSolverMultistepScheduler(**LD, algorithm_type="dpmsolver++", solver_order=2,
                                                  timestep_spacing="linspace")
    theirs = run_diffusers(sched, net, steps, noise())
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def k_denoiser(net, p):
    """k-diffusion's wrapper of a CompVis model, on the same network."""
    external = k_diffusion("external")

    class CompVisModel(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.alphas_cumprod = p.alphas_cumprod

        def apply_model(self, x, t, cond=None):
            return net(x, t)

    return external.CompVisDenoiser(CompVisModel(), quantize=False)


def test_vp_denoiser_and_karras_sigmas_match_k_diffusion():
    ks = k_diffusion("sampling")
    net, p = Net(), process()
    ours, theirs = VPDenoiser(net, p), k_denoiser(net, p)
    sig = torch.tensor([0.05, 1.3, 14.0])
    x = noise()[:1].repeat(3, 1, 1, 1)
    torch.testing.assert_close(ours(x, sig), theirs(x, sig), atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(karras_sigmas(12, 0.03, 14.6), ks.get_sigmas_karras(12, 0.03, 14.6), atol=0, rtol=1e-6)


@pytest.mark.parametrize("sampler", ["euler", "heun"])
@pytest.mark.parametrize("churn", [0.0, 5.0])
def test_euler_and_heun_match_k_diffusion(sampler, churn):
    ks = k_diffusion("sampling")
    net, p = Net(), process()
    den = VPDenoiser(net, p)
    sigmas = karras_sigmas(10, den.sigma_min, den.sigma_max)
    x = noise() * sigmas[0]
    fn = {"euler": (euler, ks.sample_euler), "heun": (heun, ks.sample_heun)}[sampler]
    torch.manual_seed(3)  # k-diffusion draws churn noise from the global generator: ours does too when given none
    ours = fn[0](den, x, sigmas, s_churn=churn)
    torch.manual_seed(3)
    theirs = fn[1](den, x, sigmas, s_churn=churn, disable=True)
    torch.testing.assert_close(ours, theirs, atol=1e-4, rtol=1e-4)


def test_ddpm_with_a_perfect_model_of_a_point_mass_returns_it():
    """Data a single point x*: the optimal eps-model gives back x* exactly (closed form)."""
    p = GaussianDiffusion(50, "linear")
    target = torch.full((1, 4, 2, 2), 0.7)

    def model(x, t):  # eps = (x_t - sqrt(A) x*) / sqrt(1 - A)
        a = p.alphas_cumprod[t][:, None, None, None]
        return (x - a.sqrt() * target) / (1 - a).sqrt()

    out = ddpm(model, p, torch.randn(1, 4, 2, 2, generator=torch.Generator().manual_seed(0)),
               generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(out, target, atol=1e-4, rtol=0)
    torch.testing.assert_close(dpm_solver_pp(model, p, torch.randn(1, 4, 2, 2), 10), target, atol=1e-4, rtol=0)
    for sampler in (ddim, plms):  # these end at t = 0's noise level (latent-diffusion's): their last x_0 is x*
        seen = []
        sampler(model, p, torch.randn(1, 4, 2, 2), 10, callback=seen.append)
        torch.testing.assert_close(seen[-1]["pred_x0"], target, atol=1e-4, rtol=0)


def test_guidance_is_one_batched_forward_and_rescale_restores_the_conditional_spread():
    calls = []

    def net(x, t, cond):
        calls.append(x.shape[0])
        return x * (1 + cond["class_label"].float()[:, None, None, None])

    cond, null = {"class_label": torch.tensor([1, 2])}, {"class_label": torch.tensor([0, 0])}
    x, t = torch.randn(2, 4, 3, 3), torch.zeros(2, dtype=torch.long)
    out = guided(net, cond, null, scale=3.0)(x, t)
    assert calls == [4]
    c, u = net(x, t, cond), net(x, t, null)
    torch.testing.assert_close(out, u + 3 * (c - u))
    full = guided(net, cond, null, scale=3.0, rescale=1.0)(x, t)
    torch.testing.assert_close(full.std((1, 2, 3)), c.std((1, 2, 3)))
    with pytest.raises(ValueError, match="classifier-free guidance needs a null condition"):
        guided(net, cond, None, scale=2.0)


def test_step_counts_the_samplers_cannot_take_are_refused():
    with pytest.raises(ValueError, match=r"steps must be in 1..1000 \(the model's T\), got 1001"):
        ddim(Net(), process(), noise(), 1001)
    with pytest.raises(ValueError, match=r"steps must be in 1..1000 \(the model's T\), got 0"):
        dpm_solver_pp(Net(), process(), noise(), 0)

"""The latent diffusion prior: every sampler through the prior interface, RePaint's schedule and inpainting, the
bound, the latent-diffusion checkpoint layout, and the errors bad input gets."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ldm.diffusion.model import SCHEDULE_KEYS, repaint_schedule
from ldm.util import ConfigError
from tests.fixture_paths import fixture_dir
from tests.toy import build_from_config

CFG = Path(__file__).resolve().parents[2] / "configs" / "test" / "ldm.yaml"


def build(**overrides):
    return build_from_config(CFG, **overrides)


@pytest.mark.parametrize("sampler", ["ddim", "plms", "dpm++2m", "euler", "heun", "ddpm"])
def test_every_sampler_runs_through_the_prior_and_is_seeded(sampler):
    model = build().eval()
    kw = dict(cond=[1, 2], sampler=sampler, steps=3, guidance_scale=2.0)
    a = model.sample(2, generator=torch.Generator().manual_seed(0), **kw)
    b = model.sample(2, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 1, 32, 32) and torch.equal(a, b) and torch.isfinite(a).all()


def test_karras_samplers_on_a_discrete_model_start_at_sigma_80_unless_told():
    """The cosine schedule's largest sigma is in the thousands; Karras et al.'s schedule starts at 80 (capped at the
    model's own), `sigma_max=None` at the model's own, and a call's value wins."""
    model = build(**{"model.params.beta_schedule": "cosine"}).eval()
    own = model.process.alphas_cumprod[-1]
    own = float(((1 - own) / own).sqrt())
    assert own > 1000

    def first_sigma(**kw):
        seen = []
        model.sample(1, cond=[1], sampler="euler", steps=3, callback=lambda d: seen.append(d["t"]), **kw)
        return seen[0]

    assert first_sigma() == pytest.approx(80.0)
    assert first_sigma(sigma_max=None) == pytest.approx(own, rel=1e-5)
    assert first_sigma(sigma_max=5.0) == pytest.approx(5.0)
    assert first_sigma(sigma_max=1e9) == pytest.approx(own, rel=1e-5)


def test_a_config_eta_is_the_default_and_a_call_overrides_it():
    """`sample_defaults: {eta: 1.0}` (the Fashion-MNIST configs' ancestral DDIM): the declared default says so,
    a call without eta samples as one passing it, and a call's eta wins."""
    ancestral = build(**{"model.params.sample_defaults": {"sampler": "ddim", "steps": 4, "eta": 1.0}}).eval()
    plain = build().eval()
    plain.load_state_dict(ancestral.state_dict())
    assert {o.name: o.default for o in ancestral.sampler_options.resolve(ancestral)}["eta"] == 1.0
    assert {o.name: o.default for o in plain.sampler_options.resolve(plain)}["eta"] == 0.0

    def draw(model, **kw):
        return model.sample(2, cond=[1, 2], generator=torch.Generator().manual_seed(0), sampler="ddim", steps=4,
                            **kw)

    assert torch.equal(draw(ancestral), draw(plain, eta=1.0))
    assert torch.equal(draw(ancestral, eta=0.0), draw(plain))
    assert not torch.equal(draw(ancestral), draw(plain))


def test_repaint_schedule_goes_back_up_and_ends_below_zero():
    times = repaint_schedule(10, jump=3, resample=2)
    assert times[0] == 9 and times[-1] == -1
    ups = sum(1 for a, b in zip(times, times[1:]) if b > a)
    assert ups == 3 * 3  # three jumps (at t = 6, 3, 0) of three steps each, once each (resample 2)
    assert all(abs(b - a) == 1 for a, b in zip(times, times[1:]))
    assert repaint_schedule(5, jump=2, resample=1) == [4, 3, 2, 1, 0, -1]


@pytest.mark.parametrize("method", ["blend", "repaint"])
def test_inpainting_methods_keep_the_known_latents(method):
    model = build(**{"model.params.timesteps": 20}).eval()
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    known = torch.zeros(2, 16, 16, dtype=torch.bool)
    known[:, :8] = True
    out = model.inpaint_latents(latents, known, model.user_cond([3, 4], 2), torch.Generator().manual_seed(1),
                                inpaint_method=method, steps=4, repaint_jump=5, repaint_resample=2)
    assert torch.equal(out[:, :, :8], latents[:, :, :8]) and not torch.equal(out[:, :, 8:], latents[:, :, 8:])


def test_latent_diffusion_checkpoint_layout_loads(tmp_path):
    """A latent-diffusion state dict (`model.diffusion_model.*`, `model_ema.diffusion_model*`, the schedule
    buffers, `scale_factor`) loads into the prior through ckpt_path."""
    ref = build(**{"model.params.timesteps": 1000, "model.params.linear_start": 0.0015,
                   "model.params.linear_end": 0.0155})
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("model."):
            state["model.diffusion_model." + k[len("model."):]] = v.clone()
        elif k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates"):
            state["model_ema.diffusion_model" + k[len("model_ema."):]] = v.clone()
        elif not k.startswith("first_stage_model."):
            state[k] = v.clone()
    layout = json.loads((fixture_dir("latent-diffusion", "ldm_ckpt_layout") / "layouts.json").read_text())
    schedule_keys = {k for k, _, _ in layout["layouts"]["unconditional_noema"]["state_dict_layout"] if "." not in k}
    assert schedule_keys <= set(state)  # the top-level buffers of a latent-diffusion checkpoint are all here
    torch.save({"state_dict": state}, tmp_path / "ldm.ckpt")
    loaded = build(**{"model.params.timesteps": 1000, "model.params.linear_start": 0.0015,
                      "model.params.linear_end": 0.0155, "model.params.ckpt_path": str(tmp_path / "ldm.ckpt")})
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in ref.state_dict().items() if k.startswith("model"))
    with pytest.raises(ValueError, match=r"the checkpoint's noise schedule \(betas\) is not this config's"):
        build(**{"model.params.timesteps": 1000, "model.params.linear_start": 0.0015,
                 "model.params.linear_end": 0.012, "model.params.ckpt_path": str(tmp_path / "ldm.ckpt")})
    with pytest.raises(ValueError, match=r"12 shape mismatch\(es\): betas: \(1000,\) in .*, \(100,\) in "
                                         r"LatentDiffusionPrior"):
        build(**{"model.params.ckpt_path": str(tmp_path / "ldm.ckpt")})


def test_original_layout_keeps_the_conditioning_network(tmp_path):
    """A latent-diffusion checkpoint of a conditional model (text, class) stores its `cond_stage_model.*`
    beside the UNet; they load into this prior's conditioning network."""
    ref = build_from_config(CFG.parent / "ldm_text.yaml")
    state = {}
    for k, v in ref.state_dict().items():
        if k.startswith("model."):
            state["model.diffusion_model." + k[len("model."):]] = v.clone()
        elif k.startswith(("cond_stage_model.", "scale_factor")) or k in SCHEDULE_KEYS:
            state[k] = v.clone()
    assert any(k.startswith("cond_stage_model.") for k in state)
    torch.save({"state_dict": state}, tmp_path / "ldm_text.ckpt")
    loaded = build_from_config(CFG.parent / "ldm_text.yaml", **{"model.params.ckpt_path": str(tmp_path / "ldm_text.ckpt")})
    for k, v in ref.state_dict().items():
        if k.startswith(("model.", "cond_stage_model.")):
            assert torch.equal(loaded.state_dict()[k], v), k


def test_nll_is_a_bound_in_bits_per_dimension():
    model = build(**{"model.params.timesteps": 10}).eval()
    batch = {"image": torch.rand(2, 1, 32, 32) * 2 - 1, "class_label": torch.tensor([1, 2])}
    bits = model.nll(batch, generator=torch.Generator().manual_seed(0))
    assert bits.shape == (2,) and torch.isfinite(bits).all()


def test_stratified_bound_is_unbiased():
    from ldm.diffusion.model import stratum_bounds

    assert stratum_bounds(1, 10, 3) == [(1, 4), (4, 7), (7, 10)]
    with pytest.raises(ValueError, match=r"strata must be in 1..9, got 10"):
        stratum_bounds(1, 10, 10)
    model = build(**{"model.params.timesteps": 12}).eval()
    batch = {"image": torch.rand(4, 1, 32, 32) * 2 - 1, "class_label": torch.tensor([1, 2, 3, 4])}
    full, strat = [], []
    for seed in range(40):
        full.append(model.nll(batch, generator=torch.Generator().manual_seed(seed)).mean())
        strat.append(model.nll(batch, generator=torch.Generator().manual_seed(1000 + seed), strata=3).mean())
    full, strat = torch.stack(full), torch.stack(strat)
    se = (full.var() / len(full) + strat.var() / len(strat)).sqrt()
    assert abs(float(full.mean() - strat.mean())) < 4 * float(se)
    assert strat.std() > full.std()  # fewer timesteps: the same bound, noisier


def test_bad_input_is_refused():
    model = build(**{"model.params.cond_drop_prob": 0.0}).eval()
    with pytest.raises(ValueError, match=r"guidance_scale needs a prior trained with conditioning dropout "
                                         r"\(cond_drop_prob > 0\); this one was trained with 0"):
        model.sample(1, cond=1, guidance_scale=2.0)
    with pytest.raises(ValueError, match=r"steps must be an integer in 1..100, got 101"):
        model.sample(1, cond=1, steps=101)
    with pytest.raises(ValueError, match=r"cond must be a class label or one per sample, in 0..9"):
        model.sample(2, cond=[1, 12])
    with pytest.raises(ValueError, match=r"sampler must be one of ddim, plms, dpm\+\+2m, euler, heun, ddpm, got 'lms'"):
        model.sample(1, cond=1, sampler="lms")
    with pytest.raises(ConfigError, match=r"unet_config.params.in_channels: the latents have 4 channels, so the UNet "
                                          r"takes 4; it is configured for 3"):
        build(**{"model.params.unet_config.params.in_channels": 3})


def test_text_prompts_condition_a_text_model_and_are_refused_by_a_class_model():
    text = build_from_config(CFG.parent / "ldm_text.yaml").eval()
    kw = dict(generator=torch.Generator().manual_seed(0), steps=2)
    a = text.sample(2, cond="a photo of a sandal", **kw)
    b = text.sample(2, cond=["a photo of a sandal", "a photo of a sandal"], generator=torch.Generator().manual_seed(0),
                    steps=2)
    assert torch.equal(a, b)
    guided = text.sample(2, cond="a photo of a bag", guidance_scale=3.0, **kw)
    assert torch.isfinite(guided).all()
    with pytest.raises(ValueError, match=r"cond must be a caption or one per sample \(strings, up to 24 UTF-8 bytes "
                                         r"are used\) for 2 samples, got \['one'\]"):
        text.sample(2, cond=["one"])
    with pytest.raises(ValueError, match=r"cond must be a class label or one per sample, in 0..9, got 'a photo of a "
                                         r"sandal'"):
        build().sample(1, cond="a photo of a sandal")


def test_class_captions_name_the_class():
    from ldm.data.captions import ClassCaptions
    from tests.toy import ToyImages

    data = ClassCaptions({"target": "tests.toy.ToyImages", "params": {"n": 3, "size": 16}})
    assert isinstance(data.dataset, ToyImages)
    labels = [int(data.dataset[i]["class_label"]) for i in range(3)]
    names = ("T-shirt/top", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "ankle boot")
    assert [data[i]["caption"] for i in range(3)] == [f"a photo of a {names[k]}" for k in labels]
    with pytest.raises(ValueError, match="template must hold {} for the class name"):
        ClassCaptions({"target": "tests.toy.ToyImages", "params": {"n": 3, "size": 16}}, template="a photo")


def test_dynamic_thresholding_pulls_saturated_predictions_in():
    """Imagen's rule in closed form: s = max(1, quantile_p |x_0|); x_0 clipped to [-s, s] and divided by s."""
    from ldm.diffusion.process import dynamic_threshold

    x0 = torch.tensor([[0.5, -3.0, 2.0, 0.1], [0.2, -0.3, 0.4, 0.9]])
    s0 = torch.quantile(x0[0].abs(), 0.75)
    torch.testing.assert_close(dynamic_threshold(x0, 0.75)[0], x0[0].clamp(-s0, s0) / s0)
    torch.testing.assert_close(dynamic_threshold(x0, 0.75)[1], x0[1])  # inside [-1, 1]: unchanged (s = 1)


def test_pixel_space_prior_thresholds_and_a_latent_prior_refuses():
    pixel = build_from_config(CFG.parent / "ldm_pixel.yaml").eval()
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    plain = pixel.sample(2, cond=[1, 2], guidance_scale=10.0, generator=g(), steps=3)
    for sampler in ("ddim", "dpm++2m", "heun"):
        thresholded = pixel.sample(2, cond=[1, 2], guidance_scale=10.0, dynamic_threshold=0.9, sampler=sampler,
                                   generator=g(), steps=3)
        assert thresholded.shape == plain.shape and torch.isfinite(thresholded).all()
    seen = []
    pixel.sample(2, cond=[1, 2], guidance_scale=10.0, clip_x0=1.0, generator=g(), steps=3, callback=seen.append)
    assert all(s["pred_x0"].abs().max() <= 1.0 + 1e-5 for s in seen)
    with pytest.raises(ValueError, match=r"dynamic_threshold is for a pixel-space prior \(first stage "
                                         r"ldm.first_stage.models.IdentityFirstStage\); the latents of AutoencoderKL "
                                         r"are not bounded to \[-1, 1\]"):
        build().sample(1, cond=1, dynamic_threshold=0.995)


def test_a_caption_is_encoded_once_per_sampling_run_not_at_every_step():
    """The text encoder's answer does not change between steps: sampling encodes the captions (and, under
    guidance, the null captions) once, and draws what encoding at every step draws."""
    from ldm.diffusion import sampling as samplers

    text = build_from_config(CFG.parent / "ldm_text.yaml").eval()
    encoder = text.network("cond_stage_model", ema=True)
    calls = []
    hook = encoder.register_forward_hook(lambda *_: calls.append(1))
    cond = text.user_cond(["a photo of a sandal", "a photo of a bag"], 2)
    with torch.no_grad():
        once = text.sample_latents(2, cond, torch.Generator().manual_seed(0), steps=4, guidance_scale=2.0)
        assert len(calls) == 2  # the captions and the null captions, each once for 4 steps
        per_step = samplers.guided(text.denoiser(ema=True), cond, text.conditioner.null_like(cond), 2.0)
        again = text._run(per_step, text._noise(2, torch.Generator().manual_seed(0)), torch.Generator().manual_seed(0),
                          None, "ddim", 4, 0.0, {})
    hook.remove()
    assert len(calls) == 2 + 4  # the reference encodes the doubled batch at every step
    torch.testing.assert_close(once, again, rtol=1e-5, atol=1e-6)


def test_a_checkpoint_on_another_first_stage_is_refused(tmp_path):
    """A prior checkpoint loaded with a config naming another first stage (sample.py --config, main.py -r, the
    prior's ckpt_path) is refused by name: its latents mean nothing to that first stage, and loading would
    silently swap the checkpoint's in."""
    from omegaconf import OmegaConf
    from safetensors.torch import save_file

    from ldm.checkpoint import CheckpointError, instantiate_from_checkpoint
    from ldm.train import resumable_step

    prior = build()
    weights = {k: v.contiguous() for k, v in prior.first_stage_model.state_dict().items()}
    save_file(weights, tmp_path / "same.safetensors")
    save_file({k: v + 0.01 if v.is_floating_point() else v for k, v in weights.items()}, tmp_path / "other.safetensors")
    torch.save({"state_dict": prior.state_dict(), "global_step": 3}, tmp_path / "prior.ckpt")
    key = "model.params.first_stage_config.params.ckpt_path"
    ckpt = str(tmp_path / "prior.ckpt")
    message = (rf"{ckpt} holds a prior trained on another first stage than {tmp_path}/other.safetensors, the one "
               r"the config names \(first_stage_model\.\S+: other values\); its latents mean nothing to that first "
               r"stage: load it with the config it was trained with, or train the prior on this first stage")

    same = build(**{key: str(tmp_path / "same.safetensors"), "model.params.ckpt_path": ckpt})
    assert torch.equal(same.model.out[-1].weight, prior.model.out[-1].weight)
    with pytest.raises(CheckpointError, match=message.replace(ckpt, f"ckpt_path {ckpt}")):
        build(**{key: str(tmp_path / "other.safetensors"), "model.params.ckpt_path": ckpt})
    with pytest.raises(CheckpointError, match=message):
        resumable_step(build(**{key: str(tmp_path / "other.safetensors")}), ckpt)
    assert resumable_step(build(**{key: str(tmp_path / "same.safetensors")}), ckpt) == 3

    config = OmegaConf.to_container(OmegaConf.load(CFG), resolve=True)
    config["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = str(tmp_path / "other.safetensors")
    with pytest.raises(CheckpointError, match=message):
        instantiate_from_checkpoint(ckpt, config)
    config["model"]["params"]["first_stage_config"]["params"]["ckpt_path"] = str(tmp_path / "same.safetensors")
    loaded, _ = instantiate_from_checkpoint(ckpt, config, use_ema=False)
    assert torch.equal(loaded.model.out[-1].weight, prior.model.out[-1].weight)

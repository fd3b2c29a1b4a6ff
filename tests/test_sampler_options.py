"""The sampler-options declaration: what it refuses (exact messages), what it normalises, that `sample` and
`inpaint` check before any work, and that a program can read it to build its controls."""

from __future__ import annotations

import inspect

import pytest
import torch

from absorbing import sampling
from absorbing.model import AbsorbingPrior
from ldm.sampler_options import Option, SamplerOptions, describe
from tests.absorbing.test_model import build as build_prior


def build(**overrides):
    return build_prior(**overrides).eval()


@pytest.fixture(scope="module")
def prior():
    return build()  # T = 16, sample_steps = 4, tokens 8 x 8, 10 classes


def refused(call, *args, **kw) -> str:
    with pytest.raises(ValueError) as e:
        call(*args, **kw)
    return str(e.value)


BAD = [
    ({"temperature": -1}, "temperature must be a number >= 0, got -1"),
    ({"temperature": float("nan")}, "temperature must be a number >= 0, got nan"),
    ({"temperature": "hot"}, "temperature must be a number >= 0, got 'hot'"),
    ({"steps": 0}, "steps must be an integer in 1..16 or None, got 0"),
    ({"steps": 17}, "steps must be an integer in 1..16 or None, got 17"),
    ({"steps": 2.5}, "steps must be an integer in 1..16 or None, got 2.5"),
    ({"steps": True}, "steps must be an integer in 1..16 or None, got True"),
    ({"order": "raster", "steps": 65}, "steps must be an integer in 1..64 or None, got 65"),
    ({"guidance_scale": -0.5}, "guidance_scale must be a number >= 0, got -0.5"),
    ({"top_k": 0}, "top_k must be an integer >= 1 or None, got 0"),
    ({"top_p": 0}, "top_p must be a number in (0, 1] or None, got 0"),
    ({"top_p": 1.5}, "top_p must be a number in (0, 1] or None, got 1.5"),
    ({"order": "spiral"}, "order must be one of random, confidence, raster, got 'spiral'"),
    ({"schedule": "linear"}, "schedule must be one of uniform, cosine or None, got 'linear'"),
    ({"confidence_noise": -1}, "confidence_noise must be a number >= 0, got -1"),
    ({"shape": [4, 4]}, "shape must be an integer or 2 integers >= (8, 8) or None, got (4, 4)"),
    ({"shape": [8, 8, 8]}, "shape must be an integer or 2 integers >= (8, 8) or None, got (8, 8, 8)"),
    ({"stride": 0}, "stride must be an integer or 2 integers >= 1 and <= (8, 8) or None, got 0"),
    ({"stride": [2, 9]}, "stride must be an integer or 2 integers >= 1 and <= (8, 8) or None, got (2, 9)"),
    ({"stpes": 2}, "AbsorbingPrior.sample has no option 'stpes' (did you mean 'steps'?); valid options: order, "
                   "schedule, confidence_noise, shape, steps, temperature, top_k, top_p, guidance_scale, stride"),
]


@pytest.mark.parametrize("options,message", BAD, ids=[str(o) for o, _ in BAD])
def test_sample_refuses_a_bad_option_before_any_work(prior, options, message, monkeypatch):
    def no_work(*args, **kw):
        raise AssertionError("sampling started")

    monkeypatch.setattr(prior, "sample_latents", no_work)
    monkeypatch.setattr(prior, "user_cond", no_work)
    assert refused(prior.sample, 2, cond=[1, 2], **options) == message


def test_valid_values_are_normalised_and_sample(prior):
    checked = prior.check_sampler_options({"steps": 2, "temperature": 0, "top_k": 3, "top_p": 1, "guidance_scale": 0,
                                           "order": "confidence", "shape": 10, "stride": [2, 3]})
    assert checked == {"order": "confidence", "shape": (10, 10), "steps": 2, "temperature": 0.0, "top_k": 3,
                       "top_p": 1.0, "guidance_scale": 0.0, "stride": (2, 3)}
    assert type(checked["temperature"]) is float and prior.check_sampler_options({"steps": None}) == {"steps": None}
    g = torch.Generator().manual_seed(0)
    assert prior.sample(2, cond=[1, 2], generator=g, steps=2, temperature=0, guidance_scale=2, top_p=0.9).shape == (2, 1, 16, 16)
    assert prior.sample(1, shape=10, steps=2, stride=[2, 3]).shape == (1, 1, 20, 20)
    assert prior.sample(1, shape=(9, 9), order="raster", steps=81).shape == (1, 1, 18, 18)  # one token per step


def test_guidance_needs_a_conditional_prior():
    unconditional = build(**{"model.params.num_classes": None})
    assert refused(unconditional.sample, 1, guidance_scale=2) == "guidance_scale must be 1 for an unconditional prior, got 2"
    assert unconditional.sample(1, steps=2, guidance_scale=1).shape == (1, 1, 16, 16)


def test_config_sampling_settings_are_checked_at_construction():
    assert refused(build, **{"model.params.log_sample_kwargs": {"steps": 0}}) == \
        "model.params.log_sample_kwargs: steps must be an integer in 1..16 or None, got 0"
    assert refused(build, **{"model.params.sample_steps": 0}) == \
        "model.params.sample_steps: expected an integer >= 1 or null, got 0 (int)"
    assert refused(build, **{"model.params.sample_steps": 17}) == "model.params: absorbing.model.AbsorbingPrior cannot " \
        "be built from these parameters: sample_steps must be in 1..16 (num_timesteps) or None, got 17"


def test_declaration_is_introspectable(prior):
    options = {o.name: o for o in prior.sampler_options.resolve(prior)}
    assert list(options) == ["order", "schedule", "confidence_noise", "shape", "steps", "temperature", "top_k", "top_p",
                            "guidance_scale", "stride"]
    steps = options["steps"]
    assert (steps.type, steps.default, steps.low, steps.high) == (int, 4, 1, 16)
    assert (options["shape"].default, options["shape"].low, options["shape"].size) == ((8, 8), (8, 8), 2)
    assert options["order"].choices == ("random", "confidence", "raster") and options["order"].default == "random"
    assert (options["top_p"].low, options["top_p"].high, options["top_p"].low_open) == (0.0, 1.0, True)
    assert all(o.help and o.type in (int, float, str) for o in options.values())
    assert "1 is the conditional model (no guidance), 0 the unconditional one" in options["guidance_scale"].help
    # inpainting takes the same options except the shape, which the images set
    assert prior.sampler_options.names("inpaint") == [n for n in options if n != "shape"]
    text = describe(prior.sampler_options.resolve(prior))
    assert "steps: an integer in 1..16 or None; default 4\n    reverse steps S" in text


def test_declared_defaults_are_the_sampler_defaults():
    """Fixed defaults in the declaration are what the sampler does without the option."""
    signature = inspect.signature(sampling.sample).parameters
    for option in AbsorbingPrior.sampler_options:
        if option.name in signature and not callable(option.default):
            assert option.default == signature[option.name].default, option.name
    assert inspect.signature(AbsorbingPrior._sample_tokens).parameters["stride"].default is None


def test_option_messages_without_a_prior():
    ratio = Option("ratio", float, 0.5, "a share", low=0.0, high=1.0, low_open=True)
    assert ratio.check(1) == 1.0
    with pytest.raises(ValueError, match=r"^ratio must be a number in \(0, 1\], got 0$"):
        ratio.check(0)
    with pytest.raises(ValueError, match="declared twice"):
        SamplerOptions(ratio, ratio)
    assert describe(()) == "(no sampler options)"


# --- inpainting -------------------------------------------------------------------------------------
def images(b: int = 2) -> torch.Tensor:
    return torch.rand(b, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1


def top_half(dtype: torch.dtype) -> torch.Tensor:
    mask = torch.zeros(2, 1, 16, 16, dtype=dtype)
    mask[..., :8, :] = 1
    return mask


VALUES = "mask values must be in {0, 1} (bool or integers) or [0, 1] (floats), 1 = keep"
BAD_MASKS = [
    (top_half(torch.uint8) * 255, f"{VALUES}, got uint8 values in [0, 255]"),
    (top_half(torch.float32) * 255, f"{VALUES}, got float32 values in [0, 255]"),
    (top_half(torch.float32) - 0.5, f"{VALUES}, got float32 values in [-0.5, 0.5]"),
    (torch.full((2, 1, 16, 16), float("nan")), f"{VALUES}, got non-finite values"),
    (torch.ones(2, 1, 8, 8), "mask must have shape (B, 1, H, W) = (2, 1, 16, 16) or (B, H, W) = (2, 16, 16) to match "
                             "the images (2, 1, 16, 16), got (2, 1, 8, 8)"),
    (torch.ones(1, 16, 16), "mask must have shape (B, 1, H, W) = (2, 1, 16, 16) or (B, H, W) = (2, 16, 16) to match "
                            "the images (2, 1, 16, 16), got (1, 16, 16)"),
]


@pytest.mark.parametrize("mask,message", BAD_MASKS, ids=["uint8_255", "float_255", "negative", "nan", "small", "batch"])
def test_inpaint_refuses_a_bad_mask_before_any_work(prior, mask, message, monkeypatch):
    monkeypatch.setattr(prior, "encode", lambda *a, **k: pytest.fail("encoding started"))
    assert refused(prior.inpaint, images(), mask, cond=[1, 2]) == message


def test_inpaint_options_are_checked(prior):
    assert refused(prior.inpaint, images(), top_half(torch.bool), shape=(9, 9)) == (
        "AbsorbingPrior.inpaint has no option 'shape'; valid options: order, schedule, confidence_noise, steps, "
        "temperature, top_k, top_p, guidance_scale, stride")
    assert refused(prior.inpaint, images(), top_half(torch.bool), steps=0) == \
        "steps must be an integer in 1..16 or None, got 0"


def test_bool_int_and_float_masks_mean_the_same(prior):
    """A float mask is thresholded at 0.5 for the prior; 0.9 and 0.1 keep and fill as 1 and 0 do."""
    def fill(mask):
        return prior.inpaint(images(), mask, cond=[1, 2], generator=torch.Generator().manual_seed(0), steps=2,
                             paste=False)

    reference = fill(top_half(torch.bool))
    assert torch.equal(fill(top_half(torch.int64)), reference)
    assert torch.equal(fill(top_half(torch.float32)[:, 0]), reference)  # (B, H, W)
    assert torch.equal(fill(top_half(torch.float32) * 0.8 + 0.1), reference)


def test_config_sample_defaults_become_the_options_defaults():
    """`sample_defaults` in an absorbing config: the declared defaults say so, and a call without the option
    samples exactly as one that passes it."""
    tuned = build(**{"model.params.sample_defaults": {"schedule": "cosine", "temperature": 0.9}})
    resolved = {o.name: o.default for o in tuned.sampler_options.resolve(tuned)}
    assert resolved["schedule"] == "cosine" and resolved["temperature"] == 0.9 and resolved["order"] == "random"
    plain = build()
    plain.load_state_dict(tuned.state_dict())
    a = tuned.sample(4, cond=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0))
    b = plain.sample(4, cond=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0), schedule="cosine",
                     temperature=0.9)
    assert torch.equal(a, b)
    c = tuned.sample(4, cond=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0), schedule="uniform",
                     temperature=0.9)  # a call's option wins over the config's
    d = plain.sample(4, cond=[0, 1, 2, 3], generator=torch.Generator().manual_seed(0), temperature=0.9)
    assert torch.equal(c, d)


@pytest.mark.parametrize("defaults,message", [
    ({"schedule": "linear"}, "model.params.sample_defaults: schedule must be one of uniform, cosine or None, "
                             "got 'linear'"),
    ({"steps": 8}, "model.params.sample_defaults: the step count is `sample_steps`, not a sample_defaults key"),
    ({"shape": 10}, "model.params.sample_defaults: AbsorbingPrior.inpaint has no option 'shape'"),
])
def test_bad_config_sample_defaults_are_refused(defaults, message):
    with pytest.raises(ValueError) as e:
        build(**{"model.params.sample_defaults": defaults})
    assert str(e.value).startswith(message)

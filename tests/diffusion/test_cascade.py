"""Cascaded diffusion: noise conditioning augmentation, the low-resolution input kept by guidance, the cascade
assembled from stage checkpoints (sampling, inpainting, options per stage), and the errors bad input gets."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from ldm.checkpoint import CheckpointError, instantiate_from_checkpoint
from ldm.conditioning import LowResImage
from ldm.diffusion.cascade import augment
from ldm.util import ConfigError
from tests.test_script_checks import save_checkpoint
from tests.toy import build_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "test"


def sr_stage(**overrides):
    return build_from_config(CONFIGS / "ldm_sr.yaml", **overrides)


def test_augmentation_is_variance_preserving_from_the_image_to_pure_noise():
    image, noise = torch.randn(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    out = augment(image, torch.tensor([0.0, 0.5, 1.0]), noise)
    assert torch.equal(out[0], image[0])
    assert torch.allclose(out[1], (image[1] + noise[1]) / math.sqrt(2), atol=1e-6)
    assert torch.allclose(out[2], noise[2], atol=1e-6)


def test_training_corrupts_the_input_at_levels_up_to_the_maximum_and_tells_the_unet():
    stage = sr_stage()
    seen = []
    forward = stage.model.forward

    def spy(x, t, **kw):
        seen.append((x[:, 1:].clone(), kw["aug_level"].clone()))
        return forward(x, t, **kw)

    stage.model.forward = spy
    image = torch.rand(64, 1, 32, 32) * 2 - 1
    cond = stage.get_cond({"image": image, "class_label": torch.zeros(64, dtype=torch.long)})
    stage.compute_loss(image, cond, generator=torch.Generator().manual_seed(0))
    lowres, levels = seen[0]
    assert levels.min() >= 0 and levels.max() <= 0.5 and levels.std() > 0.05  # uniform on [0, 0.5]
    clean = cond["concat"]
    assert not torch.allclose(lowres, clean)
    noise = (lowres - torch.cos(levels * math.pi / 2).view(-1, 1, 1, 1) * clean) / \
        torch.sin(levels * math.pi / 2).view(-1, 1, 1, 1)
    assert abs(float(noise.std()) - 1) < 0.05  # what was added is unit Gaussian noise at the told level

    seen.clear()
    stage.sample(2, cond={"class_label": [1, 2], "concat": torch.zeros(2, 1, 16, 16), "aug_level": [0, 0]},
                 steps=1, aug_level=0.25, use_ema=False)
    assert torch.allclose(seen[0][1], torch.full((2,), 0.25))  # sampling: the fixed level


def test_guidance_drops_the_class_but_keeps_the_low_resolution_image():
    stage = sr_stage()
    cond = stage.user_cond({"class_label": [3, 4], "concat": torch.rand(2, 1, 16, 16), "aug_level": [0.1, 0.1]}, 2)
    null = stage.conditioner.null_like(cond)
    assert torch.equal(null["class_label"], torch.tensor([10, 10]))
    assert torch.equal(null["concat"], cond["concat"]) and torch.equal(null["aug_level"], cond["aug_level"])
    dropped = stage.conditioner.drop(cond, 0.999, generator=torch.Generator().manual_seed(0))
    assert torch.equal(dropped["class_label"], torch.tensor([10, 10])) and torch.equal(dropped["concat"], cond["concat"])


def test_low_res_conditioner_shrinks_by_area_and_refuses_another_resolution():
    low = LowResImage(shape=(1, 32, 32), size=16)
    image = torch.rand(2, 1, 32, 32)
    encoded = low.encode({"image": image})
    shrunk = image.view(2, 1, 16, 2, 16, 2).mean((3, 5))
    assert torch.allclose(encoded["concat"], low.upsample(shrunk), atol=1e-6)
    with pytest.raises(ValueError, match=r"this super-resolution stage takes low-resolution images \(n, 1, 16, 16\) "
                                         r"in \[-1, 1\] for 2 samples, got \(2, 1, 8, 8\): the stage before it must "
                                         r"output 16 x 16"):
        low.from_user(torch.zeros(2, 1, 8, 8), 2)
    with pytest.raises(ValueError, match="size 32 must be below the stage's resolution"):
        LowResImage(shape=(1, 32, 32), size=32)


def test_bad_stage_configs_are_refused():
    with pytest.raises(ConfigError, match="aug_level_conditioning: must be true"):
        sr_stage(**{"model.params.unet_config.params.aug_level_conditioning": False})
    with pytest.raises(ConfigError, match=r"need 0 <= noise_aug_sample_level <= noise_aug_max_level <= 1, got 0.6 "
                                          r"and 0.5"):
        sr_stage(**{"model.params.noise_aug_sample_level": 0.6})


@pytest.fixture(scope="module")
def cascade_config(tmp_path_factory):
    root = tmp_path_factory.mktemp("cascade")
    base = save_checkpoint("ldm_pixel.yaml", root / "base.ckpt")
    sr = save_checkpoint("ldm_sr.yaml", root / "sr.ckpt")
    path = root / "cascade.yaml"
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.diffusion.cascade.CascadePrior", "params": {"stages": [
        {"checkpoint": base, "sample": {"steps": 2, "guidance_scale": 2.0}},
        {"checkpoint": sr, "sample": {"steps": 2, "aug_level": 0.2}}]}}}))
    return path


def test_cascade_samples_base_then_super_resolution_with_per_stage_options(cascade_config):
    cascade, config = instantiate_from_checkpoint(cascade_config)
    assert config["data"]["params"]["train"]["params"]["size"] == 32  # the last stage's data (the base: 16)
    steps = []
    kw = dict(cond=[1, 2], sr_guidance_scale=1.5, callback=lambda info: steps.append((info["stage"], info["i"])))
    a = cascade.sample(2, generator=torch.Generator().manual_seed(0), **kw)
    b = cascade.sample(2, generator=torch.Generator().manual_seed(0), **kw)
    assert a.shape == (2, 1, 32, 32) and torch.equal(a, b)
    assert steps == [(0, 0), (0, 1), (1, 0), (1, 1)] * 2  # the config's 2 steps per stage, two runs
    options = {o.name: o for o in cascade.sampler_options.resolve(cascade)}
    assert options["guidance_scale"].default == 2.0 and options["sr_aug_level"].default == 0.2
    with pytest.raises(ValueError, match=r"sr_aug_level must be a number in \[0, 0.5\], got 0.7"):
        cascade.sample(1, cond=1, sr_aug_level=0.7)
    with pytest.raises(NotImplementedError, match="a cascade is trained stage by stage"):
        cascade.compute_loss(torch.zeros(1, 1, 32, 32), {})


def test_cascade_inpaints_through_every_stage(cascade_config):
    cascade, _ = instantiate_from_checkpoint(cascade_config)
    images = torch.rand(2, 1, 32, 32) * 2 - 1
    mask = torch.zeros(2, 1, 32, 32)
    mask[..., :16, :] = 1
    out = cascade.inpaint(images, mask, cond=[0, 5], generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape and torch.equal(out * mask, images * mask)
    assert not torch.equal(out, images)


def test_a_stage_whose_input_is_not_the_base_output_is_refused(tmp_path):
    base = save_checkpoint("ldm_pixel.yaml", tmp_path / "base.ckpt",
                           **{"model.params.first_stage_config.params.resolution": 8,
                              "model.params.unet_config.params.image_size": 8})
    sr = save_checkpoint("ldm_sr.yaml", tmp_path / "sr.ckpt")
    path = tmp_path / "cascade.yaml"
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.diffusion.cascade.CascadePrior", "params": {
        "stages": [{"checkpoint": base}, {"checkpoint": sr}]}}}))
    with pytest.raises(CheckpointError, match=r"stage 1 upsamples 1 x 16 x 16 images, but stage 0 outputs 1 x 8 x 8"):
        instantiate_from_checkpoint(path)
    path.write_text(yaml.safe_dump({"model": {"target": "ldm.diffusion.cascade.CascadePrior", "params": {
        "stages": [{"checkpoint": sr}, {"checkpoint": base}]}}}))
    with pytest.raises(CheckpointError, match=r"stage 1 \(.*base.ckpt\) is not a super-resolution stage"):
        instantiate_from_checkpoint(path)


def test_benchmark_pairs_each_cascade_step_with_its_own_stage_network(cascade_config, capsys, monkeypatch):
    import json

    from ldm.throughput import CallRecorder
    from tests.test_scripts import load

    benchmark = load("benchmark")
    stage_of = {}  # network -> its stage, in the cascade the benchmark builds
    replayed = []  # per replayed step: the stages whose networks it ran
    original_load, original_replay = benchmark.instantiate_from_checkpoint, CallRecorder.replay

    def load_and_note_stages(*args, **kwargs):
        prior, config = original_load(*args, **kwargs)
        stage_of.update({net: i for i, stage in enumerate(prior.stages) for net in stage.sampling_networks()})
        return prior, config

    def spy(self, calls):
        replayed.append(sorted({stage_of[module] for module, _, _ in calls}))
        return original_replay(self, calls)

    monkeypatch.setattr(benchmark, "instantiate_from_checkpoint", load_and_note_stages)
    monkeypatch.setattr(CallRecorder, "replay", spy)
    assert benchmark.main(["-r", str(cascade_config), "--batch", "2", "--repeats", "1"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["steps_run"] == 4 and result["paired_per_step"] and result["replayed_inputs"]
    # two steps of each stage per run (warm-up and one timed run), each replayed on its own stage's network only
    assert replayed == [[0], [0], [1], [1]] * 2

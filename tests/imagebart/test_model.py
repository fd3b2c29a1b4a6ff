"""The ImageBART prior: cached and uncached sampling agree, training fits a batch, vocabulary remapping, the
original's checkpoints load into the network of their scale, and the errors bad input gets."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from imagebart.model import CodeRemap
from ldm.checkpoint import CheckpointError
from ldm.util import ConfigError
from tests.toy import build_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "test"
CFG = CONFIGS / "imagebart.yaml"


def build(**overrides):
    return build_from_config(CFG, **overrides)


def batch(n=8):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1, "class_label": torch.arange(n) % 10}


@pytest.mark.parametrize("guidance", [1.0, 2.0])
def test_cached_and_uncached_sampling_give_the_same_samples(guidance):
    model = build().eval()
    for net in (model.model, model.top):  # off the zero-initialised scalors, so every part matters
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    model.sync_ema_buffers()
    kw = dict(cond=[1, 2, 3], use_ema=False, guidance_scale=guidance, temperature=1.0)
    cached = model.sample_latents(3, model.user_cond([1, 2, 3], 3), torch.Generator().manual_seed(4), ema=False,
                                  guidance_scale=guidance, use_cache=1)
    uncached = model.sample_latents(3, model.user_cond([1, 2, 3], 3), torch.Generator().manual_seed(4), ema=False,
                                    guidance_scale=guidance, use_cache=0)
    assert torch.equal(cached, uncached)
    assert model.sample(3, generator=torch.Generator().manual_seed(4), **kw).shape == (3, 1, 16, 16)


def test_callback_reports_scale_and_position():
    model = build().eval()
    seen = []
    model.sample(2, cond=[0, 1], callback=lambda d: seen.append((d["scale"], d["position"], d["i"])),
                 generator=torch.Generator().manual_seed(0))
    n = 64
    assert [s for s, _, _ in seen] == [2] * n + [1] * n
    assert [p for _, p, _ in seen] == list(range(n)) * 2 and [i for _, _, i in seen] == list(range(2 * n))


@pytest.mark.parametrize("use_cache,guidance", [(1, 1.0), (1, 2.0), (0, 1.0)])
def test_each_step_offers_its_network_evaluation_to_replay(use_cache, guidance, monkeypatch):
    """The callback's `replay` reruns the step's own evaluation (the same logits, from the same cache slot or
    prefix, the encoder on a scale's first step) and leaves the sampling unchanged (benchmark.py times it)."""
    from imagebart.transformer import DecoderOnly, EncoderDecoder

    model = build().eval()
    for net in (model.model, model.top):
        for p in net.parameters():
            torch.nn.init.normal_(p, std=0.3)
    model.sync_ema_buffers()
    logits = []  # every evaluation, in order: a step's and then its replay's

    def logged(name, original):
        def method(self, *args):
            out = original(self, *args)
            logits.append((name, out))
            return out
        return method

    for cls in (EncoderDecoder, DecoderOnly):
        for name in ("next_logits", "prefix_logits", "encode"):
            if hasattr(cls, name):
                monkeypatch.setattr(cls, name, logged(name, getattr(cls, name)))

    def run(replaying):
        logits.clear()
        cb = (lambda d: d["replay"]()) if replaying else None
        return model.sample_latents(3, model.user_cond([1, 2, 3], 3), torch.Generator().manual_seed(4), ema=False,
                                    guidance_scale=guidance, use_cache=use_cache, callback=cb)

    plain, plain_calls = run(False), list(logits)
    replayed = run(True)
    assert torch.equal(plain, replayed)
    steps = [c for c in plain_calls if c[0] != "encode"]
    evaluations = [c for c in logits if c[0] != "encode"]
    assert len(evaluations) == 2 * len(steps) == 2 * 2 * 64  # two scales of 64 tokens, each step replayed once
    for step, (first, again) in zip(steps, zip(evaluations[::2], evaluations[1::2])):
        assert first[0] == again[0] == step[0]
        torch.testing.assert_close(again[1], first[1], rtol=0, atol=0)
        torch.testing.assert_close(first[1], step[1], rtol=0, atol=0)
    encodes = sum(c[0] == "encode" for c in logits)
    assert encodes == 2 * sum(c[0] == "encode" for c in plain_calls) == 2  # the encoder scale's start, again


def test_training_fits_one_batch():
    """Steps on one batch with the same corruption draws bring the loss far down (the chain can be learnt)."""
    model = build(**{"model.params.cond_drop_prob": 0.0}).train()
    b = batch()
    latents, cond = model.get_latents(b), model.get_cond(b)
    opt = torch.optim.Adam(model.trained_parameters(), lr=3e-3)
    first = None
    for _ in range(150):
        loss, _ = model.compute_loss(latents, cond, generator=torch.Generator().manual_seed(0))
        opt.zero_grad()
        loss.backward()
        opt.step()
        first = first if first is not None else float(loss)
    assert float(loss) < 0.2 * first, (first, float(loss))


def test_single_scale_builds_and_trains_only_its_network():
    top = build(**{"model.params.single_scale": 2})
    assert top.network_names == ("top",) and not hasattr(top, "model")
    low = build(**{"model.params.single_scale": 1})
    assert low.network_names == ("model",) and not hasattr(low, "top")
    b = batch(4)
    _, logs = low.compute_loss(low.get_latents(b), low.get_cond(b))
    assert "loss_scale2" not in logs
    with pytest.raises(ValueError, match="scale 1 has no network here: this prior holds scale 2 only"):
        top.transition(1)


def test_remap_round_trip_and_unknown_codes():
    remap = CodeRemap(torch.tensor([3, 7, 1]), n_embed=8)
    ids = remap.to_prior(torch.tensor([[7, 1, 3]]))
    assert ids.tolist() == [[1, 2, 0]] and remap.to_first_stage(ids).tolist() == [[7, 1, 3]]
    unknown = remap.to_prior(torch.tensor([0, 2, 4, 5, 6] * 40), generator=torch.Generator().manual_seed(0))
    assert set(unknown.tolist()) == {0, 1, 2}  # a code out of use becomes a random one in use
    with pytest.raises(ValueError, match="remap must list distinct first-stage codes in 0..7"):
        CodeRemap(torch.tensor([3, 3]), n_embed=8)


def test_remapped_prior_models_the_codes_in_use(tmp_path):
    used = np.array([0, 2, 4, 6, 8, 10, 12, 14], dtype=np.int64)
    np.save(tmp_path / "used.npy", used)
    model = build(**{"model.params.remap": str(tmp_path / "used.npy"), "model.params.codebook_size": 8}).eval()
    tokens = model.sample_latents(2, model.user_cond([0, 1], 2), torch.Generator().manual_seed(0))
    assert tokens.max() < 8
    assert set(model.remap.to_first_stage(tokens).unique().tolist()) <= set(used.tolist())
    with pytest.raises(ConfigError, match="codebook_size: the remapped vocabulary has 8 codes but the prior is "
                                          "configured for 16"):
        build(**{"model.params.remap": str(tmp_path / "used.npy")})


def test_original_per_scale_checkpoints_load_into_their_network(tmp_path):
    """An original encoder-decoder checkpoint (`transformer.*`, with `transformer_ema.*` and the schedule
    buffers) fills `model`; an original minGPT one (`transformer.blocks.*`) fills `top`."""
    ref = build(**{"model.params.cond_drop_prob": 0.0})
    original = {f"transformer.{k}": v.clone() for k, v in ref.model.state_dict().items()}
    original["transformer.encoder.to_logits.weight"] = torch.zeros(16, 32)  # the original's unused head
    original.update({"alphacum": torch.zeros(3), "sos_token": torch.zeros(1, dtype=torch.long),
                     "transformer_ema.decay": torch.tensor(0.99)})
    path = tmp_path / "scale1.ckpt"
    torch.save({"state_dict": original}, path)
    low = build(**{"model.params.single_scale": 1, "model.params.ckpt_path": str(path),
                   "model.params.cond_drop_prob": 0.0})
    assert all(torch.equal(low.model.state_dict()[k], v) for k, v in ref.model.state_dict().items())
    gpt = {f"transformer.{k}": v.clone() for k, v in ref.top.state_dict().items()}
    gpt.update({f"transformer.blocks.{i}.attn.mask": torch.ones(1, 1, 65, 65) for i in range(1)})
    torch.save({"state_dict": gpt}, tmp_path / "scale2.ckpt")
    top = build(**{"model.params.single_scale": 2, "model.params.ckpt_path": str(tmp_path / "scale2.ckpt"),
                   "model.params.cond_drop_prob": 0.0})
    assert all(torch.equal(top.top.state_dict()[k], v) for k, v in ref.top.state_dict().items())
    with pytest.raises(ValueError, match="decoder-only \\(minGPT\\) last scale: configure top_config"):
        build(**{"model.params.top_config": None, "model.params.ckpt_path": str(tmp_path / "scale2.ckpt")})


def test_checkpoint_of_another_prior_is_refused(tmp_path):
    sundae = build_from_config(CONFIGS / "sundae.yaml")
    torch.save({"state_dict": sundae.state_dict()}, tmp_path / "sundae.ckpt")
    with pytest.raises(CheckpointError, match="holds another network than ImageBARTPrior's 'model'"):
        build(**{"model.params.ckpt_path": str(tmp_path / "sundae.ckpt")})


@pytest.mark.parametrize("overrides, message", [
    ({"model.params.schedule": {"kind": "alphacum", "alphacum": [1.0, 0.2, 0.5]}},
     "model.params.schedule: schedule is not monotone: A_2 = 0.5 after A_1 = 0.2"),
    ({"model.params.codebook_size": 32}, "codebook_size: the first stage's codebook has 16 codes but the prior is "
                                         "configured for 32"),
    ({"model.params.single_scale": 3}, "single_scale: must be a scale in 1..2, got 3"),
    ({"model.params.scale_weights": [1.0]}, "scale_weights: expected 2 non-negative weights"),
    ({"model.params.transformer_config.params.enc_num_tokens": 10},
     "enc_num_tokens=10 cannot hold the ids the network reads: codes 0..15, scales 1..2, classes 0..9; it must be >= 16"),
])
def test_bad_configs_are_refused_naming_the_setting(overrides, message):
    with pytest.raises((ConfigError, ValueError)) as e:
        build(**overrides)
    assert message in str(e.value)


def test_bad_sampling_input_is_refused():
    model = build().eval()
    with pytest.raises(ValueError, match=r"cond must be a class label or one per sample, in 0..9 \(or the null class "
                                         r"10\) for 2 samples, got \[0, 11\]"):
        model.sample(2, cond=[0, 11])
    with pytest.raises(ValueError, match=r"temperature must be a number or 2 numbers >= 0, got \(1, 1, 1\)"):
        model.sample(2, cond=[0, 1], temperature=[1.0, 1.0, 1.0])
    with pytest.raises(ValueError, match=re.escape("mask must have shape (B, 1, H, W) = (2, 1, 16, 16) or (B, H, W) = "
                                                   "(2, 16, 16) to match the images (2, 1, 16, 16), got (2, 1, 8, 8)")):
        model.inpaint(torch.zeros(2, 1, 16, 16), torch.ones(2, 1, 8, 8), cond=[0, 1])


def test_a_single_scale_checkpoint_logs_its_own_transition():
    model = build(**{"model.params.single_scale": 1}).eval()
    logs = model.log_images(batch(3), N=3)
    assert set(logs) == {"x_1", "samples_x_0", "x_0"} and all(v.shape == (3, 1, 16, 16) for v in logs.values())
    with pytest.raises(ValueError, match="scale 2 has no network here: this prior holds scale 1 only"):
        model.sample(1, cond=0)


def test_a_config_sample_defaults_are_the_defaults_and_a_call_overrides_them():
    """`sample_defaults: {temperature: [...]}` is what `sample` does unasked: the same samples as passing it, a call's
    own value wins, and the declared default (what evaluate.py records) says so; a bad one names the key."""
    defaults = {"temperature": [0.7, 1.0], "top_k": 8}
    model, plain = build(**{"model.params.sample_defaults": defaults}).eval(), build().eval()
    plain.load_state_dict(model.state_dict())
    draw = lambda m, **kw: m.sample(4, cond=[0, 1, 2, 3], generator=torch.Generator().manual_seed(1), **kw)  # noqa: E731
    assert torch.equal(draw(model), draw(plain, **defaults))
    assert torch.equal(draw(model, temperature=1.0, top_k=None), draw(plain))
    resolved = {o.name: o.default for o in model.sampler_options.resolve(model)}
    assert resolved["temperature"] == (0.7, 1.0) and resolved["top_k"] == (8, 8)
    with pytest.raises(ConfigError, match=r"sample_defaults: temperature must be a number or 2 numbers >= 0"):
        build(**{"model.params.sample_defaults": {"temperature": [1.0, 1.0, 1.0]}})

"""The benchmark's yardstick: the calls a sampler made to its networks, recorded and replayed bare."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.throughput import CallRecorder, classes_in_turn
from tests.toy import build_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "test"


def test_replayed_calls_are_the_calls_the_sampler_made():
    prior = build_from_config(CONFIGS / "absorbing.yaml").eval()
    outputs, evaluated = [], []
    nets = prior.sampling_networks()
    assert prior.network("model", ema=True) in nets and prior.network("model") in nets
    hooks = [net.register_forward_hook(lambda m, a, out: outputs.append(out.clone())) for net in nets]
    cond = classes_in_turn(prior, 6)
    with torch.no_grad(), CallRecorder(nets) as recorder:
        prior.sample_latents(6, cond, torch.Generator().manual_seed(0), steps=16,
                             callback=lambda info: evaluated.append(int(info.get("evaluated", 6))))
        calls = recorder.take()
        assert recorder.take() == []
    assert len(calls) == len(outputs) == sum(1 for e in evaluated if e)
    assert CallRecorder.rows(calls) == sum(evaluated) < 6 * 16  # unchanged rows were not evaluated again
    replayed = []
    with torch.no_grad():
        for module, args, kwargs in calls:
            replayed.append(module(*args, **kwargs))
    for h in hooks:
        h.remove()
    for a, b in zip(outputs, replayed):  # the same inputs give the same logits
        assert torch.equal(a, b)
    with CallRecorder(nets) as recorder:
        assert recorder.replay(calls) > 0 and recorder.take() == []  # a replay records nothing


def test_guidance_replays_the_doubled_batch():
    prior = build_from_config(CONFIGS / "ldm.yaml").eval()
    with torch.no_grad(), CallRecorder(prior.sampling_networks()) as recorder:
        prior.sample_latents(3, classes_in_turn(prior, 3), torch.Generator().manual_seed(0), steps=4,
                             guidance_scale=2.0)
        calls = recorder.take()
    assert len(calls) == 4 and CallRecorder.rows(calls) == 4 * 6

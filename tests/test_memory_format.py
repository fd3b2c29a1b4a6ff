"""`channels_last: true` stores a prior's convolutions (UNet, first stage) NHWC: the same numbers, other strides."""

from __future__ import annotations

from pathlib import Path

import torch

from ldm.throughput import classes_in_turn, random_latents
from tests.toy import build_from_config

CONFIGS = Path(__file__).resolve().parents[1] / "configs" / "test"


def test_channels_last_prior_computes_what_the_default_does():
    plain = build_from_config(CONFIGS / "ldm.yaml")
    nhwc = build_from_config(CONFIGS / "ldm.yaml", **{"model.params.channels_last": True})
    convs = [m.weight for m in nhwc.modules() if isinstance(m, torch.nn.Conv2d)]
    assert convs and all(w.is_contiguous(memory_format=torch.channels_last) for w in convs)
    assert not plain.model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)
    nhwc.load_state_dict(plain.state_dict())  # the values load; the strides stay NHWC
    assert nhwc.model.input_blocks[0][0].weight.is_contiguous(memory_format=torch.channels_last)

    latents = random_latents(plain, 4, torch.Generator().manual_seed(0))
    cond = classes_in_turn(plain, 4)
    losses = [p.compute_loss(latents, cond, generator=torch.Generator().manual_seed(1))[0] for p in (plain, nhwc)]
    torch.testing.assert_close(losses[0], losses[1], rtol=1e-5, atol=1e-6)
    samples = [p.sample_latents(4, cond, torch.Generator().manual_seed(2), steps=3) for p in (plain, nhwc)]
    torch.testing.assert_close(samples[0], samples[1], rtol=1e-4, atol=1e-5)
    images = [p.decode(s) for p, s in zip((plain, nhwc), samples)]
    torch.testing.assert_close(images[0], images[1], rtol=1e-4, atol=1e-5)

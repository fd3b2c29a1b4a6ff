"""The contract every prior keeps, run over each prior's tiny config (diffusers' common-test pattern).

A new prior passes by adding its config to PRIOR_CONFIGS.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import export_safetensors, load_into
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "test"
PRIOR_CONFIGS = ["absorbing.yaml"]


def build(name: str):
    torch.manual_seed(0)
    cfg = OmegaConf.load(CONFIGS / name)
    return instantiate_from_config(cfg.model, key="model"), cfg


def fake_batch(model, n=4):
    g = torch.Generator().manual_seed(0)
    res = model.first_stage_model.ddconfig["resolution"]
    c = model.first_stage_model.ddconfig["in_channels"]
    return {"image": torch.rand(n, c, res, res, generator=g) * 2 - 1, "class_label": torch.arange(n) % 10}


@pytest.fixture(params=PRIOR_CONFIGS, scope="module")
def prior(request):
    model, cfg = build(request.param)
    return model, cfg, request.param


def test_loss_is_finite_and_gradients_reach_every_parameter(prior):
    model, _, _ = prior
    model.train()
    batch = fake_batch(model)
    loss, logs = model.compute_loss(model.get_latents(batch), model.get_cond(batch))
    assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values())
    model.model.zero_grad()
    loss.backward()
    missing = [n for n, p in model.model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())]
    assert not missing, f"no gradient reaches {missing}"
    assert all(p.grad is None for p in model.first_stage_model.parameters())  # frozen


def test_sample_shape_dtype_range_and_determinism(prior):
    model, _, _ = prior
    model.eval()
    images = model.sample(3, cond=[1, 2, 3], generator=torch.Generator().manual_seed(0))
    res = model.first_stage_model.ddconfig["resolution"]
    assert images.shape == (3, model.first_stage_model.ddconfig["out_ch"], res, res)
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    again = model.sample(3, cond=[1, 2, 3], generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    other = model.sample(3, cond=[1, 2, 3], generator=torch.Generator().manual_seed(1))
    assert not torch.equal(images, other)


def test_checkpoint_round_trip(prior, tmp_path):
    model, _, name = prior
    model.eval()
    path = tmp_path / "prior.safetensors"
    export_safetensors(model.state_dict(), path)
    fresh, _ = build(name)
    from ldm.checkpoint import load_state_dict

    load_into(fresh, load_state_dict(path))
    fresh.eval()
    a = model.sample(2, cond=[4, 5], generator=torch.Generator().manual_seed(3))
    b = fresh.sample(2, cond=[4, 5], generator=torch.Generator().manual_seed(3))
    assert torch.equal(a, b)


def test_inpainting_keeps_the_known_region(prior):
    model, _, _ = prior
    model.eval()
    batch = fake_batch(model, 2)
    images = batch["image"]
    mask = torch.zeros(2, 1, *images.shape[2:])
    mask[..., : images.shape[2] // 2, :] = 1  # keep the top half
    out = model.inpaint(images, mask, cond=[0, 1], generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(out * mask, images * mask)  # known pixels are pasted back
    latents = model.encode(images)
    known = model.latent_mask(mask, images)
    assert known.any() and not known.all()
    filled = model.inpaint_latents(latents, known, torch.tensor([0, 1]), torch.Generator().manual_seed(0))
    assert torch.equal(filled[known], latents[known])


def test_bad_mask_shape_is_clear(prior):
    model, _, _ = prior
    images = fake_batch(model, 2)["image"]
    with pytest.raises(ValueError, match=r"mask must be \(B, 1, H, W\) or \(B, H, W\) matching images"):
        model.inpaint(images, torch.ones(2, 1, 5, 5))


def test_nll_is_finite_bits(prior):
    model, _, _ = prior
    model.eval()
    try:
        bits = model.nll(fake_batch(model, 2))
    except NotImplementedError:
        pytest.skip("this prior has no likelihood")
    assert bits.shape == (2,) and torch.isfinite(bits).all() and (bits > 0).all()

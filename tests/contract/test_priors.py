"""The contract every prior keeps, run over each prior's tiny config (diffusers' common-test pattern).

A new prior passes by adding its config to PRIOR_CONFIGS and, if its conditioning is not class
labels, a valid `cond` to `valid_cond`.
"""

from __future__ import annotations

import glob
import re
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import instantiate_from_checkpoint, read_checkpoint
from ldm.conditioning import Caption, ClassLabel
from ldm.train import main
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "test"
PRIOR_CONFIGS = ["absorbing.yaml", "sundae.yaml", "imagebart.yaml", "ldm.yaml", "ldm_text.yaml", "ldm_pixel.yaml",
                 "ldm_sr.yaml", "ldm_edm.yaml"]


def build(name: str, seed: int = 0):
    torch.manual_seed(seed)
    cfg = OmegaConf.load(CONFIGS / name)
    return instantiate_from_config(cfg.model, key="model"), cfg


def image_shape(model) -> tuple[int, int, int]:
    dd = model.first_stage_model.ddconfig
    return dd["in_channels"], dd["resolution"], dd["resolution"]


def fake_batch(model, n=4):
    g = torch.Generator().manual_seed(0)
    return {"image": torch.rand(n, *image_shape(model), generator=g) * 2 - 1, "class_label": torch.arange(n) % 10,
            "caption": [f"a photo of thing {i}" for i in range(n)]}


def valid_cond(model, n):
    if isinstance(model.conditioner, ClassLabel):
        return [i % model.num_classes for i in range(1, n + 1)]
    if isinstance(model.conditioner, Caption):
        return [f"a photo of a sandal, number {i}" for i in range(n)]
    return model.null_cond(n)


@pytest.fixture(params=PRIOR_CONFIGS, scope="module")
def prior(request):
    model, cfg = build(request.param)
    return model, cfg, request.param


def test_loss_is_finite_and_gradients_reach_every_parameter(prior):
    model, _, _ = prior
    model.train()
    batch = fake_batch(model)
    params = dict(model.named_parameters())
    trained = {id(p) for p in model.trained_parameters()}
    # a network whose blocks start as the identity (the UNet's zero-initialised output layers, as the original)
    # passes gradient everywhere from its third step on (the output layer, then each block's last layer, must
    # leave zero first): up to two SGD steps are taken before the check
    for _ in range(3):
        loss, logs = model.compute_loss(model.get_latents(batch), model.get_cond(batch))
        assert torch.isfinite(loss) and all(torch.isfinite(torch.as_tensor(v)).all() for v in logs.values())
        model.zero_grad()
        loss.backward()
        missing = [n for n, p in params.items() if id(p) in trained and (p.grad is None or not p.grad.any())]
        if not missing:
            break
        with torch.no_grad():
            for p in model.trained_parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad.sign()
    assert not missing, f"no gradient reaches {missing}"
    assert all(p.grad is None for p in model.first_stage_model.parameters())  # frozen
    # the trainable set is exactly the networks (+ a trainable conditioner): no EMA copy, no first stage
    assert {n for n, p in params.items() if p.requires_grad} == {n for n, p in params.items() if id(p) in trained}


def test_frozen_first_stage_is_built_without_its_training_loss(prior):
    model, cfg, _ = prior
    if getattr(model.first_stage_model, "pixel_space", False):  # the identity: nothing to train or store
        assert not list(model.first_stage_model.parameters())
        return
    assert "lossconfig" in cfg.model.params.first_stage_config.params  # the config names a loss ...
    assert isinstance(model.first_stage_model.loss, torch.nn.Identity)  # ... but none is built
    assert not [k for k in model.state_dict() if k.startswith("first_stage_model.loss.")]


def test_sample_shape_dtype_range_and_determinism(prior):
    model, _, _ = prior
    model.eval()
    cond = valid_cond(model, 3)
    images = model.sample(3, cond=cond, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, *image_shape(model))
    assert images.dtype == torch.float32 and images.min() >= -1 and images.max() <= 1
    again = model.sample(3, cond=cond, generator=torch.Generator().manual_seed(0))
    assert torch.equal(images, again)
    other = model.sample(3, cond=cond, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(images, other)


def test_sample_validates_cond_against_the_conditioner(prior):
    model, _, _ = prior
    if isinstance(model.conditioner, ClassLabel):
        k = model.num_classes
        with pytest.raises(ValueError, match=rf"cond must be a class label or one per sample, in 0..{k - 1}"):
            model.sample(2, cond=[0, k + 1])
        with pytest.raises(ValueError, match="cond must be a class label"):
            model.sample(2, cond=[0, 1, 2])  # 3 labels for 2 samples
    with pytest.raises(ValueError, match=r"cond must have the keys"):
        model.sample(2, cond={"not_a_key": torch.zeros(2)})
    with pytest.raises(ValueError, match="n must be >= 1"):
        model.sample(0)


def test_sampling_leaves_the_trained_weights_alone(prior):
    model, _, _ = prior
    before = {k: v.clone() for k, v in model.state_dict().items()}
    model.sample(2, cond=valid_cond(model, 2), generator=torch.Generator().manual_seed(0), use_ema=True)
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_ema_is_updated_once_per_optimizer_step(prior, tmp_path):
    """With gradient accumulation 2 over 4 batches there are 2 optimizer steps, hence 2 EMA updates."""
    _, _, name = prior
    model, cfg = build(name)
    ema = model.model_ema
    start = {k: v.clone() for k, v in ema.averaged.state_dict().items()}
    data = instantiate_from_config(cfg.data, key="data")
    trainer = pl.Trainer(accelerator="cpu", max_steps=2, accumulate_grad_batches=2, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                         default_root_dir=str(tmp_path))
    trainer.fit(model, datamodule=data)
    assert int(ema.num_updates) == 2 == trainer.global_step
    averaged = ema.averaged.state_dict()
    live = dict(model.model.named_parameters())
    moved = [k for k in start if not torch.equal(start[k], averaged[k])]
    assert moved, "the EMA copy never moved"
    assert any(not torch.equal(averaged[k], live[k]) for k in moved), "the EMA copy is the live network"


@pytest.mark.parametrize("name", PRIOR_CONFIGS)
def test_checkpoint_from_main_samples_with_its_ema_weights(name, tmp_path):
    """Train a few steps through main.py, reload into a model built with another seed, compare samples
    against an oracle network that holds the file's EMA tensors as its plain weights."""
    logroot = tmp_path / "logs"
    main(["--base", str(CONFIGS / name), "-t", "--no-test", "-l", str(logroot), "-n", "contract",
          "lightning.trainer.max_steps=3", "lightning.trainer.val_check_interval=3"])
    ckpt = glob.glob(str(logroot / "*" / "checkpoints" / "last.ckpt"))[0]
    stored = read_checkpoint(ckpt)["state_dict"]
    ema_keys = [k for k in stored if k.startswith("model_ema.") and k not in ("model_ema.decay", "model_ema.num_updates")]
    assert ema_keys and int(stored["model_ema.num_updates"]) == 3

    torch.manual_seed(1234)  # the loaded model starts from other random weights
    loaded, _ = instantiate_from_checkpoint(ckpt)
    oracle, _ = build(name, seed=99)
    names = oracle.network_names
    oracle_state = {k: v for k, v in stored.items() if not k.startswith(tuple(f"{n}." for n in names))}
    saved = set(oracle.state_dict())
    for net_name in names:
        net = getattr(oracle, net_name)
        for pname, _ in net.named_parameters():  # the file's EMA tensors as the oracle's live weights
            oracle_state[f"{net_name}.{pname}"] = stored[f"{net_name}_ema." + pname.replace(".", "")]
        for bname, buf in net.named_buffers():
            if f"{net_name}.{bname}" in saved:
                oracle_state[f"{net_name}.{bname}"] = stored.get(f"{net_name}.{bname}", buf)
    oracle.load_state_dict(oracle_state)
    oracle.eval()
    fresh, _ = build(name, seed=1234)
    fresh.eval()

    cond = valid_cond(loaded, 4)
    draw = dict(generator=torch.Generator().manual_seed(5))
    ema_samples = loaded.sample(4, cond=cond, **draw)
    assert torch.equal(ema_samples, oracle.sample(4, cond=cond, use_ema=False, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(ema_samples, fresh.sample(4, cond=cond, generator=torch.Generator().manual_seed(5)))
    live = {k: v for k, v in loaded.state_dict().items() if k.startswith("model.")}
    assert all(torch.equal(live[k], stored[k]) for k in live)  # the trained weights load too
    assert any((stored["model_ema." + k[6:].replace(".", "")] - stored[k]).abs().max() > 1e-6
               for k in live if "model_ema." + k[6:].replace(".", "") in stored)  # and differ from the EMA


def test_inpainting_keeps_the_known_region(prior):
    model, _, _ = prior
    model.eval()
    batch = fake_batch(model, 2)
    images = batch["image"]
    mask = torch.zeros(2, 1, *images.shape[2:])
    mask[..., : images.shape[2] // 2, :] = 1  # keep the top half
    cond = valid_cond(model, 2)
    out = model.inpaint(images, mask, cond=cond, generator=torch.Generator().manual_seed(0))
    assert out.shape == images.shape
    assert torch.equal(out * mask, images * mask)  # known pixels are pasted back
    latents = model.encode(images)
    known = model.latent_mask(mask, images)
    assert known.any() and not known.all()
    filled = model.inpaint_latents(latents, known, model.user_cond(cond, 2), torch.Generator().manual_seed(0))
    if latents.dim() == 4:  # continuous latents: the grid's mask holds for every channel
        known = known[:, None].expand_as(latents)
    assert torch.equal(filled[known], latents[known])


def test_bad_mask_shape_is_clear(prior):
    model, _, _ = prior
    images = fake_batch(model, 2)["image"]
    c, h, w = image_shape(model)
    with pytest.raises(ValueError, match=re.escape(f"mask must have shape (B, 1, H, W) = (2, 1, {h}, {w}) or (B, H, W) = "
                                                   f"(2, {h}, {w}) to match the images (2, {c}, {h}, {w}), got (2, 1, 5, 5)")):
        model.inpaint(images, torch.ones(2, 1, 5, 5))
    with pytest.raises(ValueError, match=re.escape("mask values must be in {0, 1} (bool or integers) or [0, 1] "
                                                   "(floats), 1 = keep, got uint8 values in [0, 255]")):
        model.inpaint(images, (torch.rand(2, h, w) > 0.5).to(torch.uint8) * 255)


def test_unknown_sampler_option_is_refused_naming_the_valid_ones(prior):
    model, _, _ = prior
    valid = ", ".join(model.sampler_options.names("sample")) or "none"
    with pytest.raises(ValueError, match=re.escape(f"{type(model).__name__}.sample has no option 'no_such_option'")
                       + ".*" + re.escape(f"valid options: {valid}")):
        model.sample(1, no_such_option=1)


def test_nll_is_finite_bits(prior):
    model, _, _ = prior
    model.eval()
    try:
        bits = model.nll(fake_batch(model, 2))
    except NotImplementedError:
        pytest.skip("this prior has no likelihood")
    assert bits.shape == (2,) and torch.isfinite(bits).all() and (bits > 0).all()

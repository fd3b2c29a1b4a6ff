"""VQModel / AutoencoderKL behaviour: overfitting, GAN start, checkpoint round trips and wrong kinds."""

from __future__ import annotations

import pytest
import torch

from ldm.checkpoint import CheckpointError, export_safetensors
from ldm.first_stage.losses import (
    LPIPS,
    NLayerDiscriminator,
    VQLPIPSWithDiscriminator,
    hinge_d_loss,
    vanilla_d_loss,
)
from ldm.first_stage.models import AutoencoderKL, VQModel
from ldm.util import ConfigError, instantiate_from_config

DD = dict(double_z=False, z_channels=4, resolution=16, in_channels=1, out_ch=1, ch=32, ch_mult=[1, 2],
          num_res_blocks=1, attn_resolutions=[], dropout=0.0)
DDK = dict(DD, double_z=True)


def vq_loss(disc_start=10**9):
    return {"target": "ldm.first_stage.losses.VQLPIPSWithDiscriminator",
            "params": {"disc_start": disc_start, "perceptual_weight": 0.0, "disc_in_channels": 1,
                       "disc_num_layers": 1, "disc_ndf": 8}}


def kl_loss(disc_start=10**9):
    return {"target": "ldm.first_stage.losses.LPIPSWithDiscriminator",
            "params": {"disc_start": disc_start, "perceptual_weight": 0.0, "kl_weight": 1e-6, "disc_in_channels": 1,
                       "disc_num_layers": 1, "disc_ndf": 8}}


def batch(n=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"image": torch.rand(n, 1, 16, 16, generator=g) * 2 - 1}


class Loop:
    """Drive `training_step` without a Trainer: the optimizers and global step it needs."""

    def __init__(self, model):
        self.model = model
        self.opts = model.configure_optimizers()
        self.step = 0
        model.optimizers = lambda: [_Wrapped(o) for o in self.opts]
        model.manual_backward = lambda loss: loss.backward()
        model.log = model.log_dict = lambda *a, **k: None
        type(model).global_step = property(lambda m: self.step)

    def run(self, b, n):
        for _ in range(n):
            self.model.training_step(b, 0)
            self.step += 1


class _Wrapped:
    def __init__(self, opt):
        self.optimizer = opt

    def zero_grad(self):
        self.optimizer.zero_grad()

    def step(self):
        self.optimizer.step()


@pytest.fixture(autouse=True)
def restore_global_step():
    saved = {cls: cls.__dict__.get("global_step") for cls in (VQModel, AutoencoderKL)}
    yield
    for cls, prop in saved.items():
        if prop is None and "global_step" in cls.__dict__:
            delattr(cls, "global_step")


@pytest.mark.slow  # 60 optimiser steps of a conv autoencoder: tens of seconds on two cores
@pytest.mark.parametrize("kind", ["vq", "kl"])
def test_overfits_one_batch(kind):
    torch.manual_seed(0)
    model = (VQModel(DD, vq_loss(), n_embed=32, embed_dim=4, init_from_data=True) if kind == "vq"
             else AutoencoderKL(DDK, kl_loss(), embed_dim=4))
    model.learning_rate = 2e-3
    b = batch()
    with torch.no_grad():
        before = (model(b["image"])[0] - b["image"]).abs().mean()
    Loop(model).run(b, 60)
    with torch.no_grad():
        after = (model(b["image"])[0] - b["image"]).abs().mean()
    assert after < 0.5 * before, (before, after)


def test_discriminator_trains_only_after_disc_start():
    torch.manual_seed(0)
    model = VQModel(DD, vq_loss(disc_start=3), n_embed=16, embed_dim=4)
    model.learning_rate = 1e-3
    loop = Loop(model)
    d0 = [p.clone() for p in model.loss.discriminator.parameters()]
    loop.run(batch(), 3)  # steps 0, 1, 2: before disc_start
    assert all(torch.equal(a, b) for a, b in zip(d0, model.loss.discriminator.parameters()))
    loop.run(batch(), 1)
    assert not all(torch.equal(a, b) for a, b in zip(d0, model.loss.discriminator.parameters()))


@pytest.mark.parametrize("fmt", ["ckpt", "safetensors"])
def test_checkpoint_round_trip(tmp_path, fmt):
    torch.manual_seed(0)
    model = VQModel(DD, vq_loss(), n_embed=16, embed_dim=4, use_ema=True).eval()
    path = tmp_path / f"vq.{fmt}"
    if fmt == "ckpt":
        torch.save({"state_dict": model.state_dict()}, path)
    else:
        export_safetensors(model.state_dict(), path)
    torch.manual_seed(1)
    loaded = VQModel(DD, vq_loss(), n_embed=16, embed_dim=4, use_ema=True, ckpt_path=str(path)).eval()
    x = batch()["image"]
    with torch.no_grad():
        assert torch.equal(model.encode_to_indices(x), loaded.encode_to_indices(x))
        torch.testing.assert_close(model(x)[0], loaded(x)[0])
    assert "model_ema.num_updates" in loaded.state_dict()
    assert "reconstructions_ema" in loaded.log_images(batch(), N=2)


def test_wrong_kind_and_missing_checkpoints_are_clear(tmp_path):
    kl = AutoencoderKL(DDK, kl_loss(), embed_dim=4)
    vq = VQModel(DD, vq_loss(), n_embed=16, embed_dim=4)
    torch.save({"state_dict": kl.state_dict()}, tmp_path / "kl.ckpt")
    torch.save({"state_dict": vq.state_dict()}, tmp_path / "vq.ckpt")
    with pytest.raises(CheckpointError, match="is an AutoencoderKL \\(KL first stage\\) checkpoint, not a VQModel"):
        VQModel(DD, vq_loss(), n_embed=16, embed_dim=4, ckpt_path=str(tmp_path / "kl.ckpt"))
    with pytest.raises(CheckpointError, match="is a VQModel \\(VQ first stage\\) checkpoint, not an AutoencoderKL"):
        AutoencoderKL(DDK, kl_loss(), embed_dim=4, ckpt_path=str(tmp_path / "vq.ckpt"))
    with pytest.raises(CheckpointError, match="checkpoint not found: .*nope.ckpt"):
        VQModel(DD, vq_loss(), n_embed=16, embed_dim=4, ckpt_path=str(tmp_path / "nope.ckpt"))
    with pytest.raises(CheckpointError, match="shape mismatch"):
        VQModel(DD, vq_loss(), n_embed=32, embed_dim=4, ckpt_path=str(tmp_path / "vq.ckpt"))


def test_misspelt_loss_parameter_names_the_key():
    cfg = {"target": "ldm.first_stage.models.VQModel",
           "params": {"ddconfig": DD, "n_embed": 16, "embed_dim": 4,
                      "lossconfig": {"target": "ldm.first_stage.losses.VQLPIPSWithDiscriminator",
                                     "params": {"disc_strat": 0, "perceptual_weight": 0.0}}}}
    with pytest.raises(ConfigError) as e:
        instantiate_from_config(cfg, key="model")
    assert e.value.key == "model.params.lossconfig.params"
    assert "does not accept 'disc_strat' (did you mean 'disc_start'?)" in str(e.value)


def test_interface_shapes():
    vq = VQModel(DD, vq_loss(), n_embed=16, embed_dim=4).eval()
    kl = AutoencoderKL(DDK, kl_loss(), embed_dim=4).eval()
    x = batch(2)["image"]
    assert vq.latent_kind == "tokens" and vq.n_embed == 16 and vq.latent_shape() == (8, 8)
    assert vq.encode_to_latent(x).shape == (2, 8, 8) and vq.encode_to_latent(x).dtype == torch.long
    assert kl.latent_kind == "continuous" and kl.encode_to_latent(x).shape == (2, 4, 8, 8)
    assert kl.decode_latent(kl.encode_to_latent(x)).shape == x.shape
    hwc = {"image": x.permute(0, 2, 3, 1)}  # the anchors' layout
    assert torch.equal(vq.get_input(hwc), x)


def test_discriminator_matches_taming():
    taming_disc = pytest.importorskip("taming.modules.discriminator.model")
    torch.manual_seed(0)
    ref = taming_disc.NLayerDiscriminator(input_nc=3, ndf=16, n_layers=3).eval()
    ours = NLayerDiscriminator(3, 16, 3).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x))


def test_gan_losses_closed_form():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # hinge: 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake))) = 0.5 * (0.25 + 0.75)
    assert hinge_d_loss(real, fake).item() == pytest.approx(0.5)
    sp = torch.nn.functional.softplus
    expected = 0.5 * (sp(-real).mean() + sp(fake).mean())
    assert vanilla_d_loss(real, fake).item() == pytest.approx(expected.item())


def test_perceptual_loss_without_weights_says_how_to_disable(monkeypatch):
    import torchvision.models

    def offline(*args, **kwargs):
        raise OSError("no network")

    monkeypatch.setattr(torchvision.models, "vgg16", offline)
    with pytest.raises(RuntimeError, match="perceptual_weight: 0"):
        LPIPS()
    with pytest.raises(RuntimeError, match="VGG16"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=1.0)
    VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0)  # never touches VGG


def test_bad_loss_modes_are_clear():
    with pytest.raises(ValueError, match="disc_loss must be one of hinge, vanilla; got 'hinje'"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, disc_loss="hinje")
    with pytest.raises(ValueError, match="unknown DiffAugment policy 'colour'"):
        VQLPIPSWithDiscriminator(disc_start=0, perceptual_weight=0.0, diffaug_policy="colour,translation")

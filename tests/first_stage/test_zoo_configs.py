"""The latent-diffusion model-zoo first-stage configs: their architecture values are the anchor's, and our
pieces built from them have the same parameter names, shapes and counts as taming-transformers' modules
(so the released checkpoints load). Built from the pieces, without `ldm.first_stage.models`."""

from __future__ import annotations

import importlib
import inspect
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from torch import nn

from ldm.first_stage.modules import Decoder, Encoder
from ldm.first_stage.quantize import VectorQuantizer

taming_model = pytest.importorskip("taming.modules.diffusionmodules.model")
taming_quantize = pytest.importorskip("taming.modules.vqvae.quantize")

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "first_stage"

# CompVis/latent-diffusion@a506df5 models/first_stage_models/<name>/config.yaml:
# (embed_dim, n_embed, ch_mult, attn_resolutions, loss params); all have z_channels = embed_dim,
# ch 128, num_res_blocks 2, resolution 256, in/out 3 channels, dropout 0, base_learning_rate 4.5e-6.
KL_LOSS = {"disc_start": 50001, "kl_weight": 1.0e-6, "disc_weight": 0.5}
ANCHOR = {
    "vq-f4": (3, 8192, [1, 2, 4], [], {"disc_conditional": False, "disc_in_channels": 3, "disc_start": 0,
                                       "disc_weight": 0.75, "codebook_weight": 1.0}),
    "vq-f8": (4, 16384, [1, 2, 2, 4], [32], {"disc_conditional": False, "disc_in_channels": 3, "disc_num_layers": 2,
                                             "disc_start": 1, "disc_weight": 0.6, "codebook_weight": 1.0}),
    "vq-f16": (8, 16384, [1, 1, 2, 2, 4], [16], {"disc_conditional": False, "disc_in_channels": 3,
                                                 "disc_start": 250001, "disc_weight": 0.75, "disc_num_layers": 2,
                                                 "codebook_weight": 1.0}),
    "kl-f4": (3, None, [1, 2, 4], [], KL_LOSS),
    "kl-f8": (4, None, [1, 2, 4, 4], [], KL_LOSS),
    "kl-f16": (16, None, [1, 1, 2, 2, 4], [16], KL_LOSS),
    "kl-f32": (64, None, [1, 1, 2, 2, 4, 4], [16, 8], KL_LOSS),
}


def load(name: str):
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=False)["model"]


def first_stage(params: dict, encoder_cls, decoder_cls, quantizer_cls) -> nn.Module:
    """The inference part of VQModel / AutoencoderKL, with the anchors' attribute names."""
    dd, e = params["ddconfig"], params["embed_dim"]
    z, kl = dd["z_channels"], dd["double_z"]
    m = nn.Module()
    m.encoder, m.decoder = encoder_cls(**dd), decoder_cls(**dd)
    m.quant_conv = nn.Conv2d(2 * z if kl else z, 2 * e if kl else e, 1)
    m.post_quant_conv = nn.Conv2d(e, z, 1)
    if not kl:
        m.quantize = quantizer_cls(params["n_embed"], e)
    return m


def layout(m: nn.Module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in m.state_dict().items()}


@pytest.mark.parametrize("name", list(ANCHOR))
def test_zoo_config_is_the_anchors(name):
    model = load(name)
    embed_dim, n_embed, ch_mult, attn, loss_params = ANCHOR[name]
    kind = "VQModel" if n_embed else "AutoencoderKL"
    assert model["target"] == f"ldm.first_stage.models.{kind}"
    assert model["base_learning_rate"] == 4.5e-6
    p = model["params"]
    assert p["embed_dim"] == embed_dim and p.get("n_embed") == n_embed
    assert p["ddconfig"] == dict(double_z=n_embed is None, z_channels=embed_dim, resolution=256, in_channels=3,
                                 out_ch=3, ch=128, ch_mult=ch_mult, num_res_blocks=2, attn_resolutions=attn,
                                 dropout=0.0)
    loss = p["lossconfig"]
    assert loss["target"] == "ldm.first_stage.losses." + ("VQLPIPSWithDiscriminator" if n_embed
                                                           else "LPIPSWithDiscriminator")
    assert loss["params"] == loss_params


@pytest.mark.parametrize("name", list(ANCHOR))
def test_loss_params_are_accepted(name):
    """Every lossconfig parameter is a constructor argument of our loss (checked without building it)."""
    target = load(name)["params"]["lossconfig"]
    module, cls = target["target"].rsplit(".", 1)
    sig = inspect.signature(getattr(importlib.import_module(module), cls))
    assert set(target["params"]) <= set(sig.parameters), set(target["params"]) - set(sig.parameters)


@pytest.mark.parametrize("name", list(ANCHOR))
def test_zoo_layout_and_count_match_taming(name):
    params = load(name)["params"]
    with torch.device("meta"):  # full size, no memory or init cost
        ours = first_stage(params, Encoder, Decoder, VectorQuantizer)
        ref = first_stage(params, taming_model.Encoder, taming_model.Decoder,
                          lambda n, e: taming_quantize.VectorQuantizer2(n, e, beta=0.25))
    assert layout(ours) == layout(ref)
    assert list(ours.state_dict()) == list(ref.state_dict())  # same order too
    count = sum(p.numel() for p in ours.parameters())
    assert count == sum(p.numel() for p in ref.parameters())
    if name == "kl-f8":
        assert count == 83_653_863  # the well-known size of this autoencoder (also Stable Diffusion's VAE)

"""latent-diffusion's AutoencoderKL state dict loads into ours with no missing or unexpected keys, and
reproduces the stored posterior and decodings."""

from __future__ import annotations

import json

import torch
from safetensors.torch import load_file

from ldm.checkpoint import load_into, load_state_dict
from ldm.first_stage.distributions import DiagonalGaussianDistribution
from ldm.first_stage.models import AutoencoderKL
from tests.fixture_paths import fixture_dir

NO_GAN = {"target": "ldm.first_stage.losses.LPIPSWithDiscriminator",
          "params": {"disc_start": 10**9, "perceptual_weight": 0.0}}


def test_autoencoder_kl_fixture():
    root = fixture_dir("latent-diffusion", "autoencoder_kl")
    kwargs = json.loads((root / "config.json").read_text())["init_kwargs"]
    model = AutoencoderKL(kwargs["ddconfig"], NO_GAN, embed_dim=kwargs["embed_dim"]).eval()
    state = load_state_dict(root)
    assert len(state) == 124
    load_into(model, state, source="autoencoder_kl fixture", allow_missing=("loss.",))  # strict otherwise
    io = load_file(str(root / "io.safetensors"))
    tol = dict(atol=1e-5, rtol=1e-4)
    with torch.no_grad():
        h = model.encoder(io["x"])
        torch.testing.assert_close(h, io["encoder_out"], **tol)
        torch.testing.assert_close(model.quant_conv(h), io["moments"], **tol)
        post = model.encode(io["x"])
        for name in ("mean", "logvar", "std", "var"):
            torch.testing.assert_close(getattr(post, name), io[f"posterior_{name}"], **tol)
        torch.testing.assert_close(post.kl(), io["kl"], atol=1e-3, rtol=1e-4)
        torch.testing.assert_close(model.decode(post.mode()), io["decode_mean"], **tol)
        z = post.mean + post.std * io["eps"]
        torch.testing.assert_close(z, io["z_sample"], **tol)
        torch.testing.assert_close(model.decode(z), io["decode_z_sample"], **tol)


def test_posterior_sample_uses_generator():
    params = torch.randn(2, 8, 4, 4)
    a = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(1))
    b = DiagonalGaussianDistribution(params).sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b)
    assert torch.equal(DiagonalGaussianDistribution(params, deterministic=True).kl(), torch.zeros(2))

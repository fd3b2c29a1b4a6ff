"""The one first-stage interface the priors and the cache use: kinds, `encode_for_prior`, `decode_latent`,
`latent_shape`, with no caller asking which model it holds."""

from __future__ import annotations

import pytest
import torch

from ldm.first_stage.models import AutoencoderKL, VQModel

DD = {"double_z": False, "z_channels": 4, "resolution": 16, "in_channels": 1, "out_ch": 1, "ch": 32,
      "ch_mult": [1, 2], "num_res_blocks": 1, "attn_resolutions": [], "dropout": 0.0}
IDENTITY = {"target": "torch.nn.Identity"}


@pytest.fixture(scope="module")
def models():
    torch.manual_seed(0)
    vq = VQModel(DD, IDENTITY, n_embed=16, embed_dim=3).eval()
    kl = AutoencoderKL({**DD, "double_z": True}, IDENTITY, embed_dim=3).eval()
    x = torch.rand(2, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    return vq, kl, x


def test_kinds_and_shapes(models):
    vq, kl, _ = models
    assert VQModel.latent_kinds == ("tokens", "continuous") and vq.latent_kind == "tokens"
    assert AutoencoderKL.latent_kinds == ("continuous",) and kl.latent_kind == "continuous"
    assert vq.latent_shape() == (8, 8) and vq.latent_shape(kind="tokens") == (8, 8)
    assert vq.latent_shape(kind="continuous") == (3, 8, 8) and vq.latent_shape(32, "continuous") == (3, 16, 16)
    assert kl.latent_shape() == (3, 8, 8)
    with pytest.raises(ValueError, match=r"AutoencoderKL offers latents of kind 'continuous', not 'tokens'"):
        kl.latent_shape(kind="tokens")
    with pytest.raises(ValueError, match=r"VQModel offers latents of kind 'tokens' or 'continuous', not 'pixels'"):
        vq.encode_for_prior(torch.zeros(1, 1, 16, 16), "pixels")


@torch.no_grad()
def test_vq_tokens_and_continuous(models):
    vq, _, x = models
    tokens = vq.encode_for_prior(x)
    assert set(tokens) == {"tokens"} and tokens["tokens"].dtype == torch.long and tokens["tokens"].shape == (2, 8, 8)
    assert torch.equal(tokens["tokens"], vq.encode_to_latent(x))
    z = vq.encode_for_prior(x, "continuous")
    assert set(z) == {"latent"} and z["latent"].shape == (2, 3, 8, 8)
    torch.testing.assert_close(z["latent"], vq.quant_conv(vq.encoder(x)))
    reconstruction = vq(x)[0]  # encoder -> nearest codes -> decoder
    torch.testing.assert_close(vq.decode_latent(z["latent"], "continuous"), reconstruction)
    torch.testing.assert_close(vq.decode_latent(tokens["tokens"]), reconstruction)


@torch.no_grad()
def test_decoding_a_continuous_latent_never_updates_the_codebook(models):
    _, _, x = models
    vq = VQModel(DD, IDENTITY, n_embed=16, embed_dim=3, ema_update=True, restart_dead_codes=True,
                 init_from_data=True).train()
    before = vq.quantize.embedding.weight.clone()
    vq.decode_latent(vq.encode_for_prior(x, "continuous")["latent"], "continuous")
    assert torch.equal(before, vq.quantize.embedding.weight) and vq.quantize.training


@torch.no_grad()
def test_kl_posterior(models):
    _, kl, x = models
    out = kl.encode_for_prior(x)
    assert set(out) == {"posterior_mean", "posterior_logvar"}
    posterior = kl.encode(x)
    torch.testing.assert_close(out["posterior_mean"], posterior.mean)
    torch.testing.assert_close(out["posterior_logvar"], posterior.logvar)
    assert out["posterior_mean"].shape == out["posterior_logvar"].shape == (2, 3, 8, 8)
    raw = torch.chunk(kl.quant_conv(kl.encoder(x)), 2, dim=1)[1]
    torch.testing.assert_close(out["posterior_logvar"], raw.clamp(-30.0, 20.0))
    torch.testing.assert_close(kl.decode_latent(out["posterior_mean"]), kl.decode(kl.encode_to_latent(x)))

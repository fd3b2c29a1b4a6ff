"""latent-diffusion's AutoencoderKL fixture (README section 2): its state dict loads into our Encoder,
Decoder and 1x1 convs, laid out as `AutoencoderKL`, with no missing or unexpected keys, and every stored
tensor is reproduced. Built from the pieces, so this test does not depend on `ldm.first_stage.models`."""

from __future__ import annotations

import json
import math

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from ldm.checkpoint import load_state_dict
from ldm.first_stage.distributions import DiagonalGaussianDistribution
from ldm.first_stage.modules import Decoder, Encoder
from tests.fixture_paths import fixture_dir

TOL = dict(atol=1e-5, rtol=1e-4)


class KLPieces(nn.Module):
    """The inference part of latent-diffusion's AutoencoderKL, with its attribute names."""

    def __init__(self, ddconfig: dict, embed_dim: int):
        super().__init__()
        self.encoder = Encoder(**ddconfig)
        self.decoder = Decoder(**ddconfig)
        z = ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))


@pytest.fixture(scope="module")
def fixture():
    root = fixture_dir("latent-diffusion", "autoencoder_kl")
    config = json.loads((root / "config.json").read_text())
    kwargs = config["init_kwargs"]
    torch.manual_seed(0)
    model = KLPieces(kwargs["ddconfig"], kwargs["embed_dim"]).eval()
    state = load_state_dict(root)  # merges the shards
    return model, state, config, load_file(str(root / "io.safetensors"))


def test_state_dict_layout_and_strict_load(fixture):
    model, state, config, _ = fixture
    layout = [(k, tuple(shape)) for k, shape, _ in config["state_dict_layout"]]
    assert len(state) == len(layout) == 124
    ours = [(k, tuple(v.shape)) for k, v in model.state_dict().items()]
    assert ours == layout  # same names, shapes and order as the original AutoencoderKL.state_dict()
    result = model.load_state_dict(state, strict=True)
    assert not result.missing_keys and not result.unexpected_keys


def test_outputs_match_fixture(fixture):
    model, state, _, io = fixture
    model.load_state_dict(state, strict=True)
    with torch.no_grad():
        h = model.encoder(io["x"])
        torch.testing.assert_close(h, io["encoder_out"], **TOL)
        torch.testing.assert_close(model.quant_conv(h), io["moments"], **TOL)
        post = model.encode(io["x"])
        for name in ("mean", "logvar", "std", "var"):
            torch.testing.assert_close(getattr(post, name), io[f"posterior_{name}"], **TOL)
        torch.testing.assert_close(post.kl(), io["kl"], **TOL)
        torch.testing.assert_close(model.decode(post.mean), io["decode_mean"], **TOL)
        torch.testing.assert_close(model.decode(post.mode()), io["decode_mean"], **TOL)
        z = post.mean + post.std * io["eps"]
        torch.testing.assert_close(z, io["z_sample"], **TOL)
        torch.testing.assert_close(model.decode(z), io["decode_z_sample"], **TOL)


def test_posterior_sampling_kl_and_nll():
    g = torch.Generator().manual_seed(0)
    params = torch.randn(2, 8, 4, 4, generator=g)
    params[:, 4:] = params[:, 4:].clamp(-3, 3)
    post = DiagonalGaussianDistribution(params)
    a = post.sample(torch.Generator().manual_seed(1))
    b = post.sample(torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and a.shape == (2, 4, 4, 4)
    eps = torch.randn(2, 4, 4, 4, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, post.mean + post.std * eps)
    # against itself the KL is zero; against N(0, I) given explicitly it equals kl()
    torch.testing.assert_close(post.kl(post), torch.zeros(2), atol=1e-5, rtol=0)
    std_normal = DiagonalGaussianDistribution(torch.zeros(2, 8, 4, 4))
    torch.testing.assert_close(post.kl(std_normal), post.kl(), **TOL)
    # nll = -log N(x; mean, var) summed, checked against torch.distributions
    x = torch.randn(2, 4, 4, 4, generator=g)
    ref = -torch.distributions.Normal(post.mean, post.std).log_prob(x).sum(dim=[1, 2, 3])
    torch.testing.assert_close(post.nll(x), ref, **TOL)
    assert math.isclose(float(post.nll(x, dims=[0, 1, 2, 3])), float(ref.sum()), rel_tol=1e-5)


def test_clamping_and_deterministic():
    params = torch.zeros(1, 2, 1, 1)
    params[0, 1] = 100.0
    assert float(DiagonalGaussianDistribution(params).logvar) == 20.0
    params[0, 1] = -100.0
    assert float(DiagonalGaussianDistribution(params).logvar) == -30.0
    det = DiagonalGaussianDistribution(torch.randn(3, 8, 2, 2), deterministic=True)
    assert torch.equal(det.sample(), det.mean) and torch.equal(det.kl(), torch.zeros(3))
    assert torch.equal(det.nll(det.mean), torch.zeros(3))
    with pytest.raises(ValueError, match="mean and log-variance on dim 1"):
        DiagonalGaussianDistribution(torch.zeros(1, 3, 2, 2))

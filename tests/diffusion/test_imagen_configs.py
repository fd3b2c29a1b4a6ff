"""Imagen's cascade (configs/imagen/) builds on the meta device with the parameter counts derived here.

Where the expected numbers come from: `closed_form` counts latent-diffusion's UNet layout from the configuration
alone (convolution, norm and linear shapes; no module of ldm.nn.unet is used), extended by the Efficient U-Net
options. The paper's figures (Saharia et al. 2022, Section 4.1: a 2B base model, 600M and 400M super-resolution
models; Appendix F for their configurations) are approximate and their architectures differ from this layout in
the attention (Imagen concatenates the text to the self-attention's keys and values; latent-diffusion's
transformer block adds a cross-attention and a feed-forward), so they are compared, not equated:
- base64: 3,306,049,027; the same UNet with self-attention blocks and no text (ADM's layout, which the paper
  adapts) counts 2,097,572,867, the paper's 2B to within 5%;
- sr64_256: 656,562,819, the paper's 600M to within 10% (the text attention sits only in the middle block);
- sr256_1024: the same UNet (Appendix F.3: "the same configuration" without self-attention, which the
  transformer block cannot drop), 657M against the paper's 400M, a gap the published configuration does not
  explain (two self-attention layers at 1024 channels hold about 8M).
The frozen text encoder is google/t5-v1_1-xxl's, built from its shape (ldm.nn.hf_text.T5_V1_1) on the meta
device: 4,762,310,656 parameters (the paper's "T5-XXL (4.6B parameters)", Section 4.4)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf

from ldm.checkpoint import _without_ckpt_paths
from ldm.util import instantiate_from_config

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "imagen"
EXPECTED = {"base64": 3_306_049_027, "sr64_256": 656_562_819, "sr256_1024": 656_562_819}
T5_XXL_ENCODER = 4_762_310_656


def load(name: str) -> dict:
    return OmegaConf.to_container(OmegaConf.load(CONFIGS / f"{name}.yaml"), resolve=True)


def count(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def closed_form(p: dict) -> int:
    """The UNet's parameters from its configuration (2-d convolutions, GroupNorm affine, biased linears)."""
    conv = lambda i, o, k=3: i * o * k * k + o  # noqa: E731
    lin = lambda i, o: i * o + o  # noqa: E731
    norm = lambda c: 2 * c  # noqa: E731
    mc, ted, ctx = p["model_channels"], 4 * p["model_channels"], p.get("context_dim")
    ss = p.get("use_scale_shift_norm", False)
    levels = len(p["channel_mult"])
    blocks = p["num_res_blocks"] if isinstance(p["num_res_blocks"], list) else [p["num_res_blocks"]] * levels
    efficient, updown = p.get("efficient_updown", False), p.get("resblock_updown", False)

    def res(i, o):
        return norm(i) + conv(i, o) + lin(ted, (2 if ss else 1) * o) + norm(o) + conv(o, o) + (conv(i, o, 1) if i != o else 0)

    def attention(c):
        if not p.get("use_spatial_transformer"):  # ADM's block: 1x1 qkv and output projections
            return norm(c) + conv(c, 3 * c, 1) + conv(c, c, 1)
        d = c  # heads x channels per head = the width in these configurations
        block = (3 * d * d + lin(d, d)) + (d * d + 2 * ctx * d + lin(d, d)) + lin(d, 8 * d) + lin(4 * d, d) + 3 * 2 * d
        return norm(c) + conv(c, d, 1) + block + conv(d, c, 1)

    def resample(c):
        return res(c, c) if updown else conv(c, c)

    total = conv(p["in_channels"], mc) + lin(mc, ted) + lin(ted, ted)
    total += (lin(mc, ted) + lin(ted, ted)) if p.get("aug_level_conditioning") else 0
    total += lin(ctx, ted) if p.get("pooled_context") else 0
    chans, ch, ds = [mc], mc, 1
    for level, mult in enumerate(p["channel_mult"]):
        if efficient:
            total, ds = total + resample(ch), ds * 2
            chans.append(ch)
        for _ in range(blocks[level]):
            total += res(ch, mult * mc) + (attention(mult * mc) if ds in p["attention_resolutions"] else 0)
            ch = mult * mc
            chans.append(ch)
        if not efficient and level != levels - 1:
            total, ds = total + resample(ch), ds * 2
            chans.append(ch)
    total += 2 * res(ch, ch) + attention(ch)
    for level in reversed(range(levels)):
        out = p["channel_mult"][level] * mc
        for i in range(blocks[level] + 1):
            total += res(ch + chans.pop(), out) + (attention(out) if ds in p["attention_resolutions"] else 0)
            ch = out
            if (level or efficient) and i == blocks[level]:
                total, ds = total + resample(ch), ds // 2
    if efficient:
        total += res(ch + chans.pop(), mc)
    return total + norm(mc) + conv(mc, p["out_channels"])


def build_unet(params: dict):
    with torch.device("meta"):
        return instantiate_from_config({"target": "ldm.nn.unet.UNetModel", "params": params}, key="unet_config")


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stage_unets_have_the_derived_parameter_counts(name):
    unet_config = load(name)["model"]["params"]["unet_config"]
    assert unet_config["target"] == "ldm.nn.unet.UNetModel"
    params = unet_config["params"]
    assert params["context_dim"] == 4096  # T5-XXL's width
    unet = build_unet(params)
    assert count(unet) == closed_form(params) == EXPECTED[name]
    print(f"{name}: {count(unet):,} UNet parameters")


def test_counts_against_the_papers_figures():
    base = load("base64")["model"]["params"]["unet_config"]["params"]
    adm = {k: v for k, v in base.items() if k not in ("use_spatial_transformer", "context_dim", "legacy",
                                                      "pooled_context")}
    assert count(build_unet(adm)) == closed_form(adm) == 2_097_572_867
    assert abs(closed_form(adm) / 2e9 - 1) < 0.05  # "a 2B parameter model" (Section 4.1)
    assert abs(EXPECTED["sr64_256"] / 600e6 - 1) < 0.10  # "600M" (Section 4.1)
    sr256, sr1024 = (load(n)["model"]["params"]["unet_config"]["params"] for n in ("sr64_256", "sr256_1024"))
    assert sr256 == sr1024  # Appendix F.3: the 64 -> 256 configuration (see the module docstring for the 400M)


def test_efficient_unet_options_are_on_only_where_imagen_uses_them():
    base, sr = (load(n)["model"]["params"]["unet_config"]["params"] for n in ("base64", "sr64_256"))
    assert not base.get("efficient_updown") and not base.get("scale_skip_connection") and base["pooled_context"]
    assert sr["efficient_updown"] and sr["scale_skip_connection"] and sr["num_res_blocks"] == [2, 4, 8, 8]
    assert sr["aug_level_conditioning"] and sr["in_channels"] == 6  # the image and its upsampled input


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_stages_build_with_the_frozen_t5_xxl_encoder(name):
    cfg = load(name)
    if cfg["model"]["target"].startswith("ldm.diffusion.cascade."):
        pytest.importorskip("ldm.diffusion.cascade", reason="the super-resolution stage's prior is not here yet")
    with torch.device("meta"):
        prior = instantiate_from_config(_without_ckpt_paths(cfg["model"]), key="model")
    assert count(prior.model) == EXPECTED[name]
    assert count(prior.cond_stage_model) == T5_XXL_ENCODER and prior.cond_stage_model.dim == 4096
    assert prior.latent_shape == ((3, 64, 64) if name == "base64" else (3, 256, 256))

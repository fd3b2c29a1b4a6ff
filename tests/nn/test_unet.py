"""The latent-diffusion UNet: the original's state dicts (class-conditional and cross-attention,
`../shared/fixtures/latent-diffusion/unet_*`) load with no missing or unexpected keys and give its outputs."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file

from ldm.checkpoint import read_checkpoint
from ldm.nn.unet import UNetModel, timestep_embedding
from tests.fixture_paths import fixture_dir


def fixture(name):
    root = fixture_dir("latent-diffusion", name)
    config = json.loads((root / "config.json").read_text())
    state = read_checkpoint(root / "state_dict.safetensors.index.json")
    return config, state, load_file(str(root / "io.safetensors")), load_file(str(root / "intermediates.safetensors"))


@pytest.mark.parametrize("name", ["unet_classcond", "unet_crossattn"])
def test_original_weights_give_the_original_outputs(name):
    config, state, io, inter = fixture(name)
    net = UNetModel(**config["init_kwargs"]).eval()
    assert [k for k, _, _ in config["state_dict_layout"]] == list(net.state_dict())  # names and order
    net.load_state_dict(state, strict=True)
    torch.testing.assert_close(timestep_embedding(io["timesteps"], 32), io["t_emb"], atol=1e-6, rtol=1e-6)
    with torch.no_grad():
        if "y" in io:
            out = net(io["x"], io["timesteps"], y=io["y"])
        else:
            out = net(io["x"], io["timesteps"], context=io["context"])
        emb = net.time_embed(io["t_emb"])
    torch.testing.assert_close(emb, inter["emb_time_only"], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(out, io["out"], atol=1e-5, rtol=1e-4)
    print(f"{name}: {sum(p.numel() for p in net.parameters()):,} parameters, max abs diff "
          f"{(out - io['out']).abs().max():.2e}")


def test_new_attention_order_splits_heads_after_qkv():
    """The two head splits agree when there is one head, and differ with several (the option matters)."""
    from ldm.nn.unet import AttentionBlock

    torch.manual_seed(0)
    x = torch.randn(2, 32, 4, 4)
    one_legacy, one_new = AttentionBlock(32, num_heads=1), AttentionBlock(32, num_heads=1, use_new_attention_order=True)
    one_new.load_state_dict(one_legacy.state_dict())
    for block in (one_legacy, one_new):
        torch.nn.init.normal_(block.proj_out.weight)
    one_new.load_state_dict(one_legacy.state_dict())
    torch.testing.assert_close(one_legacy(x), one_new(x))
    four_legacy, four_new = AttentionBlock(32, num_heads=4), AttentionBlock(32, num_heads=4, use_new_attention_order=True)
    torch.nn.init.normal_(four_legacy.proj_out.weight)
    four_new.load_state_dict(four_legacy.state_dict())
    assert not torch.allclose(four_legacy(x), four_new(x))

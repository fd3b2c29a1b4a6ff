"""Denoisers: the paper's transformer reproduces the original logits; ours conditions as documented."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from absorbing.unleashing import UnleashingTransformer
from ldm.checkpoint import load_into, load_state_dict
from ldm.nn.transformer import TokenTransformer
from tests.fixture_paths import fixture_dir


def test_original_denoiser_logits():
    root = fixture_dir("unleashing-transformers", "absorbing_transformer")
    net = UnleashingTransformer(vocab_size=16, seq_len=16, n_embd=32, n_head=4, n_layer=2).eval()
    load_into(net, load_state_dict(root / "state_dict.safetensors"), source="unleashing fixture")
    io = load_file(str(root / "io.safetensors"))
    with torch.no_grad():
        torch.testing.assert_close(net(io["idx"]), io["logits"], atol=1e-5, rtol=1e-4)
        # the loss replay's logits come from the same network
        for s in ("random", "fixed"):
            torch.testing.assert_close(net(io[f"{s}/x_t"]), io[f"{s}/x_0_hat_logits"], atol=1e-5, rtol=1e-4)


def test_token_transformer_conditioning():
    torch.manual_seed(0)
    net = TokenTransformer(vocab_size=8, seq_len=6, dim=32, depth=1, heads=2, num_classes=3,
                           time_conditioning=True, num_timesteps=10).eval()
    x = torch.randint(0, 9, (4, 6))
    t = torch.tensor([1, 2, 3, 10])
    out = net(x, t, torch.tensor([0, 1, 2, 0]))
    assert out.shape == (4, 6, 8)
    assert not torch.allclose(out, net(x, t, torch.tensor([1, 1, 2, 0])))  # class matters
    assert not torch.allclose(out, net(x, t - 1, torch.tensor([0, 1, 2, 0])))  # so does t
    null = net(x, t, None)  # the null class is used when no label is given
    torch.testing.assert_close(null, net(x, t, torch.full((4,), 3)))
    with pytest.raises(ValueError, match="needs t"):
        net(x, None, None)
    with pytest.raises(ValueError, match="longer than the trained 6"):
        net(torch.zeros(1, 7, dtype=torch.long), t[:1])


def test_paper_parameter_count_matches_the_original_layout():
    import json

    from absorbing.unleashing import paper_parameter_count

    root = fixture_dir("unleashing-transformers", "absorbing_transformer")
    layout = json.loads((root / "config.json").read_text())["state_dict_layout"]
    original = sum(torch.Size(shape).numel() for _, shape, _ in layout)
    assert paper_parameter_count(16, 16, 32, 2) == original

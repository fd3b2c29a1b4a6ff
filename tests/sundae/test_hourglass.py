"""The hourglass network: the original's logits from its own weights, shapes at every nesting, the 2-D
patches, the rotary modes, and the errors a bad configuration gets."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file

from ldm.util import ConfigError
from sundae.hourglass import (
    Hourglass,
    HourglassTransformer,
    Level,
    LinearDownsample,
    LinearUpsample,
    convert_original_state_dict,
    group,
    original_parameter_count,
    parse_depth,
    ungroup,
)
from tests.fixture_paths import fixture_dir


def original_fixture():
    root = fixture_dir("sundae-vqgan", "hourglass_lm")
    config = json.loads((root / "config.json").read_text())
    return config, load_file(str(root / "state_dict.safetensors")), load_file(str(root / "io.safetensors"))


def fixture_network(config, conditional=True):
    kw = config["init_kwargs"]
    return HourglassTransformer(
        kw["num_tokens"], (4, 4), dim=kw["dim"], depth=kw["depth"], shorten_factor=kw["shorten_factor"],
        heads=kw["heads"], dim_head=config["implicit_defaults"]["dim_head"], rotary_mode="original",
        resample_groups="raster", num_classes=kw["num_classes"] if conditional else None).eval()


def test_original_weights_give_the_original_logits():
    """sundae-vqgan's HourglassTransformerLM (vvvm23/sundae-vqgan b6c713b): its state dict, converted, and
    its inputs give its logits, conditional and (through the null class) unconditional."""
    config, state, io = original_fixture()
    assert {k: tuple(shape) for k, shape, _ in config["state_dict_layout"]} == {k: tuple(v.shape) for k, v in state.items()}
    net = fixture_network(config)
    net.load_state_dict(convert_original_state_dict(state, net), strict=True)
    with torch.no_grad():
        cond = net(io["x"], io["c"])
        null = net(io["x"], None)  # the null class: a zero embedding, the original without class_emb
    print(f"max abs diff: conditional {(cond - io['logits_cond']).abs().max():.2e}, "
          f"unconditional {(null - io['logits_uncond']).abs().max():.2e}")
    torch.testing.assert_close(cond, io["logits_cond"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(null, io["logits_uncond"], atol=1e-5, rtol=1e-5)

    # the same weights without the original's quirks give other logits: the options matter
    for quirk in ({"rotary_mode": "per_head"}, {"resample_groups": "patch"}):
        other = HourglassTransformer(16, (4, 4), dim=32, depth=[2, 2, 2], heads=4, num_classes=10,
                                     **{"rotary_mode": "original", "resample_groups": "raster", **quirk}).eval()
        other.load_state_dict(convert_original_state_dict(state, other))
        with torch.no_grad():
            assert (other(io["x"], io["c"]) - io["logits_cond"]).abs().max() > 1e-3


def test_original_parameter_count_formula_matches_the_original_layout():
    """The count computed from the architecture equals the tensors the original code stored (340,096 with
    its frozen rotary frequencies), and ours differs from it by exactly what the layouts differ by."""
    config, state, _ = original_fixture()
    kw = config["init_kwargs"]
    stored = sum(v.numel() for v in state.values())
    assert stored == 340_096
    count = original_parameter_count(kw["num_tokens"], kw["max_seq_len"], kw["dim"], kw["depth"], heads=kw["heads"],
                                     num_classes=kw["num_classes"], shorten_factor=kw["shorten_factor"])
    assert count == stored
    net = fixture_network(config)
    freqs = sum(v.numel() for k, v in state.items() if k.endswith("rotary_pos_emb.freqs"))  # buffers here
    assert sum(p.numel() for p in net.parameters()) == stored - freqs + kw["dim"]  # + the null class row


@pytest.mark.parametrize("kw", [
    dict(depth=[1, [2], 1], shorten_factor=4),
    dict(depth=[1, [1, [1], 1], 1], shorten_factor=[4, 4], attn_resampling=False),
    dict(depth=[1, 1, 1], shorten_factor=4, rotary=False, num_classes=3),
    dict(depth=[3], shorten_factor=4, rotary_emb_dim=4),
])
def test_formula_counts_our_network_in_the_original_layout(kw):
    """For other shapes too: our parameters + our rotary buffers + the original's unused resampling
    frequencies - our null class row = the formula."""
    net = HourglassTransformer(16, (8, 8), dim=16, heads=2, dim_head=8, **kw)
    ours = sum(p.numel() for p in net.parameters()) + sum(b.numel() for b in net.buffers())
    spec = parse_depth(kw["depth"])
    n_levels, level = 0, spec
    while isinstance(level, Level):
        n_levels, level = n_levels + 1, level.valley
    rd = kw.get("rotary_emb_dim", 4) if kw.get("rotary", True) else 0
    unused = 2 * n_levels * (rd // 2) if kw.get("attn_resampling", True) else 0
    null_row = 16 if kw.get("num_classes") else 0
    args = {k: v for k, v in kw.items() if k in ("shorten_factor", "rotary", "rotary_emb_dim", "attn_resampling",
                                                 "num_classes")}
    assert ours + unused - null_row == original_parameter_count(16, 64, 16, kw["depth"], heads=2, dim_head=8, **args)


@pytest.mark.parametrize("depth,factors,grids", [
    ([2, [4], 2], 4, [(8, 8), (4, 4)]),
    ([1, [1, [2], 1], 1], [4, 4], [(8, 8), (4, 4), (2, 2)]),
    ([1, 2, 1], [[2, 4]], [(8, 8), (4, 2)]),
    ([3], 4, [(8, 8)]),
    (2, 4, [(8, 8)]),
])
def test_shapes_at_every_nesting(depth, factors, grids):
    torch.manual_seed(0)
    net = HourglassTransformer(11, (8, 8), dim=16, depth=depth, shorten_factor=factors, heads=2, dim_head=8,
                               num_classes=4)
    assert net.grids == grids
    x = torch.randint(0, 11, (3, 64))
    logits = net(x, torch.tensor([0, 3, 4]))  # 4: the null class
    assert logits.shape == (3, 64, 11) and torch.isfinite(logits).all()
    logits.sum().backward()
    assert all(p.grad is not None for p in net.parameters())


def test_linear_shortening_merges_2d_patches_and_splits_them_back():
    """Token (i, j) of the 4x4 map goes into merged token (i // 2, j // 2), and back."""
    down, up = LinearDownsample(1, (2, 2)), LinearUpsample(1, (2, 2))
    with torch.no_grad():
        down.proj.weight.copy_(torch.tensor([[1.0, 10.0, 100.0, 1000.0]]))
        down.proj.bias.zero_()
    grid = torch.arange(16.0).view(1, 16, 1)  # raster order: value = 4 i + j
    merged = down(grid, (4, 4))  # (1, 4, 1)
    # patch (0, 0) holds 0, 1, 4, 5 in the order (kh, kw): 0 + 10 + 400 + 5000
    assert merged.flatten().tolist() == [5410.0, 7632.0, 14298.0, 16520.0]
    with torch.no_grad():
        up.proj.weight.copy_(torch.tensor([[1.0], [2.0], [3.0], [4.0]]))
        up.proj.bias.zero_()
    split = up(torch.tensor([[[1.0], [10.0], [100.0], [1000.0]]]), (4, 4)).view(4, 4)
    assert split.tolist() == [[1, 2, 10, 20], [3, 4, 30, 40], [100, 200, 1000, 2000], [300, 400, 3000, 4000]]


def test_resampling_groups_patches_or_raster_runs():
    x = torch.arange(16.0).view(1, 16, 1)
    patches = group(x, (4, 4), (2, 2), "patch")[..., 0]
    assert patches[0].tolist() == [0, 1, 4, 5] and patches[3].tolist() == [10, 11, 14, 15]
    raster = group(x, (4, 4), (2, 2), "raster")[..., 0]
    assert raster[0].tolist() == [0, 1, 2, 3]  # the original: consecutive tokens, not the merged patch
    for how in ("patch", "raster"):
        assert torch.equal(ungroup(group(x, (4, 4), (2, 2), how), 1, (4, 4), (2, 2), how), x)


def _rotated_features(mode):
    """Which query features the positions move: (heads * dim_head,) bool."""
    from sundae import hourglass

    torch.manual_seed(0)
    net = HourglassTransformer(5, (4, 4), dim=8, depth=[1], heads=4, dim_head=8, rotary_mode=mode)
    captured = {}
    original = hourglass.attention

    def spy(q, k, v, **kw):
        captured["q"] = q
        return original(q, k, v, **kw)

    hourglass.attention = spy
    try:
        x = torch.zeros(1, 16, dtype=torch.long)  # the same token everywhere: only positions differ
        net(x)
    finally:
        hourglass.attention = original
    q = captured["q"][0]  # (H, N, dh): identical rows but for the rotation
    return (q - q[:, :1]).abs().amax(1) > 1e-6  # (H, dh)


def test_rotary_turns_every_head_by_default_and_head_0_only_in_the_original_mode():
    per_head = _rotated_features("per_head")
    assert per_head.all()  # rotary_emb_dim = dim_head / 2 per axis: every feature of every head
    original = _rotated_features("original")
    assert original[0].all() and not original[1:].any()  # 2 x 4 features of the concatenated heads: head 0


def test_bad_configurations_name_their_setting():
    with pytest.raises(ConfigError, match=re.escape("shorten_factor: the 6x6 token map (36 tokens) at level 1 does not "
                                                    "divide into 4x4 patches (shorten factor 16)")):
        HourglassTransformer(8, (6, 6), dim=8, depth=[1, 1, 1], shorten_factor=16)
    with pytest.raises(ConfigError, match=r"shorten_factor: the 2x2 token map .* at level 2 does not divide"):
        HourglassTransformer(8, (4, 4), dim=8, depth=[1, [1, [1], 1], 1], shorten_factor=[4, 9])
    with pytest.raises(ConfigError, match=r"shorten_factor: 2 tokens do not form a square patch"):
        HourglassTransformer(8, (4, 4), dim=8, depth=[1, 1, 1], shorten_factor=2)
    with pytest.raises(ConfigError, match=r"shorten_factor: give one factor for every level or a list of 2"):
        HourglassTransformer(8, (8, 8), dim=8, depth=[1, [1, 1, 1], 1], shorten_factor=[4])
    with pytest.raises(ConfigError, match=r"depth: a list has 1 or 3 entries, found 2"):
        HourglassTransformer(8, (8, 8), dim=8, depth=[1, 2])
    with pytest.raises(ConfigError, match=r"rotary_emb_dim: 2 x 8 rotated features .* do not fit in 8 \(dim_head\)"):
        HourglassTransformer(8, (4, 4), dim=8, depth=[1], dim_head=8, rotary_emb_dim=8)
    net = HourglassTransformer(8, (4, 4), dim=8, depth=[1, 1, 1], heads=2, dim_head=4, num_classes=3)
    with pytest.raises(ValueError, match=re.escape("class labels must be in 0..2 (or 3, the null class; "
                                                   "num_classes=3), got [1, 7]")):
        net(torch.zeros(2, 16, dtype=torch.long), torch.tensor([1, 7]))
    with pytest.raises(ValueError, match=r"built for a 4x4 token map \(16 tokens\), got sequences of 12"):
        net(torch.zeros(2, 12, dtype=torch.long))


def test_nested_levels_are_hourglasses():
    net = HourglassTransformer(8, (8, 8), dim=8, depth=[1, [2, [3], 2], 1], shorten_factor=4, heads=2, dim_head=4)
    assert isinstance(net.body, Hourglass) and isinstance(net.body.valley, Hourglass)
    assert len(net.body.valley.valley.layers) == 3 and len(net.body.valley.pre.layers) == 2
    assert net.body.valley.grid == (4, 4)

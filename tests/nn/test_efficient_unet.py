"""Imagen's Efficient U-Net options on latent-diffusion's UNet (Saharia et al. 2022, Appendix B.1): off, the
original modules and names; on, each changes what it says and nothing else."""

from __future__ import annotations

import pytest
import torch

from ldm.nn.unet import Downsample, ResBlock, UNetModel, Upsample, masked_mean, timestep_embedding
from ldm.util import ConfigError, instantiate_from_config

TINY = dict(image_size=16, in_channels=3, out_channels=3, model_channels=32, channel_mult=(1, 2),
            num_res_blocks=1, attention_resolutions=(2,), num_heads=2)


def randomized(net: UNetModel, seed: int = 0) -> UNetModel:
    """Every parameter drawn at random: the zero-initialised output layers would hide what the skips carry."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return net.eval()


def inputs(b: int = 2, size: int = 16):
    g = torch.Generator().manual_seed(1)
    return torch.randn(b, 3, size, size, generator=g), torch.tensor([3, 700][:b])


def test_defaults_keep_the_original_modules_and_names():
    """The options off, and a per-level list equal to the number, give the original layout (so checkpoints load)."""
    plain = UNetModel(**TINY)
    explicit = UNetModel(**{**TINY, "num_res_blocks": [1, 1]}, scale_skip_connection=False, efficient_updown=False,
                         pooled_context=False)
    assert list(plain.state_dict()) == list(explicit.state_dict())
    assert [tuple(v.shape) for v in plain.state_dict().values()] == [tuple(v.shape) for v in explicit.state_dict().values()]
    randomized(plain)
    explicit.load_state_dict(plain.state_dict())
    x, t = inputs()
    with torch.no_grad():
        assert torch.equal(plain(x, t), explicit.eval()(x, t))


def resblocks_by_level(blocks: torch.nn.ModuleList) -> list[int]:
    """The ResBlocks (not up/down-sampling ones) of each block, as a list of their output widths."""
    return [m.out_layers[-1].out_channels for b in blocks for m in b if isinstance(m, ResBlock) and not m.updown]


def test_per_level_block_counts():
    net = UNetModel(**{**TINY, "channel_mult": (1, 2, 2), "num_res_blocks": [1, 3, 2]})
    assert resblocks_by_level(net.input_blocks) == [32] + [64] * 3 + [64] * 2
    assert resblocks_by_level(net.output_blocks) == [64] * 3 + [64] * 4 + [32] * 2  # one more per level going up
    x, t = inputs()
    assert net(x, t).shape == x.shape


def test_scaled_skips_are_the_skips_times_one_over_sqrt_two():
    net = randomized(UNetModel(**TINY, scale_skip_connection=True))
    x, t = inputs()
    with torch.no_grad():
        emb = net.time_embed(timestep_embedding(t, 32))
        hs, h = [], x
        for block in net.input_blocks:
            h = block(h, emb)
            hs.append(h)
        h = net.middle_block(h, emb)
        for block in net.output_blocks:
            h = block(torch.cat([h, hs.pop() / 2 ** 0.5], 1), emb)
        manual = net.out(h)
        torch.testing.assert_close(net(x, t), manual, atol=1e-6, rtol=1e-6)
        unscaled = UNetModel(**TINY)
        unscaled.load_state_dict(net.state_dict())  # the same parameters: the option adds none
        assert not torch.allclose(unscaled.eval()(x, t), manual, atol=1e-3)


def test_efficient_order_downsamples_first_and_upsamples_last():
    net = UNetModel(**TINY, efficient_updown=True)
    assert isinstance(net.input_blocks[1][0], Downsample)  # right after the input convolution
    assert isinstance(net.output_blocks[-2][-1], Upsample)  # the last level ends by going back up
    sizes: list[tuple[int, int]] = []
    for m in net.modules():
        if isinstance(m, ResBlock):
            m.register_forward_hook(lambda mod, args, out: sizes.append((out.shape[-1], out.shape[1])))
    x, t = inputs()
    assert net(x, t).shape == x.shape
    # down: level 0 at 8 (not 16), level 1 at 4; middle at 4; up: 4, 4 then 8, 8; the input conv's skip at 16
    assert sizes == [(8, 32), (4, 64), (4, 64), (4, 64), (4, 64), (4, 64), (8, 32), (8, 32), (16, 32)]
    plain_sizes = []
    plain = UNetModel(**TINY)
    for m in plain.modules():
        if isinstance(m, ResBlock):
            m.register_forward_hook(lambda mod, args, out: plain_sizes.append(out.shape[-1]))
    plain(x, t)
    assert plain_sizes == [16, 8, 8, 8, 8, 8, 16, 16]  # the original: level 0 at full resolution
    updown = UNetModel(**TINY, efficient_updown=True, resblock_updown=True)
    assert updown(x, t).shape == x.shape and updown.input_blocks[1][0].updown


def test_pooled_context_adds_the_masked_mean_of_the_tokens():
    kw = dict(TINY, use_spatial_transformer=True, context_dim=8)
    net = randomized(UNetModel(**kw, pooled_context=True))
    assert net.pooled_context_embed.in_features == 8 and net.pooled_context_embed.out_features == 128
    g = torch.Generator().manual_seed(2)
    context, mask = torch.randn(2, 5, 8, generator=g), torch.tensor([[1, 1, 1, 0, 0], [1, 0, 0, 0, 0]]).bool()
    torch.testing.assert_close(masked_mean(context, mask), torch.stack([context[0, :3].mean(0), context[1, 0]]))
    assert torch.equal(masked_mean(context, torch.zeros_like(mask)), torch.zeros(2, 8))  # the null text
    x, t = inputs()
    with torch.no_grad():
        out = net(x, t, context=context, context_mask=mask)
        padded = context.masked_fill(~mask[..., None], 100.0)  # what the padding holds changes nothing
        torch.testing.assert_close(net(x, t, context=padded, context_mask=mask), out)
        unpooled = UNetModel(**kw)
        unpooled.load_state_dict({k: v for k, v in net.state_dict().items() if "pooled_context" not in k})
        assert not torch.allclose(unpooled.eval()(x, t, context=context, context_mask=mask), out, atol=1e-3)
    with pytest.raises(ValueError, match="a UNet with pooled_context needs context"):
        net(x, t)


def test_bad_option_values_name_the_problem():
    with pytest.raises(ValueError, match=r"num_res_blocks has 3 entries \[2, 4, 8\] but channel_mult has 2 levels: "
                                         r"give one block count per level"):
        UNetModel(**{**TINY, "num_res_blocks": [2, 4, 8]})
    with pytest.raises(ValueError, match=r"num_res_blocks must be integers >= 1, got \[2, 0\]"):
        UNetModel(**{**TINY, "num_res_blocks": [2, 0]})
    with pytest.raises(ValueError, match="pooled_context needs context_dim"):
        UNetModel(**TINY, pooled_context=True)
    with pytest.raises(ConfigError, match=r"unet_config\.params\.num_res_blocks: expected"):
        instantiate_from_config({"target": "ldm.nn.unet.UNetModel",
                                 "params": {**TINY, "num_res_blocks": [1, -1]}}, key="unet_config")
    with pytest.raises(ConfigError, match=r"unet_config\.params\.efficient_updown"):
        instantiate_from_config({"target": "ldm.nn.unet.UNetModel",
                                 "params": {**TINY, "efficient_updown": "yes"}}, key="unet_config")


def test_all_options_together_fit_one_batch():
    """A tiny Efficient U-Net with every option on learns to predict the noise of one batch."""
    torch.manual_seed(0)
    net = UNetModel(**{**TINY, "num_res_blocks": [1, 2]}, scale_skip_connection=True, efficient_updown=True,
                    use_spatial_transformer=True, context_dim=8, pooled_context=True, aug_level_conditioning=True)
    g = torch.Generator().manual_seed(3)
    x0, noise = torch.randn(4, 3, 16, 16, generator=g), torch.randn(4, 3, 16, 16, generator=g)
    context, mask = torch.randn(4, 5, 8, generator=g), torch.ones(4, 5, dtype=torch.bool)
    t, level = torch.tensor([10, 200, 500, 900]), torch.tensor([0.0, 0.1, 0.2, 0.3])
    a = torch.cos(t / 1000 * torch.pi / 2).view(-1, 1, 1, 1)
    xt = a * x0 + (1 - a**2).sqrt() * noise
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    losses = []
    for _ in range(40):
        loss = (net(xt, t, context=context, context_mask=mask, aug_level=level) - noise).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses[::8]

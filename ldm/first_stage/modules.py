"""Convolutional encoder and decoder of the VQGAN / KL autoencoders (Esser et al. 2021, Rombach et al. 2022).

Parameter names and shapes equal those of taming-transformers' and latent-diffusion's
`Encoder`/`Decoder` (`ldm/modules/diffusionmodules/model.py`), so their checkpoints load
unchanged. Both classes take the same `ddconfig` dict: each accepts the other's keys and ignores them.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.attention import attention
from ldm.util import Fraction, NonNegativeInt, PositiveInt

# ddconfig keys the anchors pass to both classes that one of them does not use.
_ANCHOR_KEYS = frozenset({"ch", "out_ch", "ch_mult", "num_res_blocks", "attn_resolutions", "dropout",
                          "resamp_with_conv", "in_channels", "resolution", "z_channels", "double_z",
                          "give_pre_end", "tanh_out", "use_linear_attn", "attn_type", "use_timestep"})
ATTN_TYPES = ("vanilla", "none")


def Normalize(channels: int) -> nn.GroupNorm:  # noqa: N802 - the anchors' name, kept for readers
    """GroupNorm with 32 groups and eps 1e-6, as everywhere in the anchors' autoencoders."""
    return nn.GroupNorm(num_groups=32, num_channels=channels, eps=1e-6, affine=True)


def nonlinearity(x: torch.Tensor) -> torch.Tensor:
    """Swish, x * sigmoid(x)."""
    return F.silu(x)


def _check_extra_keys(cls: str, extra: dict[str, Any]) -> None:
    unknown = sorted(set(extra) - _ANCHOR_KEYS)
    if unknown:
        warnings.warn(f"{cls} ignores unknown ddconfig keys {unknown}; accepted keys are {sorted(_ANCHOR_KEYS)}",
                      stacklevel=3)


def _attn_kind(attn_type: str, use_linear_attn: bool) -> str:
    """The anchors' `make_attn` choices that keep their layout: 'vanilla' (AttnBlock) or 'none'."""
    if use_linear_attn:
        attn_type = "linear"
    if attn_type not in ATTN_TYPES:
        raise ValueError(f"attn_type must be one of {', '.join(ATTN_TYPES)}; got {attn_type!r} "
                         "(latent-diffusion's linear attention is not implemented)")
    return attn_type


def make_attn(channels: int, attn_type: str = "vanilla") -> nn.Module:
    """Single-head spatial attention, or an identity for `attn_type='none'` (no parameters)."""
    return AttnBlock(channels) if attn_type == "vanilla" else nn.Identity()


class Upsample(nn.Module):
    """Nearest-neighbour x2, then (with_conv) a 3x3 conv: (B, C, H, W) -> (B, C, 2H, 2W)."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2.0, mode="nearest")  # (B, C, 2H, 2W)
        return self.conv(x) if self.with_conv else x


class Downsample(nn.Module):
    """(B, C, H, W) -> (B, C, H/2, W/2): pad right and bottom by one, then a stride-2 3x3 conv
    (the anchors' asymmetric padding); without a conv, 2x2 average pooling."""

    def __init__(self, in_channels: int, with_conv: bool):
        super().__init__()
        self.with_conv = with_conv
        if with_conv:
            self.conv = nn.Conv2d(in_channels, in_channels, kernel_size=3, stride=2, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.with_conv:
            return self.conv(F.pad(x, (0, 1, 0, 1), mode="constant", value=0.0))  # (B, C, H/2, W/2)
        return F.avg_pool2d(x, kernel_size=2, stride=2)


class ResnetBlock(nn.Module):
    """Pre-activation residual block: GN-swish-conv3x3 twice; a 1x1 `nin_shortcut` (or a 3x3
    `conv_shortcut`) when the channel count changes. (B, C_in, H, W) -> (B, C_out, H, W).

    `temb_channels` > 0 adds the timestep projection of the anchors' diffusion `Model`; the
    autoencoders use 0 (taming's default is 512, but its Encoder/Decoder always pass 0).
    """

    def __init__(self, *, in_channels: int, out_channels: int | None = None, conv_shortcut: bool = False,
                 dropout: float = 0.0, temb_channels: int = 0):
        super().__init__()
        out_channels = in_channels if out_channels is None else out_channels
        self.in_channels, self.out_channels = in_channels, out_channels
        self.use_conv_shortcut = conv_shortcut
        self.norm1 = Normalize(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if temb_channels > 0:
            self.temb_proj = nn.Linear(temb_channels, out_channels)
        self.norm2 = Normalize(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_channels, out_channels, kernel_size=3, stride=1, padding=1)
        if in_channels != out_channels:
            if conv_shortcut:
                self.conv_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=3, stride=1, padding=1)
            else:
                self.nin_shortcut = nn.Conv2d(in_channels, out_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None = None) -> torch.Tensor:
        h = self.conv1(nonlinearity(self.norm1(x)))  # (B, C_out, H, W)
        if temb is not None:
            h = h + self.temb_proj(nonlinearity(temb))[:, :, None, None]
        h = self.conv2(self.dropout(nonlinearity(self.norm2(h))))  # (B, C_out, H, W)
        if self.in_channels != self.out_channels:
            x = self.conv_shortcut(x) if self.use_conv_shortcut else self.nin_shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    """Single-head self-attention over the H*W positions with 1x1 conv q/k/v/proj_out, scale C**-0.5,
    residual. (B, C, H, W) -> (B, C, H, W)."""

    def __init__(self, in_channels: int):
        super().__init__()
        self.in_channels = in_channels
        self.norm = Normalize(in_channels)
        self.q = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.k = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.v = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)
        self.proj_out = nn.Conv2d(in_channels, in_channels, kernel_size=1, stride=1, padding=0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm(x)
        b, c, hh, ww = h.shape

        def tokens(t: torch.Tensor) -> torch.Tensor:
            return t.reshape(b, 1, c, hh * ww).transpose(-1, -2)  # (B, 1 head, HW, C)

        out = attention(tokens(self.q(h)), tokens(self.k(h)), tokens(self.v(h)))  # (B, 1, HW, C)
        out = out.transpose(-1, -2).reshape(b, c, hh, ww)  # (B, C, H, W)
        return x + self.proj_out(out)


def _level(blocks: nn.ModuleList, attn: nn.ModuleList) -> nn.Module:
    """A container with the anchors' attribute names (`block`, `attn`, later `downsample`/`upsample`)."""
    level = nn.Module()
    level.block = blocks
    level.attn = attn
    return level


def _mid(channels: int, dropout: float, attn_type: str) -> nn.Module:
    mid = nn.Module()
    mid.block_1 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    mid.attn_1 = make_attn(channels, attn_type)
    mid.block_2 = ResnetBlock(in_channels=channels, out_channels=channels, dropout=dropout)
    return mid


def _check_ch_mult(ch_mult: Sequence[int]) -> tuple[int, ...]:
    ch_mult = tuple(int(m) for m in ch_mult)
    if not ch_mult:
        raise ValueError("ch_mult must list at least one channel multiplier, got an empty list")
    return ch_mult


class Encoder(nn.Module):
    """Image (B, in_channels, H, W) -> (B, 2*z_channels if double_z else z_channels, H/f, W/f),
    f = 2**(len(ch_mult) - 1). Levels `down[i]` hold `num_res_blocks` ResnetBlocks (plus an AttnBlock
    after each where the resolution is in `attn_resolutions`), then a Downsample except the last."""

    def __init__(self, *, ch: PositiveInt, ch_mult: Sequence[PositiveInt] = (1, 2, 4, 8),
                 num_res_blocks: NonNegativeInt, attn_resolutions: Sequence[PositiveInt], dropout: Fraction = 0.0,
                 resamp_with_conv: bool = True, in_channels: PositiveInt, resolution: PositiveInt,
                 z_channels: PositiveInt, double_z: bool = True, out_ch: PositiveInt | None = None,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", **ignore: Any):
        super().__init__()
        _check_extra_keys("Encoder", ignore)
        attn_type = _attn_kind(attn_type, use_linear_attn)
        ch_mult = _check_ch_mult(ch_mult)
        attn_resolutions = {int(r) for r in attn_resolutions}
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels

        self.conv_in = nn.Conv2d(in_channels, ch, kernel_size=3, stride=1, padding=1)
        in_ch_mult = (1, *ch_mult)
        self.in_ch_mult = in_ch_mult
        curr_res = resolution
        block_in = ch
        self.down = nn.ModuleList()
        for i_level in range(self.num_resolutions):
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            block_in, block_out = ch * in_ch_mult[i_level], ch * ch_mult[i_level]
            for _ in range(num_res_blocks):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            down = _level(blocks, attn)
            if i_level != self.num_resolutions - 1:
                down.downsample = Downsample(block_in, resamp_with_conv)
                curr_res //= 2
            self.down.append(down)

        self.mid = _mid(block_in, dropout, attn_type)
        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, 2 * z_channels if double_z else z_channels,
                                  kernel_size=3, stride=1, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(x)  # (B, ch, H, W)
        for i_level, down in enumerate(self.down):
            for i_block, block in enumerate(down.block):
                h = block(h)
                if len(down.attn) > 0:
                    h = down.attn[i_block](h)
            if i_level != self.num_resolutions - 1:
                h = down.downsample(h)  # (B, C, H / 2**(i+1), W / 2**(i+1))
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))  # (B, ch*ch_mult[-1], H/f, W/f)
        return self.conv_out(nonlinearity(self.norm_out(h)))  # (B, (2 if double_z else 1)*z_channels, H/f, W/f)


class Decoder(nn.Module):
    """(B, z_channels, h, w) -> image (B, out_ch, h*f, w*f). `up[i]` is level i (the same resolution as
    the encoder's `down[i]`) with `num_res_blocks + 1` ResnetBlocks; the lowest resolution runs first."""

    def __init__(self, *, ch: PositiveInt, out_ch: PositiveInt, ch_mult: Sequence[PositiveInt] = (1, 2, 4, 8),
                 num_res_blocks: NonNegativeInt, attn_resolutions: Sequence[PositiveInt], dropout: Fraction = 0.0,
                 resamp_with_conv: bool = True, in_channels: PositiveInt | None = None, resolution: PositiveInt,
                 z_channels: PositiveInt, give_pre_end: bool = False, tanh_out: bool = False, double_z: bool = True,
                 use_linear_attn: bool = False, attn_type: str = "vanilla", **ignore: Any):
        super().__init__()
        _check_extra_keys("Decoder", ignore)
        attn_type = _attn_kind(attn_type, use_linear_attn)
        ch_mult = _check_ch_mult(ch_mult)
        attn_resolutions = {int(r) for r in attn_resolutions}
        self.ch, self.temb_ch = ch, 0
        self.num_resolutions, self.num_res_blocks = len(ch_mult), num_res_blocks
        self.resolution, self.in_channels = resolution, in_channels
        self.give_pre_end, self.tanh_out = give_pre_end, tanh_out

        block_in = ch * ch_mult[-1]
        curr_res = resolution // 2 ** (self.num_resolutions - 1)
        self.z_shape = (1, z_channels, curr_res, curr_res)
        self.conv_in = nn.Conv2d(z_channels, block_in, kernel_size=3, stride=1, padding=1)
        self.mid = _mid(block_in, dropout, attn_type)

        levels: list[nn.Module] = []
        for i_level in reversed(range(self.num_resolutions)):
            blocks, attn = nn.ModuleList(), nn.ModuleList()
            block_out = ch * ch_mult[i_level]
            for _ in range(num_res_blocks + 1):
                blocks.append(ResnetBlock(in_channels=block_in, out_channels=block_out, dropout=dropout))
                block_in = block_out
                if curr_res in attn_resolutions:
                    attn.append(make_attn(block_in, attn_type))
            up = _level(blocks, attn)
            if i_level != 0:
                up.upsample = Upsample(block_in, resamp_with_conv)
                curr_res *= 2
            levels.insert(0, up)  # keep `up[i]` = level i, as in the checkpoints
        self.up = nn.ModuleList(levels)

        self.norm_out = Normalize(block_in)
        self.conv_out = nn.Conv2d(block_in, out_ch, kernel_size=3, stride=1, padding=1)

    @property
    def last_layer(self) -> torch.Tensor:
        """The weight the adaptive GAN weight differentiates against."""
        return self.conv_out.weight

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.conv_in(z)  # (B, ch*ch_mult[-1], h, w)
        h = self.mid.block_2(self.mid.attn_1(self.mid.block_1(h)))
        for i_level in reversed(range(self.num_resolutions)):
            up = self.up[i_level]
            for i_block, block in enumerate(up.block):
                h = block(h)
                if len(up.attn) > 0:
                    h = up.attn[i_block](h)
            if i_level != 0:
                h = up.upsample(h)  # (B, ch*ch_mult[i], 2x, 2x)
        if self.give_pre_end:
            return h  # (B, ch*ch_mult[0], h*f, w*f)
        h = self.conv_out(nonlinearity(self.norm_out(h)))  # (B, out_ch, h*f, w*f)
        return torch.tanh(h) if self.tanh_out else h

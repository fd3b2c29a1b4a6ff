"""The latent-diffusion UNet (the openaimodel `UNetModel` of CompVis/latent-diffusion), with its configuration keys
and parameter names, so `model.diffusion_model.*` of its checkpoints loads unchanged; attention runs through
`scaled_dot_product_attention`.

Residual blocks carry the timestep (and class) embedding, added or as scale and shift of the second norm
(`use_scale_shift_norm`); attention at the resolutions in `attention_resolutions` (downsampling factors) is
either the self-attention block (`legacy` head split: heads taken before q/k/v) or, with
`use_spatial_transformer`, a transformer over the positions with cross-attention to `context` (text tokens).
`num_classes` adds a class embedding to the timestep embedding, `aug_level_conditioning` an embedding of the
noise level of a super-resolution stage's augmented low-resolution input (Imagen's cascades). Norms are GroupNorm(32) computed in float32,
as the original.

Imagen's Efficient U-Net (Saharia et al. 2022, Appendix B.1), each option off by default so the original layout and
parameter names stay: `num_res_blocks` per level (more blocks at low resolution), `scale_skip_connection` (skips
times 1/sqrt(2)), `efficient_updown` (its DBlock/UBlock order: every level down-samples before its convolutions and
up-samples after them, so they run at half the resolution) and `pooled_context` (the masked mean of the text tokens
added to the timestep embedding, as Imagen's pooled T5 embedding).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.attention import attention
from ldm.util import Fraction, PositiveInt


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """(B,) -> (B, dim): cosines then sines of t at frequencies exp(-ln(max_period) i / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=timesteps.device) / half)
    args = timesteps[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], -1)
    return F.pad(emb, (0, 1)) if dim % 2 else emb


def level_blocks(num_res_blocks: int | Sequence[int], levels: int) -> tuple[int, ...]:
    """Residual blocks per level: one number for all, or one per `channel_mult` entry (Imagen's Efficient U-Net
    puts more at low resolution)."""
    if isinstance(num_res_blocks, int):
        blocks: tuple[int, ...] = (num_res_blocks,) * levels
    else:
        blocks = tuple(num_res_blocks)
        if len(blocks) != levels:
            raise ValueError(f"num_res_blocks has {len(blocks)} entries {list(blocks)} but channel_mult has {levels} "
                             f"levels: give one block count per level, or one number for all")
    if not all(isinstance(n, int) and not isinstance(n, bool) and n >= 1 for n in blocks):
        raise ValueError(f"num_res_blocks must be integers >= 1, got {num_res_blocks!r}")
    return blocks


def masked_mean(context: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    """(B, L, D), (B, L) bool -> (B, D): the mean over the tokens; zeros for a row with none (the null text)."""
    if mask is None:
        return context.mean(1)
    weight = mask.to(context.dtype)[..., None]  # (B, L, 1)
    return (context * weight).sum(1) / weight.sum(1).clamp(min=1.0)


class GroupNorm32(nn.GroupNorm):
    """GroupNorm(32, C) computed in float32 (the original's `normalization`)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(x.float()).type(x.dtype)


def normalization(channels: int) -> nn.GroupNorm:
    return GroupNorm32(32, channels)


def conv_nd(dims: int, *args, **kwargs) -> nn.Module:
    return {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}[dims](*args, **kwargs)


class Downsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        out_channels = out_channels or channels
        self.op = conv_nd(dims, channels, out_channels, 3, stride=2, padding=1) if use_conv else \
            {1: nn.AvgPool1d, 2: nn.AvgPool2d, 3: nn.AvgPool3d}[dims](kernel_size=2, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    def __init__(self, channels: int, use_conv: bool, dims: int = 2, out_channels: int | None = None):
        super().__init__()
        self.dims = dims
        if use_conv:
            self.conv = conv_nd(dims, channels, out_channels or channels, 3, padding=1)
        self.use_conv = use_conv

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.dims == 3:
            x = F.interpolate(x, (x.shape[2], x.shape[3] * 2, x.shape[4] * 2), mode="nearest")
        else:
            x = F.interpolate(x, scale_factor=2, mode="nearest")
        return self.conv(x) if self.use_conv else x


class ResBlock(nn.Module):
    """Two convolutions with the embedding between them; optionally down- or upsampling inside."""

    def __init__(self, channels: int, emb_channels: int, dropout: float, out_channels: int | None = None,
                 use_conv: bool = False, use_scale_shift_norm: bool = False, dims: int = 2, up: bool = False,
                 down: bool = False):
        super().__init__()
        out_channels = out_channels or channels
        self.use_scale_shift_norm = use_scale_shift_norm
        self.in_layers = nn.Sequential(normalization(channels), nn.SiLU(), conv_nd(dims, channels, out_channels, 3, padding=1))
        self.updown = up or down
        if up:
            self.h_upd, self.x_upd = Upsample(channels, False, dims), Upsample(channels, False, dims)
        elif down:
            self.h_upd, self.x_upd = Downsample(channels, False, dims), Downsample(channels, False, dims)
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_channels, 2 * out_channels if use_scale_shift_norm
                                                             else out_channels))
        self.out_layers = nn.Sequential(normalization(out_channels), nn.SiLU(), nn.Dropout(dropout),
                                        conv_nd(dims, out_channels, out_channels, 3, padding=1))
        if out_channels == channels:
            self.skip_connection = nn.Identity()
        else:
            self.skip_connection = conv_nd(dims, channels, out_channels, 3 if use_conv else 1,
                                           padding=1 if use_conv else 0)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        if self.updown:
            h = self.in_layers[:-1](x)
            h, x = self.h_upd(h), self.x_upd(x)
            h = self.in_layers[-1](h)
        else:
            h = self.in_layers(x)
        emb_out = self.emb_layers(emb).type(h.dtype)
        emb_out = emb_out.reshape(*emb_out.shape, *([1] * (h.dim() - emb_out.dim())))
        if self.use_scale_shift_norm:
            scale, shift = emb_out.chunk(2, dim=1)
            h = self.out_layers[0](h) * (1 + scale) + shift
            h = self.out_layers[1:](h)
        else:
            h = self.out_layers(h + emb_out)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """Self-attention over the positions: a 1x1 qkv convolution, heads split before q/k/v (`legacy`) or after."""

    def __init__(self, channels: int, num_heads: int = 1, num_head_channels: int = -1,
                 use_new_attention_order: bool = False):
        super().__init__()
        if num_head_channels != -1:
            if channels % num_head_channels:
                raise ValueError(f"channels {channels} are not divisible by num_head_channels {num_head_channels}")
            num_heads = channels // num_head_channels
        self.num_heads, self.new_order = num_heads, use_new_attention_order
        self.norm = normalization(channels)
        self.qkv = conv_nd(1, channels, channels * 3, 1)
        self.proj_out = conv_nd(1, channels, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)
        qkv = self.qkv(self.norm(x))  # (B, 3C, T)
        heads, length = self.num_heads, qkv.shape[-1]
        if self.new_order:
            q, k, v = (t.reshape(b, heads, -1, length) for t in qkv.chunk(3, dim=1))
        else:  # legacy: (B*heads, 3*ch, T) split into q, k, v
            q, k, v = qkv.reshape(b, heads, -1, length).chunk(3, dim=2)
        out = attention(q.transpose(-1, -2), k.transpose(-1, -2), v.transpose(-1, -2))
        h = self.proj_out(out.transpose(-1, -2).reshape(b, c, length))
        return (x + h).reshape(b, c, *spatial)


class CrossAttention(nn.Module):
    def __init__(self, query_dim: int, context_dim: int | None = None, heads: int = 8, dim_head: int = 64,
                 dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        context_dim = context_dim or query_dim
        self.heads = heads
        self.to_q = nn.Linear(query_dim, inner, bias=False)
        self.to_k = nn.Linear(context_dim, inner, bias=False)
        self.to_v = nn.Linear(context_dim, inner, bias=False)
        self.to_out = nn.Sequential(nn.Linear(inner, query_dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        context = x if context is None else context
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.to_q(x)), split(self.to_k(context)), split(self.to_v(context))
        mask = empty = None
        if context_mask is not None:
            mask = context_mask.bool()
            empty = ~mask.any(-1)  # no token at all (the null text): the attention adds nothing
            mask = (mask | empty[:, None])[:, None, None, :]
        out = attention(q, k, v, attn_mask=mask)
        if empty is not None:
            out = out.masked_fill(empty[:, None, None, None], 0.0)
        return self.to_out(out.transpose(1, 2).flatten(2))


class GEGLU(nn.Module):
    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out * 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, gate = self.proj(x).chunk(2, dim=-1)
        return x * F.gelu(gate)


class FeedForward(nn.Module):
    def __init__(self, dim: int, mult: int = 4, glu: bool = True, dropout: float = 0.0):
        super().__init__()
        inner = dim * mult
        project_in = GEGLU(dim, inner) if glu else nn.Sequential(nn.Linear(dim, inner), nn.GELU())
        self.net = nn.Sequential(project_in, nn.Dropout(dropout), nn.Linear(inner, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class BasicTransformerBlock(nn.Module):
    def __init__(self, dim: int, n_heads: int, d_head: int, dropout: float = 0.0, context_dim: int | None = None):
        super().__init__()
        self.attn1 = CrossAttention(dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.ff = FeedForward(dim, dropout=dropout, glu=True)
        self.attn2 = CrossAttention(dim, context_dim=context_dim, heads=n_heads, dim_head=d_head, dropout=dropout)
        self.norm1, self.norm2, self.norm3 = nn.LayerNorm(dim), nn.LayerNorm(dim), nn.LayerNorm(dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.attn1(self.norm1(x)) + x
        x = self.attn2(self.norm2(x), context=context, context_mask=context_mask) + x
        return self.ff(self.norm3(x)) + x


class SpatialTransformer(nn.Module):
    """A transformer over the positions of a feature map, cross-attending to `context` (B, L, context_dim)."""

    def __init__(self, in_channels: int, n_heads: int, d_head: int, depth: int = 1, dropout: float = 0.0,
                 context_dim: int | None = None):
        super().__init__()
        inner = n_heads * d_head
        self.norm = nn.GroupNorm(32, in_channels, eps=1e-6)
        self.proj_in = nn.Conv2d(in_channels, inner, 1)
        self.transformer_blocks = nn.ModuleList(
            [BasicTransformerBlock(inner, n_heads, d_head, dropout, context_dim) for _ in range(depth)])
        self.proj_out = nn.Conv2d(inner, in_channels, 1)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        x_in = x
        x = self.proj_in(self.norm(x)).flatten(2).transpose(1, 2)  # (B, HW, inner)
        for block in self.transformer_blocks:
            x = block(x, context=context, context_mask=context_mask)
        x = self.proj_out(x.transpose(1, 2).reshape(b, -1, h, w))
        return x + x_in


class TimestepEmbedSequential(nn.Sequential):
    """Hands the embedding to residual blocks and the context to transformers."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor, context: torch.Tensor | None = None,
                context_mask: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            if isinstance(layer, ResBlock):
                x = layer(x, emb)
            elif isinstance(layer, SpatialTransformer):
                x = layer(x, context, context_mask)
            else:
                x = layer(x)
        return x


class UNetModel(nn.Module):
    """`forward(x (B, C, H, W), timesteps (B,), context=None, y=None) -> (B, out_channels, H, W)`."""

    def __init__(
        self,
        image_size: int | None,
        in_channels: PositiveInt,
        model_channels: PositiveInt,
        out_channels: PositiveInt,
        num_res_blocks: PositiveInt | Sequence[PositiveInt],
        attention_resolutions: Sequence[int],
        dropout: Fraction = 0.0,
        channel_mult: Sequence[int] = (1, 2, 4, 8),
        conv_resample: bool = True,
        dims: int = 2,
        num_classes: PositiveInt | None = None,
        use_checkpoint: bool = False,
        use_fp16: bool = False,
        num_heads: int = -1,
        num_head_channels: int = -1,
        num_heads_upsample: int = -1,
        use_scale_shift_norm: bool = False,
        resblock_updown: bool = False,
        use_new_attention_order: bool = False,
        use_spatial_transformer: bool = False,
        transformer_depth: PositiveInt = 1,
        context_dim: PositiveInt | None = None,
        n_embed: int | None = None,
        legacy: bool = True,
        aug_level_conditioning: bool = False,
        scale_skip_connection: bool = False,
        efficient_updown: bool = False,
        pooled_context: bool = False,
    ):
        super().__init__()
        if use_spatial_transformer and context_dim is None:
            raise ValueError("use_spatial_transformer needs context_dim (the cross-attention conditioning's width)")
        if num_heads == -1 and num_head_channels == -1:
            raise ValueError("give num_heads or num_head_channels")
        if n_embed is not None:
            raise ValueError("n_embed (predicting codebook ids) is not supported")
        if pooled_context and context_dim is None:
            raise ValueError("pooled_context needs context_dim (the width of the text tokens it averages)")
        blocks = level_blocks(num_res_blocks, len(channel_mult))
        num_heads_upsample = num_heads if num_heads_upsample == -1 else num_heads_upsample
        self.in_channels, self.out_channels, self.model_channels = in_channels, out_channels, model_channels
        self.num_classes, self.context_dim = num_classes, context_dim
        self.use_checkpoint = use_checkpoint  # accepted for the original configs; activations are kept
        ted = model_channels * 4
        self.time_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        if num_classes is not None:
            self.label_emb = nn.Embedding(num_classes, ted)
        self.aug_level_conditioning = aug_level_conditioning
        if aug_level_conditioning:  # the noise level of a super-resolution stage's augmented input (Imagen)
            self.aug_level_embed = nn.Sequential(nn.Linear(model_channels, ted), nn.SiLU(), nn.Linear(ted, ted))
        self.pooled_context = pooled_context
        if pooled_context:  # Imagen adds its pooled T5 embedding to the timestep embedding
            self.pooled_context_embed = nn.Linear(context_dim, ted)
        self.skip_scale = 2 ** -0.5 if scale_skip_connection else 1.0  # Imagen: faster convergence

        def attention(ch: int, heads_default: int) -> nn.Module:
            if num_head_channels == -1:
                heads, dim_head = heads_default, ch // heads_default
            else:
                heads, dim_head = ch // num_head_channels, num_head_channels
            if legacy:
                dim_head = ch // heads if use_spatial_transformer else num_head_channels
            if use_spatial_transformer:
                return SpatialTransformer(ch, heads, dim_head, depth=transformer_depth, context_dim=context_dim)
            return AttentionBlock(ch, num_heads=heads, num_head_channels=dim_head,
                                  use_new_attention_order=use_new_attention_order)

        def resample(ch: int, up: bool) -> nn.Module:
            if resblock_updown:
                return ResBlock(ch, ted, dropout, ch, dims=dims, use_scale_shift_norm=use_scale_shift_norm, up=up,
                                down=not up)
            return (Upsample if up else Downsample)(ch, conv_resample, dims, ch)

        self.input_blocks = nn.ModuleList([TimestepEmbedSequential(conv_nd(dims, in_channels, model_channels, 3, padding=1))])
        chans, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            if efficient_updown:  # Imagen's DBlock: down-sample first, so the level's convolutions cost a quarter
                self.input_blocks.append(TimestepEmbedSequential(resample(ch, up=False)))
                chans.append(ch)
                ds *= 2
            for _ in range(blocks[level]):
                layers: list[nn.Module] = [ResBlock(ch, ted, dropout, mult * model_channels, dims=dims,
                                                    use_scale_shift_norm=use_scale_shift_norm)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads))
                self.input_blocks.append(TimestepEmbedSequential(*layers))
                chans.append(ch)
            if not efficient_updown and level != len(channel_mult) - 1:
                self.input_blocks.append(TimestepEmbedSequential(resample(ch, up=False)))
                chans.append(ch)
                ds *= 2
        self.middle_block = TimestepEmbedSequential(
            ResBlock(ch, ted, dropout, dims=dims, use_scale_shift_norm=use_scale_shift_norm),
            attention(ch, num_heads),
            ResBlock(ch, ted, dropout, dims=dims, use_scale_shift_norm=use_scale_shift_norm))
        self.output_blocks = nn.ModuleList()
        for level, mult in list(enumerate(channel_mult))[::-1]:
            for i in range(blocks[level] + 1):
                layers = [ResBlock(ch + chans.pop(), ted, dropout, model_channels * mult, dims=dims,
                                   use_scale_shift_norm=use_scale_shift_norm)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attention(ch, num_heads_upsample))
                if (level or efficient_updown) and i == blocks[level]:  # (Imagen's UBlock up-samples its last level too)
                    layers.append(resample(ch, up=True))
                    ds //= 2
                self.output_blocks.append(TimestepEmbedSequential(*layers))
        if efficient_updown:  # the input convolution's features, at full resolution, are the last skip
            self.output_blocks.append(TimestepEmbedSequential(
                ResBlock(ch + chans.pop(), ted, dropout, model_channels, dims=dims, use_scale_shift_norm=use_scale_shift_norm)))
            ch = model_channels
        assert not chans, "every skip connection is consumed"
        self.out = nn.Sequential(normalization(ch), nn.SiLU(), conv_nd(dims, model_channels, out_channels, 3, padding=1))
        for module in (self.out[-1], *(m.out_layers[-1] for m in self.modules() if isinstance(m, ResBlock)),
                       *(m.proj_out for m in self.modules() if isinstance(m, (AttentionBlock, SpatialTransformer)))):
            nn.init.zeros_(module.weight)  # the original's zero_module: each block starts as the identity
            nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, context: torch.Tensor | None = None,
                y: torch.Tensor | None = None, context_mask: torch.Tensor | None = None,
                aug_level: torch.Tensor | None = None) -> torch.Tensor:
        if (y is not None) != (self.num_classes is not None):
            raise ValueError("y (class labels) must be given if and only if the UNet has num_classes")
        if (aug_level is not None) != self.aug_level_conditioning:
            raise ValueError("aug_level (the conditioning image's noise level) must be given if and only if the UNet "
                             "has aug_level_conditioning")
        emb = self.time_embed(timestep_embedding(timesteps, self.model_channels).to(x.dtype))
        if self.num_classes is not None:
            emb = emb + self.label_emb(y)
        if self.pooled_context:
            if context is None:
                raise ValueError("a UNet with pooled_context needs context (the text tokens)")
            emb = emb + self.pooled_context_embed(masked_mean(context, context_mask).to(x.dtype))
        if aug_level is not None:
            # levels in [0, 1] embedded on the scale of the timesteps (0..1000)
            emb = emb + self.aug_level_embed(timestep_embedding(aug_level * 1000, self.model_channels).to(x.dtype))
        hs, h = [], x
        for module in self.input_blocks:
            h = module(h, emb, context, context_mask)
            hs.append(h)
        h = self.middle_block(h, emb, context, context_mask)
        for module in self.output_blocks:
            skip = hs.pop()
            skip = skip * self.skip_scale if self.skip_scale != 1.0 else skip
            h = module(torch.cat([h, skip], 1), emb, context, context_mask)
        return self.out(h)

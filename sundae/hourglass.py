"""Hourglass transformer (Nawrot et al. 2021) over 2-D token maps, as McKinney & Willcocks 2022 use it as
SUNDAE's denoiser: full-length pre- and post-layers around a valley that runs on a shortened map.

Shortening merges each kh x kw patch of tokens into one by a linear map (the paper's 2-D change to the
hourglass) and splits it back by a linear map plus a residual from before the valley. Attention
resampling (Nawrot et al. Sec. 3.3), an option, lets the merged token attend to its patch on the way down
and every token of a patch attend to the valley's token on the way up. Valleys nest to any depth:

    depth: [2, [4], 2]               2 full-length layers, 4 layers on the map shortened once, 2 full-length
    depth: [2, [2, [4], 2], 2]       a second hourglass inside the first (shortened twice)
    depth: [2, 8, 2]                 the original's form: an integer valley is a plain stack
    depth: [6] (or 6)                no shortening: a plain transformer of 6 layers

`shorten_factor` is one factor for every level or a list with one per level; a factor k is a square
number of tokens merged as a sqrt(k) x sqrt(k) patch (the original's "pixel" mode), or an explicit
patch [kh, kw]. Positions are 2-D (axial) rotary embeddings: a query or key's first features turn by
its row, the next by its column (or a learnt absolute embedding without rotary). The class embedding
(index `num_classes` is the null class of classifier-free guidance) is added to every token, as in the
original. Attention runs through `torch.nn.functional.scaled_dot_product_attention`; the feed-forward
blocks and the rotation are x-transformers' (`FeedForward`, `apply_rotary_pos_emb`). Attention itself is
this file's: the original fuses k and v into one projection (`to_kv`) and, in its rotary mode, rotates
q and k before splitting them into heads, which x-transformers' attention cannot express.

Rotary modes (`rotary_mode`):

- ``"per_head"`` (default, correct): every head rotates its first 2 * `rotary_emb_dim` features
  (`rotary_emb_dim` per axis; by default dim_head / 2, so the whole head).
- ``"original"``: exactly what vvvm23/sundae-vqgan does, needed to load its checkpoints: the rotation is
  applied to the concatenated heads (heads * dim_head features) before they are split, so only their
  first 2 * `rotary_emb_dim` features turn - with the defaults, head 0 alone; every other head sees no
  position at all.

The original also groups the tokens of attention resampling as k consecutive tokens in raster order,
not as the kh x kw patches its linear shortening merges, so a merged token attends to tokens of other
patches; ``resample_groups="raster"`` reproduces that, ``"patch"`` (default) groups each patch.
`convert_original_state_dict` maps a state dict of the original `HourglassTransformerLM` onto this
network (`tests/sundae/test_hourglass.py` replays the original's logits).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal, Union

import torch
from einops import rearrange
from torch import nn
from x_transformers.x_transformers import FeedForward, apply_rotary_pos_emb

from ldm.nn.attention import attention
from ldm.util import ConfigError

RotaryMode = Literal["per_head", "original"]
ResampleGroups = Literal["patch", "raster"]
Patch = tuple[int, int]


# --- the depth spec ---------------------------------------------------------------------------------
@dataclass(frozen=True)
class Level:
    """One hourglass level: `pre` and `post` layers at this length around a shortened `valley`."""

    pre: int
    valley: Level | int  # a nested level, or the depth of a plain stack
    post: int


DepthSpec = Union[Level, int]


def parse_depth(depth: Any) -> DepthSpec:
    """`[pre, valley, post]` (valley an int or a nested list), `[n]` or `n`: a Level tree or a plain depth."""
    def bad(why: str) -> ConfigError:
        return ConfigError("depth", f"{why}; give [pre, valley, post] with valley an integer or a nested "
                                    f"[pre, valley, post] (e.g. [2, [4], 2]), or [n] for a plain stack; got {depth!r}")

    def layers(n: Any) -> int:
        if isinstance(n, bool) or not isinstance(n, int) or n < 0:
            raise bad(f"layer counts are integers >= 0, found {n!r}")
        return n

    def parse(node: Any) -> DepthSpec:
        if isinstance(node, (list, tuple)):
            if len(node) == 1:
                return layers(node[0])
            if len(node) == 3:
                return Level(layers(node[0]), parse(node[1]), layers(node[2]))
            raise bad(f"a list has 1 or 3 entries, found {len(node)}")
        return layers(node)

    spec = parse(depth)
    if isinstance(spec, int) and spec < 1:
        raise bad("a plain stack needs at least one layer")
    return spec


def levels(spec: DepthSpec) -> int:
    """How many times the map is shortened."""
    return 0 if isinstance(spec, int) else 1 + levels(spec.valley)


def total_depth(spec: DepthSpec) -> int:
    """Layers of the pre, valley and post stacks together (attention resampling layers not counted)."""
    return spec if isinstance(spec, int) else spec.pre + total_depth(spec.valley) + spec.post


def parse_shorten_factors(shorten_factor: Any, n_levels: int) -> list[Patch]:
    """One patch (kh, kw) per level from an int for every level or a list with one entry per level."""
    if n_levels == 0:
        return []
    items = list(shorten_factor) if isinstance(shorten_factor, (list, tuple)) else [shorten_factor] * n_levels
    if len(items) != n_levels:
        raise ConfigError("shorten_factor", f"give one factor for every level or a list of {n_levels} (one per "
                                            f"level of the depth spec), got {shorten_factor!r}")
    patches = []
    for k in items:
        if isinstance(k, (list, tuple)) and len(k) == 2 and all(isinstance(v, int) and v >= 1 for v in k):
            patch = (int(k[0]), int(k[1]))
        elif isinstance(k, int) and not isinstance(k, bool) and k >= 1:
            side = math.isqrt(k)
            if side * side != k:
                raise ConfigError("shorten_factor", f"{k} tokens do not form a square patch: give a square "
                                                    f"number (4 = 2x2 patches) or a patch [kh, kw]")
            patch = (side, side)
        else:
            raise ConfigError("shorten_factor", f"a factor is an integer >= 1 or a patch [kh, kw], got {k!r}")
        if patch[0] * patch[1] < 2:
            raise ConfigError("shorten_factor", f"a level must shorten the map (a factor >= 2), got {k!r}")
        patches.append(patch)
    return patches


def level_grids(grid: tuple[int, int], patches: Sequence[Patch]) -> list[tuple[int, int]]:
    """The token map at every level, top first; a map a patch does not divide is refused."""
    grids = [grid]
    for i, (kh, kw) in enumerate(patches):
        h, w = grids[-1]
        if h % kh or w % kw:
            raise ConfigError("shorten_factor", f"the {h}x{w} token map ({h * w} tokens) at level {i + 1} does not "
                                                f"divide into {kh}x{kw} patches (shorten factor {kh * kw}): the "
                                                f"sequence length must be divisible by the shorten factors")
        grids.append((h // kh, w // kw))
    return grids


# --- blocks -------------------------------------------------------------------------------------------
class AxialRotary(nn.Module):
    """2-D rotary angles (N, 2 * dim): `dim` features turn with the row, `dim` with the column.

    Positions run over [-1, 1] on each axis with frequencies linspace(1, max_freq / 2) * pi, the "pixel"
    embedding of rotary-embedding-torch that the original uses; each angle covers an interleaved pair.
    `freqs` is a buffer (a frozen parameter in the original) so that checkpoints carry it.
    """

    def __init__(self, dim: int, max_freq: float):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ConfigError("rotary_emb_dim", f"must be an even number >= 2, got {dim}")
        self.register_buffer("freqs", torch.linspace(1.0, max_freq / 2, dim // 2) * math.pi)

    def forward(self, grid: tuple[int, int]) -> torch.Tensor:
        h, w = grid
        device = self.freqs.device

        def axis(n: int) -> torch.Tensor:
            pos = torch.linspace(-1.0, 1.0, n, device=device)
            return (pos[:, None] * self.freqs[None]).repeat_interleave(2, dim=-1)  # (n, dim)

        rows, cols = axis(h), axis(w)
        angles = torch.cat([rows[:, None].expand(h, w, -1), cols[None].expand(h, w, -1)], -1)
        return angles.reshape(1, h * w, -1)  # (1, N, 2 dim)


class Attention(nn.Module):
    """Multi-head attention with the original's projections (`to_q`, fused `to_kv`, `to_out` with bias)."""

    def __init__(self, dim: int, heads: int, dim_head: int, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.dropout = heads, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_kv = nn.Linear(dim, 2 * inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, angles: torch.Tensor | None = None,
                rotary_mode: RotaryMode = "per_head") -> torch.Tensor:
        q = self.to_q(x)  # (B, N, H*dh)
        k, v = self.to_kv(x if context is None else context).chunk(2, dim=-1)
        rotate = angles is not None and context is None  # never across attention resampling's context
        if rotate and rotary_mode == "original":  # before the head split: the first features of all heads
            q, k = apply_rotary_pos_emb(q, angles), apply_rotary_pos_emb(k, angles)
        q, k, v = (rearrange(t, "b n (h d) -> b h n d", h=self.heads) for t in (q, k, v))
        if rotate and rotary_mode == "per_head":
            q, k = apply_rotary_pos_emb(q, angles), apply_rotary_pos_emb(k, angles)
        out = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.to_out(rearrange(out, "b h n d -> b n (h d)"))


class Block(nn.Module):
    """Pre-LayerNorm residual attention and feed-forward; with `context`, only the query is normalised."""

    def __init__(self, dim: int, heads: int, dim_head: int, ff_mult: int, attn_dropout: float, ff_dropout: float):
        super().__init__()
        self.attn_norm = nn.LayerNorm(dim)
        self.attn = Attention(dim, heads, dim_head, attn_dropout)
        self.ff_norm = nn.LayerNorm(dim)
        self.ff = FeedForward(dim, mult=ff_mult, dropout=ff_dropout)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None, angles: torch.Tensor | None = None,
                rotary_mode: RotaryMode = "per_head") -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), context, angles, rotary_mode)
        return x + self.ff(self.ff_norm(x))


class Stack(nn.Module):
    """`depth` blocks at one length, with their own rotary frequencies (None: no rotary)."""

    def __init__(self, depth: int, dim: int, heads: int, dim_head: int, ff_mult: int, attn_dropout: float,
                 ff_dropout: float, rotary_emb_dim: int | None, max_freq: float, rotary_mode: RotaryMode):
        super().__init__()
        self.layers = nn.ModuleList(Block(dim, heads, dim_head, ff_mult, attn_dropout, ff_dropout)
                                    for _ in range(depth))
        self.rotary = AxialRotary(rotary_emb_dim, max_freq) if rotary_emb_dim else None
        self.rotary_mode = rotary_mode

    def forward(self, x: torch.Tensor, grid: tuple[int, int], context: torch.Tensor | None = None) -> torch.Tensor:
        angles = self.rotary(grid) if self.rotary is not None and context is None else None
        for block in self.layers:
            x = block(x, context, angles, self.rotary_mode)
        return x


class LinearDownsample(nn.Module):
    """Each kh x kw patch to one token: its features concatenated (d outermost, as the original) and projected."""

    def __init__(self, dim: int, patch: Patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(dim * patch[0] * patch[1], dim)

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        (h, w), (kh, kw) = grid, self.patch
        x = rearrange(x, "b (h kh w kw) d -> b (h w) (d kh kw)", h=h // kh, kh=kh, w=w // kw, kw=kw)
        return self.proj(x)  # (B, N / (kh kw), D)


class LinearUpsample(nn.Module):
    """One token to a kh x kw patch: projected to kh * kw tokens' features and split (the inverse layout)."""

    def __init__(self, dim: int, patch: Patch):
        super().__init__()
        self.patch = patch
        self.proj = nn.Linear(dim, dim * patch[0] * patch[1])

    def forward(self, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        (h, w), (kh, kw) = grid, self.patch  # `grid`: the full-length map
        x = self.proj(x)
        return rearrange(x, "b (h w) (d kh kw) -> b (h kh w kw) d", h=h // kh, kh=kh, w=w // kw, kw=kw)


def group(x: torch.Tensor, grid: tuple[int, int], patch: Patch, how: ResampleGroups) -> torch.Tensor:
    """(B, N, D) to (B * N/k, k, D): the k tokens each merged token resamples from (its patch, or raster runs)."""
    (h, w), (kh, kw) = grid, patch
    if how == "raster":
        return rearrange(x, "b (n s) d -> (b n) s d", s=kh * kw)
    return rearrange(x, "b (h kh w kw) d -> (b h w) (kh kw) d", h=h // kh, kh=kh, w=w // kw, kw=kw)


def ungroup(x: torch.Tensor, b: int, grid: tuple[int, int], patch: Patch, how: ResampleGroups) -> torch.Tensor:
    (h, w), (kh, kw) = grid, patch
    if how == "raster":
        return rearrange(x, "(b n) s d -> b (n s) d", b=b)
    return rearrange(x, "(b h w) (kh kw) d -> b (h kh w kw) d", b=b, h=h // kh, w=w // kw, kh=kh, kw=kw)


class Hourglass(nn.Module):
    """One level: pre layers, shorten, valley (a stack or a nested level), lengthen + residual, post layers."""

    def __init__(self, spec: Level, patches: Sequence[Patch], grids: Sequence[tuple[int, int]],
                 make_stack: Any, valley_freq: float, attn_resampling: bool, resample_groups: ResampleGroups):
        super().__init__()
        self.grid, self.patch, self.resample_groups = grids[0], patches[0], resample_groups
        self.pre = make_stack(spec.pre, grids[0])
        self.down = LinearDownsample(make_stack.dim, self.patch)
        if isinstance(spec.valley, Level):
            self.valley: nn.Module = Hourglass(spec.valley, patches[1:], grids[1:], make_stack, valley_freq,
                                               attn_resampling, resample_groups)
        else:
            self.valley = make_stack(spec.valley, grids[1], max_freq=valley_freq)
        self.up = LinearUpsample(make_stack.dim, self.patch)
        self.resample_pre = make_stack(1, None, rotary=False) if attn_resampling else None
        self.resample_post = make_stack(1, None, rotary=False) if attn_resampling else None
        self.post = make_stack(spec.post, grids[0])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        small = (self.grid[0] // self.patch[0], self.grid[1] // self.patch[1])
        x = self.pre(x, self.grid)  # (B, N, D)
        residual = x
        down = self.down(x, self.grid)  # (B, N/k, D)
        if self.resample_pre is not None:  # the merged token attends to the tokens it merges
            groups = group(x, self.grid, self.patch, self.resample_groups)  # (B N/k, k, D)
            down = self.resample_pre(down.reshape(-1, 1, down.shape[-1]), None, context=groups)
            down = down.reshape(b, -1, down.shape[-1])
        valley = self.valley(down) if isinstance(self.valley, Hourglass) else self.valley(down, small)
        x = self.up(valley, self.grid) + residual  # (B, N, D)
        if self.resample_post is not None:  # every token attends to the valley token of its group
            groups = group(x, self.grid, self.patch, self.resample_groups)
            x = self.resample_post(groups, None, context=valley.reshape(-1, 1, valley.shape[-1]))
            x = ungroup(x, b, self.grid, self.patch, self.resample_groups)
        return self.post(x, self.grid)


class _StackFactory:
    """Builds the stacks of every level with the shared widths (and knows the rotary setting)."""

    def __init__(self, dim: int, kw: dict[str, Any], rotary_emb_dim: int | None, rotary_mode: RotaryMode,
                 default_freq: Any):
        self.dim, self.kw, self.rotary_emb_dim = dim, kw, rotary_emb_dim
        self.rotary_mode, self.default_freq = rotary_mode, default_freq

    def __call__(self, depth: int, grid: tuple[int, int] | None, max_freq: float | None = None,
                 rotary: bool = True) -> Stack:
        freq = max_freq if max_freq is not None else self.default_freq(grid)
        return Stack(depth, self.dim, **self.kw, rotary_emb_dim=self.rotary_emb_dim if rotary else None,
                     max_freq=freq or 1.0, rotary_mode=self.rotary_mode)


class HourglassTransformer(nn.Module):
    """`forward(x (B, N) long, cond (B,) long | None) -> logits (B, N, K)` over an h x w token map.

    See the module docstring for `depth`, `shorten_factor`, `rotary_mode` and `resample_groups`.
    `dim_head` defaults to 64 as in the original (whose configs never set it), so the attention width is
    heads * 64 whatever `dim` is.
    """

    def __init__(
        self,
        vocab_size: int,
        grid: Sequence[int],
        dim: int = 512,
        depth: int | Sequence[Any] = (2, 8, 2),
        shorten_factor: int | Sequence[Any] = 4,
        heads: int = 8,
        dim_head: int = 64,
        ff_mult: int = 4,
        attn_resampling: bool = True,
        resample_groups: ResampleGroups = "patch",
        rotary: bool = True,
        rotary_mode: RotaryMode = "per_head",
        rotary_emb_dim: int | None = None,
        num_classes: int | None = None,
        attn_dropout: float = 0.0,
        ff_dropout: float = 0.0,
    ):
        super().__init__()
        # the architecture without the map's size and vocabulary: a twin at another length (sundae.cost)
        self.hparams = dict(dim=dim, depth=depth, shorten_factor=shorten_factor, heads=heads, dim_head=dim_head,
                            ff_mult=ff_mult, attn_resampling=attn_resampling, resample_groups=resample_groups,
                            rotary=rotary, rotary_mode=rotary_mode, rotary_emb_dim=rotary_emb_dim,
                            num_classes=num_classes, attn_dropout=attn_dropout, ff_dropout=ff_dropout)
        if len(grid) != 2 or min(grid) < 1:
            raise ConfigError("grid", f"the token map is (h, w) with h, w >= 1, got {list(grid)}")
        if rotary_mode not in ("per_head", "original"):
            raise ConfigError("rotary_mode", f"must be 'per_head' or 'original', got {rotary_mode!r}")
        if resample_groups not in ("patch", "raster"):
            raise ConfigError("resample_groups", f"must be 'patch' or 'raster', got {resample_groups!r}")
        self.vocab_size, self.grid = int(vocab_size), (int(grid[0]), int(grid[1]))
        self.seq_len = self.grid[0] * self.grid[1]
        self.num_classes = int(num_classes) if num_classes else None
        self.spec = parse_depth(depth)
        self.patches = parse_shorten_factors(shorten_factor, levels(self.spec))
        self.grids = level_grids(self.grid, self.patches)
        self.rotary_mode = rotary_mode
        rd = (dim_head // 2 if rotary_emb_dim is None else int(rotary_emb_dim)) if rotary else None
        if rd is not None:
            width = dim_head if rotary_mode == "per_head" else heads * dim_head
            if 2 * rd > width:
                raise ConfigError("rotary_emb_dim", f"2 x {rd} rotated features (one set per axis) do not fit in "
                                                    f"{width} ({'dim_head' if rotary_mode == 'per_head' else 'heads x dim_head'})")

        if rotary_mode == "original":
            # the original builds every stack with max_seq_len 256 (max_freq 16), except the innermost valley,
            # which gets the model's length divided by the shorten factors (the weights carry them anyway)
            def default_freq(g: Any) -> float:
                return 16.0
            inner = self.seq_len // math.prod(kh * kw for kh, kw in self.patches)
            valley_freq = float(math.isqrt(inner))
        else:  # one frequency step per token side at every level: the finest turns ~pi per token
            def default_freq(g: Any) -> float:
                return float(max(g)) if g else 1.0
            valley_freq = float(max(self.grids[-1]))
        block_kw = dict(heads=heads, dim_head=dim_head, ff_mult=ff_mult, attn_dropout=attn_dropout, ff_dropout=ff_dropout)
        make_stack = _StackFactory(dim, block_kw, rd, rotary_mode, default_freq)

        self.token_emb = nn.Embedding(self.vocab_size, dim)
        self.class_emb = nn.Embedding(self.num_classes + 1, dim) if self.num_classes else None  # + the null class
        self.pos_emb = None if rotary else nn.Parameter(torch.randn(1, self.seq_len, dim) * 0.02)
        if isinstance(self.spec, Level):
            self.body: nn.Module = Hourglass(self.spec, self.patches, self.grids, make_stack, valley_freq,
                                             attn_resampling, resample_groups)
        else:
            self.body = make_stack(self.spec, self.grid, max_freq=valley_freq)
        self.norm_out = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, self.vocab_size)

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None) -> torch.Tensor:
        b, n = x.shape
        if n != self.seq_len:
            raise ValueError(f"this network was built for a {self.grid[0]}x{self.grid[1]} token map ({self.seq_len} "
                             f"tokens), got sequences of {n}")
        h = self.token_emb(x)  # (B, N, D)
        if self.class_emb is not None:
            if cond is None:
                cond = torch.full((b,), self.num_classes, dtype=torch.long, device=x.device)
            if cond.numel() and (int(cond.min()) < 0 or int(cond.max()) > self.num_classes):
                raise ValueError(f"class labels must be in 0..{self.num_classes - 1} (or {self.num_classes}, the null "
                                 f"class; num_classes={self.num_classes}), got {sorted(set(cond.tolist()))}")
            h = h + self.class_emb(cond)[:, None]
        if self.pos_emb is not None:
            h = h + self.pos_emb
        h = self.body(h) if isinstance(self.body, Hourglass) else self.body(h, self.grid)
        return self.to_logits(self.norm_out(h))  # (B, N, K)


# --- the original's checkpoints -------------------------------------------------------------------------
_STACK_NAMES = {"pre_transformer": "pre", "post_transformer": "post", "valley_transformer": "valley",
                "attn_resampling_pre_valley": "resample_pre", "attn_resampling_post_valley": "resample_post",
                "downsample": "down", "upsample": "up"}


def _ff_linear_names(net: HourglassTransformer) -> tuple[str, str]:
    """Where x-transformers' FeedForward keeps its two Linear layers (relative to a block's `ff.`)."""
    ff = next(m for m in net.modules() if isinstance(m, FeedForward))
    names = [n for n, m in ff.named_modules() if isinstance(m, nn.Linear)]
    return names[0], names[-1]


def convert_original_state_dict(state: Mapping[str, torch.Tensor], net: HourglassTransformer) -> dict[str, torch.Tensor]:
    """A state dict of the original `HourglassTransformerLM` in `net`'s keys (for `net.load_state_dict`).

    Renames each part; the original's feed-forward `fn.0` / `fn.3` go to x-transformers' Linear layers;
    the rotary frequencies of the attention-resampling stacks, which the original stores but never uses,
    are dropped; a class embedding without the null class gets a zero row for it, so the null class runs
    the network as the original's unconditional model with the same weights does.
    """
    ff_in, ff_out = _ff_linear_names(net)
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        parts = key.split(".")
        if parts[0] == "transformer":
            parts[0] = "body"
            if parts[1] in ("norm_out", "norm"):  # the top level's final norm (a plain stack calls it norm)
                parts = ["norm_out", *parts[2:]]
        elif parts[0] == "pos_emb":
            value = value[None]  # an Embedding(N, D) in the original
            parts = ["pos_emb"]
        renamed = []
        i = 0
        while i < len(parts):
            p = parts[i]
            if p in _STACK_NAMES:
                renamed.append(_STACK_NAMES[p])
            elif p == "rotary_pos_emb":
                renamed.append("rotary")
            elif p == "layers" and i + 2 < len(parts) and parts[i + 2] in ("0", "1"):
                # layers.<n>.0.norm / .0.fn.* (attention), layers.<n>.1.norm / .1.fn.<0|3>.* (feed-forward)
                n, which, rest = parts[i + 1], parts[i + 2], parts[i + 3:]
                if which == "0":
                    rest = ["attn_norm", *rest[1:]] if rest[0] == "norm" else ["attn", *rest[1:]]
                elif rest[0] == "norm":
                    rest = ["ff_norm", *rest[1:]]
                else:  # fn.0.weight -> ff.<first linear>.weight
                    rest = ["ff", *(ff_in if rest[1] == "0" else ff_out).split("."), *rest[2:]]
                renamed += ["layers", n, *rest]
                break
            else:
                renamed.append(p)
            i += 1
        name = ".".join(renamed)
        if ".resample_" in name and name.endswith(".rotary.freqs"):  # stored by the original, never used
            continue
        out[name] = value
    own = net.state_dict()
    if "class_emb.weight" in out and "class_emb.weight" in own:
        w = out["class_emb.weight"]
        if w.shape[0] + 1 == own["class_emb.weight"].shape[0]:
            out["class_emb.weight"] = torch.cat([w, torch.zeros_like(w[:1])])
    return out


def original_parameter_count(vocab_size: int, seq_len: int, dim: int, depth: Any, heads: int = 8,
                             dim_head: int = 64, ff_mult: int = 4, num_classes: int = 0, rotary: bool = True,
                             rotary_emb_dim: int | None = None, attn_resampling: bool = True,
                             shorten_factor: Any = 4) -> int:
    """Parameters of the original `HourglassTransformerLM` (all of its `nn.Parameter`s, the frozen rotary
    frequencies included), counted from its architecture rather than from this file's modules."""
    inner = heads * dim_head
    block = 2 * (2 * dim) + dim * inner + dim * 2 * inner + (inner * dim + dim) \
        + (dim * ff_mult * dim + ff_mult * dim) + (ff_mult * dim * dim + dim)
    freqs = ((dim_head // 2 if rotary_emb_dim is None else rotary_emb_dim) // 2) if rotary else 0

    def transformer(n: int) -> int:  # every original Transformer holds a rotary embedding when rotary is on
        return n * block + freqs

    def count(spec: DepthSpec, factors: list[int]) -> int:
        if isinstance(spec, int):
            return transformer(spec)
        k = factors[0]
        resampling = 2 * transformer(1) if attn_resampling else 0
        return transformer(spec.pre) + transformer(spec.post) + count(spec.valley, factors[1:]) + resampling \
            + (k * dim * dim + dim) + (dim * k * dim + k * dim)

    spec = parse_depth(depth)
    factors = [kh * kw for kh, kw in parse_shorten_factors(shorten_factor, levels(spec))]
    embeddings = vocab_size * dim + num_classes * dim + (0 if rotary else seq_len * dim)
    return embeddings + count(spec, factors) + 2 * dim + dim * vocab_size + vocab_size

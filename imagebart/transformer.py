"""ImageBART's transition networks, in the key layouts of the original checkpoints, with a key/value cache.

`EncoderDecoder` (scales t < T, or every scale when trained jointly) is the original's
`ResidualScaledXTransformer`: the encoder reads `[t, class, x_t]` bidirectionally (scale, class and codes are
ids of one vocabulary, told apart by their positions), the decoder predicts x_{t-1} in raster order, each
position attending causally to the earlier ones and to all of the encoder's output. In the residual-scaled
variant the logits of scale t are the decoder's times exp(log_scalors[t - 1]) plus log q(x_t | x_{t-1}) as a
function of x_{t-1}, so an untrained network already predicts "x_{t-1} is x_t, up to the noise".

`DecoderOnly` (scale T, where x_T is pure noise) is the original's minGPT: `[T, class, x_{T-1}]` with causal
attention, the conditioning tokens seeing each other when `n_unmasked` says so.

ImageBART vendors x-transformers 0.x: its attention output projection has a bias and its absolute positions
are not rescaled, unlike x-transformers 2.x, so a 2.x stack cannot load the released checkpoints exactly.
These modules keep the original parameter names (`encoder.attn_layers.layers.3.1.to_q.weight`, ...), run
attention through `scaled_dot_product_attention`, and decode with a cache: `start` encodes once and
`next_logits` feeds one token at a time, attending to cached keys and values.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.nn.attention import attention
from ldm.util import Fraction, NonNegativeInt, PositiveInt


@dataclass
class DecodeState:
    """What incremental decoding carries between tokens: the encoder's output, per-layer key/value caches
    (filled up to `length`), and the conditioning the network's output needs."""

    x_t: torch.Tensor  # (B, N) long
    t: torch.Tensor  # (B,) long
    cond: torch.Tensor | None  # (B,) long class ids
    context: torch.Tensor | None = None  # (B, L, D) encoder output
    caches: list[dict[str, Any]] = field(default_factory=list)
    length: int = 0  # tokens fed so far
    position: int = 0  # the next output position


class Attention(nn.Module):
    """Multi-head attention, q/k/v without bias and an output projection with bias (x-transformers 0.x)."""

    def __init__(self, dim: int, heads: int, dim_head: int = 64, causal: bool = False, dropout: float = 0.0):
        super().__init__()
        inner = heads * dim_head
        self.heads, self.causal, self.dropout = heads, causal, dropout
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def split(self, x: torch.Tensor) -> torch.Tensor:
        return x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # (B, h, n, d)

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                cache: dict[str, Any] | None = None, offset: int = 0) -> torch.Tensor:
        """Self-attention over `x` (B, n, D), or cross-attention to `context`. With `cache`, `x` holds the
        tokens at positions offset.. and earlier keys/values come from the cache (which this call extends);
        cross-attention keys/values are computed once and kept there."""
        q = self.split(self.to_q(x))
        if context is not None:
            if cache is not None and "k" in cache:
                k, v = cache["k"], cache["v"]
            else:
                k, v = self.split(self.to_k(context)), self.split(self.to_v(context))
                if cache is not None:
                    cache.update(k=k, v=v)
            mask = None
        else:
            k, v = self.split(self.to_k(x)), self.split(self.to_v(x))
            if cache is not None:
                k, v = _append(cache, k, v, offset)
            mask = _causal_mask(q.shape[2], k.shape[2], x.device) if self.causal and q.shape[2] > 1 else None
        drop = self.dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.to_out(out.transpose(1, 2).flatten(2))


def _append(cache: dict[str, Any], k: torch.Tensor, v: torch.Tensor, offset: int
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """Write k, v (B, h, n, d) at positions offset.. of the cache's buffers; the keys/values up to there."""
    n = k.shape[2]
    if "k" not in cache:
        cache["k"] = k.new_empty((*k.shape[:2], int(cache["capacity"]), k.shape[3]))
        cache["v"] = torch.empty_like(cache["k"])
    cache["k"][:, :, offset: offset + n] = k
    cache["v"][:, :, offset: offset + n] = v
    return cache["k"][:, :, : offset + n], cache["v"][:, :, : offset + n]


def _causal_mask(n_q: int, n_k: int, device: torch.device, n_unmasked: int = 0) -> torch.Tensor:
    """(n_q, n_k) bool, True = attend: the last n_q of n_k positions see those before them (and the first
    `n_unmasked` see each other)."""
    q_pos = torch.arange(n_k - n_q, n_k, device=device)[:, None]
    k_pos = torch.arange(n_k, device=device)[None]
    mask = k_pos <= q_pos
    if n_unmasked:
        mask |= (q_pos < n_unmasked) & (k_pos < n_unmasked)
    return mask


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, as `net.0.0` / `net.2` (x-transformers 0.x)."""

    def __init__(self, dim: int, mult: int = 4, dropout: float = 0.0):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(dropout),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class LayerStack(nn.Module):
    """Pre-LayerNorm residual blocks: ('a', 'f') per layer in the encoder, ('a', 'c', 'f') in the decoder."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int, causal: bool, cross_attend: bool,
                 ff_mult: int, dropout: float):
        super().__init__()
        kinds = ("a", "c", "f") if cross_attend else ("a", "f")
        self.kinds = kinds * depth
        self.layers = nn.ModuleList()
        for kind in self.kinds:
            block = FeedForward(dim, ff_mult, dropout) if kind == "f" else \
                Attention(dim, heads, dim_head, causal=causal and kind == "a", dropout=dropout)
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), block]))

    def forward(self, x: torch.Tensor, context: torch.Tensor | None = None,
                caches: list[dict[str, Any]] | None = None, offset: int = 0) -> torch.Tensor:
        for i, (kind, (norm, block)) in enumerate(zip(self.kinds, self.layers)):
            h = norm(x)
            if kind == "f":
                x = x + block(h)
            else:
                cache = caches[i] if caches is not None else None
                x = x + block(h, context if kind == "c" else None, cache=cache, offset=offset)
        return x


class AbsolutePositions(nn.Module):
    """Learned absolute positions, unscaled (the `pos_emb.emb` of x-transformers 0.x)."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)

    def forward(self, n: int, offset: int, device: torch.device) -> torch.Tensor:
        if offset + n > self.emb.num_embeddings:
            raise ValueError(f"sequence of {offset + n} tokens is longer than the network's {self.emb.num_embeddings}")
        return self.emb(torch.arange(offset, offset + n, device=device))


class TokenStack(nn.Module):
    """Token and position embeddings, a `LayerStack`, a final LayerNorm and, for a decoder, logits."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, heads: int, dim_head: int,
                 causal: bool, cross_attend: bool, logits_dim: int | None, ff_mult: int, dropout: float):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        self.pos_emb = AbsolutePositions(dim, max_seq_len)
        self.attn_layers = LayerStack(dim, depth, heads, dim_head, causal, cross_attend, ff_mult, dropout)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, logits_dim) if logits_dim else None

    def forward(self, ids: torch.Tensor, context: torch.Tensor | None = None,
                caches: list[dict[str, Any]] | None = None, offset: int = 0) -> torch.Tensor:
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1], offset, ids.device)
        x = self.norm(self.attn_layers(x, context, caches, offset))
        return self.to_logits(x) if self.to_logits is not None else x

    def new_caches(self, capacity: int) -> list[dict[str, Any]]:
        return [{"capacity": capacity} for _ in self.attn_layers.kinds]


def _vocabulary(codebook_size: int, n_scales: int, num_classes: int | None, given: int | None, key: str) -> int:
    """Input ids hold codes, the scale t (1..T) and the class: the vocabulary must cover all of them. By
    default it also holds the null class (id num_classes) of classifier-free guidance; a given one may not
    (the original ImageNet networks read exactly the 1,000 classes)."""
    need = max(codebook_size, n_scales + 1, num_classes or 0)
    if given is None:
        return max(need, (num_classes + 1) if num_classes else 0)
    if given < need:
        raise ValueError(f"{key}={given} cannot hold the ids the network reads: codes 0..{codebook_size - 1}, scales "
                         f"1..{n_scales}" + (f", classes 0..{num_classes - 1}" if num_classes else "")
                         + f"; it must be >= {need}")
    return given


def _length(given: int | None, need: int, key: str) -> int:
    """A learned position table of `need` positions, or a larger given one (some original configs)."""
    if given is None:
        return need
    if given < need:
        raise ValueError(f"{key}={given} is shorter than the {need} positions the network reads")
    return given


class EncoderDecoder(nn.Module):
    """p(x_{t-1} | x_t, t, class): `forward(x_prev, x_t, t, cond) -> logits (B, N, K)` teacher-forced on x_prev."""

    def __init__(
        self,
        vocab_size: PositiveInt,
        seq_len: PositiveInt,
        n_scales: PositiveInt,
        dim: PositiveInt = 256,
        enc_depth: PositiveInt = 4,
        dec_depth: PositiveInt = 2,
        heads: PositiveInt = 8,
        dim_head: PositiveInt = 64,
        ff_mult: PositiveInt = 4,
        num_classes: PositiveInt | None = None,
        residual_scaled: bool = True,
        enc_num_tokens: PositiveInt | None = None,
        enc_max_seq_len: PositiveInt | None = None,
        sos_token: NonNegativeInt = 0,
        dropout: Fraction = 0.0,
    ):
        super().__init__()
        self.vocab_size, self.seq_len, self.n_scales = vocab_size, seq_len, n_scales
        self.num_classes, self.sos_token, self.residual_scaled = num_classes, sos_token, residual_scaled
        self.prefix = 2 if num_classes else 1  # [t] or [t, class] before x_t
        enc_tokens = _vocabulary(vocab_size, n_scales, num_classes, enc_num_tokens, "enc_num_tokens")
        self.has_null_class = bool(num_classes) and enc_tokens > num_classes
        self.encoder = TokenStack(enc_tokens, _length(enc_max_seq_len, self.prefix + seq_len, "enc_max_seq_len"), dim,
                                  enc_depth, heads, dim_head, causal=False, cross_attend=False, logits_dim=None,
                                  ff_mult=ff_mult, dropout=dropout)
        self.decoder = TokenStack(vocab_size, seq_len, dim, dec_depth, heads, dim_head, causal=True,
                                  cross_attend=True, logits_dim=vocab_size, ff_mult=ff_mult, dropout=dropout)
        if residual_scaled:
            self.log_scalors = nn.Parameter(torch.zeros(n_scales))
        # a_t of the forward process (t = 0..T), set by the prior from its schedule (not saved: the schedule is)
        self.register_buffer("kernel_alphas", torch.ones(n_scales + 1), persistent=False)

    def set_alphas(self, alphas: torch.Tensor) -> None:
        self.kernel_alphas = torch.as_tensor(alphas, dtype=torch.float32).to(self.kernel_alphas.device)

    def source(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        parts = [t[:, None]]
        if self.num_classes:
            parts.append(cond[:, None] if cond is not None else
                         torch.full_like(t[:, None], self.num_classes))
        return torch.cat(parts + [x_t], 1)

    def encode(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        return self.encoder(self.source(x_t, t, cond))

    def output(self, logits: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor, start: int) -> torch.Tensor:
        """The decoder's logits for positions start.. turned into the transition's (scaled, plus the residual)."""
        if not self.residual_scaled:
            return logits
        logits = logits * self.log_scalors[t - 1].exp()[:, None, None]
        keep = self.kernel_alphas[t][:, None, None]
        x = x_t[:, start: start + logits.shape[1]]
        residual = (keep * F.one_hot(x, self.vocab_size).to(logits.dtype) + (1 - keep) / self.vocab_size).log()
        return logits + residual

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        sos = torch.full_like(x_prev[:, :1], self.sos_token)
        logits = self.decoder(torch.cat([sos, x_prev[:, :-1]], 1), context=self.encode(x_t, t, cond))
        return self.output(logits, x_t, t, 0)

    # --- incremental decoding ----------------------------------------------------------------
    def evaluation_modules(self) -> list[nn.Module]:
        """What one network evaluation runs: the decoder, once per token while sampling (the encoder once per
        scale besides), once per sequence in training."""
        return [self.decoder]

    def start(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> DecodeState:
        return DecodeState(x_t, t, cond, context=self.encode(x_t, t, cond),
                           caches=self.decoder.new_caches(self.seq_len))

    def next_logits(self, state: DecodeState, token: torch.Tensor | None) -> torch.Tensor:
        """Logits (B, K) of the next position, given the token (B,) chosen at the previous one (None first)."""
        if token is None:
            token = torch.full_like(state.x_t[:, 0], self.sos_token)
        logits = self.decoder(token[:, None], context=state.context, caches=state.caches, offset=state.length)
        out = self.output(logits, state.x_t, state.t, state.position)[:, 0]
        state.length += 1
        state.position += 1
        return out

    def prefix_logits(self, state: DecodeState, prefix: torch.Tensor) -> torch.Tensor:
        """Logits (B, K) of position len(prefix) without the cache: the decoder rerun on the whole prefix (the
        encoder's output reused, as the original samples), the reference the cache must match."""
        sos = torch.full_like(state.x_t[:, :1], self.sos_token)
        logits = self.decoder(torch.cat([sos, prefix], 1), context=state.context)[:, -1:]
        return self.output(logits, state.x_t, state.t, prefix.shape[1])[:, 0]


class GPTAttention(nn.Module):
    """minGPT's attention: key/query/value/proj with bias."""

    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads, self.dropout = heads, dropout
        self.key, self.query, self.value = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, cache: dict[str, Any] | None, offset: int,
                n_unmasked: int) -> torch.Tensor:
        split = lambda y: y.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        q, k, v = split(self.query(x)), split(self.key(x)), split(self.value(x))
        if cache is not None:
            k, v = _append(cache, k, v, offset)
        mask = _causal_mask(q.shape[2], k.shape[2], x.device, n_unmasked) if q.shape[2] > 1 or n_unmasked else None
        drop = self.dropout if self.training else 0.0
        out = attention(q, k, v, attn_mask=mask, dropout_p=drop)
        return self.proj(out.transpose(1, 2).flatten(2))


class GPTBlock(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = GPTAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor, cache: dict[str, Any] | None = None, offset: int = 0,
                n_unmasked: int = 0) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache, offset, n_unmasked)
        return x + self.mlp(self.ln2(x))


class DecoderOnly(nn.Module):
    """p(x_{T-1} | class) at the last scale (x_T carries nothing): minGPT over `[T, class, x_{T-1}]`.

    `forward(x_prev, x_t, t, cond) -> logits (B, N, K)`, the same call as `EncoderDecoder`'s (x_t unused).
    """

    def __init__(
        self,
        vocab_size: PositiveInt,
        seq_len: PositiveInt,
        n_scales: PositiveInt,
        dim: PositiveInt = 256,
        depth: PositiveInt = 4,
        heads: PositiveInt = 8,
        num_classes: PositiveInt | None = None,
        input_vocab_size: PositiveInt | None = None,
        block_size: PositiveInt | None = None,
        n_unmasked: NonNegativeInt = 0,
        dropout: Fraction = 0.0,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads})")
        self.vocab_size, self.seq_len, self.n_scales = vocab_size, seq_len, n_scales
        self.num_classes, self.n_unmasked = num_classes, n_unmasked
        self.prefix = 2 if num_classes else 1
        self.block_size = _length(block_size, self.prefix + seq_len - 1, "block_size")
        in_tokens = _vocabulary(vocab_size, n_scales, num_classes, input_vocab_size, "input_vocab_size")
        self.has_null_class = bool(num_classes) and in_tokens > num_classes
        self.tok_emb = nn.Embedding(in_tokens, dim)
        self.pos_emb = nn.Parameter(torch.zeros(1, self.block_size, dim))
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[GPTBlock(dim, heads, dropout) for _ in range(depth)])
        self.ln_f = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    def set_alphas(self, alphas: torch.Tensor) -> None:  # the last scale's transition has no residual
        pass

    def conditioning(self, t: torch.Tensor, cond: torch.Tensor | None) -> torch.Tensor:
        parts = [t[:, None]]
        if self.num_classes:
            parts.append(cond[:, None] if cond is not None else torch.full_like(t[:, None], self.num_classes))
        return torch.cat(parts, 1)

    def run(self, ids: torch.Tensor, caches: list[dict[str, Any]] | None = None, offset: int = 0
            ) -> torch.Tensor:
        n = ids.shape[1]
        if offset + n > self.block_size:
            raise ValueError(f"sequence of {offset + n} tokens is longer than the network's {self.block_size}")
        x = self.drop(self.tok_emb(ids) + self.pos_emb[:, offset: offset + n])
        for i, block in enumerate(self.blocks):
            x = block(x, caches[i] if caches is not None else None, offset, self.n_unmasked)
        return self.head(self.ln_f(x))

    def forward(self, x_prev: torch.Tensor, x_t: torch.Tensor | None, t: torch.Tensor,
                cond: torch.Tensor | None = None) -> torch.Tensor:
        c = self.conditioning(t, cond)
        return self.run(torch.cat([c, x_prev[:, :-1]], 1))[:, c.shape[1] - 1:]

    def evaluation_modules(self) -> list[nn.Module]:
        """What one network evaluation runs: the output head, once per token while sampling."""
        return [self.head]

    def start(self, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor | None) -> DecodeState:
        return DecodeState(x_t, t, cond, caches=[{"capacity": self.block_size} for _ in self.blocks])

    def next_logits(self, state: DecodeState, token: torch.Tensor | None) -> torch.Tensor:
        ids = self.conditioning(state.t, state.cond) if token is None else token[:, None]
        logits = self.run(ids, state.caches, state.length)[:, -1]
        state.length += ids.shape[1]
        state.position += 1
        return logits

    def prefix_logits(self, state: DecodeState, prefix: torch.Tensor) -> torch.Tensor:
        return self.run(torch.cat([self.conditioning(state.t, state.cond), prefix], 1))[:, -1]


def parameter_count(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def gpt_parameter_count(vocab_size: int, block_size: int, n_layer: int, n_embd: int,
                        input_vocab_size: int | None = None) -> int:
    """minGPT's parameters in closed form (from its configuration, for the paper-config tests)."""
    d = n_embd
    block = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    return (input_vocab_size or vocab_size) * d + block_size * d + n_layer * block + 2 * d + d * vocab_size


def xtransformer_parameter_count(dim: int, enc_num_tokens: int, enc_depth: int, enc_heads: int,
                                 enc_max_seq_len: int, dec_num_tokens: int, dec_depth: int, dec_heads: int,
                                 dec_max_seq_len: int, dim_head: int = 64, scalors: int = 0) -> int:
    """The original XTransformer's parameters in closed form (encoder `to_logits` included, as it exists)."""
    d = dim

    def attn(heads: int) -> int:
        inner = heads * dim_head
        return 3 * d * inner + inner * d + d + 2 * d  # q, k, v, out (+bias), its LayerNorm

    ff = d * 4 * d + 4 * d + 4 * d * d + d + 2 * d
    enc = enc_num_tokens * d + enc_max_seq_len * d + enc_depth * (attn(enc_heads) + ff) + 2 * d + d * enc_num_tokens + enc_num_tokens
    dec = dec_num_tokens * d + dec_max_seq_len * d + dec_depth * (2 * attn(dec_heads) + ff) + 2 * d \
        + d * dec_num_tokens + dec_num_tokens
    return enc + dec + scalors



def convert_original_state_dict(state: dict[str, torch.Tensor], prefix: str = "transformer.") -> dict[str, torch.Tensor]:
    """An original ImageBART network's state dict (`transformer.*` of a `DenoisingXTransformer` or
    `DecoderOnlyDenoiser` checkpoint) in this module's names: the prefix dropped, and what these modules do
    not keep left out (the encoder's unused logits head, minGPT's mask buffers)."""
    out = {}
    for key, value in state.items():
        if not key.startswith(prefix):
            continue
        key = key[len(prefix):]
        if key.startswith("encoder.to_logits.") or key.endswith(".attn.mask"):
            continue
        out[key] = value
    return out

"""latent-diffusion's `BERTEmbedder`: the text encoder of its LAION-400M text-to-image model (LDM-KL-8, 1.45B).

Despite the name it is no pretrained BERT: only the BERT WordPiece tokenizer's ids (bert-base-uncased, vocabulary
30522, padded to 77) come from BERT; the encoder is a pre-norm transformer (x-transformers 0.x's `Encoder`: 8 heads
of 64, a GELU feed-forward of 4x the width, LayerNorms with bias) trained from scratch with the diffusion model.

The module tree reproduces the bundled x-transformers 0.x's `TransformerWrapper`, so the released checkpoint's
`cond_stage_model.*` tensors load with no missing or unexpected key:

    transformer.token_emb.weight, transformer.pos_emb.emb.weight,
    transformer.attn_layers.layers.<2i>.0.{weight,bias}           pre-attention LayerNorm of block i
    transformer.attn_layers.layers.<2i>.1.to_{q,k,v}.weight        (no bias), .1.to_out.{weight,bias}
    transformer.attn_layers.layers.<2i+1>.0.{weight,bias}          pre-feed-forward LayerNorm
    transformer.attn_layers.layers.<2i+1>.1.net.0.0.{weight,bias}  and .1.net.2.{weight,bias}
    transformer.norm.{weight,bias}, transformer.to_logits.{weight,bias}

`to_logits` (a language-model head the embeddings never use) is kept, frozen, only so those checkpoints load and
the parameter count is the original's. The tokenizer lives in the conditioner (`ldm.conditioning.BERTCaption`):
latent-diffusion called it inside `forward`, here strings become ids where every other caption does.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ldm.nn.attention import attention
from ldm.util import NonNegativeFloat, PositiveInt

BERT_VOCAB = 30522  # bert-base-uncased's WordPiece vocabulary
BERT_MAX_LENGTH = 77


class _SelfAttention(nn.Module):
    """Multi-head self-attention with x-transformers 0.x's parameters (bias-free q/k/v, biased output)."""

    def __init__(self, dim: int, heads: int, dim_head: int):
        super().__init__()
        inner = heads * dim_head
        self.heads = heads
        self.to_q = nn.Linear(dim, inner, bias=False)
        self.to_k = nn.Linear(dim, inner, bias=False)
        self.to_v = nn.Linear(dim, inner, bias=False)
        self.to_out = nn.Linear(inner, dim)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        split = lambda t: t.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731  (B, heads, L, dim_head)
        out = attention(split(self.to_q(x)), split(self.to_k(x)), split(self.to_v(x)), attn_mask=attn_mask)
        return self.to_out(out.transpose(1, 2).flatten(2))  # (B, L, dim)


class _FeedForward(nn.Module):
    """Linear -> GELU -> (dropout) -> Linear, nested as x-transformers 0.x nests it (`net.0.0`, `net.2`)."""

    def __init__(self, dim: int, mult: int = 4):
        super().__init__()
        self.net = nn.Sequential(nn.Sequential(nn.Linear(dim, dim * mult), nn.GELU()), nn.Dropout(0.0),
                                 nn.Linear(dim * mult, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _PositionalEmbedding(nn.Module):
    """Learned absolute positions (`pos_emb.emb`), added unscaled as in x-transformers 0.x."""

    def __init__(self, dim: int, max_seq_len: int):
        super().__init__()
        self.emb = nn.Embedding(max_seq_len, dim)
        nn.init.normal_(self.emb.weight, std=0.02)

    def forward(self, length: int) -> torch.Tensor:
        return self.emb.weight[:length]  # (L, dim)


class _Encoder(nn.Module):
    """`depth` pre-norm residual pairs (self-attention, feed-forward): `layers.<j>` = [LayerNorm, block]."""

    def __init__(self, dim: int, depth: int, heads: int, dim_head: int):
        super().__init__()
        self.layers = nn.ModuleList()
        for _ in range(depth):
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _SelfAttention(dim, heads, dim_head)]))
            self.layers.append(nn.ModuleList([nn.LayerNorm(dim), _FeedForward(dim)]))

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        for norm, block in self.layers:
            h = norm(x)
            x = x + (block(h, attn_mask) if isinstance(block, _SelfAttention) else block(h))
        return x


class _TransformerWrapper(nn.Module):
    """Token and position embeddings, the encoder, a final LayerNorm (and the unused `to_logits` head)."""

    def __init__(self, num_tokens: int, max_seq_len: int, dim: int, depth: int, heads: int, dim_head: int,
                 emb_dropout: float):
        super().__init__()
        self.max_seq_len = max_seq_len
        self.token_emb = nn.Embedding(num_tokens, dim)
        nn.init.normal_(self.token_emb.weight, std=0.02)
        self.pos_emb = _PositionalEmbedding(dim, max_seq_len)
        self.emb_dropout = nn.Dropout(emb_dropout)
        self.attn_layers = _Encoder(dim, depth, heads, dim_head)
        self.norm = nn.LayerNorm(dim)
        self.to_logits = nn.Linear(dim, num_tokens).requires_grad_(False)  # checkpoint layout only

    def forward(self, ids: torch.Tensor, attn_mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.token_emb(ids) + self.pos_emb(ids.shape[1])  # (B, L, dim)
        x = self.attn_layers(self.emb_dropout(x), attn_mask)
        return self.norm(x)


class BERTEmbedder(nn.Module):
    """`forward(ids (B, L) long, mask (B, L) bool | None) -> (B, L, n_embed)`: latent-diffusion's LAION text encoder.

    `use_mask=False` is the original's behaviour: the padded positions are encoded and attended like any token
    (the released model was trained so), and the UNet's cross-attention sees all `max_seq_len` of them (the
    `context_mask` it gets is all True). `use_mask=True` keeps padding out of the encoder's keys and passes the
    tokenizer's mask on to the UNet, for models trained that way.
    """

    def __init__(self, n_embed: PositiveInt, n_layer: PositiveInt, vocab_size: PositiveInt = BERT_VOCAB,
                 max_seq_len: PositiveInt = BERT_MAX_LENGTH, embedding_dropout: NonNegativeFloat = 0.0,
                 heads: PositiveInt = 8, dim_head: PositiveInt = 64, use_mask: bool = False):
        super().__init__()
        if not 0.0 <= embedding_dropout < 1.0:
            raise ValueError(f"embedding_dropout must be in [0, 1), got {embedding_dropout}")
        self.dim, self.vocab_size, self.max_seq_len, self.use_mask = n_embed, vocab_size, max_seq_len, use_mask
        self.transformer = _TransformerWrapper(vocab_size, max_seq_len, n_embed, n_layer, heads, dim_head,
                                               embedding_dropout)

    consumes = ("context",)

    def condition(self, cond: dict[str, Any]) -> dict[str, Any]:
        """The conditioning dict with its WordPiece ids replaced by their embeddings (see `use_mask` for the mask)."""
        ids, mask = cond["context"], cond.get("context_mask")
        if self.use_mask:
            return {**cond, "context": self(ids, mask)}
        return {**cond, "context": self(ids), "context_mask": torch.ones(ids.shape, dtype=torch.bool, device=ids.device)}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if ids.dim() != 2 or ids.is_floating_point():
            raise ValueError(f"BERTEmbedder takes token ids (B, L) long, got {tuple(ids.shape)} {ids.dtype}")
        if ids.shape[1] > self.max_seq_len:
            raise ValueError(f"{ids.shape[1]} tokens are more than the BERTEmbedder's max_seq_len {self.max_seq_len}")
        attn_mask = None
        if mask is not None:
            keep = mask.bool().clone()  # (B, L)
            keep[:, 0] |= ~keep.any(1)  # an all-padding row attends to its first position rather than to nothing
            attn_mask = keep[:, None, None, :]  # keys only: (B, 1, 1, L)
        return self.transformer(ids.long(), attn_mask)

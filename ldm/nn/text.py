"""Text for the Gaussian prior without downloads: UTF-8 bytes as token ids and a small transformer encoder
trained with the prior (latent-diffusion's `cond_stage_model`, trainable).

Ids are byte + 1 (0 pads), so the vocabulary is 257 and any language or symbol encodes; the encoder is an
x-transformers stack whose output embeddings feed the UNet's cross-attention (`context_dim` = its width).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from ldm.util import PositiveInt

with warnings.catch_warnings():  # x_transformers decorates with torch.jit.script at import (a FutureWarning)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from x_transformers import Encoder, TransformerWrapper

BYTE_VOCAB = 257  # 256 byte values + padding


def byte_ids(texts: Sequence[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Strings to (ids (B, max_length) long, mask (B, max_length) bool), truncated to max_length bytes."""
    ids = torch.zeros(len(texts), max_length, dtype=torch.long)
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise ValueError(f"captions must be strings, got {type(text).__name__}")
        data = list(text.encode("utf-8"))[:max_length]
        ids[i, : len(data)] = torch.tensor(data, dtype=torch.long) + 1
    return ids, ids > 0


class ByteTextEncoder(nn.Module):
    """`forward(ids (B, L) long, mask (B, L) bool) -> (B, L, dim)` embeddings."""

    def __init__(self, dim: PositiveInt = 128, depth: PositiveInt = 2, heads: PositiveInt = 4,
                 max_length: PositiveInt = 32):
        super().__init__()
        self.dim, self.max_length = dim, max_length
        self.net = TransformerWrapper(num_tokens=BYTE_VOCAB, max_seq_len=max_length, return_only_embed=True, attn_layers=Encoder(
            dim=dim, depth=depth, heads=heads, attn_dim_head=dim // heads))

    consumes = ("context",)

    def condition(self, cond: dict) -> dict:
        """The conditioning dict with its caption ids replaced by their embeddings (the mask kept)."""
        return {**cond, "context": self(cond["context"], cond["context_mask"])}

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # an empty caption (the null text) attends to its first (padding) position rather than to nothing
        attend = mask.clone()
        attend[:, 0] |= ~mask.any(1)
        return self.net(ids, mask=attend, return_embeddings=True)

"""Bidirectional transformer over token maps, on x-transformers: the denoiser of the masked-token priors.

Conditioning enters as tokens prepended to the sequence: a class token (index `num_classes` is
the null class used for classifier-free guidance) and, optionally, a timestep token. The
absorbing prior's paper denoiser is not told t and infers it from the number of masks; both
variants are available through `time_conditioning`.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

with warnings.catch_warnings():
    # x_transformers decorates a function with torch.jit.script as it is imported, which torch 2.9 deprecates: a
    # warning the user can do nothing about, on the stderr that otherwise holds only errors (ldm.cli)
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from x_transformers import Encoder, TransformerWrapper

from ldm.util import Fraction, NonNegativeInt, PositiveInt


class TokenTransformer(nn.Module):
    """`forward(x (B, N) long, t (B,) long | None, cond (B,) long | None) -> logits (B, N, K)`."""

    def __init__(
        self,
        vocab_size: int,
        seq_len: int,
        dim: PositiveInt = 256,
        depth: PositiveInt = 8,
        heads: PositiveInt = 8,
        dim_head: PositiveInt | None = None,
        ff_mult: PositiveInt = 4,
        num_classes: PositiveInt | None = None,
        time_conditioning: bool = False,
        num_timesteps: PositiveInt | None = None,
        extra_input_tokens: NonNegativeInt = 1,
        dropout: Fraction = 0.0,
        emb_dropout: Fraction = 0.0,
    ):
        """`vocab_size` K output classes; inputs may use K + `extra_input_tokens` ids (the mask id K)."""
        super().__init__()
        if dim % heads != 0 and dim_head is None:
            raise ValueError(f"dim ({dim}) must be divisible by heads ({heads}) unless dim_head is given")
        if time_conditioning and not num_timesteps:
            raise ValueError("time_conditioning needs num_timesteps")
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_classes = num_classes
        self.time_conditioning = time_conditioning
        self.net = TransformerWrapper(
            num_tokens=vocab_size + extra_input_tokens,
            max_seq_len=seq_len,
            logits_dim=vocab_size,
            emb_dropout=emb_dropout,
            attn_layers=Encoder(
                dim=dim, depth=depth, heads=heads, attn_dim_head=dim_head or dim // heads, ff_mult=ff_mult,
                attn_flash=True, attn_dropout=dropout, ff_dropout=dropout,
            ),
        )
        self.class_emb = nn.Embedding(num_classes + 1, dim) if num_classes else None
        self.time_emb = nn.Embedding(num_timesteps + 1, dim) if time_conditioning else None

    @property
    def null_class(self) -> int | None:
        return self.num_classes

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        if x.shape[1] > self.seq_len:
            raise ValueError(f"sequence of {x.shape[1]} tokens is longer than the trained {self.seq_len}")
        prepend = []
        if self.class_emb is not None:
            if cond is None:
                cond = torch.full((x.shape[0],), self.num_classes, dtype=torch.long, device=x.device)
            prepend.append(self.class_emb(cond)[:, None])  # (B, 1, D)
        if self.time_emb is not None:
            if t is None:
                raise ValueError("this denoiser was built with time_conditioning and needs t")
            prepend.append(self.time_emb(t)[:, None])
        if not prepend:
            return self.net(x)
        return self.net(x, prepend_embeds=torch.cat(prepend, 1), excise_prepend_embeds=True)  # (B, N, K)

"""The paper's own denoiser (Bond-Taylor et al. 2022), in its checkpoint layout, so released weights load.

A pre-LayerNorm bidirectional transformer with biased q/k/v projections and a bias-free head,
which x-transformers cannot express; new models train `ldm.nn.transformer.TokenTransformer`.
Keys equal the original `Transformer.state_dict()` (`_denoise_fn.` prefix in sampler checkpoints).
"""

from __future__ import annotations

import torch
from torch import nn

from ldm.nn.attention import attention


class _SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.heads = heads
        self.key = nn.Linear(dim, dim)
        self.query = nn.Linear(dim, dim)
        self.value = nn.Linear(dim, dim)
        self.proj = nn.Linear(dim, dim)
        self.dropout = dropout

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        q, k, v = (f(x).view(b, n, self.heads, d // self.heads).transpose(1, 2)
                   for f in (self.query, self.key, self.value))  # (B, H, N, d_h)
        y = attention(q, k, v, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(b, n, d))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1 = nn.LayerNorm(dim)
        self.ln2 = nn.LayerNorm(dim)
        self.attn = _SelfAttention(dim, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim), nn.Dropout(dropout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.mlp(self.ln2(x))


class UnleashingTransformer(nn.Module):
    """`forward(x (B, N) long, t=None, cond=None) -> logits (B, N, K)`; t and cond are not used."""

    def __init__(self, vocab_size: int, seq_len: int, n_embd: int = 512, n_head: int = 8,
                 n_layer: int = 24, dropout: float = 0.0):
        """`vocab_size` is the codebook size K (the original's `codebook_size`), `seq_len` its `block_size`."""
        super().__init__()
        self.vocab_size, self.seq_len = vocab_size, seq_len
        self.num_classes = None
        self.tok_emb = nn.Embedding(vocab_size + 1, n_embd)  # + the mask token
        self.pos_emb = nn.Parameter(torch.zeros(1, seq_len, n_embd))
        self.start_tok = nn.Parameter(torch.zeros(1, 1, n_embd))  # unused by the bidirectional model
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.Sequential(*[_Block(n_embd, n_head, dropout) for _ in range(n_layer)])
        self.ln_f = nn.LayerNorm(n_embd)
        self.head = nn.Linear(n_embd, vocab_size, bias=False)

    @property
    def null_class(self) -> None:
        return None

    def forward(self, x: torch.Tensor, t: torch.Tensor | None = None, cond: torch.Tensor | None = None) -> torch.Tensor:
        h = self.drop(self.tok_emb(x) + self.pos_emb[:, : x.shape[1]])  # (B, N, D)
        return self.head(self.ln_f(self.blocks(h)))


def paper_parameter_count(vocab_size: int, seq_len: int, n_embd: int, n_layer: int) -> int:
    """Parameters of the paper's denoiser, from its architecture (for checking configs)."""
    d = n_embd
    per_layer = 2 * 2 * d + 4 * (d * d + d) + (d * 4 * d + 4 * d) + (4 * d * d + d)  # 2 LN, q/k/v/proj, MLP
    return (vocab_size + 1) * d + seq_len * d + d + n_layer * per_layer + 2 * d + d * vocab_size


def convert_sampler_state_dict(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """An original `AbsorbingDiffusion` checkpoint (`_denoise_fn.*`, `Lt_history`, ...) in our prior's keys."""
    out = {}
    for k, v in state.items():
        if k.startswith("_denoise_fn."):
            out["model." + k[len("_denoise_fn."):]] = v
        elif k in ("Lt_history", "Lt_count", "loss_history"):
            out["process." + k] = v
    return out

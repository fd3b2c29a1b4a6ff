"""latent-diffusion's class embedder (`cond_stage_model` of its class-conditional cross-attention models,
cin256-v2): a class id becomes one context token for the UNet's cross-attention."""

from __future__ import annotations

from typing import Any

from torch import nn

from ldm.util import PositiveInt


class ClassEmbedder(nn.Module):
    """`condition({"class_label": (B,)}) -> {"context": (B, 1, embed_dim)}`; `n_classes` counts the null class."""

    def __init__(self, embed_dim: PositiveInt, n_classes: PositiveInt = 1000, key: str = "class_label"):
        super().__init__()
        self.dim, self.key = embed_dim, key
        self.embedding = nn.Embedding(n_classes, embed_dim)

    @property
    def consumes(self) -> tuple[str, ...]:
        return (self.key,)

    def condition(self, cond: dict[str, Any]) -> dict[str, Any]:
        out = {k: v for k, v in cond.items() if k != self.key}
        out["context"] = self.embedding(cond[self.key].long())[:, None]
        return out

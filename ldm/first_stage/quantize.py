"""Vector quantisation with taming-transformers' `VectorQuantizer2` semantics, plus what stops
codebook collapse: EMA codebook updates (van den Oord et al. 2017, App. A.1), initialisation from
data, dead-code restarts (Dhariwal et al. 2020), l2-normalised and low-dimensional lookup (Yu et al.
2022, ViT-VQGAN). Each extra is off by default; off, the state dict is taming's (`embedding.weight`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


class VectorQuantizer(nn.Module):
    """z (B, C, H, W) -> (z_q, loss, (perplexity, None, indices)) with a straight-through gradient."""

    def __init__(
        self,
        n_e: int,
        e_dim: int,
        beta: float = 0.25,
        remap: str | None = None,
        unknown_index: str | int = "random",
        sane_index_shape: bool = False,
        legacy: bool = True,
        ema_update: bool = False,
        decay: float = 0.99,
        eps: float = 1e-5,
        init_from_data: bool = False,
        restart_dead_codes: bool = False,
        dead_threshold: float = 1.0,
        l2_normalize: bool = False,
        codebook_dim: int | None = None,
    ):
        super().__init__()
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        self.ema_update, self.decay, self.eps = ema_update, decay, eps
        self.init_from_data, self.restart_dead_codes = init_from_data, restart_dead_codes
        self.dead_threshold, self.l2_normalize = dead_threshold, l2_normalize
        self.codebook_dim = codebook_dim or e_dim
        if codebook_dim and codebook_dim != e_dim:
            self.in_proj = nn.Linear(e_dim, codebook_dim)
            self.out_proj = nn.Linear(codebook_dim, e_dim)
        else:
            self.in_proj = self.out_proj = None
        self.embedding = nn.Embedding(n_e, self.codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if ema_update:
            self.embedding.weight.requires_grad_(False)
            self.register_buffer("ema_cluster_size", torch.zeros(n_e))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if init_from_data:
            self.register_buffer("initialized", torch.tensor(0.0))
        if restart_dead_codes:
            self.register_buffer("code_usage", torch.ones(n_e) * max(dead_threshold, 1.0) * 2)
        # counts since the last `reset_usage()`: for logging, not part of the checkpoint layout
        self.register_buffer("usage_counts", torch.zeros(n_e), persistent=False)

        self.remap = remap
        if remap is not None:
            if not Path(remap).exists():
                raise FileNotFoundError(f"codebook remap file not found: {remap} (a .npy of used code indices)")
            self.register_buffer("used", torch.tensor(np.load(remap)).long())
            self.re_embed = int(self.used.shape[0])
            self.unknown_index = unknown_index
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
        else:
            self.re_embed = n_e

    # --- remapping (taming's semantics) ---------------------------------------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, ...]).long()
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:  # the extra token maps to code 0
            inds = inds.clone()
            inds[inds >= used.shape[0]] = 0
        return torch.gather(used[None, :].expand(inds.shape[0], -1), 1, inds).reshape(ishape)

    # --- lookup ---------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    def _nearest(self, z_flat: torch.Tensor) -> torch.Tensor:
        e = self.codebook()
        d = z_flat.pow(2).sum(1, keepdim=True) + e.pow(2).sum(1) - 2 * z_flat @ e.t()  # (N, n_e)
        return d.argmin(1)

    @torch.no_grad()
    def _init_codebook(self, z_flat: torch.Tensor) -> None:
        idx = torch.randint(0, z_flat.shape[0], (self.n_e,), device=z_flat.device)
        self.embedding.weight.data.copy_(z_flat[idx])
        if self.ema_update:
            self.ema_embed_sum.copy_(z_flat[idx])
            self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(1.0)

    @torch.no_grad()
    def _ema_step(self, z_flat: torch.Tensor, onehot: torch.Tensor) -> None:
        counts = onehot.sum(0)
        sums = onehot.t() @ z_flat  # (n_e, D)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.eps) / (n + self.n_e * self.eps) * n  # Laplace smoothing
        self.embedding.weight.data.copy_(self.ema_embed_sum / size[:, None])

    @torch.no_grad()
    def _restart(self, z_flat: torch.Tensor, counts: torch.Tensor) -> None:
        self.code_usage.mul_(self.decay).add_(counts, alpha=1 - self.decay)
        dead = self.code_usage < self.dead_threshold
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        pick = torch.randint(0, z_flat.shape[0], (n_dead,), device=z_flat.device)
        self.embedding.weight.data[dead] = z_flat[pick]
        if self.ema_update:
            self.ema_embed_sum[dead] = z_flat[pick]
            self.ema_cluster_size[dead] = 1.0
        self.code_usage[dead] = self.dead_threshold * 2  # give restarted codes time to be used

    def forward(self, z: torch.Tensor):
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, C)
        z_in = self.in_proj(z) if self.in_proj is not None else z  # (B, H, W, D)
        z_flat = z_in.reshape(-1, self.codebook_dim)
        if self.l2_normalize:
            z_flat = F.normalize(z_flat, dim=1)
            z_in = z_flat.view(z_in.shape)
        if self.training and self.init_from_data and not bool(self.initialized):
            self._init_codebook(z_flat.detach())
        idx = self._nearest(z_flat.detach())  # (N,)
        z_q = self.codebook()[idx].view(z_in.shape)

        onehot = F.one_hot(idx, self.n_e).type_as(z_flat)  # (N, n_e)
        counts = onehot.sum(0).detach()
        self.usage_counts += counts
        if self.training and self.ema_update:
            self._ema_step(z_flat.detach(), onehot.detach())
        if self.ema_update:
            loss = self.beta * torch.mean((z_q.detach() - z_in) ** 2)
        elif self.legacy:
            loss = torch.mean((z_q.detach() - z_in) ** 2) + self.beta * torch.mean((z_q - z_in.detach()) ** 2)
        else:
            loss = self.beta * torch.mean((z_q.detach() - z_in) ** 2) + torch.mean((z_q - z_in.detach()) ** 2)
        if self.training and self.restart_dead_codes:
            self._restart(z_flat.detach(), counts)

        z_q = z_in + (z_q - z_in).detach()  # straight-through
        if self.out_proj is not None:
            z_q = self.out_proj(z_q)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)

        probs = counts / counts.sum()
        perplexity = torch.exp(-(probs * torch.log(probs + 1e-10)).sum())
        indices = idx
        if self.remap is not None:
            indices = self.remap_to_used(idx.reshape(z.shape[0], -1)).reshape(-1, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z.shape[0], z.shape[1], z.shape[2])
        return z_q, loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Indices -> quantised vectors; `shape` (B, H, W, C) gives (B, C, H, W) back."""
        if self.remap is not None:
            indices = self.unmap_to_all(indices.reshape(shape[0] if shape else 1, -1))
        z_q = self.codebook()[indices.reshape(-1)]
        if self.out_proj is not None:
            z_q = self.out_proj(z_q)
        if shape is not None:
            z_q = z_q.view(shape).permute(0, 3, 1, 2).contiguous()
        return z_q

    # --- codebook health --------------------------------------------------------------------------
    def reset_usage(self) -> None:
        self.usage_counts.zero_()

    def usage_stats(self) -> dict[str, float]:
        """Fraction of codes used and perplexity of the code histogram since the last reset."""
        counts = self.usage_counts
        total = counts.sum()
        if total == 0:
            return {"usage": 0.0, "perplexity": 0.0}
        p = counts / total
        return {"usage": float((counts > 0).float().mean()),
                "perplexity": float(torch.exp(-(p * torch.log(p + 1e-10)).sum()))}

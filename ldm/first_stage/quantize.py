"""Vector quantisation with taming-transformers' `VectorQuantizer2` semantics, plus what stops
codebook collapse: EMA codebook updates (van den Oord et al. 2017, App. A.1), initialisation from
data and dead-code restarts (Dhariwal et al. 2020, Jukebox), l2-normalised and low-dimensional
lookup (Yu et al. 2022, ViT-VQGAN). Each extra is off by default; off, the state dict is taming's
(`embedding.weight`, plus `used` with `remap`) and the numbers are taming's.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ldm.distributed import all_reduce_sum_, random_global_rows


def load_used_codes(remap: str | Path, n_e: int) -> torch.Tensor:
    """The 1-D integer array of used code indices in a `remap` .npy file, checked against `n_e`."""
    path = Path(remap)
    if not path.is_file():
        raise FileNotFoundError(f"codebook remap file not found: {remap} (expected a .npy file holding the "
                                f"1-D array of used code indices in [0, {n_e}))")
    try:
        used = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as e:
        raise ValueError(f"codebook remap file {remap} is not a readable .npy array: {e}") from e
    if used.ndim != 1 or used.size == 0 or not np.issubdtype(used.dtype, np.integer):
        raise ValueError(f"codebook remap file {remap} must hold a non-empty 1-D integer array of used code "
                         f"indices; found shape {used.shape} and dtype {used.dtype}")
    if used.min() < 0 or used.max() >= n_e:
        raise ValueError(f"codebook remap file {remap} has indices outside [0, {n_e}) for n_e={n_e}: "
                         f"min {used.min()}, max {used.max()}")
    return torch.from_numpy(used.copy())  # taming keeps the file's dtype; so do we (same state dict)


class VectorQuantizer(nn.Module):
    """Nearest-code quantiser with a straight-through gradient.

    forward: z (B, e_dim, H, W) -> (z_q (B, e_dim, H, W), loss, (perplexity, None, indices)); indices
    are (B*H*W,) long, (B*H*W, 1) with `remap`, or (B, H, W) with `sane_index_shape`.
    loss (legacy, taming's default): mean((sg[z_q] - z)^2) + beta * mean((z_q - sg[z])^2);
    legacy=False puts beta on the first (commitment) term; with `ema_update` only beta * commitment.

    Options (all off by default): `ema_update` (codebook = EMA of assigned vectors with Laplace
    smoothing, `decay`, `eps`; no codebook gradient), `init_from_data` (first training batch seeds
    the codebook), `restart_dead_codes` (codes whose running usage, an EMA with `decay` of per-batch
    counts, falls below `dead_threshold` are moved onto random encoder outputs), `l2_normalize`
    (cosine-similarity lookup), `codebook_dim` (lookup in a learned low-dimensional projection).
    """

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
        if n_e < 1 or e_dim < 1:
            raise ValueError(f"n_e and e_dim must be positive; got n_e={n_e}, e_dim={e_dim}")
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1); got {decay}")
        if codebook_dim is not None and codebook_dim < 1:
            raise ValueError(f"codebook_dim must be a positive int or None; got {codebook_dim}")
        self.n_e, self.e_dim, self.beta, self.legacy = n_e, e_dim, beta, legacy
        self.sane_index_shape = sane_index_shape
        self.ema_update, self.decay, self.eps = ema_update, decay, eps
        self.init_from_data, self.restart_dead_codes = init_from_data, restart_dead_codes
        self.dead_threshold, self.l2_normalize = dead_threshold, l2_normalize

        # factorised codes (ViT-VQGAN): look up in codebook_dim, project back to e_dim
        self.codebook_dim = codebook_dim or e_dim
        self.in_proj: nn.Linear | None = None
        self.out_proj: nn.Linear | None = None
        if self.codebook_dim != e_dim:
            self.in_proj = nn.Linear(e_dim, self.codebook_dim)
            self.out_proj = nn.Linear(self.codebook_dim, e_dim)

        self.embedding = nn.Embedding(n_e, self.codebook_dim)
        self.embedding.weight.data.uniform_(-1.0 / n_e, 1.0 / n_e)
        if ema_update:
            self.embedding.weight.requires_grad_(False)
            # embedding.weight == ema_embed_sum / ema_cluster_size holds from the start
            self.register_buffer("ema_cluster_size", torch.ones(n_e))
            self.register_buffer("ema_embed_sum", self.embedding.weight.detach().clone())
        if init_from_data:
            self.register_buffer("initialized", torch.tensor(0.0))  # saved, so a resumed run does not re-seed
        if restart_dead_codes:
            # start above the threshold: a code gets about log(2)/(1-decay) steps before it counts as dead
            self.register_buffer("code_usage", torch.full((n_e,), 2.0 * max(dead_threshold, 1.0)))
        # This rank's assignment counts since the last reset_usage(), for logging. A plain tensor, not a
        # buffer: not in the checkpoint, and DDP does not overwrite it with rank 0's (broadcast_buffers).
        self.usage_counts = torch.zeros(n_e)

        self.remap = remap
        self.unknown_index = unknown_index
        if remap is not None:
            self.register_buffer("used", load_used_codes(remap, n_e))
            self.re_embed = int(self.used.shape[0])
            if unknown_index == "extra":
                self.unknown_index = self.re_embed
                self.re_embed += 1
            elif unknown_index != "random" and not (
                    isinstance(unknown_index, int) and not isinstance(unknown_index, bool)
                    and 0 <= unknown_index < self.re_embed):
                raise ValueError(f"unknown_index must be 'random', 'extra' or an int in [0, {self.re_embed}); "
                                 f"got {unknown_index!r}")
        else:
            self.re_embed = n_e

    # --- remapping to the used codes (taming's semantics) ----------------------------------------
    def remap_to_used(self, inds: torch.Tensor) -> torch.Tensor:
        """Codebook indices (B, ...) -> positions in `used`; codes outside it get `unknown_index`."""
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)  # (B, n)
        used = self.used.to(inds)
        match = (inds[:, :, None] == used[None, None, :]).long()  # (B, n, n_used)
        new = match.argmax(-1)
        unknown = match.sum(2) < 1
        if self.unknown_index == "random":
            new[unknown] = torch.randint(0, self.re_embed, size=new[unknown].shape, device=new.device)
        else:
            new[unknown] = self.unknown_index
        return new.reshape(ishape)

    def unmap_to_all(self, inds: torch.Tensor) -> torch.Tensor:
        """Positions in `used` (B, ...) -> codebook indices; the 'extra' token maps to used[0]."""
        ishape = inds.shape
        inds = inds.reshape(ishape[0], -1)  # (B, n)
        used = self.used.to(inds)
        if self.re_embed > used.shape[0]:
            inds = inds.masked_fill(inds >= used.shape[0], 0)  # taming does this in place on the caller's tensor
        return torch.gather(used[None, :].expand(inds.shape[0], -1), 1, inds).reshape(ishape)

    # --- lookup ---------------------------------------------------------------------------------
    def codebook(self) -> torch.Tensor:
        """The code vectors used for lookup, (n_e, codebook_dim); unit length with `l2_normalize`."""
        w = self.embedding.weight
        return F.normalize(w, dim=1) if self.l2_normalize else w

    @staticmethod
    def nearest(z_flat: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
        """argmin_k |z - e_k|^2 by the expanded distance (taming's formula, so ties break alike). (N,)"""
        d = (z_flat.pow(2).sum(1, keepdim=True) + codebook.pow(2).sum(1)[None, :]
             - 2.0 * z_flat @ codebook.t())  # (N, n_e)
        return d.argmin(dim=1)

    @torch.no_grad()
    def _init_codebook(self, z_flat: torch.Tensor) -> None:
        rows = random_global_rows(z_flat, self.n_e)  # (n_e, D) from the global batch
        self.embedding.weight.data.copy_(rows)
        if self.ema_update:
            self.ema_embed_sum.copy_(rows)
            self.ema_cluster_size.fill_(1.0)
        self.initialized.fill_(1.0)

    @torch.no_grad()
    def _restart_dead(self, z_flat: torch.Tensor) -> None:
        """Move codes whose running usage is below `dead_threshold` onto random vectors of the global batch."""
        dead = self.code_usage < self.dead_threshold  # (n_e,)
        n_dead = int(dead.sum())
        if n_dead == 0:
            return
        rows = random_global_rows(z_flat, n_dead)  # (n_dead, D), the same on every rank
        self.embedding.weight.data[dead] = rows
        if self.ema_update:
            self.ema_embed_sum[dead] = rows
            self.ema_cluster_size[dead] = 1.0
        self.code_usage[dead] = 2.0 * max(self.dead_threshold, 1.0)  # time to be picked before the next check

    @torch.no_grad()
    def _ema_step(self, z_flat: torch.Tensor, idx: torch.Tensor, counts: torch.Tensor) -> None:
        """N_k <- d N_k + (1-d) n_k; m_k <- d m_k + (1-d) sum_{i: idx_i = k} z_i; e_k = m_k / N~_k (smoothed)."""
        sums = torch.zeros_like(self.ema_embed_sum).index_add_(0, idx, z_flat.to(self.ema_embed_sum.dtype))
        all_reduce_sum_(sums)  # (n_e, D)
        self.ema_cluster_size.mul_(self.decay).add_(counts, alpha=1.0 - self.decay)
        self.ema_embed_sum.mul_(self.decay).add_(sums, alpha=1.0 - self.decay)
        n = self.ema_cluster_size.sum()
        size = (self.ema_cluster_size + self.eps) / (n + self.n_e * self.eps) * n  # Laplace smoothing
        self.embedding.weight.data.copy_(self.ema_embed_sum / size[:, None])

    def forward(self, z: torch.Tensor, temp: float | None = None, rescale_logits: bool = False,
                return_logits: bool = False):
        """z (B, e_dim, H, W) -> (z_q, loss, (perplexity, None, indices)); the extra arguments exist only
        for interface compatibility with taming's Gumbel quantiser, as in `VectorQuantizer2`."""
        if (temp is not None and temp != 1.0) or rescale_logits or return_logits:
            raise ValueError("temp, rescale_logits and return_logits are only for interface compatibility with "
                             "taming's GumbelQuantize; VectorQuantizer supports temp=None or 1.0 only")
        if z.dim() != 4 or z.shape[1] != self.e_dim:
            raise ValueError(f"expected z of shape (B, {self.e_dim}, H, W); got {tuple(z.shape)}")
        z = z.permute(0, 2, 3, 1).contiguous()  # (B, H, W, e_dim)
        z_in = self.in_proj(z) if self.in_proj is not None else z  # (B, H, W, D)
        if self.l2_normalize:
            z_in = F.normalize(z_in, dim=-1)
        z_flat = z_in.reshape(-1, self.codebook_dim)  # (N, D), N = B*H*W

        if self.training:  # codebook surgery happens before the codebook enters the graph
            if self.init_from_data and not bool(self.initialized):
                self._init_codebook(z_flat.detach())
            if self.restart_dead_codes:
                self._restart_dead(z_flat.detach())

        codebook = self.codebook()  # (n_e, D)
        with torch.no_grad():
            idx = self.nearest(z_flat.detach(), codebook.detach())  # (N,)
        z_q = F.embedding(idx, codebook).view(z_in.shape)  # (B, H, W, D)

        commitment = torch.mean((z_q.detach() - z_in) ** 2)
        if self.ema_update:
            loss = self.beta * commitment
        elif self.legacy:
            loss = commitment + self.beta * torch.mean((z_q - z_in.detach()) ** 2)
        else:
            loss = self.beta * commitment + torch.mean((z_q - z_in.detach()) ** 2)

        # (n_e,) this rank's batch; in the codebook's dtype, not autocast's (bf16 counts round above 256)
        counts = torch.bincount(idx, minlength=self.n_e).to(self.embedding.weight.dtype)
        self.usage_counts = self.usage_counts.to(counts) + counts
        probs = counts / counts.sum()
        perplexity = torch.exp(-torch.sum(probs * torch.log(probs + 1e-10)))
        if self.training and (self.ema_update or self.restart_dead_codes):
            global_counts = all_reduce_sum_(counts.clone())
            if self.ema_update:
                self._ema_step(z_flat.detach(), idx, global_counts)
            if self.restart_dead_codes:
                self.code_usage.mul_(self.decay).add_(global_counts, alpha=1.0 - self.decay)

        z_q = z_in + (z_q - z_in).detach()  # straight-through estimator
        if self.out_proj is not None:
            z_q = self.out_proj(z_q)  # (B, H, W, e_dim)
        z_q = z_q.permute(0, 3, 1, 2).contiguous()  # (B, e_dim, H, W)

        indices = idx
        if self.remap is not None:
            indices = self.remap_to_used(idx.reshape(z.shape[0], -1)).reshape(-1, 1)  # (N, 1)
        if self.sane_index_shape:
            indices = indices.reshape(z.shape[0], z.shape[1], z.shape[2])  # (B, H, W)
        return z_q, loss, (perplexity, None, indices)

    def get_codebook_entry(self, indices: torch.Tensor, shape: tuple[int, ...] | None) -> torch.Tensor:
        """Indices -> code vectors in e_dim; with `shape` = (B, H, W, e_dim) the result is (B, e_dim, H, W)."""
        if self.remap is not None:
            lead = shape[0] if shape is not None else (indices.shape[0] if indices.dim() > 1 else 1)
            indices = self.unmap_to_all(indices.reshape(lead, -1)).reshape(indices.shape)
        z_q = F.embedding(indices, self.codebook())  # (*indices.shape, D)
        if self.out_proj is not None:
            z_q = self.out_proj(z_q)  # (*indices.shape, e_dim)
        if shape is not None:
            z_q = z_q.reshape(shape).permute(0, 3, 1, 2).contiguous()  # (B, e_dim, H, W)
        return z_q

    # --- codebook health --------------------------------------------------------------------------
    def reset_usage(self) -> None:
        """Start a new window for `usage_stats()`."""
        self.usage_counts.zero_()

    def usage_stats(self) -> dict[str, float]:
        """Fraction of codes used at least once and the perplexity of the code histogram since the
        last `reset_usage()` (perplexity n_e means uniform use; 1 means a collapsed codebook), over
        all ranks: a collective under DDP, so every rank calls it."""
        counts = all_reduce_sum_(self.usage_counts.clone())
        total = counts.sum()
        if total == 0:
            return {"usage": 0.0, "perplexity": 0.0, "used_codes": 0}
        p = counts / total
        return {"usage": float((counts > 0).float().mean()),
                "perplexity": float(torch.exp(-torch.sum(p * torch.log(p + 1e-10)))),
                "used_codes": int((counts > 0).sum())}

"""The base LightningModule every prior subclasses: a frozen first stage, latents from a cache or
encoded on the fly, an EMA of the prior's weights, and the public `sample` / `inpaint` / `nll` API.

A subclass builds `self.model` (the trainable network) and `self.process` (its corruption
process), calls `self.finish_init(ckpt_path, ignore_keys)`, and implements `compute_loss`,
`sample_latents`, `inpaint_latents` and, where defined, `nll_latents`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import pytorch_lightning as pl
import torch
import torch.nn.functional as F

from ldm.checkpoint import drop_keys, load_into, load_state_dict
from ldm.data.cache import first_stage_fingerprint
from ldm.ema import LitEma, ema_scope
from ldm.util import instantiate_from_config

LATENT_KEYS = {"tokens": "tokens", "continuous": "latent"}


class LatentPrior(pl.LightningModule):
    """Shared wiring of the four priors; see the module docstring for what a subclass provides."""

    latent_kind: str = "tokens"  # what the prior models: "tokens" (VQ) or "continuous" (KL)

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        latent_shape: Sequence[int] | None = None,
        image_key: str = "image",
        cond_key: str = "class_label",
        num_classes: int | None = None,
        cond_drop_prob: float = 0.0,
        use_ema: bool = True,
        ema_decay: float = 0.9999,
        weight_decay: float = 0.0,
        betas: Sequence[float] = (0.9, 0.95),
        warmup_steps: int = 0,
        monitor: str | None = "val/loss",
        log_sample_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.image_key, self.cond_key = image_key, cond_key
        self.num_classes = num_classes
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        self.cond_drop_prob = cond_drop_prob
        self.use_ema, self.ema_decay = use_ema, ema_decay
        self.weight_decay, self.betas, self.warmup_steps = weight_decay, tuple(betas), warmup_steps
        self.monitor = monitor
        self.log_sample_kwargs = dict(log_sample_kwargs or {})
        self.learning_rate = 1e-4  # main.py sets it from base_learning_rate
        self.first_stage_ckpt = dict(first_stage_config.get("params") or {}).get("ckpt_path")
        self.first_stage_model = instantiate_from_config(first_stage_config, key="first_stage_config")
        self.first_stage_model.eval().requires_grad_(False)
        kind = getattr(self.first_stage_model, "latent_kind", None)
        if kind != self.latent_kind:
            raise ValueError(
                f"{type(self).__name__} models {self.latent_kind} latents, but the first stage "
                f"{type(self.first_stage_model).__name__} produces {kind!r} latents"
            )
        self.latent_shape = tuple(latent_shape) if latent_shape else tuple(self.first_stage_model.latent_shape())

    # --- construction -------------------------------------------------------------------------
    def finish_init(self, ckpt_path: str | None = None, ignore_keys: Sequence[str] = ()) -> None:
        """Called by a subclass once `self.model` exists: EMA shadow, then optional weights."""
        self.model_ema = LitEma(self.model, decay=self.ema_decay) if self.use_ema else None
        if ckpt_path:
            state = drop_keys(load_state_dict(ckpt_path), ignore_keys)
            load_into(self, state, source=str(ckpt_path), allow_missing=tuple(ignore_keys))

    def train(self, mode: bool = True) -> LatentPrior:
        super().train(mode)
        self.first_stage_model.eval()  # frozen: BatchNorm/dropout stay in eval mode
        return self

    def first_stage_fingerprint(self) -> dict[str, Any]:
        """What a latent cache must have been built with to be used by this prior."""
        return first_stage_fingerprint(self.first_stage_model, self.first_stage_ckpt, self.latent_shape)

    def on_fit_start(self) -> None:
        """Refuse a latent cache built with another first stage before any step is taken."""
        datamodule = getattr(self.trainer, "datamodule", None)
        for dataset in getattr(datamodule, "datasets", {}).values():
            if hasattr(dataset, "check_compatible"):
                dataset.check_compatible(self.first_stage_fingerprint())

    on_test_start = on_fit_start  # the test split is built only when testing

    # --- data ---------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.encode_to_latent(images)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return self.first_stage_model.decode_latent(latents).clamp(-1.0, 1.0)

    def get_latents(self, batch: Mapping[str, Any]) -> torch.Tensor:
        """Cached latents when the batch has them, else the first stage encodes the images."""
        key = LATENT_KEYS[self.latent_kind]
        if key in batch:
            return batch[key]
        if self.image_key not in batch:
            raise KeyError(f"batch has neither {key!r} (a latent cache) nor {self.image_key!r} (images)")
        return self.encode(batch[self.image_key])

    def get_cond(self, batch: Mapping[str, Any]) -> torch.Tensor | None:
        if not self.num_classes:
            return None
        return torch.as_tensor(batch[self.cond_key], device=self.device).long()

    def drop_cond(self, cond: torch.Tensor | None) -> torch.Tensor | None:
        """Replace labels by the null class with probability `cond_drop_prob` (classifier-free guidance)."""
        if cond is None or self.cond_drop_prob == 0.0:
            return cond
        drop = torch.rand(cond.shape, device=cond.device) < self.cond_drop_prob
        return torch.where(drop, torch.full_like(cond, self.num_classes), cond)

    def null_cond(self, n: int) -> torch.Tensor | None:
        return torch.full((n,), self.num_classes, dtype=torch.long, device=self.device) if self.num_classes else None

    # --- subclass interface ------------------------------------------------------------------
    def compute_loss(self, latents: torch.Tensor, cond: torch.Tensor | None) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def sample_latents(self, n: int, cond: torch.Tensor | None, generator: torch.Generator | None,
                       **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: torch.Tensor | None,
                        generator: torch.Generator | None, **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def nll_latents(self, latents: torch.Tensor, cond: torch.Tensor | None, **kw: Any) -> torch.Tensor:
        raise NotImplementedError(f"{type(self).__name__} has no likelihood")

    # --- public API ---------------------------------------------------------------------------
    def ema_weights(self, enabled: bool = True):
        return ema_scope(self.model, self.model_ema, enabled and self.model_ema is not None)

    def _labels(self, n: int, cond: torch.Tensor | Sequence[int] | int | None) -> torch.Tensor | None:
        if cond is None or not self.num_classes:
            if cond is not None:
                raise ValueError(f"{type(self).__name__} is unconditional (num_classes is not set); pass cond=None")
            return None
        cond = torch.as_tensor(cond, dtype=torch.long, device=self.device)
        cond = cond.expand(n) if cond.dim() == 0 else cond
        if cond.shape != (n,) or bool(((cond < 0) | (cond > self.num_classes)).any()):
            raise ValueError(f"cond must be {n} labels in 0..{self.num_classes - 1} (or the null class "
                             f"{self.num_classes}), got {cond.tolist()}")
        return cond

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, use_ema: bool = True,
               **sampler_kw: Any) -> torch.Tensor:
        """`n` images in [-1, 1], (n, C, H, W); `cond` class labels (one, or one per image)."""
        with self.ema_weights(use_ema):
            latents = self.sample_latents(n, self._labels(n, cond), generator, **sampler_kw)
        return self.decode(latents)

    def latent_mask(self, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Pixel mask (B, 1, H, W) or (B, H, W), 1 = keep, to a latent mask (B, h, w) bool.

        A latent cell is known only if every pixel it covers is known.
        """
        if mask.dim() == 3:
            mask = mask[:, None]
        if mask.dim() != 4 or mask.shape[1] != 1 or mask.shape[0] != images.shape[0] or mask.shape[2:] != images.shape[2:]:
            raise ValueError(f"mask must be (B, 1, H, W) or (B, H, W) matching images {tuple(images.shape)}, "
                             f"got {tuple(mask.shape)}")
        h, w = self.latent_shape[-2:]
        fh, fw = images.shape[2] // h, images.shape[3] // w
        known = -F.max_pool2d(-mask.float(), kernel_size=(fh, fw), stride=(fh, fw))  # min pooling
        return known[:, 0] > 0.5  # (B, h, w)

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, cond: Any = None,
                generator: torch.Generator | None = None, use_ema: bool = True, paste: bool = True,
                **sampler_kw: Any) -> torch.Tensor:
        """Fill the unknown region (mask 0) of `images` (B, C, H, W) in [-1, 1]; known latents never change.

        With `paste`, known pixels are copied from the input into the decoded result.
        """
        images = images.to(self.device)
        mask = mask.to(self.device)
        known = self.latent_mask(mask, images)
        latents = self.encode(images)
        with self.ema_weights(use_ema):
            out = self.inpaint_latents(latents, known, self._labels(images.shape[0], cond), generator, **sampler_kw)
        decoded = self.decode(out)
        if paste:
            m = mask if mask.dim() == 4 else mask[:, None]
            decoded = m * images + (1 - m) * decoded
        return decoded

    @torch.no_grad()
    def nll(self, batch: Mapping[str, Any], use_ema: bool = True, **kw: Any) -> torch.Tensor:
        """Negative log-likelihood bound per sample, in bits per latent dimension (per token for VQ)."""
        with self.ema_weights(use_ema):
            return self.nll_latents(self.get_latents(batch), self.get_cond(batch), **kw)

    # --- Lightning ----------------------------------------------------------------------------
    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.compute_loss(self.get_latents(batch), self.drop_cond(self.get_cond(batch)))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        return loss

    def on_train_batch_end(self, *args: Any) -> None:
        if self.model_ema is not None:
            self.model_ema(self.model)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        with self.ema_weights():
            loss, logs = self.compute_loss(self.get_latents(batch), self.get_cond(batch))
        self.log("val/loss", loss, prog_bar=True, sync_dist=True)
        self.log_dict({f"val/{k}": v for k, v in logs.items()}, sync_dist=True)

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        with self.ema_weights():
            loss, logs = self.compute_loss(self.get_latents(batch), self.get_cond(batch))
        self.log("test/loss", loss, sync_dist=True)
        self.log_dict({f"test/{k}": v for k, v in logs.items()}, sync_dist=True)

    def configure_optimizers(self):
        opt = torch.optim.AdamW(self.model.parameters(), lr=self.learning_rate, betas=self.betas,
                                weight_decay=self.weight_decay)
        if not self.warmup_steps:
            return opt
        warm = self.warmup_steps
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: min(1.0, (step + 1) / warm))
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, split: str = "train", **kw: Any) -> dict[str, torch.Tensor]:
        """Samples (with the batch's labels when conditional) and first-stage reconstructions."""
        out: dict[str, torch.Tensor] = {}
        latents = self.get_latents(batch)[:N]
        n = latents.shape[0]
        out["reconstructions"] = self.decode(latents)
        if self.image_key in batch:
            out["inputs"] = batch[self.image_key][:N]
        cond = self.get_cond(batch)
        cond = cond[:n] if cond is not None else None
        g = torch.Generator(device=self.device).manual_seed(0)
        out["samples"] = self.sample(n, cond=cond, generator=g, **{**self.log_sample_kwargs, **kw})
        return out

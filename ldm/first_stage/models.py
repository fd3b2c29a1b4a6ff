"""`VQModel` (VQGAN, Esser et al. 2021) and `AutoencoderKL` (Rombach et al. 2022) on Lightning 2.

State-dict layouts equal taming-transformers' `VQModel` and latent-diffusion's `AutoencoderKL`, so
their `.ckpt` files load. Both offer one interface to the priors: `latent_kinds` (the first is the
default `latent_kind`), `encode_for_prior(x, kind)`, `decode_latent(z, kind)` and `latent_shape(kind=...)`;
no caller needs to ask which model it holds.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
from torch import nn

from ldm.checkpoint import CheckpointError, drop_keys, load_into, load_state_dict
from ldm.ema import EMA
from ldm.first_stage.distributions import DiagonalGaussianDistribution
from ldm.first_stage.modules import Decoder, Encoder
from ldm.first_stage.quantize import VectorQuantizer
from ldm.optim import adam
from ldm.util import Fraction, NonNegativeFloat, PositiveInt, check_nested, instantiate_from_config

TRAINING_ONLY = ("loss.",)  # discriminator / perceptual net: absent from inference checkpoints
# averaged by the EMA (the loss is not): their parameter names are the LitEma keys of the anchors
AUTOENCODER_PARTS = ("encoder", "decoder", "quant_conv", "post_quant_conv", "quantize")
LatentKind = Literal["tokens", "continuous"]


def _no_closure() -> None:
    """The closure of a manual-optimisation step: the backward already ran (Lightning passes the same)."""


class FirstStageModel(pl.LightningModule):
    """Encoder/decoder, loss, EMA, checkpoint loading and the two-optimizer GAN step shared by both models."""

    latent_kinds: tuple[str, ...] = ()  # what a prior may model; the first is the default
    latent_kind: str = ""
    # the generator step (before disc_start) and the discriminator step each reach only part of the
    # parameters: DDP must look for unused ones (ldm.train.resolve_strategy)
    ddp_find_unused_parameters = True

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: PositiveInt,
                 image_key: str = "image", monitor: str | None = None, use_ema: bool = False,
                 ema_decay: Fraction = 0.9999):
        super().__init__()
        self.automatic_optimization = False  # generator and discriminator steps by hand (Lightning 2)
        self.ddconfig = dict(ddconfig)
        check_nested(self.ddconfig, (Encoder, Decoder), "ddconfig")
        self.embed_dim = embed_dim
        self.image_key = image_key
        self.monitor = monitor
        self.encoder = Encoder(**self.ddconfig)
        self.decoder = Decoder(**self.ddconfig)
        self.loss = instantiate_from_config(lossconfig, key="lossconfig")
        self.use_ema = use_ema
        self.ema_decay = ema_decay
        self.learning_rate = 4.5e-6  # main.py sets it from base_learning_rate

    def finish_init(self, ckpt_path: str | None, ignore_keys: Sequence[str]) -> None:
        """After the subclass built its modules: the EMA copy, then weights from `ckpt_path`."""
        self.model_ema = EMA(self.autoencoder_modules(), decay=self.ema_decay) if self.use_ema else None
        if ckpt_path:
            self.init_from_ckpt(ckpt_path, ignore_keys)

    # --- checkpoints ------------------------------------------------------------------------------
    def check_checkpoint_kind(self, state: Mapping[str, torch.Tensor], path: str) -> None:
        raise NotImplementedError

    def init_from_ckpt(self, path: str, ignore_keys: Sequence[str] = ()) -> None:
        state = drop_keys(load_state_dict(path), ignore_keys)
        self.check_checkpoint_kind(state, path)
        if self.model_ema is None:
            state = {k: v for k, v in state.items() if not k.startswith("model_ema.")}
        load_into(self, state, source=str(path), allow_missing=TRAINING_ONLY + ("model_ema.",) + tuple(ignore_keys),
                  allow_unexpected=TRAINING_ONLY + ("model_ema.loss",))  # the anchors averaged the loss too
        if self.model_ema is not None:
            self.model_ema.copy_untracked_from(self.autoencoder_modules())
        print(f"Restored {type(self).__name__} from {path}")

    # --- shared interface --------------------------------------------------------------------------
    def resolve_kind(self, kind: str | None) -> str:
        """`kind`, or the default `latent_kind`; ValueError naming the supported kinds otherwise."""
        kind = self.latent_kind if kind is None else kind
        if kind not in self.latent_kinds:
            raise ValueError(f"{type(self).__name__} offers latents of kind {' or '.join(map(repr, self.latent_kinds))}, "
                             f"not {kind!r}")
        return kind

    def latent_shape(self, image_size: int | None = None, kind: str | None = None) -> tuple[int, ...]:
        """Per-image latent shape for square images of `image_size` (default: the config's resolution):
        (h, w) for tokens, (embed_dim, h, w) for continuous latents."""
        kind = self.resolve_kind(kind)
        res = image_size or int(self.ddconfig["resolution"])
        f = 2 ** (len(self.ddconfig["ch_mult"]) - 1)
        h = w = res // f
        return (h, w) if kind == "tokens" else (self.embed_dim, h, w)

    def get_input(self, batch: Mapping[str, Any], key: str | None = None) -> torch.Tensor:
        """Images (B, C, H, W) float; the anchors' (B, H, W, C) layout is converted."""
        x = batch[key or self.image_key]
        if x.dim() == 3:
            x = x[:, None]
        if x.dim() == 4 and x.shape[-1] in (1, 3, 4) and x.shape[1] not in (1, 3, 4):
            x = x.permute(0, 3, 1, 2)
        return x.to(memory_format=torch.contiguous_format).float()

    def autoencoder_modules(self) -> nn.ModuleDict:
        """The parts an image goes through (not the loss): what the EMA averages."""
        return nn.ModuleDict({name: getattr(self, name) for name in AUTOENCODER_PARTS if hasattr(self, name)})

    def averaged(self) -> FirstStageModel:
        """This model with the EMA copies as its parts: a shallow view, nothing swapped or copied.

        Without an EMA it is the model itself.
        """
        if self.model_ema is None:
            return self
        view = copy.copy(self)
        view.__dict__["_modules"] = {**self._modules, **self.model_ema.averaged._modules}
        return view

    @torch.no_grad()
    def load_ema_as_weights(self) -> None:
        """For inference from a checkpoint: the averaged weights are loaded as the model's weights."""
        if self.model_ema is not None:
            averaged = dict(self.model_ema.averaged.named_parameters())
            for name, p in self.autoencoder_modules().named_parameters():
                p.copy_(averaged[name])

    def on_train_batch_end(self, *args: Any) -> None:
        if self.model_ema is not None:  # one generator step per batch
            self.model_ema.update(self.autoencoder_modules())

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        raise NotImplementedError

    def configure_optimizers(self):
        lr = self.learning_rate
        opt_ae = adam([p for p in self.autoencoder_parameters() if p.requires_grad], lr=lr, betas=(0.5, 0.9))
        opt_disc = adam(self.loss.discriminator.parameters(), lr=lr, betas=(0.5, 0.9))
        return [opt_ae, opt_disc]

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        opt_ae, opt_disc = self.optimizers()
        x = self.get_input(batch)
        xrec, aux = self(x)
        step = self.global_step
        ae_loss, log_ae = self.loss(aux, x, xrec, 0, step, last_layer=self.decoder.last_layer, split="train")
        opt_ae.zero_grad()
        self.manual_backward(ae_loss)
        opt_ae.step()
        logs = dict(log_ae)
        if self.loss.discriminator_active(step):
            d_loss, log_d = self.loss(aux, x, xrec, 1, step, split="train")
            opt_disc.zero_grad()
            self.manual_backward(d_loss)
            # global_step counts the steps of the wrapped optimizers, and the anchors' disc_start and
            # max_steps count batches. So the discriminator steps through the strategy (precision
            # plugin: autocast, grad scaler unscale/skip-on-inf, clipping, on_before_optimizer_step),
            # which is what `opt_disc.step()` does minus the hook that increments global_step.
            if self._trainer is not None:
                self.trainer.strategy.optimizer_step(opt_disc.optimizer, closure=_no_closure, model=self)
            else:  # stepped by hand, without a Trainer: no precision plugin to go through
                opt_disc.optimizer.step()
            logs.update(log_d)
        self.log("train/rec_loss", logs.pop("train/rec_loss"), prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict(logs, on_step=True, on_epoch=False)
        self.log_extra_train_metrics()

    def log_extra_train_metrics(self) -> None:
        pass

    def _eval_step(self, batch: Mapping[str, Any], split: str) -> None:
        if batch is None:  # every image of the batch was skipped (ldm.data.skipped)
            return
        model = self.averaged()  # the EMA copies when the model keeps them
        x = self.get_input(batch)
        xrec, aux = model(x)
        _, log_ae = self.loss(aux, x, xrec, 0, self.global_step, split=split)
        if self.loss.discriminator_active(self.global_step):
            _, log_d = self.loss(aux, x, xrec, 1, self.global_step, split=split)
            log_ae.update(log_d)
        recon = model.decode_latent(model.encode_to_latent(x))  # deterministic: the posterior mode for KL
        mse = (x - recon.clamp(-1, 1)).pow(2).flatten(1).mean(1)
        psnr = 10 * torch.log10(4.0 / mse.clamp(min=1e-10))  # data range 2 for [-1, 1]
        self.log(f"{split}/rec_loss", log_ae.pop(f"{split}/rec_loss"), prog_bar=True, sync_dist=True)
        self.log(f"{split}/psnr", psnr.mean(), prog_bar=True, sync_dist=True)
        self.log_dict(log_ae, sync_dist=True)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, "test")

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, **kwargs: Any) -> dict[str, torch.Tensor]:
        x = self.get_input(batch)[:N].to(self.device)
        out = {"inputs": x, "reconstructions": self(x)[0]}
        if self.model_ema is not None:
            out["reconstructions_ema"] = self.averaged()(x)[0]
        return out


class VQModel(FirstStageModel):
    """VQGAN: encoder -> 1x1 conv -> vector quantiser -> 1x1 conv -> decoder."""

    latent_kinds = ("tokens", "continuous")
    latent_kind = "tokens"

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], n_embed: PositiveInt,
                 embed_dim: PositiveInt, ckpt_path: str | None = None, ignore_keys: Sequence[str] = (),
                 image_key: str = "image", monitor: str | None = None, remap: str | None = None,
                 sane_index_shape: bool = False, beta: NonNegativeFloat = 0.25, legacy: bool = True,
                 ema_update: bool = False, decay: Fraction = 0.99, init_from_data: bool = False,
                 restart_dead_codes: bool = False, dead_threshold: NonNegativeFloat = 1.0, l2_normalize: bool = False,
                 codebook_dim: PositiveInt | None = None, use_ema: bool = False, ema_decay: Fraction = 0.9999):
        super().__init__(ddconfig, lossconfig, embed_dim, image_key, monitor, use_ema, ema_decay)
        self.quantize = VectorQuantizer(n_embed, embed_dim, beta=beta, remap=remap, sane_index_shape=sane_index_shape,
                                        legacy=legacy, ema_update=ema_update, decay=decay, init_from_data=init_from_data,
                                        restart_dead_codes=restart_dead_codes, dead_threshold=dead_threshold,
                                        l2_normalize=l2_normalize, codebook_dim=codebook_dim)
        z = self.ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(z, embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.finish_init(ckpt_path, ignore_keys)

    @property
    def n_embed(self) -> int:
        """Number of token ids the priors see (the remapped count when `remap` is set)."""
        return int(self.quantize.re_embed)

    def check_checkpoint_kind(self, state: Mapping[str, torch.Tensor], path: str) -> None:
        if "quantize.embedding.weight" in state:
            return
        qc = state.get("quant_conv.weight")
        if "loss.logvar" in state or (qc is not None and qc.shape[0] == 2 * self.embed_dim):
            raise CheckpointError(f"{path} is an AutoencoderKL (KL first stage) checkpoint, not a VQModel: it has no "
                                  "codebook (quantize.embedding.weight). Use ldm.first_stage.models.AutoencoderKL.")
        raise CheckpointError(f"{path} has no codebook (quantize.embedding.weight): not a VQModel checkpoint")

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quantize.parameters(),
                *self.quant_conv.parameters(), *self.post_quant_conv.parameters()]

    def encode(self, x: torch.Tensor):
        """(quant (B, embed_dim, h, w), codebook loss, (perplexity, None, indices))."""
        return self.quantize(self.quant_conv(self.encoder(x)))

    def decode(self, quant: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(quant))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        quant, diff, _ = self.encode(x)
        return self.decode(quant), diff

    def encode_to_indices(self, x: torch.Tensor) -> torch.Tensor:
        quant, _, (_, _, ind) = self.encode(x)
        return ind.reshape(x.shape[0], quant.shape[2], quant.shape[3])  # (B, h, w) long

    def decode_indices(self, idx: torch.Tensor) -> torch.Tensor:
        b, h, w = idx.shape
        quant = self.quantize.get_codebook_entry(idx.reshape(b, -1), (b, h, w, self.embed_dim))
        return self.decode(quant)

    def encode_for_prior(self, x: torch.Tensor, kind: LatentKind | None = None) -> dict[str, torch.Tensor]:
        """What a prior models: `{"tokens": (B, h, w) long}`, or `{"latent": (B, embed_dim, h, w)}` the
        pre-quantisation latent `quant_conv(encoder(x))` that latent-diffusion's LDM-VQ priors use."""
        if self.resolve_kind(kind) == "tokens":
            return {"tokens": self.encode_to_indices(x)}
        return {"latent": self.quant_conv(self.encoder(x))}  # (B, embed_dim, h, w)

    def quantize_latent(self, z: torch.Tensor) -> torch.Tensor:
        """Nearest codebook vectors of a continuous latent (B, embed_dim, h, w), through the quantiser's own
        lookup (projection, normalisation as when encoding); its training-time codebook updates stay off."""
        was_training = self.quantize.training
        self.quantize.eval()
        try:
            return self.quantize(z)[0]  # (B, embed_dim, h, w)
        finally:
            self.quantize.train(was_training)

    def decode_latent(self, z: torch.Tensor, kind: LatentKind | None = None) -> torch.Tensor:
        """Images from tokens (B, h, w), or from a continuous latent (B, embed_dim, h, w): quantised to the
        nearest codes first, as latent-diffusion's VQ first stage decodes by default."""
        if self.resolve_kind(kind) == "tokens":
            return self.decode_indices(z)
        return self.decode(self.quantize_latent(z))

    def encode_to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens (B, h, w) long: the default latent, for callers that predate `encode_for_prior`."""
        return self.encode_to_indices(x)

    def log_extra_train_metrics(self) -> None:
        stats = self.quantize.usage_stats()
        self.log("train/codebook_usage", stats["usage"], prog_bar=True, on_step=True, on_epoch=False)
        self.log("train/perplexity", stats["perplexity"], on_step=True, on_epoch=False)
        if self.global_step % 100 == 0:  # usage over the last 100 batches
            self.quantize.reset_usage()

    def on_validation_epoch_start(self) -> None:
        self.averaged().quantize.reset_usage()  # validation runs the EMA copy when there is one

    def on_validation_epoch_end(self) -> None:
        quantize = self.averaged().quantize
        stats = quantize.usage_stats()
        self.log("val/codebook_usage", stats["usage"], sync_dist=True)
        self.log("val/perplexity", stats["perplexity"], sync_dist=True)
        quantize.reset_usage()


class AutoencoderKL(FirstStageModel):
    """KL-regularised autoencoder with a diagonal Gaussian posterior over (B, embed_dim, h, w)."""

    latent_kinds = ("continuous",)
    latent_kind = "continuous"

    def __init__(self, ddconfig: Mapping[str, Any], lossconfig: Mapping[str, Any], embed_dim: PositiveInt,
                 ckpt_path: str | None = None, ignore_keys: Sequence[str] = (), image_key: str = "image",
                 monitor: str | None = None, use_ema: bool = False, ema_decay: Fraction = 0.9999):
        super().__init__(ddconfig, lossconfig, embed_dim, image_key, monitor, use_ema, ema_decay)
        if not self.ddconfig.get("double_z", True):
            raise ValueError("AutoencoderKL needs ddconfig.double_z: true (the encoder predicts mean and log-variance)")
        z = self.ddconfig["z_channels"]
        self.quant_conv = nn.Conv2d(2 * z, 2 * embed_dim, 1)
        self.post_quant_conv = nn.Conv2d(embed_dim, z, 1)
        self.finish_init(ckpt_path, ignore_keys)

    def check_checkpoint_kind(self, state: Mapping[str, torch.Tensor], path: str) -> None:
        if "quantize.embedding.weight" in state:
            raise CheckpointError(f"{path} is a VQModel (VQ first stage) checkpoint, not an AutoencoderKL: it has a "
                                  "codebook (quantize.embedding.weight). Use ldm.first_stage.models.VQModel.")

    def autoencoder_parameters(self) -> list[nn.Parameter]:
        return [*self.encoder.parameters(), *self.decoder.parameters(), *self.quant_conv.parameters(),
                *self.post_quant_conv.parameters()]

    def encode(self, x: torch.Tensor) -> DiagonalGaussianDistribution:
        return DiagonalGaussianDistribution(self.quant_conv(self.encoder(x)))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def forward(self, x: torch.Tensor, sample_posterior: bool = True):
        posterior = self.encode(x)
        z = posterior.sample() if sample_posterior else posterior.mode()
        return self.decode(z), posterior

    def encode_for_prior(self, x: torch.Tensor, kind: LatentKind | None = None) -> dict[str, torch.Tensor]:
        """The posterior `{"posterior_mean", "posterior_logvar"}`, each (B, embed_dim, h, w), the
        log-variance clamped to [-30, 20] as `DiagonalGaussianDistribution` does: a prior can sample
        z = mean + exp(logvar / 2) * eps anew every epoch, or take the mean."""
        self.resolve_kind(kind)
        posterior = self.encode(x)
        return {"posterior_mean": posterior.mean, "posterior_logvar": posterior.logvar}

    def encode_to_latent(self, x: torch.Tensor) -> torch.Tensor:
        """The posterior mode (B, embed_dim, h, w): the default latent, for callers that predate `encode_for_prior`."""
        return self.encode(x).mode()

    def decode_latent(self, z: torch.Tensor, kind: LatentKind | None = None) -> torch.Tensor:
        """Images from a latent (B, embed_dim, h, w)."""
        self.resolve_kind(kind)
        return self.decode(z)

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, **kwargs: Any) -> dict[str, torch.Tensor]:
        out = super().log_images(batch, N, **kwargs)
        z = self.encode(out["inputs"]).mode()
        out["samples"] = self.decode(torch.randn_like(z))
        return out


class IdentityFirstStage(nn.Module):
    """Pixel space as a first stage (latent-diffusion's `IdentityFirstStage`): the latents are the images, so a
    Gaussian prior trains and samples in pixel space with no other change (Imagen's base and super-resolution
    models)."""

    latent_kinds = ("continuous",)
    latent_kind = "continuous"
    pixel_space = True

    def __init__(self, channels: PositiveInt = 3, resolution: PositiveInt = 64):
        super().__init__()
        self.ddconfig = {"in_channels": int(channels), "resolution": int(resolution)}  # what an image config reads

    def resolve_kind(self, kind: str | None) -> str:
        if kind not in (None, "continuous"):
            raise ValueError(f"IdentityFirstStage offers latents of kind 'continuous', not {kind!r}")
        return "continuous"

    def latent_shape(self, image_size: int | None = None, kind: str | None = None) -> tuple[int, ...]:
        self.resolve_kind(kind)
        res = image_size or self.ddconfig["resolution"]
        return (self.ddconfig["in_channels"], res, res)

    def encode_for_prior(self, x: torch.Tensor, kind: str | None = None) -> dict[str, torch.Tensor]:
        self.resolve_kind(kind)
        return {"latent": x.float()}

    def decode_latent(self, z: torch.Tensor, kind: str | None = None) -> torch.Tensor:
        self.resolve_kind(kind)
        return z

"""The base LightningModule every prior subclasses: a frozen first stage, latents of any kind from a
cache or encoded on the fly, conditioning as an object, one EMA copy per trained network, and the
public `sample` / `inpaint` / `nll` API that the scripts and apps use.

A subclass builds its trained networks under the attribute names listed in `network_names`
(`self.model` by default; ImageBART has one transformer per scale, a cascade one network per
stage) and its corruption process, calls `self.finish_init(ckpt_path, ignore_keys)`, and
implements `compute_loss`, `sample_latents`, `inpaint_latents` and, where defined, `nll_latents`.
Those take `ema`: whether to run the averaged copies (`self.network(name, ema)`). The keywords its
samplers take are declared in `sampler_options` (`ldm.sampler_options`): `sample` and `inpaint` refuse
anything else before any work.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import nn

from ldm.checkpoint import drop_keys, load_into, load_state_dict
from ldm.conditioning import ClassLabel, Cond, Conditioner, Unconditional
from ldm.data.cache import first_stage_fingerprint
from ldm.distributed import draw_local, gather_global, step_generator
from ldm.ema import EMA
from ldm.masks import check_mask
from ldm.optim import adamw
from ldm.sampler_options import Mode, SamplerOptions
from ldm.util import (
    ConfigError,
    Fraction,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    accepted_parameters,
    check_config,
    instantiate_from_config,
)

# what a batch from a latent cache holds, by latent kind
CACHE_KEYS = {"tokens": ("tokens",), "continuous": ("latent", "posterior_mean")}
# keys of a frozen first stage that inference never needs (its training losses)
FIRST_STAGE_TRAINING_KEYS = ("first_stage_model.loss.",)


def frozen_first_stage_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The first stage's config with its training loss replaced by `torch.nn.Identity`.

    A frozen first stage never trains: no LPIPS network, no discriminator, nothing downloaded and
    nothing of them stored in the prior's checkpoint. A `lossconfig` the config names is still checked
    (keys, target, parameters) as any node is: a mistake there is one, even where it is not built.
    """
    target = check_config(config, key="first_stage_config")
    config = {**config, "params": dict(config.get("params") or {})}
    if "lossconfig" in accepted_parameters(target)[0]:
        if config["params"].get("lossconfig") is not None:
            check_config(config["params"]["lossconfig"], key="first_stage_config.params.lossconfig")
        config["params"]["lossconfig"] = {"target": "torch.nn.Identity"}
    return config


class LatentPrior(pl.LightningModule):
    """Shared wiring of the four priors; see the module docstring for what a subclass provides."""

    latent_kind: Literal["tokens", "continuous"] = "tokens"  # what the prior models
    network_names: tuple[str, ...] = ("model",)  # the trained networks; EMA copies at `<name>_ema`
    sampler_options: SamplerOptions = SamplerOptions()  # what `sample` / `inpaint` accept (none by default)
    likelihood_note: str | None = None  # why a prior without `nll_latents` has none, and what it reports instead
    compile_note: str | None = None  # why `compile_networks` cannot speed this prior's sampler, where it cannot

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        conditioner_config: Mapping[str, Any] | None = None,
        latent_shape: Sequence[int] | None = None,
        image_key: str = "image",
        cond_key: str = "class_label",
        num_classes: PositiveInt | None = None,
        cond_drop_prob: Fraction = 0.0,
        scale_factor: PositiveFloat = 1.0,
        scale_by_std: bool = False,
        posterior: Literal["sample", "mode"] = "sample",
        use_ema: bool = True,
        ema_decay: Fraction = 0.9999,
        weight_decay: NonNegativeFloat = 0.0,
        betas: Sequence[Fraction] = (0.9, 0.95),
        warmup_steps: NonNegativeInt = 0,
        warmup_start_lr: NonNegativeFloat = 0.0,
        lr_decay_steps: PositiveInt | None = None,
        min_lr: NonNegativeFloat = 0.0,
        fused_optimizer: bool | None = None,
        channels_last: bool = False,
        monitor: str | None = "val/loss",
        log_sample_kwargs: Mapping[str, Any] | None = None,
    ):
        super().__init__()
        self.image_key = image_key
        if not 0.0 <= cond_drop_prob < 1.0:
            raise ValueError(f"cond_drop_prob must be in [0, 1), got {cond_drop_prob}")
        if posterior not in ("sample", "mode"):
            raise ValueError(f"posterior must be 'sample' or 'mode', got {posterior!r}")
        self.cond_drop_prob, self.posterior = cond_drop_prob, posterior
        self.use_ema, self.ema_decay = use_ema, ema_decay
        self.weight_decay, self.adam_betas, self.warmup_steps = weight_decay, tuple(betas), warmup_steps
        if lr_decay_steps is not None and lr_decay_steps <= warmup_steps:
            raise ConfigError("lr_decay_steps", f"must be after the warm-up ({warmup_steps} steps), got {lr_decay_steps}")
        self.warmup_start_lr, self.lr_decay_steps, self.min_lr = warmup_start_lr, lr_decay_steps, min_lr
        self.fused_optimizer, self.channels_last = fused_optimizer, channels_last
        self.monitor = monitor
        self.log_sample_kwargs = dict(log_sample_kwargs or {})
        self.learning_rate = 1e-4  # main.py sets it from base_learning_rate
        self.conditioner = self.build_conditioner(conditioner_config, num_classes, cond_key)

        self.first_stage_ckpt = dict(first_stage_config.get("params") or {}).get("ckpt_path")
        self.first_stage_model = instantiate_from_config(frozen_first_stage_config(first_stage_config),
                                                         key="first_stage_config")
        self.first_stage_model.eval().requires_grad_(False)
        kinds = tuple(getattr(self.first_stage_model, "latent_kinds", (getattr(self.first_stage_model, "latent_kind", None),)))
        if self.latent_kind not in kinds:
            raise ValueError(f"{type(self).__name__} models {self.latent_kind} latents, but the first stage "
                             f"{type(self.first_stage_model).__name__} produces {', '.join(map(str, kinds))} latents")
        native = tuple(self.first_stage_model.latent_shape(kind=self.latent_kind))
        self.latent_shape = tuple(latent_shape) if latent_shape else native

        # latents are multiplied by scale_factor before the prior sees them (latent-diffusion's
        # convention); with scale_by_std it is 1/std of the first training batch, kept in the checkpoint
        self.scale_by_std = bool(scale_by_std) and self.latent_kind == "continuous"
        if self.scale_by_std:
            self.register_buffer("scale_factor", torch.tensor(float(scale_factor)))
        else:
            self.scale_factor = float(scale_factor)
        self._scale_known = False  # restored from a checkpoint or estimated

    # --- construction -------------------------------------------------------------------------
    @staticmethod
    def build_conditioner(config: Mapping[str, Any] | None, num_classes: int | None, cond_key: str) -> Conditioner:
        """From `conditioner_config`; the shorthand `num_classes` builds a class-label conditioner."""
        if config is not None:
            if num_classes:
                raise ValueError("give either conditioner_config or num_classes, not both")
            cond = instantiate_from_config(config, key="conditioner_config")
            if not isinstance(cond, Conditioner):
                raise ValueError(f"conditioner_config must build an ldm.conditioning.Conditioner, got "
                                 f"{type(cond).__name__}")
            return cond
        return ClassLabel(num_classes, key=cond_key) if num_classes else Unconditional()

    def finish_init(self, ckpt_path: str | None = None, ignore_keys: Sequence[str] = ()) -> None:
        """Called by a subclass once its networks exist: EMA copies, then optional weights."""
        for name in self.network_names:
            if not isinstance(getattr(self, name, None), nn.Module):
                raise TypeError(f"{type(self).__name__} lists {name!r} in network_names but has no such module")
            setattr(self, f"{name}_ema", EMA(getattr(self, name), decay=self.ema_decay) if self.use_ema else None)
        if ckpt_path:
            state = self.convert_checkpoint_state(drop_keys(load_state_dict(ckpt_path), ignore_keys))
            self.check_networks_in(state, f"ckpt_path {ckpt_path}")
            self.check_first_stage_in(state, f"ckpt_path {ckpt_path}")
            load_into(self, state, source=str(ckpt_path), allow_missing=tuple(ignore_keys) + self.optional_keys(state),
                      allow_unexpected=FIRST_STAGE_TRAINING_KEYS)
            for name in self.network_names:  # a checkpoint without EMA copies: they start from its weights
                ema = getattr(self, f"{name}_ema")
                if ema is not None and not any(k.startswith(f"{name}_ema.") for k in state):
                    ema.reset_to(getattr(self, name))
            self.sync_ema_buffers()
        if self.channels_last:  # 4-d weights (convolutions: UNet, first stage) stored NHWC; outputs follow them
            self.to(memory_format=torch.channels_last)
        try:  # the config's sampling settings fail now, not at the first logged image
            self.check_sampler_options(self.log_sample_kwargs)
        except ValueError as e:
            raise ConfigError("log_sample_kwargs", str(e)) from None

    def convert_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Hook: map an original repository's key layout onto this prior's (identity by default)."""
        return state

    def check_networks_in(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Refuse, in one sentence, a state dict whose networks are another architecture's (say, another
        prior's checkpoint): it holds keys under a network's name, but not even half of that network's own."""
        from ldm.checkpoint import CheckpointError

        for name in self.network_names:
            theirs = {k for k in state if k.startswith(f"{name}.")}
            ours = {k for k in self.state_dict() if k.startswith(f"{name}.")}
            if theirs and 2 * len(theirs & ours) < len(ours):
                raise CheckpointError(
                    f"{source} holds another network than {type(self).__name__}'s {name!r} (only {len(theirs & ours)} "
                    f"of its {len(theirs)} {name}.* keys, e.g. {sorted(theirs - ours)[0]}, are among this network's "
                    f"{len(ours)}): a checkpoint of another prior or architecture? Use the config it was trained with")

    def check_first_stage_in(self, state: Mapping[str, torch.Tensor], source: str) -> None:
        """Refuse a checkpoint whose first stage is not the one the config names (and loaded): the prior's
        latents mean nothing to another first stage, and loading would silently swap it in."""
        from ldm.checkpoint import CheckpointError

        prefix = "first_stage_model."
        theirs = {k[len(prefix):]: v for k, v in state.items()
                  if k.startswith(prefix) and not k.startswith(FIRST_STAGE_TRAINING_KEYS)}
        if not self.first_stage_ckpt or not theirs:
            return
        ours = self.first_stage_model.state_dict()
        for key, value in theirs.items():
            mine = ours.get(key)
            if mine is None:
                why = "not in it"
            elif mine.shape != value.shape:
                why = f"{tuple(value.shape)} against {tuple(mine.shape)}"
            elif not torch.equal(mine, value.to(mine.dtype)):
                why = "other values"
            else:
                continue
            raise CheckpointError(
                f"{source} holds a prior trained on another first stage than {self.first_stage_ckpt}, the one "
                f"the config names ({prefix}{key}: {why}); its latents mean nothing to that first stage: load "
                f"it with the config it was trained with, or train the prior on this first stage")

    def optional_keys(self, state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """Key prefixes a checkpoint may lack: the first stage (it has its own `ckpt_path`) when the
        checkpoint holds none of it, and the EMA copies when it holds none of them."""
        out: list[str] = []
        if not any(k.startswith("first_stage_model.") for k in state):
            out.append("first_stage_model.")
        for name in self.network_names:
            if not any(k.startswith(f"{name}_ema.") for k in state):
                out.append(f"{name}_ema.")
        return tuple(out)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        """Old checkpoints of this project stored the first stage's training loss: it is ignored."""
        state_dict = {k: v for k, v in state_dict.items() if not k.startswith(FIRST_STAGE_TRAINING_KEYS)}
        result = super().load_state_dict(state_dict, strict=strict, assign=assign)
        self.sync_ema_buffers()
        return result

    def sync_ema_buffers(self) -> None:
        for name in self.network_names:
            ema = getattr(self, f"{name}_ema", None)
            if ema is not None:
                ema.copy_untracked_from(getattr(self, name))

    def network(self, name: str = "model", ema: bool = False) -> nn.Module:
        """A trained network, or its averaged copy when `ema` (and the prior keeps one)."""
        copy = getattr(self, f"{name}_ema", None)
        return copy.averaged if ema and copy is not None else getattr(self, name)

    def compile_networks(self, dynamic: bool | None = None) -> None:
        """`torch.compile` the forward of every network a sampler calls, in place (the state dict, hooks and
        averaged copies unchanged): the first calls compile (minutes on a CPU; a new batch size compiles again,
        then the shape is taken as dynamic), later ones run the generated kernels."""
        if self.compile_note:
            raise ValueError(self.compile_note)
        for net in self.sampling_networks():
            net.forward = torch.compile(net.forward, dynamic=dynamic)

    def sampling_networks(self) -> list[nn.Module]:
        """Every network a sampler of this prior may call: the trained ones and their averaged copies."""
        nets = [self.network(name, ema) for name in self.network_names for ema in (False, True)]
        return list({id(net): net for net in nets}.values())

    def train(self, mode: bool = True) -> LatentPrior:
        super().train(mode)
        self.first_stage_model.eval()  # frozen: BatchNorm/dropout stay in eval mode
        return self

    @property
    def num_classes(self) -> int | None:
        return self.conditioner.num_classes

    def first_stage_fingerprint(self) -> dict[str, Any]:
        """What a latent cache must have been built with to be used by this prior."""
        return first_stage_fingerprint(self.first_stage_model, self.first_stage_ckpt, self.latent_shape,
                                       kind=self.latent_kind)

    def on_fit_start(self) -> None:
        """Refuse a latent cache built with another first stage before any step is taken."""
        datamodule = getattr(self.trainer, "datamodule", None)
        for dataset in getattr(datamodule, "datasets", {}).values():
            if hasattr(dataset, "check_compatible"):
                dataset.check_compatible(self.first_stage_fingerprint())

    on_test_start = on_fit_start  # the test split is built only when testing

    # --- latents ------------------------------------------------------------------------------
    @torch.no_grad()
    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               mode: bool | None = True) -> torch.Tensor:
        """Images (B, C, H, W) in [-1, 1] to what the prior models: tokens (B, h, w) or scaled z.

        A KL posterior gives its mean by default; `mode=None` follows the prior's `posterior` setting.
        """
        enc = self.first_stage_model.encode_for_prior(images.to(self.device), kind=self.latent_kind)
        return self.latents_from_encoding(enc, generator, mode)

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.latent_kind == "continuous":
            latents = latents / self.scale_factor
        return self.first_stage_model.decode_latent(latents, kind=self.latent_kind).clamp(-1.0, 1.0)

    def latents_from_encoding(self, enc: Mapping[str, torch.Tensor], generator: torch.Generator | None = None,
                              mode: bool | None = None) -> torch.Tensor:
        """Tokens as they are; a continuous latent scaled; a posterior sampled (or its mode) and scaled."""
        if "tokens" in enc:
            return enc["tokens"].long()
        if "latent" in enc:
            z = enc["latent"].float()
        else:
            mean, logvar = enc["posterior_mean"].float(), enc["posterior_logvar"].float()
            take_mode = (self.posterior == "mode") if mode is None else mode
            if take_mode:
                z = mean
            else:
                gen_device = generator.device if generator is not None else mean.device
                eps = draw_local(lambda m: torch.randn((m, *mean.shape[1:]), generator=generator,
                                                       device=gen_device), mean.shape[0], mean.device).to(mean.device)
                z = mean + torch.exp(0.5 * logvar.clamp(-30.0, 20.0)) * eps
        return z * self.scale_factor

    def get_latents(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                    mode: bool | None = None) -> torch.Tensor:
        """Cached latents when the batch has them, else the first stage encodes the images."""
        if any(k in batch for k in CACHE_KEYS[self.latent_kind]):
            enc = {k: batch[k] for k in ("tokens", "latent", "posterior_mean", "posterior_logvar") if k in batch}
            return self.latents_from_encoding({k: v.to(self.device) for k, v in enc.items()}, generator, mode)
        if self.image_key not in batch:
            raise KeyError(f"batch has neither cached {self.latent_kind} latents ({', '.join(CACHE_KEYS[self.latent_kind])}) "
                           f"nor {self.image_key!r} (images)")
        return self.encode(batch[self.image_key], generator, mode)

    def get_cond(self, batch: Mapping[str, Any]) -> Cond:
        return self.conditioner.encode(batch, device=self.device)

    @torch.no_grad()
    def estimate_scale(self, batch: Mapping[str, Any]) -> None:
        """latent-diffusion's `scale_by_std`: 1 / std of the first batch's latents, over all ranks."""
        self.scale_factor.fill_(1.0)
        z = self.get_latents(batch, mode=False, generator=torch.Generator(self.device).manual_seed(0)).float()
        stats = torch.stack([z.sum(), z.pow(2).sum(), torch.tensor(float(z.numel()), device=z.device)])
        stats = gather_global(stats[None]).sum(0)
        mean = stats[0] / stats[2]
        std = torch.sqrt(stats[1] / stats[2] - mean**2)
        self.scale_factor.fill_(float(1.0 / std))
        print(f"scale_by_std: latent std {float(std):.4f}, scale_factor set to {float(self.scale_factor):.4f}")

    # --- subclass interface ------------------------------------------------------------------
    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, **kw: Any) -> torch.Tensor:
        raise NotImplementedError

    def nll_latents(self, latents: torch.Tensor, cond: Cond, ema: bool = True, **kw: Any) -> torch.Tensor:
        note = f": {self.likelihood_note}" if self.likelihood_note else ""
        raise NotImplementedError(f"{type(self).__name__} has no likelihood{note}")

    @property
    def has_likelihood(self) -> bool:
        """Whether `nll` is defined (the subclass implements `nll_latents`)."""
        return type(self).nll_latents is not LatentPrior.nll_latents

    # --- public API ---------------------------------------------------------------------------
    def user_cond(self, cond: Any, n: int) -> Cond:
        """`sample(n, cond=...)`'s argument, checked against the conditioner."""
        return self.conditioner.from_user(cond, n, self.device)

    def null_cond(self, n: int) -> Cond:
        return self.conditioner.null(n, self.device)

    def checked_sample_defaults(self, given: Mapping[str, Any] | None, builtin: Mapping[str, Any] | None = None,
                                mode: Mode = "sample") -> dict[str, Any]:
        """A config's `sample_defaults` over the prior's own (`builtin`), checked like a call's options; a bad
        one is a ConfigError under that key."""
        try:
            return {**(builtin or {}), **self.check_sampler_options(dict(given or {}), mode)}
        except ValueError as e:
            raise ConfigError("sample_defaults", str(e)) from None

    def check_sampler_options(self, options: Mapping[str, Any], mode: Mode = "sample") -> dict[str, Any]:
        """`options` normalised against `sampler_options`; a ValueError names the first bad one.

        Scripts call it on their settings before any work (an evaluation sweep, a benchmark).
        """
        return self.sampler_options.check(self, options, mode)

    @torch.no_grad()
    def sample(self, n: int, cond: Any = None, generator: torch.Generator | None = None, use_ema: bool = True,
               callback: Callable[[dict[str, Any]], None] | None = None, **sampler_kw: Any) -> torch.Tensor:
        """`n` images in [-1, 1], (n, C, H, W); `cond` as the conditioner describes (e.g. class labels);
        `sampler_kw` as `sampler_options` declares; `callback` gets a dict after every step."""
        if isinstance(n, bool) or not isinstance(n, numbers.Integral):
            raise ValueError(f"n must be an integer, got {n!r}")
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        options = self.check_sampler_options(sampler_kw)
        latents = self.sample_latents(n, self.user_cond(cond, n), generator, ema=use_ema, callback=callback, **options)
        return self.decode(latents)

    def latent_mask(self, mask: torch.Tensor, images: torch.Tensor) -> torch.Tensor:
        """Pixel mask (B, 1, H, W) or (B, H, W), 1 = keep (see `ldm.masks`), to a latent mask (B, h, w) bool.

        A latent cell is known only if every pixel it covers is known (mask > 0.5).
        """
        mask = check_mask(mask, images)
        h, w = self.latent_shape[-2:]
        fh, fw = images.shape[2] // h, images.shape[3] // w
        known = -F.max_pool2d(-mask, kernel_size=(fh, fw), stride=(fh, fw))  # min pooling
        return known[:, 0] > 0.5  # (B, h, w)

    @torch.no_grad()
    def inpaint(self, images: torch.Tensor, mask: torch.Tensor, cond: Any = None,
                generator: torch.Generator | None = None, use_ema: bool = True, paste: bool = True,
                callback: Callable[[dict[str, Any]], None] | None = None, **sampler_kw: Any) -> torch.Tensor:
        """Fill the unknown region (mask 0) of `images` (B, C, H, W) in [-1, 1]; known latents never change.

        `mask` as `ldm.masks.check_mask` takes it. With `paste`, known pixels are copied from the input
        into the decoded result (blended by a float mask's weights).
        """
        if images.dim() != 4:
            raise ValueError(f"images must be (B, C, H, W), got {tuple(images.shape)}")
        options = self.check_sampler_options(sampler_kw, mode="inpaint")
        images = images.to(self.device)
        mask = check_mask(torch.as_tensor(mask).to(self.device), images)  # (B, 1, H, W) float
        known = self.latent_mask(mask, images)
        latents = self.encode(images)
        out = self.inpaint_latents(latents, known, self.user_cond(cond, images.shape[0]), generator,
                                   ema=use_ema, callback=callback, **options)
        decoded = self.decode(out)
        if paste:
            decoded = mask * images + (1 - mask) * decoded
        return decoded

    @torch.no_grad()
    def nll(self, batch: Mapping[str, Any], use_ema: bool = True, **kw: Any) -> torch.Tensor:
        """Negative log-likelihood bound per sample, in bits per latent dimension (per token for VQ)."""
        return self.nll_latents(self.get_latents(batch, mode=True), self.get_cond(batch), ema=use_ema, **kw)

    # --- Lightning ----------------------------------------------------------------------------
    def training_generator(self, batch_idx: int) -> torch.Generator:
        """The noise of one training batch: seeded by the run's seed and the batch's position, the same on
        every rank (each keeps its rows of the global draw) and after a resume."""
        # the run's seed (main.py's StepSeed callback sets it; outside main.py, the one torch was seeded with)
        seed = getattr(self, "run_seed", None)
        return step_generator(torch.initial_seed() if seed is None else seed, self.current_epoch, batch_idx,
                              device=self.device)

    def on_train_batch_start(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        # the first batch Lightning runs, not batch_idx 0: a batch of unreadable images only is None and passed over
        if self.scale_by_std and self.global_step == 0 and not self._scale_known:
            self.estimate_scale(batch)
            self._scale_known = True

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        self._scale_known = True

    def training_loss(self, batch: Mapping[str, Any], generator: torch.Generator) -> tuple[torch.Tensor, dict]:
        """The loss of one training batch (cached latents or images), conditioning dropped for guidance."""
        cond = self.conditioner.drop(self.get_cond(batch), self.cond_drop_prob, generator=generator)
        return self.compute_loss(self.get_latents(batch, generator=generator), cond, generator=generator)

    def training_step(self, batch: Mapping[str, Any], batch_idx: int) -> torch.Tensor:
        loss, logs = self.training_loss(batch, self.training_generator(batch_idx))
        self.log("train/loss", loss, prog_bar=True, on_step=True, on_epoch=False)
        self.log_dict({f"train/{k}": v for k, v in logs.items()}, on_step=True, on_epoch=False)
        return loss

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        """The EMA follows optimizer steps (not micro-batches under gradient accumulation)."""
        super().optimizer_step(*args, **kwargs)
        self.update_ema()

    def update_ema(self, names: Sequence[str] | None = None) -> None:
        for name in names or self.network_names:
            ema = getattr(self, f"{name}_ema", None)
            if ema is not None:
                ema.update(getattr(self, name))

    def _eval_step(self, batch: Mapping[str, Any], batch_idx: int, split: str) -> None:
        if batch is None:  # every image of the batch was skipped (ldm.data.skipped)
            return
        g = step_generator(0, batch_idx, device=self.device)  # the same draws at every validation
        loss, logs = self.compute_loss(self.get_latents(batch, generator=g), self.get_cond(batch), generator=g, ema=True)
        self.log(f"{split}/loss", loss, prog_bar=split == "val", sync_dist=True)
        self.log_dict({f"{split}/{k}": v for k, v in logs.items()}, sync_dist=True)

    def validation_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "val")

    def test_step(self, batch: Mapping[str, Any], batch_idx: int) -> None:
        self._eval_step(batch, batch_idx, "test")

    def trained_parameters(self) -> list[nn.Parameter]:
        params = [p for name in self.network_names for p in getattr(self, name).parameters()]
        return params + [p for p in self.conditioner.parameters() if p.requires_grad]

    def build_optimizer(self) -> torch.optim.Optimizer:
        """AdamW over the trained parameters, as training and the training benchmarks step it: one fused kernel
        where the parameters' device has one (`fused_optimizer`: None = where available)."""
        return adamw(self.trained_parameters(), self.fused_optimizer, lr=self.learning_rate, betas=self.adam_betas,
                     weight_decay=self.weight_decay)

    def configure_optimizers(self):
        opt = self.build_optimizer()
        if not self.warmup_steps and self.lr_decay_steps is None:
            return opt
        sched = torch.optim.lr_scheduler.LambdaLR(opt, self.lr_factor)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_factor(self, step: int) -> float:
        """The learning rate at `step` over the configured one: a linear warm-up from `warmup_start_lr`, then
        constant or, with `lr_decay_steps`, a cosine down to `min_lr` at that step (taming's and ImageBART's
        LambdaWarmUpCosineScheduler)."""
        lr = self.learning_rate
        if step < self.warmup_steps:
            start = self.warmup_start_lr / lr if lr else 0.0
            return start + (1.0 - start) * (step + 1) / self.warmup_steps
        if self.lr_decay_steps is None:
            return 1.0
        progress = min(1.0, (step - self.warmup_steps) / (self.lr_decay_steps - self.warmup_steps))
        low = self.min_lr / lr if lr else 0.0
        return low + 0.5 * (1.0 - low) * (1.0 + math.cos(math.pi * progress))

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, split: str = "train", **kw: Any) -> dict[str, torch.Tensor]:
        """Samples (with the batch's conditioning) and first-stage reconstructions."""
        out: dict[str, torch.Tensor] = {}
        latents = self.get_latents(batch, mode=True)[:N]
        n = latents.shape[0]
        out["reconstructions"] = self.decode(latents)
        if self.image_key in batch:
            out["inputs"] = batch[self.image_key][:N]
        cond = {k: v[:n] for k, v in self.get_cond(batch).items()} or None
        g = torch.Generator(device=self.device).manual_seed(0)
        out["samples"] = self.sample(n, cond=cond, generator=g, **{**self.log_sample_kwargs, **kw})
        return out


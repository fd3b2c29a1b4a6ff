"""Cascaded diffusion (Ho et al. 2022; Imagen, Saharia et al. 2022): a base prior followed by super-resolution
stages, each a Gaussian prior in pixel space conditioned on the stage before it's output.

`SuperResolutionPrior` is one stage: the low-resolution image comes in through `ldm.conditioning.LowResImage`
(shrunk, brought back to the stage's size and concatenated to the UNet input) and is corrupted by *noise
conditioning augmentation*: in training at a level s drawn uniformly from [0, noise_aug_max_level], at sampling
at the fixed `aug_level`, z = cos(pi s / 2) x + sin(pi s / 2) eps, with s given to the UNet
(`aug_level_conditioning`). The stage so learns to undo the base's artefacts instead of trusting its input.

`CascadePrior` chains trained stages from a sampling config (`configs/ldm/fmnist_cascade.yaml`): `sample` runs
the base, then every stage on the previous output, each with its own sampler settings; `inpaint` passes the
image and mask (shrunk to each stage's size) through every stage. The stages are trained one by one with their
own configs.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import replace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ldm.conditioning import Cond, LowResImage
from ldm.diffusion.model import SAMPLER_OPTIONS, LatentDiffusionPrior
from ldm.distributed import draw_local
from ldm.prior import LatentPrior
from ldm.sampler_options import Option, SamplerOptions
from ldm.util import ConfigError, Fraction


def augment(image: torch.Tensor, level: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The variance-preserving corruption at levels (B,) in [0, 1]: 0 is the image, 1 pure noise."""
    s = level.to(image.dtype).view(-1, *([1] * (image.dim() - 1))) * (math.pi / 2)
    return torch.cos(s) * image + torch.sin(s) * noise


def _aug_high(prior: SuperResolutionPrior, _: Any = None) -> float:
    return prior.noise_aug_max_level


def _aug_default(prior: SuperResolutionPrior, _: Any = None) -> float:
    return prior.noise_aug_sample_level


SR_SAMPLER_OPTIONS = SamplerOptions(
    *SAMPLER_OPTIONS,
    Option("aug_level", float, _aug_default, low=0.0, high=_aug_high, modes=("sample", "inpaint"),
           help="noise level of the low-resolution input at sampling (0: clean; at most the training's maximum)"),
)


class SuperResolutionPrior(LatentDiffusionPrior):
    """A super-resolution stage: a pixel-space Gaussian prior on the upsampled, noise-augmented low-resolution
    image (plus any class or text conditioning)."""

    sampler_options = SR_SAMPLER_OPTIONS

    def __init__(self, *args: Any, noise_aug_max_level: Fraction = 0.5, noise_aug_sample_level: Fraction = 0.1,
                 **kwargs: Any):
        self.noise_aug_max_level, self.noise_aug_sample_level = float(noise_aug_max_level), float(noise_aug_sample_level)
        if not 0.0 <= self.noise_aug_sample_level <= self.noise_aug_max_level <= 1.0:
            raise ConfigError("model.params", f"need 0 <= noise_aug_sample_level <= noise_aug_max_level <= 1, got "
                                              f"{noise_aug_sample_level} and {noise_aug_max_level}")
        super().__init__(*args, **kwargs)
        if self.low_res is None:
            raise ConfigError("conditioner_config", "a super-resolution stage needs an ldm.conditioning.LowResImage "
                                                    "conditioner (alone or in a Combined one)")
        if not getattr(self.first_stage_model, "pixel_space", False):
            raise ConfigError("first_stage_config", "a super-resolution stage works in pixel space: use "
                                                    "ldm.first_stage.models.IdentityFirstStage")
        if not getattr(self.model, "aug_level_conditioning", False):
            raise ConfigError("unet_config.params.aug_level_conditioning", "must be true: the UNet is told the "
                                                                           "noise level of its low-resolution input")

    @property
    def low_res(self) -> LowResImage | None:
        parts = getattr(self.conditioner, "parts", {"": self.conditioner})
        return next((p for p in parts.values() if isinstance(p, LowResImage)), None)

    def augment_cond(self, cond: Cond, level: float | None, generator: torch.Generator | None) -> Cond:
        """`cond` with its low-resolution image corrupted at `level`, or at levels drawn from [0, max] (training)."""
        image = cond["concat"]
        n, device = image.shape[0], image.device
        gen_device = generator.device if generator is not None else device
        if level is None:
            levels = draw_local(lambda m: torch.rand(m, generator=generator, device=gen_device), n, device)
            levels = levels.to(device) * self.noise_aug_max_level
        else:
            levels = torch.full((n,), float(level), device=device)
        if not levels.any():
            return {**cond, "aug_level": levels}
        noise = draw_local(lambda m: torch.randn((m, *image.shape[1:]), generator=generator, device=gen_device),
                           n, device).to(device)
        return {**cond, "concat": augment(image, levels, noise), "aug_level": levels}

    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        return super().compute_loss(latents, self.augment_cond(cond, None, generator), generator, ema)

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       callback: Any = None, **kw: Any) -> torch.Tensor:
        level = kw.pop("aug_level", self.noise_aug_sample_level)
        return super().sample_latents(n, self.augment_cond(cond, level, generator), generator, ema, callback, **kw)

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, callback: Any = None,
                        **kw: Any) -> torch.Tensor:
        level = kw.pop("aug_level", self.noise_aug_sample_level)
        return super().inpaint_latents(latents, known, self.augment_cond(cond, level, generator), generator, ema,
                                       callback, **kw)


STAGE_OPTIONS = ("sampler", "steps", "eta", "s_churn", "s_tmin", "s_tmax", "s_noise", "guidance_scale",
                 "guidance_rescale", "clip_x0", "dynamic_threshold", "aug_level")


class CascadePrior(LatentPrior):
    """Base → super-resolution stages. Sampler options `<option>` go to the base, `sr_<option>` to every
    super-resolution stage; their defaults are each stage's `sample` settings in the sampling config."""

    latent_kind = "continuous"
    network_names = ()
    likelihood_note = "a cascade has no single likelihood; score each stage's checkpoint on its own"

    def __init__(self, stages: Sequence[LatentDiffusionPrior], settings: Sequence[Mapping[str, Any]] = ()):
        last = stages[-1]
        c, h, _ = last.latent_shape
        super().__init__({"target": "ldm.first_stage.models.IdentityFirstStage",
                          "params": {"channels": c, "resolution": h}}, use_ema=False)
        self.stages = nn.ModuleList(stages)
        self.conditioner = stages[0].conditioner
        self.stage_settings = [dict(s) for s in (settings or [{}] * len(stages))]
        for i, stage in enumerate(stages[1:], start=1):
            check_stage_input(stages[i - 1], stage, i)
        self.sampler_options = cascade_options(stages, self.stage_settings)
        self.finish_init()

    @classmethod
    def from_sampling_config(cls, params: dict[str, Any], source: str) -> tuple[CascadePrior, dict[str, Any]]:
        """`stages: [{checkpoint: <path>, sample: {<sampler options>}}, ...]`, base first; the config returned
        carries the last stage's data config (the evaluation's reference images)."""
        from ldm.checkpoint import CheckpointError, instantiate_from_checkpoint, subclass_of

        stages = params.get("stages")
        if set(params) - {"stages"} or not isinstance(stages, list) or len(stages) < 2:
            raise CheckpointError(f"{source}: model.params takes stages (a list, base first, at least two); got "
                                  f"{sorted(params)}")

        is_gaussian = subclass_of(LatentDiffusionPrior, source, "a Gaussian diffusion prior")
        priors, settings = [], []
        for i, stage in enumerate(stages):
            if not isinstance(stage, dict) or set(stage) - {"checkpoint", "sample"} or "checkpoint" not in stage:
                raise CheckpointError(f"{source}: stage {i} must be {{checkpoint: <path>, sample: {{...}}}}, got "
                                      f"{stage!r}")
            prior, stage_config = instantiate_from_checkpoint(stage["checkpoint"], check_class=is_gaussian)
            if i and not isinstance(prior, SuperResolutionPrior):
                raise CheckpointError(f"{source}: stage {i} ({stage['checkpoint']}) is not a super-resolution stage")
            try:
                settings.append(prior.check_sampler_options(dict(stage.get("sample") or {})))
            except ValueError as e:
                raise CheckpointError(f"{source}: stage {i}'s sample settings: {e}") from None
            priors.append(prior)
        try:
            cascade = cls(priors, settings)
        except ValueError as e:
            raise CheckpointError(f"{source}: {e}") from None
        # the last stage's data: the images the cascade's samples are scored against
        return cascade.eval(), {"model": {"target": f"{cls.__module__}.{cls.__name__}", "params": params},
                                "data": stage_config.get("data")}

    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        raise NotImplementedError("a cascade is trained stage by stage: python main.py --base <stage config> -t")

    def split_options(self, kw: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
        """The call's options as the base's and the super-resolution stages' (`sr_` dropped)."""
        base = {k: v for k, v in kw.items() if not k.startswith("sr_")}
        sr = {k[3:]: v for k, v in kw.items() if k.startswith("sr_")}
        return base, sr

    def stage_cond(self, stage: LatentDiffusionPrior, cond: Cond, low: torch.Tensor) -> Cond:
        own = {k: v for k, v in cond.items() if k in stage.conditioner.keys}
        return {**own, "concat": low, "aug_level": torch.zeros(low.shape[0], device=low.device)}

    def _stage_kw(self, index: int, given: Mapping[str, Any]) -> dict[str, Any]:
        return {**self.stage_settings[index], **given}

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       callback: Any = None, **kw: Any) -> torch.Tensor:
        base_kw, sr_kw = self.split_options(kw)
        images = self.stages[0].sample(n, cond or None, generator, use_ema=ema, callback=_tagged(callback, 0),
                                       **self._stage_kw(0, base_kw))
        for i, stage in enumerate(self.stages[1:], start=1):
            images = stage.sample(n, self.stage_cond(stage, cond, images), generator, use_ema=ema,
                                  callback=_tagged(callback, i), **self._stage_kw(i, sr_kw))
        return images

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, callback: Any = None,
                        **kw: Any) -> torch.Tensor:
        """Every stage inpaints the image shrunk to its size (a pixel is known where every pixel it covers is)
        from the stage before it's result."""
        base_kw, sr_kw = self.split_options(kw)
        mask = known[:, None].float()
        images = None
        for i, stage in enumerate(self.stages):
            size = stage.latent_shape[1:]
            target = F.interpolate(latents, size=size, mode="area")
            stage_mask = -F.adaptive_max_pool2d(-mask, size)  # min-pool: known only if all covered pixels are
            stage_cond = (cond or None) if i == 0 else self.stage_cond(stage, cond, images)
            images = stage.inpaint(target, stage_mask, stage_cond, generator, use_ema=ema,
                                   callback=_tagged(callback, i), **self._stage_kw(i, base_kw if i == 0 else sr_kw))
        return images

    def sampling_networks(self) -> list[nn.Module]:
        return [net for stage in self.stages for net in stage.sampling_networks()]

    def sampling_forward(self, n: int, cond: Any = None, stage: int = 0, **kw: Any):
        """One bare forward of stage `stage`'s network, on the inputs a sampling step of that stage feeds it."""
        base_kw, sr_kw = self.split_options(kw)
        prior = self.stages[stage]
        if stage == 0:
            return prior.sampling_forward(n, cond, **{**self.stage_settings[0], **base_kw})
        c = self.user_cond(cond, n)
        low = torch.zeros(n, *self.stages[stage - 1].latent_shape, device=self.device)
        return prior.sampling_forward(n, self.stage_cond(prior, c, low), **{**self.stage_settings[stage], **sr_kw})


def check_stage_input(before: LatentPrior, stage: LatentDiffusionPrior, index: int) -> None:
    """The stage's low-resolution input must be what the stage before it outputs."""
    low = stage.low_res
    out = before.first_stage_model.latent_shape() if getattr(before.first_stage_model, "pixel_space", False) else None
    c, h, w = out if out is not None else (before.first_stage_model.ddconfig.get("out_ch", 3),
                                           *[before.first_stage_model.ddconfig["resolution"]] * 2)
    if (low.shape[0], low.size, low.size) != (c, h, w):
        raise ValueError(f"stage {index} upsamples {low.shape[0]} x {low.size} x {low.size} images, but stage "
                         f"{index - 1} outputs {c} x {h} x {w}")


def cascade_options(stages: Sequence[LatentDiffusionPrior], settings: Sequence[Mapping[str, Any]]) -> SamplerOptions:
    """The base's options under their names and the super-resolution stages' under `sr_<name>`, with bounds
    computed on the stage and defaults from the sampling config's per-stage settings."""
    out = []
    for prefix, stage, setting in (("", stages[0], settings[0]), ("sr_", stages[1], settings[1])):
        for option in stage.sampler_options:
            if option.name in STAGE_OPTIONS:
                resolved = option.resolve(stage)
                out.append(replace(resolved, name=prefix + option.name,
                                   default=setting.get(option.name, resolved.default)))
    return SamplerOptions(*out)


def _tagged(callback: Any, stage: int):
    """The callback with the stage's index added to every step's dict."""
    if callback is None:
        return None
    return lambda info: callback({**info, "stage": stage})

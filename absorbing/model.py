"""The absorbing-diffusion prior: wires the process, the denoiser and the frozen VQ first stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from absorbing.process import AbsorbingDiffusion, LossType, MaskSchedule, TimeSampling
from absorbing.sampling import ORDERS, SCHEDULES, Order, sample
from absorbing.unleashing import convert_sampler_state_dict
from absorbing.windows import windowed_denoiser
from ldm.conditioning import Cond, cat_cond
from ldm.prior import LatentPrior
from ldm.sampler_options import Option, SamplerOptions, config_default
from ldm.util import ConfigError, PositiveInt, instantiate_from_config


def _training_hw(prior: AbsorbingPrior, _: Any = None) -> tuple[int, int]:
    return tuple(prior.latent_shape[-2:])


def _max_steps(prior: AbsorbingPrior, options: dict[str, Any]) -> int:
    """T, or one step per token in raster order."""
    if options.get("order") == "raster":
        h, w = options.get("shape") or _training_hw(prior)
        return h * w
    return prior.process.num_timesteps


SAMPLER_OPTIONS = SamplerOptions(
    Option("order", str, config_default("order", "random"), choices=ORDERS,
           help="which masked tokens a step reveals: random ones (the paper), the most confident (MaskGIT), "
                "or the next ones in raster order"),
    Option("schedule", str, config_default("schedule", None), choices=SCHEDULES, nullable=True,
           help="how many tokens a step reveals: 'uniform' (each with probability 1/s in random order, an even "
                "share of what is left otherwise) or 'cosine' (MaskGIT's: few early, many late); None: the "
                "order's own, cosine in confidence order and uniform otherwise"),
    Option("confidence_noise", float, config_default("confidence_noise", 0.0), low=0.0,
           help="Gumbel noise on the log-confidences that rank positions in confidence order, scaled by "
                "1 - (i+1)/S (MaskGIT's randomised choice, 4.5 in its code): more diverse samples; unused "
                "in the other orders"),
    Option("shape", int, _training_hw, low=_training_hw, size=2, nullable=True, modes=("sample",),
           help="token map (h, w) to sample, at least the training shape; larger maps are sampled with "
                "overlapping training-size windows (None: the training shape)"),
    Option("steps", int, lambda prior, _: prior.sample_steps, low=1, high=_max_steps, nullable=True,
           help="reverse steps S (step s runs at time round(s T / S)); at most T, or one per token in raster "
                "order (None: the config's sample_steps)"),
    Option("temperature", float, config_default("temperature", 1.0), low=0.0,
           help="divides the logits: 0 takes the most likely token, < 1 sharpens, > 1 flattens"),
    Option("top_k", int, config_default("top_k", None), low=1, nullable=True,
           help="draw from the k most likely tokens only (None: all)"),
    Option("top_p", float, config_default("top_p", None), low=0.0, high=1.0, low_open=True, nullable=True,
           help="draw from the smallest set of tokens whose probability reaches p (nucleus; None: all)"),
    Option("guidance_scale", float, config_default("guidance_scale", 1.0), low=0.0, conditional_only=True,
           help="classifier-free guidance s, log p_u + s (log p_c - log p_u): 1 is the conditional model "
                "(no guidance), 0 the unconditional one, > 1 follows the condition more closely; needs a "
                "prior trained with cond_drop_prob > 0"),
    Option("stride", int, None, low=1, high=_training_hw, size=2, nullable=True,
           help="window stride (h, w) for maps larger than the training shape (None: half a window); "
                "unused at the training shape"),
)


class AbsorbingPrior(LatentPrior):
    """Bond-Taylor et al. 2022 on the tokens of a VQ first stage; class-conditional with a class token."""

    latent_kind = "tokens"
    sampler_options = SAMPLER_OPTIONS

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        denoiser_config: Mapping[str, Any],
        codebook_size: PositiveInt,
        num_timesteps: PositiveInt = 256,
        mask_schedule: MaskSchedule = "random",
        loss_type: LossType = "reweighted_elbo",
        time_sampling: TimeSampling = "uniform",
        time_conditioning: bool = False,
        sample_steps: PositiveInt | None = None,
        sample_defaults: Mapping[str, Any] | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        **prior_kw: Any,
    ):
        super().__init__(first_stage_config, **prior_kw)
        n_embed = int(self.first_stage_model.n_embed)
        if n_embed != codebook_size:
            raise ValueError(
                f"the first stage has a codebook of {n_embed} codes but the prior is configured for "
                f"codebook_size={codebook_size}; they must be equal"
            )
        self.process = AbsorbingDiffusion(codebook_size, num_timesteps, mask_schedule, loss_type, time_sampling)
        self.codebook_size = int(codebook_size)
        self.seq_len = int(self.latent_shape[-2] * self.latent_shape[-1])
        backbone_kw: dict[str, Any] = {"vocab_size": codebook_size, "seq_len": self.seq_len}
        if self.num_classes:
            backbone_kw["num_classes"] = self.num_classes
        if set(self.conditioner.keys) - {"class_label"}:
            raise ValueError(f"the absorbing denoisers take class labels only; the conditioner gives "
                             f"{list(self.conditioner.keys)}")
        self.time_conditioning = bool(time_conditioning)  # without it, sampling reuses the logits of unchanged rows
        if time_conditioning:
            backbone_kw.update(time_conditioning=True, num_timesteps=num_timesteps)
        self.model = instantiate_from_config(denoiser_config, key="denoiser_config", **backbone_kw)
        if sample_steps is not None and not 1 <= sample_steps <= num_timesteps:
            raise ValueError(f"sample_steps must be in 1..{num_timesteps} (num_timesteps) or None, got {sample_steps}")
        self.sample_steps = sample_steps or num_timesteps
        self.sample_defaults: dict[str, Any] = {}
        if sample_defaults and "steps" in sample_defaults:
            raise ConfigError("sample_defaults", "the step count is `sample_steps`, not a sample_defaults key")
        # options of both sample and inpaint (not shape)
        self.sample_defaults = self.checked_sample_defaults(sample_defaults, mode="inpaint")
        self.finish_init(ckpt_path, ignore_keys)

    def denoiser(self, ema: bool = False):
        """`net(x_t (B, N) long, t (B,), cond dict) -> logits (B, N, K)` on the trained or averaged weights."""
        net = self.network("model", ema)

        def call(xt: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
            return net(xt, t, (cond or {}).get("class_label"))

        return call

    def convert_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An original Unleashing Transformers sampler state dict (`_denoise_fn.*`) maps onto this prior."""
        if any(k.startswith("_denoise_fn.") for k in state):
            return convert_sampler_state_dict(state)
        return state

    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = latents.flatten(1)  # (B, h*w) long
        out = self.process.training_losses(self.denoiser(ema), x0, cond, generator)
        return out["loss"], {"elbo_bpt": out["elbo_bpt"]}

    def _sample_tokens(self, n: int, hw: tuple[int, int], cond: Cond, generator: torch.Generator | None,
                       ema: bool, steps: int | None = None, stride: int | Sequence[int] | None = None,
                       order: Order = "random", x_init: torch.Tensor | None = None,
                       known: torch.Tensor | None = None, **kw: Any) -> torch.Tensor:
        h, w = hw
        net = self.denoiser(ema)
        if (h, w) != tuple(self.latent_shape[-2:]):
            net = windowed_denoiser(net, (h, w), tuple(self.latent_shape[-2:]), stride)
        tokens = sample(
            net, (n, h * w), self.process.mask_id, self.process.num_timesteps,
            self.sample_steps if steps is None else steps, cond or None,
            generator, null_cond=self.null_cond(n) if cond else None, order=order, device=self.device,
            x_init=None if x_init is None else x_init.flatten(1), known=None if known is None else known.flatten(1),
            time_invariant=not self.time_conditioning, **kw,
        )
        return tokens.view(n, h, w)

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       shape: Sequence[int] | None = None, **kw: Any) -> torch.Tensor:
        """Tokens (n, h, w); `shape=(h, w)` larger than the training shape samples with sliding windows.

        Options as `sampler_options` declares (`sample` checks them; a direct caller passes valid ones); those
        not given come from the config's `sample_defaults`."""
        hw = tuple(shape) if shape is not None else _training_hw(self)
        return self._sample_tokens(n, hw, cond, generator, ema, **{**self.sample_defaults, **kw})

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, **kw: Any) -> torch.Tensor:
        if known.shape != latents.shape:
            raise ValueError(f"known mask {tuple(known.shape)} does not match the token map {tuple(latents.shape)}")
        return self._sample_tokens(latents.shape[0], tuple(latents.shape[-2:]), cond, generator, ema,
                                   x_init=latents, known=known, **{**self.sample_defaults, **kw})

    def sampling_forward(self, n: int, cond: Any = None, guidance_scale: float = 1.0,
                         use_ema: bool = True, **_: Any):
        """A closure running one bare denoiser forward on the inputs one sampling step feeds it
        (the doubled batch under guidance): the yardstick of `scripts/benchmark.py`."""
        c = self.user_cond(cond, n)
        h, w = self.latent_shape[-2:]
        x = torch.full((n, h * w), self.process.mask_id, dtype=torch.long, device=self.device)
        t = torch.full((n,), max(1, self.process.num_timesteps // 2), dtype=torch.long, device=self.device)
        if guidance_scale != 1.0 and c:
            x, t, c = torch.cat([x, x]), torch.cat([t, t]), cat_cond(c, self.null_cond(n))
        net = self.denoiser(use_ema)
        return lambda: net(x, t, c)

    def nll_latents(self, latents: torch.Tensor, cond: Cond, ema: bool = True, generator: torch.Generator | None = None,
                    timesteps: list[int] | None = None, strata: int | None = None) -> torch.Tensor:
        """The ELBO over all T steps in bits per token (B,); `strata` estimates it from fewer calls."""
        return self.process.elbo(self.denoiser(ema), latents.flatten(1), cond, generator, timesteps, strata)

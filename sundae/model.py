"""The SUNDAE prior (Savinov et al. 2022, on VQGAN tokens as McKinney & Willcocks 2022): wires the
unrolled-denoising process, the hourglass network and the frozen VQ first stage."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.conditioning import Cond, cat_cond
from ldm.prior import LatentPrior
from ldm.sampler_options import Option, SamplerOptions, config_default
from ldm.util import ConfigError, instantiate_from_config
from sundae.hourglass import HourglassTransformer, convert_original_state_dict
from sundae.process import UnrolledDenoising
from sundae.sampling import sample

# what the sampler does when neither the config's `sample_defaults` nor the call says otherwise
SAMPLER_DEFAULTS: dict[str, Any] = {
    "steps": 100, "temperature": 1.0, "end_temperature": None, "proportion": 1.0, "end_proportion": None,
    "min_steps": 10, "top_k": None, "top_p": None, "guidance_scale": 1.0,
}


SAMPLER_OPTIONS = SamplerOptions(
    Option("steps", int, config_default("steps"), low=1,
           help="sampling steps at most (a sample stops earlier once a step leaves it unchanged, see min_steps)"),
    Option("temperature", float, config_default("temperature"), low=0.0,
           help="temperature of the first step's proposals: 0 takes the most likely token, < 1 sharpens"),
    Option("end_temperature", float, config_default("end_temperature"), low=0.0, nullable=True,
           help="temperature of the last step; in between it runs linearly (None: constant, the start value)"),
    Option("proportion", float, config_default("proportion"), low=0.0, high=1.0, low_open=True,
           help="share of the first step's proposals accepted (each position independently)"),
    Option("end_proportion", float, config_default("end_proportion"), low=0.0, high=1.0, low_open=True, nullable=True,
           help="share accepted at the last step; in between it runs linearly (None: constant, the start value)"),
    Option("min_steps", int, config_default("min_steps"), low=0, nullable=True,
           help="steps before a sample may stop on its own, once a step leaves it unchanged (None: run every step)"),
    Option("top_k", int, config_default("top_k"), low=1, nullable=True,
           help="propose from the k most likely tokens only (None: all)"),
    Option("top_p", float, config_default("top_p"), low=0.0, high=1.0, low_open=True, nullable=True,
           help="propose from the smallest set of tokens whose probability reaches p (nucleus; None: all)"),
    Option("guidance_scale", float, config_default("guidance_scale"), low=0.0, conditional_only=True,
           help="classifier-free guidance s, log p_u + s (log p_c - log p_u): 1 is the conditional model (no "
                "guidance), 0 the unconditional one; needs a prior trained with cond_drop_prob > 0"),
)


class SundaePrior(LatentPrior):
    """Step-unrolled denoising autoencoder over the tokens of a VQ first stage; class labels through the
    network's class embedding (with a null class for classifier-free guidance)."""

    latent_kind = "tokens"
    sampler_options = SAMPLER_OPTIONS
    likelihood_note = ("SUNDAE defines no tractable likelihood; its unrolled denoising loss (nats per token) on "
                       "the test split is logged as test/loss by main.py")

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        network_config: Mapping[str, Any],
        codebook_size: int,
        unroll_steps: int = 2,
        sample_defaults: Mapping[str, Any] | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        **prior_kw: Any,
    ):
        super().__init__(first_stage_config, **prior_kw)
        n_embed = int(self.first_stage_model.n_embed)
        if n_embed != codebook_size:
            raise ConfigError("codebook_size", f"the first stage has a codebook of {n_embed} codes but the prior "
                                               f"is configured for {codebook_size}; they must be equal")
        if unroll_steps < 1:
            raise ConfigError("unroll_steps", f"expected an integer >= 1, got {unroll_steps}")
        if set(self.conditioner.keys) - {"class_label"}:
            raise ValueError(f"the SUNDAE network takes class labels only; the conditioner gives "
                             f"{list(self.conditioner.keys)}")
        self.process = UnrolledDenoising(codebook_size, unroll_steps)
        self.codebook_size = int(codebook_size)
        net_kw: dict[str, Any] = {"vocab_size": codebook_size, "grid": tuple(self.latent_shape[-2:])}
        if self.num_classes:
            net_kw["num_classes"] = self.num_classes
        self.model = instantiate_from_config(network_config, key="network_config", **net_kw)
        self.sample_defaults = dict(SAMPLER_DEFAULTS)
        self.sample_defaults = self.checked_sample_defaults(sample_defaults, SAMPLER_DEFAULTS)
        self.finish_init(ckpt_path, ignore_keys)

    def denoiser(self, ema: bool = False):
        """`net(x (B, N) long, cond dict) -> logits (B, N, K)` on the trained or averaged weights."""
        net = self.network("model", ema)

        def call(x: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
            return net(x, (cond or {}).get("class_label"))

        return call

    def convert_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An original sundae-vqgan `HourglassTransformerLM` state dict (`transformer.*`, `token_emb.*`, the
        `net` of its checkpoints) maps onto this prior's network."""
        if not {"token_emb.weight", "to_logits.weight"} <= set(state):  # not the original's top-level layout
            return state
        net = self.model
        if not isinstance(net, HourglassTransformer) or net.rotary_mode != "original" \
                or getattr(net.body, "resample_groups", "raster") != "raster":
            raise ValueError("an original sundae-vqgan checkpoint needs the network it was trained with: "
                             "network_config.target sundae.hourglass.HourglassTransformer with rotary_mode: original "
                             "and resample_groups: raster")
        return {f"model.{k}": v for k, v in convert_original_state_dict(state, net).items()}

    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        out = self.process.training_losses(self.denoiser(ema), latents.flatten(1), cond, generator)
        return out["loss"], {k: v for k, v in out.items() if k != "loss"}

    def _sample_tokens(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool,
                       x_init: torch.Tensor | None = None, known: torch.Tensor | None = None,
                       **kw: Any) -> torch.Tensor:
        h, w = self.latent_shape[-2:]
        options = {**self.sample_defaults, **kw}
        tokens = sample(self.denoiser(ema), (n, h * w), self.codebook_size, options.pop("steps"), cond or None,
                        generator, null_cond=self.null_cond(n) if cond else None, device=self.device,
                        x_init=None if x_init is None else x_init.flatten(1),
                        known=None if known is None else known.flatten(1), **options)
        return tokens.view(n, h, w)

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       **kw: Any) -> torch.Tensor:
        """Tokens (n, h, w). Options as `sampler_options` declares (`sample` checks them; a direct caller
        passes valid ones); those not given come from the config's `sample_defaults`."""
        return self._sample_tokens(n, cond, generator, ema, **kw)

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, **kw: Any) -> torch.Tensor:
        """Tokens (B, h, w) with `known` (B, h, w) bool held fixed at every step."""
        if known.shape != latents.shape:
            raise ValueError(f"known mask {tuple(known.shape)} does not match the token map {tuple(latents.shape)}")
        return self._sample_tokens(latents.shape[0], cond, generator, ema, x_init=latents, known=known, **kw)

    def sampling_forward(self, n: int, cond: Any = None, guidance_scale: float = 1.0,
                         use_ema: bool = True, **_: Any):
        """A closure running one bare network forward on the inputs one sampling step feeds it (random tokens;
        the doubled batch under guidance): the yardstick of `scripts/benchmark.py`."""
        c = self.user_cond(cond, n)
        h, w = self.latent_shape[-2:]
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randint(0, self.codebook_size, (n, h * w), generator=g, device=self.device)
        if guidance_scale != 1.0 and c:
            x, c = torch.cat([x, x]), cat_cond(c, self.null_cond(n))
        net = self.denoiser(use_ema)
        return lambda: net(x, c)

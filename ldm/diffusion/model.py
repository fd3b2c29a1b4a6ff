"""The latent Gaussian diffusion prior (Rombach et al. 2022): wires the process, the UNet and the frozen first
stage (a KL autoencoder's latents, or a VQ's pre-quantisation latents as latent-diffusion's LDM-VQ).

Conditioning travels as the base's dict: `class_label` to the UNet's class embedding, `context` /
`context_mask` (text embeddings) to its cross-attention, `concat` concatenated to its input channels.
Sampling runs the sampler the options name (`ldm.diffusion.sampling`); inpainting blends the known latents,
noised to each step's level, into every DDIM step (latent-diffusion's way) or runs RePaint (Lugmayr et al.
2022: jumps back up the chain re-noised with the forward process's variance, `repaint_jump` steps, each
stretch resampled `repaint_resample` times). `nll` is the variational bound in bits per latent dimension.

With `elucidated` set the prior is Karras et al. 2022's EDM (`ldm.diffusion.elucidated`): it trains the preconditioned
denoiser D(x; σ) and samples on the Karras σ schedule with ddim (σ-space, `eta`), dpm++2m, euler or heun (churn);
guidance and x_0 clipping act as for the discrete prior, inpainting blends (RePaint's, ddpm's and plms's discrete
chain is refused, and so is `nll`). The discrete schedule buffers stay, unused.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ldm.conditioning import Cond
from ldm.diffusion import elucidated as edm_samplers
from ldm.diffusion import sampling as samplers
from ldm.diffusion.elucidated import Elucidated
from ldm.diffusion.process import (
    SCHEDULE_KEYS,
    GaussianDiffusion,
    LossType,
    Parameterization,
    Schedule,
    dynamic_threshold,
    extract,
)
from ldm.prior import LatentPrior
from ldm.sampler_options import Mode, Option, SamplerOptions, config_default
from ldm.util import ConfigError, NonNegativeFloat, PositiveInt, instantiate_from_config

SAMPLERS = ("ddim", "plms", "dpm++2m", "euler", "heun", "ddpm")
EDM_SAMPLERS = ("ddim", "dpm++2m", "euler", "heun")  # those an elucidated prior runs in σ-space
KARRAS_SIGMA_MAX = 80.0  # Karras et al.'s σ_max: where euler / heun start on a discrete-time model
EDM_MAX_STEPS = 1000  # an elucidated prior has no T to bound its steps


def _max_steps(prior: LatentDiffusionPrior, _: Any = None) -> int:
    return prior.process.num_timesteps if prior.edm is None else EDM_MAX_STEPS


SAMPLER_OPTIONS = SamplerOptions(
    Option("sampler", str, config_default("sampler"), choices=SAMPLERS,
           help="ddim (eta), plms, dpm++2m (DPM-Solver++ 2M), euler / heun (Karras sigmas, churn), ddpm (all T steps); "
                "an elucidated prior: ddim, dpm++2m, euler, heun"),
    Option("steps", int, config_default("steps"), low=1, high=_max_steps,
           help="sampler steps (network evaluations; heun spends two per step but the last); ddpm runs all T"),
    Option("eta", float, config_default("eta", 0.0), low=0.0, high=1.0,
           help="DDIM's eta: 0 deterministic, 1 as ancestral sampling"),
    Option("s_churn", float, 0.0, low=0.0, help="euler / heun: Karras et al.'s churn, noise added back per step"),
    Option("s_tmin", float, 0.0, low=0.0, help="euler / heun: churn only at sigma >= s_tmin"),
    Option("s_tmax", float, None, low=0.0, nullable=True, help="euler / heun: churn only at sigma <= s_tmax (None: all)"),
    Option("s_noise", float, 1.0, low=0.0, help="euler / heun: scale of the churn noise (Karras et al.'s S_noise)"),
    Option("sigma_max", float, KARRAS_SIGMA_MAX, low=0.0, low_open=True, nullable=True,
           help="euler / heun on a discrete-time model: the Karras schedule's largest sigma, capped at the model's "
                "own (Karras et al.'s 80; null: the model's own, 20,291 for the cosine schedule at T = 1000, where "
                "a few steps are spent at noise levels that carry no image); an elucidated prior's is its config's"),
    Option("guidance_scale", float, 1.0, low=0.0, conditional_only=True,
           help="classifier-free guidance u + s (c - u) on the network output: 1 is the conditional model; needs a "
                "prior trained with cond_drop_prob > 0"),
    Option("guidance_rescale", float, 0.0, low=0.0, high=1.0, conditional_only=True,
           help="pull the guided output's spread back towards the conditional one's (Lin et al. 2023): 0 off"),
    Option("clip_x0", float, None, low=0.0, low_open=True, nullable=True,
           help="pixel space: clip each x_0 prediction to [-c, c] (static clipping; None: off)"),
    Option("dynamic_threshold", float, None, low=0.0, high=1.0, low_open=True, nullable=True,
           help="pixel space: Imagen's dynamic thresholding of x_0 at this percentile of |x_0| (e.g. 0.995; None: "
                "off), for high guidance scales"),
    Option("inpaint_method", str, "blend", choices=("blend", "repaint"), modes=("inpaint",),
           help="blend: known latents noised to each DDIM step's level replace the sample's there; repaint: "
                "RePaint's resampling"),
    Option("repaint_jump", int, 10, low=1, modes=("inpaint",), help="RePaint: DDPM steps per jump back"),
    Option("repaint_resample", int, 5, low=1, modes=("inpaint",),
           help="RePaint: times each stretch is sampled (1: no resampling)"),
)


class LatentDiffusionPrior(LatentPrior):
    """A UNet denoising continuous latents; class, text (cross-attention) or concatenated-image conditioning."""

    latent_kind = "continuous"
    sampler_options = SAMPLER_OPTIONS

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        unet_config: Mapping[str, Any],
        timesteps: PositiveInt = 1000,
        beta_schedule: Schedule = "linear",
        linear_start: NonNegativeFloat = 0.00085,
        linear_end: NonNegativeFloat = 0.012,
        cosine_s: NonNegativeFloat = 8e-3,
        parameterization: Parameterization = "eps",
        loss_type: LossType = "l2",
        min_snr_gamma: float | None = None,
        elucidated: Mapping[str, float] | None = None,
        sample_defaults: Mapping[str, Any] | None = None,
        cond_stage_config: Mapping[str, Any] | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        **prior_kw: Any,
    ):
        super().__init__(first_stage_config, **prior_kw)
        try:
            self.process = GaussianDiffusion(timesteps, beta_schedule, linear_start, linear_end, cosine_s,
                                             parameterization, loss_type, min_snr_gamma)
        except ValueError as e:
            raise ConfigError("model.params", str(e)) from None
        try:  # EDM instead of the discrete process: {sigma_data, p_mean, p_std, sigma_min, sigma_max, rho}
            self.edm = None if elucidated is None else Elucidated.from_config(elucidated)
        except (TypeError, ValueError) as e:
            raise ConfigError("elucidated", str(e)) from None
        if self.edm is not None and (parameterization, loss_type, min_snr_gamma) != ("eps", "l2", None):
            raise ConfigError("elucidated", "EDM's preconditioning and loss weight replace parameterization, loss_type "
                                            "and min_snr_gamma: leave them eps, l2 and None")
        for key, value in self.process.buffers.items():  # latent-diffusion's top-level schedule buffers
            self.register_buffer(key, value.clone())
        keys = set(self.conditioner.keys)
        unknown = keys - {"class_label", "context", "context_mask", "concat", "aug_level"}
        if unknown:
            raise ValueError(f"the UNet takes class_label, context (+ context_mask), concat and aug_level; the "
                             f"conditioner gives {sorted(unknown)} too")
        c = self.latent_shape[0]
        net_kw: dict[str, Any] = {}
        params = dict(unet_config.get("params") or {})
        if "class_label" in keys and "num_classes" not in params:
            net_kw["num_classes"] = self.num_classes + 1  # the last row is the null class of guidance
        elif "class_label" in keys and self.cond_drop_prob > 0 and params["num_classes"] <= self.num_classes:
            raise ConfigError("unet_config.params.num_classes", f"conditioning dropout needs a row for the null class "
                                                                f"{self.num_classes}: at least {self.num_classes + 1}")
        consumed: tuple[str, ...] = ()
        if cond_stage_config is not None:  # a conditioning network trained with the prior (text, class embedding)
            self.cond_stage_model = instantiate_from_config(cond_stage_config, key="cond_stage_config")
            consumed = tuple(getattr(self.cond_stage_model, "consumes", ()))
            if "class_label" in consumed:
                net_kw.pop("num_classes", None)
        self.model = instantiate_from_config(unet_config, key="unet_config", **net_kw)
        extra = self._concat_channels()
        if self.model.in_channels != c + extra:
            raise ConfigError("unet_config.params.in_channels", f"the latents have {c} channels"
                              + (f" and the concatenated image {extra}" if extra else "") +
                              f", so the UNet takes {c + extra}; it is configured for {self.model.in_channels}")
        if self.model.out_channels != c:
            raise ConfigError("unet_config.params.out_channels", f"must be the latents' {c} channels, got "
                                                                 f"{self.model.out_channels}")
        if ("class_label" in keys and "class_label" not in consumed) != (self.model.num_classes is not None):
            raise ConfigError("unet_config.params.num_classes", "a class-conditional prior needs a UNet with "
                                                                "num_classes, and only it")
        names = ["model"]
        if cond_stage_config is not None:
            width = getattr(self.cond_stage_model, "dim", None)
            if width != self.model.context_dim:
                raise ConfigError("cond_stage_config", f"the conditioning network's width {width} must be the "
                                                       f"UNet's context_dim {self.model.context_dim}")
            names.append("cond_stage_model")
        self.network_names = tuple(names)
        self.sample_defaults = {"sampler": "ddim" if self.edm is None else "heun", "steps": 50}
        self.sample_defaults = self.checked_sample_defaults(sample_defaults, self.sample_defaults)
        self.finish_init(ckpt_path, ignore_keys)

    def _concat_channels(self) -> int:
        parts = getattr(self.conditioner, "parts", {"": self.conditioner})
        return sum(p.shape[0] for p in parts.values() if getattr(p, "out_key", None) == "concat")

    # --- checkpoints --------------------------------------------------------------------------
    def convert_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """A latent-diffusion checkpoint: `model.diffusion_model.*` is the UNet, `model_ema.diffusion_model*` its
        average, `first_stage_model.*` and `cond_stage_model.*` keep their names; its schedule buffers must be
        this config's."""
        if not any(k.startswith("model.diffusion_model.") for k in state):
            return state
        out = {}
        for k, v in state.items():
            if k.startswith("model.diffusion_model."):
                out["model." + k[len("model.diffusion_model."):]] = v
            elif k.startswith("model_ema.diffusion_model"):
                out["model_ema." + k[len("model_ema.diffusion_model"):]] = v
            elif k in ("model_ema.decay", "model_ema.num_updates") or k in SCHEDULE_KEYS or k == "scale_factor":
                out[k] = v
            elif k.startswith(("first_stage_model.", "cond_stage_model.")):
                out[k] = v
        return out

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False):
        for key in SCHEDULE_KEYS:
            if key in state_dict and not torch.equal(state_dict[key].float().cpu(), self.process.buffers[key]):
                raise ValueError(f"the checkpoint's noise schedule ({key}) is not this config's: check timesteps, "
                                 "beta_schedule, linear_start and linear_end")
        return super().load_state_dict(state_dict, strict=strict, assign=assign)

    # --- the network --------------------------------------------------------------------------
    def denoiser(self, ema: bool = False, encoded: bool = False):
        """`net(x (B, C, h, w), t (B,), cond dict) -> output` on the trained or averaged UNet; with `encoded` the
        dict already went through `encode_condition` (a sampler encodes a caption once, not at every step)."""
        net = self.network("model", ema)

        def call(x: torch.Tensor, t: torch.Tensor, cond: Cond | None = None) -> torch.Tensor:
            cond = dict(cond or {}) if encoded else self.encode_condition(cond, ema)
            if "concat" in cond:
                x = torch.cat([x, cond["concat"].to(x.dtype)], 1)
            context = cond.get("context")
            if context is not None and not context.is_floating_point():
                raise ValueError("text given as token ids needs a text encoder: set cond_stage_config")
            extra = {"aug_level": cond["aug_level"]} if "aug_level" in cond else {}
            return net(x, t, context=context, y=cond.get("class_label"), context_mask=cond.get("context_mask"),
                       **extra)

        return call

    def encode_condition(self, cond: Cond | None, ema: bool = False) -> dict[str, Any]:
        """The conditioning dict as the UNet takes it: caption or class ids through the conditioning network
        (`cond_stage_config`) into the cross-attention context, when the prior has one."""
        cond = dict(cond or {})
        if "cond_stage_model" in self.network_names and cond:
            cond = self.network("cond_stage_model", ema).condition(cond)
        return cond

    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        from ldm.distributed import draw_local

        if self.edm is not None:
            return self._edm_loss(latents, cond, generator, ema)
        b = latents.shape[0]
        gen_device = generator.device if generator is not None else latents.device
        t = draw_local(lambda m: torch.randint(0, self.process.num_timesteps, (m,), generator=generator,
                                               device=gen_device), b, latents.device).to(latents.device)
        noise = draw_local(lambda m: torch.randn((m, *latents.shape[1:]), generator=generator, device=gen_device),
                           b, latents.device).to(latents.device)
        out = self.denoiser(ema)(self.process.q_sample(latents, t, noise), t, cond)
        loss = self.process.training_loss(out, latents, noise, t)
        return loss.mean(), {"loss_simple": loss.mean().detach()}

    # --- sampling -----------------------------------------------------------------------------
    def _model_fn(self, n: int, cond: Cond, ema: bool, guidance_scale: float, guidance_rescale: float):
        if guidance_scale != 1.0 and cond and self.cond_drop_prob == 0:
            raise ValueError("guidance_scale needs a prior trained with conditioning dropout (cond_drop_prob > 0); "
                             "this one was trained with 0, so it has no unconditional model")
        null = self.encode_condition(self.conditioner.null_like(cond), ema) if cond else None
        return samplers.guided(self.denoiser(ema, encoded=True), self.encode_condition(cond, ema) or None, null,
                               guidance_scale, guidance_rescale)

    def x0_transform(self, options: Mapping[str, Any]):
        """Static clipping or dynamic thresholding of x_0 predictions: images live in [-1, 1], latents do not."""
        clip, percentile = options.get("clip_x0"), options.get("dynamic_threshold")
        if clip is None and percentile is None:
            return None
        if not getattr(self.first_stage_model, "pixel_space", False):
            name = "dynamic_threshold" if percentile is not None else "clip_x0"
            raise ValueError(f"{name} is for a pixel-space prior (first stage ldm.first_stage.models."
                             f"IdentityFirstStage); the latents of {type(self.first_stage_model).__name__} are not "
                             "bounded to [-1, 1]")
        if percentile is not None:
            return lambda x0: dynamic_threshold(x0, percentile)
        return lambda x0: x0.clamp(-clip, clip)

    def _run(self, model, x_T: torch.Tensor, generator: torch.Generator | None, callback: Any, sampler: str,
             steps: int, eta: float, churn: Mapping[str, float], x0_transform: Any = None,
             sigma_max: float | None = None) -> torch.Tensor:
        if self.edm is not None:
            return self._edm_run(model, x_T, generator, callback, sampler, steps, eta, churn, x0_transform)
        p = self.process
        if sampler not in ("euler", "heun"):
            model = samplers.with_x0_transform(model, p, x0_transform)
        if sampler == "ddpm":
            return samplers.ddpm(model, p, x_T, generator, callback)
        if sampler == "ddim":
            return samplers.ddim(model, p, x_T, steps, generator, callback, eta=eta)
        if sampler == "plms":
            return samplers.plms(model, p, x_T, steps, generator, callback)
        if sampler == "dpm++2m":
            return samplers.dpm_solver_pp(model, p, x_T, steps, generator, callback)
        den = samplers.VPDenoiser(model, p, x0_transform)
        top = den.sigma_max if sigma_max is None else min(sigma_max, den.sigma_max)
        sigmas = samplers.karras_sigmas(steps, den.sigma_min, top, device=x_T.device)
        fn = samplers.heun if sampler == "heun" else samplers.euler
        return fn(den, x_T * sigmas[0], sigmas, generator, callback, **churn)

    def _noise(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else self.device
        return torch.randn((n, *self.latent_shape), generator=generator, device=gen_device).to(self.device)

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       callback: Any = None, **kw: Any) -> torch.Tensor:
        o = {**self.sample_defaults, **kw}
        transform = self.x0_transform(o)
        model = self._model_fn(n, cond, ema, o.get("guidance_scale", 1.0), o.get("guidance_rescale", 0.0))
        return self._run(model, self._noise(n, generator), generator, callback, o["sampler"], o["steps"],
                         o.get("eta", 0.0), churn_options(o), transform, o.get("sigma_max", KARRAS_SIGMA_MAX))

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, callback: Any = None,
                        **kw: Any) -> torch.Tensor:
        """Latents (B, C, h, w) with `known` (B, h, w) held: blended DDIM or RePaint, then the known latents
        pasted exactly."""
        if known.shape != (latents.shape[0], *latents.shape[2:]):
            raise ValueError(f"known mask {tuple(known.shape)} does not match the latent grid "
                             f"{(latents.shape[0], *latents.shape[2:])}")
        o = {**self.sample_defaults, **kw}
        n = latents.shape[0]
        model = self._model_fn(n, cond, ema, o.get("guidance_scale", 1.0), o.get("guidance_rescale", 0.0))
        if self.edm is not None:
            x = self._edm_blend(model, latents, known[:, None].to(latents.dtype), generator, callback, o["steps"],
                                o.get("eta", 0.0), self.x0_transform(o))
            return torch.where(known[:, None].expand_as(latents), latents, x)
        model = samplers.with_x0_transform(model, self.process, self.x0_transform(o))
        mask = known[:, None].to(latents.dtype)
        if o.get("inpaint_method", "blend") == "repaint":
            x = self._repaint(model, latents, mask, generator, callback, o.get("repaint_jump", 10),
                              o.get("repaint_resample", 5))
        else:
            x = self._blended_ddim(model, latents, mask, generator, callback, o["steps"], o.get("eta", 0.0))
        return torch.where(known[:, None].expand_as(latents), latents, x)

    def _blended_ddim(self, model, x0: torch.Tensor, mask: torch.Tensor, generator, callback, steps: int,
                      eta: float) -> torch.Tensor:
        """latent-diffusion's mask-blended DDIM: before each step the known region is x_0 noised to its level."""
        p = self.process

        def blend(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return mask * p.q_sample(x0, t, self._noise(x.shape[0], generator)) + (1 - mask) * x

        return samplers.ddim(model, p, self._noise(x0.shape[0], generator), steps, generator, callback, eta=eta,
                             before_step=blend)

    def _repaint(self, model, x0: torch.Tensor, mask: torch.Tensor, generator, callback, jump: int,
                 resample: int) -> torch.Tensor:
        """RePaint over all T steps: each DDPM step joins the known region (x_0 noised to t-1) with the sampled
        one; after every `jump` steps the sample goes back up `jump` steps through q(x_t | x_{t-1}) (variance
        b_t per step) and the stretch is sampled again, `resample` times in all."""
        p = self.process
        T = p.num_timesteps
        x = self._noise(x0.shape[0], generator)
        schedule = repaint_schedule(T, jump, resample)
        for i, (t_cur, t_next) in enumerate(zip(schedule[:-1], schedule[1:])):
            if t_next < t_cur:  # down: one reverse step t_cur -> t_next = t_cur - 1
                t = torch.full((x.shape[0],), t_cur, device=x.device, dtype=torch.long)
                x0_pred = p.predict_x0(x, t, model(x, t))
                mean, _, logvar = p.q_posterior(x0_pred, x, t)
                unknown = mean + (torch.exp(0.5 * logvar) * self._noise(x.shape[0], generator) if t_cur > 0 else 0.0)
                if t_cur > 0:
                    known = p.q_sample(x0, t - 1, self._noise(x.shape[0], generator))
                else:
                    known = x0
                x = mask * known + (1 - mask) * unknown
            else:  # up: re-noise one step, x_{t+1} ~ N(sqrt(1 - b) x_t, b)
                beta = extract(p.betas, torch.full((x.shape[0],), t_next, device=x.device, dtype=torch.long), x.shape)
                x = (1 - beta).sqrt() * x + beta.sqrt() * self._noise(x.shape[0], generator)
            if callback is not None:
                callback({"i": i, "steps": len(schedule) - 1, "x": x, "t": t_next})
        return x

    # --- likelihood ---------------------------------------------------------------------------
    @torch.no_grad()
    def nll_latents(self, latents: torch.Tensor, cond: Cond, ema: bool = True, generator: torch.Generator | None = None,
                    timesteps: Sequence[int] | None = None, strata: int | None = None, **_: Any) -> torch.Tensor:
        """The variational bound on -log p(z) in bits per latent dimension (improved-diffusion's `calc_bpd_loop`):
        KL(q(z_T | z) || N(0, I)) + the KL of every reverse step + the decoder term at t = 0, a Gaussian
        log-density with the posterior's smallest variance (the latents are continuous, not 8-bit pixels).
        `strata` estimates the sum over t = 1..T-1 without bias from one t drawn in each of that many equal
        bins, weighted by the bin's width (t = 0 is always computed); `timesteps` takes those steps, each
        weighted T / len(timesteps)."""
        if self.edm is not None:
            raise NotImplementedError("the variational bound needs the discrete chain: an elucidated (EDM) prior "
                                      "has no nll")
        p = self.process
        model = self._model_fn(latents.shape[0], cond, ema, 1.0, 0.0)
        dims = latents[0].numel()
        T = p.num_timesteps
        ac_T = extract(p.alphas_cumprod, torch.full((latents.shape[0],), T - 1, device=latents.device), latents.shape)
        mean_T, var_T = ac_T.sqrt() * latents, 1 - ac_T
        total = normal_kl(mean_T, var_T.log(), torch.zeros_like(latents), torch.zeros_like(latents)).flatten(1).sum(1)
        gen_device = generator.device if generator is not None else latents.device
        if strata is not None:
            weighted = [(0, 1.0)] + [(int(torch.randint(lo, hi, (), generator=generator, device=gen_device)), hi - lo)
                                     for lo, hi in stratum_bounds(1, T, strata)]
        elif timesteps is not None:
            weighted = [(int(step), T / len(timesteps)) for step in timesteps]
        else:
            weighted = [(step, 1.0) for step in range(T)]
        for step, weight in weighted:
            t = torch.full((latents.shape[0],), int(step), device=latents.device, dtype=torch.long)
            noise = torch.randn(latents.shape, generator=generator, device=gen_device).to(latents.device)
            x_t = p.q_sample(latents, t, noise)
            x0_pred = p.predict_x0(x_t, t, model(x_t, t))
            mean_pred, var, logvar = p.q_posterior(x0_pred, x_t, t)
            if int(step) == 0:
                term = -gaussian_log_density(latents, mean_pred, torch.log(extract(p.posterior_variance, t + 1, latents.shape)))
            else:
                mean_true, _, logvar_true = p.q_posterior(latents, x_t, t)
                term = normal_kl(mean_true, logvar_true, mean_pred, logvar)
            total = total + weight * term.flatten(1).sum(1)
        return total / (dims * math.log(2.0))

    def sampling_forward(self, n: int, cond: Any = None, guidance_scale: float = 1.0, use_ema: bool = True, **_: Any):
        """One bare UNet forward on the inputs a sampling step feeds it (the doubled batch under guidance)."""
        model = self._model_fn(n, self.user_cond(cond, n), use_ema, guidance_scale, 0.0)
        x = self._noise(n, torch.Generator(device=self.device).manual_seed(0))
        t = torch.full((n,), self.process.num_timesteps // 2, device=self.device, dtype=torch.long)
        if self.edm is not None:  # the UNet's time input is c_noise(σ), here at σ = σ_data
            t = self.edm.scalings(torch.full((n,), self.edm.sigma_data, device=self.device))[3]
        return lambda: model(x, t)

    # --- elucidated diffusion (Karras et al. 2022) -------------------------------------------------
    @property
    def has_likelihood(self) -> bool:
        return self.edm is None

    def check_sampler_options(self, options: Mapping[str, Any], mode: Mode = "sample") -> dict[str, Any]:
        """As the base, and an elucidated prior refuses the samplers that walk the discrete chain."""
        out = super().check_sampler_options(options, mode)
        if self.edm is not None and out.get("sampler", "ddim") not in EDM_SAMPLERS:
            raise ValueError(f"sampler {out['sampler']!r} walks the discrete schedule; an elucidated (EDM) prior "
                             f"samples with {', '.join(EDM_SAMPLERS)}")
        if self.edm is not None and out.get("inpaint_method") == "repaint":
            raise ValueError("inpaint_method 'repaint' walks the discrete chain; an elucidated (EDM) prior inpaints "
                             "with 'blend'")
        return out

    def _edm_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None,
                  ema: bool) -> tuple[torch.Tensor, dict[str, Any]]:
        """EDM's loss λ(σ) ||D(z + σ n; σ) - z||², ln σ ~ N(P_mean, P_std²), drawn for the global batch."""
        from ldm.distributed import draw_local

        b, edm = latents.shape[0], self.edm
        gen_device = generator.device if generator is not None else latents.device
        sigma = draw_local(lambda m: edm.draw_sigma(m, generator, gen_device), b, latents.device).to(latents.device)
        noise = draw_local(lambda m: torch.randn((m, *latents.shape[1:]), generator=generator, device=gen_device),
                           b, latents.device).to(latents.device)
        net = self.denoiser(ema)
        loss = edm.loss(lambda x, c_noise: net(x, c_noise, cond), latents, sigma, noise)
        return loss.mean(), {"loss_simple": loss.mean().detach()}

    def _edm_run(self, model, x_T: torch.Tensor, generator: torch.Generator | None, callback: Any, sampler: str,
                 steps: int, eta: float, churn: Mapping[str, float], x0_transform: Any) -> torch.Tensor:
        """σ-space sampling on the Karras schedule; guidance acts on F (linear, so on D too), x_0 transforms on D."""
        den = self.edm.denoiser(model, x0_transform)
        sigmas = self.edm.sigmas(steps, device=x_T.device)
        if sampler == "ddim":
            return edm_samplers.ddim(den, x_T * sigmas[0], sigmas, generator, callback, eta=eta)
        if sampler == "dpm++2m":
            return edm_samplers.dpm_solver_pp_2m(den, x_T * sigmas[0], sigmas, generator, callback)
        fn = samplers.heun if sampler == "heun" else samplers.euler
        return fn(den, x_T * sigmas[0], sigmas, generator, callback, **churn)

    def _edm_blend(self, model, x0: torch.Tensor, mask: torch.Tensor, generator, callback, steps: int, eta: float,
                   x0_transform: Any) -> torch.Tensor:
        """Blended σ-space DDIM (Euler steps at eta 0): before each step the known region is x_0 + σ n."""
        def blend(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
            noised = x0 + sigma.view(-1, 1, 1, 1).to(x0.dtype) * self._noise(x.shape[0], generator)
            return mask * noised + (1 - mask) * x

        sigmas = self.edm.sigmas(steps, device=x0.device)
        return edm_samplers.ddim(self.edm.denoiser(model, x0_transform), self._noise(x0.shape[0], generator) * sigmas[0],
                                 sigmas, generator, callback, eta=eta, before_step=blend)


def churn_options(options: Mapping[str, Any]) -> dict[str, float]:
    """euler / heun's churn keywords from the sampler options (s_tmax None: no upper bound)."""
    s_tmax = options.get("s_tmax")
    return {"s_churn": options.get("s_churn", 0.0), "s_tmin": options.get("s_tmin", 0.0),
            "s_tmax": float("inf") if s_tmax is None else s_tmax, "s_noise": options.get("s_noise", 1.0)}


def stratum_bounds(start: int, stop: int, strata: int) -> list[tuple[int, int]]:
    """[start, stop) cut into `strata` bins of (nearly) equal integer width, as (lo, hi) pairs."""
    if not 1 <= strata <= stop - start:
        raise ValueError(f"strata must be in 1..{stop - start}, got {strata}")
    edges = [start + round(k * (stop - start) / strata) for k in range(strata + 1)]
    return list(zip(edges[:-1], edges[1:]))


def repaint_schedule(T: int, jump: int, resample: int) -> list[int]:
    """RePaint's time path from T-1 down to -1 (done): every `jump` steps down, `resample - 1` times back up
    `jump` steps and down again."""
    times, t = [T - 1], T - 1
    done_jumps: dict[int, int] = {}
    while t >= 0:
        t -= 1
        times.append(t)
        if t >= 0 and (T - 1 - t) % jump == 0 and t + jump <= T - 1 and done_jumps.get(t, 0) < resample - 1:
            done_jumps[t] = done_jumps.get(t, 0) + 1
            for _ in range(jump):
                t += 1
                times.append(t)
    return times


def normal_kl(mean1: torch.Tensor, logvar1: torch.Tensor, mean2: torch.Tensor, logvar2: torch.Tensor) -> torch.Tensor:
    """KL(N(mean1, e^logvar1) || N(mean2, e^logvar2)) per element, nats."""
    return 0.5 * (-1.0 + logvar2 - logvar1 + torch.exp(logvar1 - logvar2) + (mean1 - mean2) ** 2 * torch.exp(-logvar2))


def gaussian_log_density(x: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    return -0.5 * (math.log(2 * math.pi) + logvar + (x - mean) ** 2 * torch.exp(-logvar))


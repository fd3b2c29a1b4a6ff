"""The ImageBART prior (Esser et al. 2021): wires the multinomial diffusion, the per-scale autoregressive
transitions and the frozen VQ first stage.

Networks: `transformer_config` builds the encoder-decoder of the scales below T (of every scale when there
is no `top_config`); `top_config` optionally builds the decoder-only network of scale T. `single_scale: k`
trains scale k only (one checkpoint per scale, as the original); without it every sample of a batch draws
its own scale (weighted by `scale_weights`), so one checkpoint holds the whole chain.

`remap` names a `.npy` list of the first-stage codes in use (the original's vocabulary remapping,
`data/imagebart/*_indices.npy`): the prior models positions in that list, K = its length, and a code outside
it becomes a uniformly random one of the list, as the original does.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from imagebart.process import MultinomialDiffusion, schedule_betas
from imagebart.sampling import sample
from imagebart.transformer import convert_original_state_dict
from ldm.conditioning import Cond
from ldm.prior import LatentPrior
from ldm.sampler_options import Option, SamplerOptions, config_default
from ldm.util import ConfigError, PositiveInt, Probability, instantiate_from_config


def _scales(prior: ImageBARTPrior, _: Any = None) -> int:
    return prior.process.n_scales


SAMPLER_OPTIONS = SamplerOptions(
    Option("temperature", float, config_default("temperature", 1.0), low=0.0, size=_scales,
           help="divides the logits, one value or one per scale t = 1..T: 0 takes the most likely token"),
    Option("top_k", int, lambda prior, _: prior.sample_defaults.get("top_k", prior.top_k), low=1, size=_scales, nullable=True,
           help="draw from the k most likely codes only, one value or one per scale t = 1..T (None: all)"),
    Option("top_p", float, config_default("top_p"), low=0.0, high=1.0, low_open=True, size=_scales, nullable=True,
           help="draw from the smallest set of codes whose probability reaches p, one value or one per scale "
                "(nucleus; None: all)"),
    Option("guidance_scale", float, config_default("guidance_scale", 1.0), low=0.0, conditional_only=True,
           help="classifier-free guidance s on each next-token distribution, log p_u + s (log p_c - log p_u): "
                "1 is the conditional model; needs a prior trained with cond_drop_prob > 0"),
    Option("resample", int, config_default("resample", 1), low=0, modes=("inpaint",),
           help="extra passes per scale that re-noise the filled x_{t-1} to x_t and draw it again"),
    Option("use_cache", int, 1, choices=(0, 1),
           help="1: decode with the key/value cache (one decoder step per token); 0: rerun the decoder on the "
                "whole prefix for every token (the reference, same samples, slower)"),
)


class CodeRemap(nn.Module):
    """First-stage codes <-> the prior's vocabulary of the codes in use (`used` (K,) long)."""

    def __init__(self, used: torch.Tensor, n_embed: int):
        super().__init__()
        used = torch.as_tensor(used, dtype=torch.long, device="cpu").flatten()  # a table, not a weight: never on meta
        if used.numel() == 0 or used.min() < 0 or used.max() >= n_embed or used.unique().numel() != used.numel():
            raise ValueError(f"remap must list distinct first-stage codes in 0..{n_embed - 1}")
        inverse = torch.full((n_embed,), -1, dtype=torch.long, device="cpu")
        inverse[used] = torch.arange(used.numel(), device="cpu")
        self.register_buffer("used", used, persistent=False)
        self.register_buffer("inverse", inverse, persistent=False)

    def to_prior(self, codes: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        ids = self.inverse[codes]
        unknown = ids < 0
        if unknown.any():
            gen_device = generator.device if generator is not None else codes.device
            random = torch.randint(0, self.used.numel(), codes.shape, generator=generator, device=gen_device)
            ids = torch.where(unknown, random.to(codes.device), ids)
        return ids

    def to_first_stage(self, ids: torch.Tensor) -> torch.Tensor:
        return self.used[ids]


class ImageBARTPrior(LatentPrior):
    """Multinomial-diffusion chains with autoregressive transitions over the tokens of a VQ first stage."""

    latent_kind = "tokens"
    sampler_options = SAMPLER_OPTIONS
    compile_note = ("ImageBART's sampler runs its decoder one position at a time on a growing key/value cache, "
                    "which torch.compile would recompile at every length: sample it uncompiled")

    def __init__(
        self,
        first_stage_config: Mapping[str, Any],
        transformer_config: Mapping[str, Any],
        codebook_size: PositiveInt,
        n_scales: PositiveInt,
        schedule: Mapping[str, Any] | None = None,
        top_config: Mapping[str, Any] | None = None,
        alpha: Probability = 1.0,
        single_scale: PositiveInt | None = None,
        scale_weights: Sequence[float] | None = None,
        top_k: PositiveInt | None = None,
        sample_defaults: Mapping[str, Any] | None = None,
        remap: str | None = None,
        ckpt_path: str | None = None,
        ignore_keys: Sequence[str] = (),
        **prior_kw: Any,
    ):
        super().__init__(first_stage_config, **prior_kw)
        n_embed = int(self.first_stage_model.n_embed)
        self.remap = None
        if remap is not None:
            self.remap = CodeRemap(torch.from_numpy(np.load(Path(remap)).astype(np.int64)), n_embed)
            n_embed = self.remap.used.numel()
        if n_embed != codebook_size:
            what = "remapped vocabulary" if remap else "first stage's codebook"
            raise ConfigError("codebook_size", f"the {what} has {n_embed} codes but the prior is configured for "
                                               f"{codebook_size}; they must be equal")
        try:
            betas = schedule_betas(n_scales, **dict(schedule or {}))
        except (TypeError, ValueError, FileNotFoundError) as e:
            raise ConfigError("schedule", str(e)) from None
        self.process = MultinomialDiffusion(codebook_size, betas)
        self.codebook_size, self.alpha, self.top_k = int(codebook_size), float(alpha), top_k
        if single_scale is not None and not 1 <= single_scale <= n_scales:
            raise ConfigError("single_scale", f"must be a scale in 1..{n_scales}, got {single_scale}")
        self.single_scale = single_scale
        weights = torch.tensor([1.0] * n_scales if scale_weights is None else list(scale_weights), dtype=torch.float,
                               device="cpu")
        if weights.numel() != n_scales or (weights < 0).any() or weights.sum() <= 0:
            raise ConfigError("scale_weights", f"expected {n_scales} non-negative weights, not all 0, got "
                                               f"{list(scale_weights or [])}")
        self.scale_weights = weights / weights.sum()

        h, w = self.latent_shape[-2:]
        net_kw: dict[str, Any] = {"vocab_size": codebook_size, "seq_len": h * w, "n_scales": n_scales}
        if self.num_classes:
            net_kw["num_classes"] = self.num_classes
        if set(self.conditioner.keys) - {"class_label"}:
            raise ValueError(f"the ImageBART networks take class labels only; the conditioner gives "
                             f"{list(self.conditioner.keys)}")
        # a checkpoint of one scale builds the one network that scale needs
        wants_top = top_config is not None and single_scale in (None, n_scales)
        wants_model = top_config is None or single_scale is None or single_scale < n_scales
        names = []
        if wants_model:
            self.model = instantiate_from_config(transformer_config, key="transformer_config", **net_kw)
            self.model.set_alphas(self.process.alphas)
            names.append("model")
        if wants_top:
            self.top = instantiate_from_config(top_config, key="top_config", **net_kw)
            names.append("top")
        self.network_names = tuple(names)
        self.sample_defaults: dict[str, Any] = {}
        self.sample_defaults = self.checked_sample_defaults(sample_defaults, mode="inpaint")
        # which network runs each scale: `top` the last one when there is one, `model` the others
        self.scale_networks = {t: ("top" if wants_top and (t == n_scales or not wants_model) else "model")
                               for t in range(1, n_scales + 1)}
        for name in names:
            if self.cond_drop_prob > 0 and self.num_classes and not getattr(self, name).has_null_class:
                raise ConfigError("cond_drop_prob", f"the {name} network's vocabulary has no null class (id "
                                                    f"{self.num_classes}) for conditioning dropout; enlarge it or set 0")
        self.finish_init(ckpt_path, ignore_keys)

    # --- networks ---------------------------------------------------------------------------
    def network_for(self, t: int) -> str:
        """The name of scale t's network."""
        name = self.scale_networks.get(t)
        if name not in self.network_names or (self.single_scale and t != self.single_scale):
            raise ValueError(f"scale {t} has no network here: this prior holds scale {self.single_scale} only")
        return name

    def transition(self, t: int, ema: bool = False) -> nn.Module:
        """The network of scale t."""
        return self.network(self.network_for(t), ema)

    @classmethod
    def from_sampling_config(cls, params: dict[str, Any], source: str) -> tuple[ImageBARTPrior, dict[str, Any]]:
        """A chain assembled from one checkpoint per scale (`checkpoints: [scale 1, ..., scale T]`, each trained
        with `single_scale`), as the original's sampling configs do: each scale runs its checkpoint's averaged
        network. The checkpoints must share the schedule, the vocabulary, the conditioning and the first stage."""
        from ldm.checkpoint import CheckpointError, instantiate_from_checkpoint, subclass_of

        unknown = set(params) - {"checkpoints"}
        paths = params.get("checkpoints")
        if unknown or not isinstance(paths, list) or not paths:
            raise CheckpointError(f"{source}: model.params takes checkpoints (a list, one per scale t = 1..T); got "
                                  f"{sorted(params)}")

        is_imagebart = subclass_of(ImageBARTPrior, source, "an ImageBART scale")
        priors, configs = [], []
        for path in paths:
            prior, config = instantiate_from_checkpoint(path, check_class=is_imagebart)
            priors.append(prior)
            configs.append(config)
        T = priors[0].process.n_scales
        if len(paths) != T:
            raise CheckpointError(f"{source}: the scale checkpoints are of a {T}-scale chain; list {T}, got {len(paths)}")
        reference = configs[0]["model"]["params"]
        for t, (path, prior, config) in enumerate(zip(paths, priors, configs), start=1):
            if prior.single_scale != t:
                trained = "every scale" if prior.single_scale is None else f"scale {prior.single_scale}"
                raise CheckpointError(f"{source}: checkpoint {t} ({path}) was trained for {trained}, not scale {t}")
            mine = config["model"]["params"]
            for key in ("first_stage_config", "n_scales", "schedule", "codebook_size", "remap", "num_classes",
                        "conditioner_config", "latent_shape"):
                if mine.get(key) != reference.get(key):
                    raise CheckpointError(f"{source}: the scale checkpoints disagree on {key}: scale 1 ({paths[0]}) "
                                          f"has {reference.get(key)!r}, scale {t} ({path}) has {mine.get(key)!r}")
        chain = priors[0]
        for t, prior in enumerate(priors, start=1):
            chain.add_module(f"scale{t}", prior.network(prior.network_for(t), ema=True))
            setattr(chain, f"scale{t}_ema", None)  # already the averaged weights
        for name in chain.network_names:
            delattr(chain, name)
            delattr(chain, f"{name}_ema")
        chain.network_names = tuple(f"scale{t}" for t in range(1, T + 1))
        chain.scale_networks = {t: f"scale{t}" for t in range(1, T + 1)}
        chain.single_scale = None
        return chain.eval(), configs[0]

    def trained_scales(self) -> list[int]:
        return [self.single_scale] if self.single_scale else list(range(1, self.process.n_scales + 1))

    def convert_checkpoint_state(self, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """An original ImageBART checkpoint (`transformer.*`; the EMA copy `transformer_ema.*` is left out, the
        original's sampler prunes it too) maps onto the network of the scale it was trained for."""
        if not any(k.startswith("transformer.") for k in state):
            return state
        net = self.transformer_keys_target(state)
        return {f"{net}.{k}": v for k, v in convert_original_state_dict(state).items()}

    def transformer_keys_target(self, state: Mapping[str, torch.Tensor]) -> str:
        decoder_only = any(k.startswith("transformer.blocks.") for k in state)
        if decoder_only and "top" not in self.network_names:
            raise ValueError("this original checkpoint is a decoder-only (minGPT) last scale: configure top_config "
                             "with imagebart.transformer.DecoderOnly")
        return "top" if decoder_only else "model"

    def optional_keys(self, state: Mapping[str, torch.Tensor]) -> tuple[str, ...]:
        """A per-scale original checkpoint holds one of the two networks."""
        out = list(super().optional_keys(state))
        for name in self.network_names:
            if not any(k.startswith(f"{name}.") for k in state):
                out.append(f"{name}.")
        return tuple(out)

    # --- tokens -----------------------------------------------------------------------------
    def get_latents(self, batch: Mapping[str, Any], generator: torch.Generator | None = None,
                    mode: bool | None = None) -> torch.Tensor:
        tokens = super().get_latents(batch, generator, mode)
        return self.remap.to_prior(tokens, generator) if self.remap is not None else tokens

    def encode(self, images: torch.Tensor, generator: torch.Generator | None = None,
               mode: bool | None = True) -> torch.Tensor:
        tokens = super().encode(images, generator, mode)
        return self.remap.to_prior(tokens, generator) if self.remap is not None else tokens

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return super().decode(self.remap.to_first_stage(latents) if self.remap is not None else latents)

    # --- training ---------------------------------------------------------------------------
    def draw_scales(self, b: int, device: torch.device, generator: torch.Generator | None) -> torch.Tensor:
        if self.single_scale:
            return torch.full((b,), self.single_scale, dtype=torch.long, device=device)
        from ldm.distributed import draw_local

        gen_device = generator.device if generator is not None else device
        weights = self.scale_weights.to(gen_device)
        t = draw_local(lambda m: torch.multinomial(weights, m, replacement=True, generator=generator), b, device)
        return t.to(device) + 1

    def compute_loss(self, latents: torch.Tensor, cond: Cond, generator: torch.Generator | None = None,
                     ema: bool = False) -> tuple[torch.Tensor, dict[str, Any]]:
        x0 = latents.flatten(1)
        t = self.draw_scales(x0.shape[0], x0.device, generator)
        prev, xt = self.process.q_pair(x0, t, generator)
        labels = cond.get("class_label") if cond else None
        per_sample = torch.zeros(x0.shape[0], device=x0.device)
        logs: dict[str, Any] = {}
        soft, hard = per_sample.clone(), per_sample.clone()
        owner = torch.tensor([self.network_names.index(self.network_for(s)) if s in self.trained_scales() else -1
                              for s in range(self.process.n_scales + 1)], device=t.device)[t]
        for k, name in enumerate(self.network_names):
            rows = owner == k
            net = self.network(name, ema)
            if not rows.any():  # keep every parameter in the graph (DDP), at zero weight
                per_sample = per_sample + 0.0 * sum(p.sum() for p in net.parameters())
                continue
            idx = rows.nonzero().squeeze(1)
            lab = labels[idx] if labels is not None else None
            logits = net(prev[idx], xt[idx], t[idx], lab)
            out = self.process.losses(logits, prev[idx], self.process.posterior(x0[idx], xt[idx], t[idx]), self.alpha)
            per_sample = per_sample.index_add(0, idx, out["loss"])
            soft, hard = soft.index_add(0, idx, out["loss_soft"].detach()), hard.index_add(0, idx, out["loss_hard"].detach())
        loss = per_sample.mean()
        logs.update(loss_soft=soft.mean(), loss_hard=hard.mean())
        for s in self.trained_scales():
            rows = t == s
            if rows.any() and len(self.trained_scales()) > 1:
                logs[f"loss_scale{s}"] = per_sample[rows].mean().detach()
        return loss, logs

    # --- sampling ---------------------------------------------------------------------------
    def _sample(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool,
                callback: Any = None, x0_known: torch.Tensor | None = None, known: torch.Tensor | None = None,
                **options: Any) -> torch.Tensor:
        h, w = self.latent_shape[-2:]
        options = {"top_k": self.top_k, "resample": 1, **self.sample_defaults, **options}
        if known is None:  # re-noise-and-resample passes are for inpainting only
            options.pop("resample")
        options["use_cache"] = bool(options.get("use_cache", 1))
        tokens = sample(lambda t: self.transition(t, ema), self.process, (n, h * w), cond or None, generator,
                        callback, null_cond=self.null_cond(n) if cond else None, device=self.device,
                        x0_known=None if x0_known is None else x0_known.flatten(1),
                        known=None if known is None else known.flatten(1), **options)
        return tokens.view(n, h, w)

    def sample_latents(self, n: int, cond: Cond, generator: torch.Generator | None, ema: bool = True,
                       **kw: Any) -> torch.Tensor:
        """Token ids (n, h, w) in the prior's vocabulary; options as `sampler_options` declares."""
        return self._sample(n, cond, generator, ema, **kw)

    def inpaint_latents(self, latents: torch.Tensor, known: torch.Tensor, cond: Cond,
                        generator: torch.Generator | None, ema: bool = True, **kw: Any) -> torch.Tensor:
        """Tokens (B, h, w) with `known` (B, h, w) bool kept at every scale."""
        if known.shape != latents.shape:
            raise ValueError(f"known mask {tuple(known.shape)} does not match the token map {tuple(latents.shape)}")
        return self._sample(latents.shape[0], cond, generator, ema, x0_known=latents, known=known, **kw)

    def nll_latents(self, latents: torch.Tensor, cond: Cond, ema: bool = True,
                    generator: torch.Generator | None = None, **_: Any) -> torch.Tensor:
        """The chain's bound on -log p(x_0), bits per token (one draw of each scale's pair)."""
        x0 = latents.flatten(1)
        labels = cond.get("class_label") if cond else None

        def transition(prev: torch.Tensor, xt: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return self.transition(int(t[0]), ema)(prev, xt, t, labels)

        return self.process.nll_terms(transition, x0, generator) / (x0.shape[1] * math.log(2.0))

    @torch.no_grad()
    def log_images(self, batch: Mapping[str, Any], N: int = 8, split: str = "train", **kw: Any) -> dict[str, torch.Tensor]:
        """The whole chain's samples; a checkpoint of one scale (`single_scale: t`) shows instead x_t drawn from the
        batch, its x_{t-1} sampled by the network, and the drawn x_{t-1} (the original's `samples_t`)."""
        if not self.single_scale:
            return super().log_images(batch, N, split, **kw)
        from imagebart.sampling import sample_scale

        x0 = self.get_latents(batch, mode=True)[:N]
        n, (h, w) = x0.shape[0], x0.shape[-2:]
        g = torch.Generator(device=self.device).manual_seed(0)
        t = torch.full((n,), self.single_scale, dtype=torch.long, device=self.device)
        prev, xt = self.process.q_pair(x0.flatten(1), t, g)
        cond = {k: v[:n] for k, v in self.get_cond(batch).items()} or None
        options = self.check_sampler_options({**self.log_sample_kwargs, **kw})
        options = {k: (v[self.single_scale - 1] if isinstance(v, tuple) else v) for k, v in options.items()}
        options["use_cache"] = bool(options.get("use_cache", 1))
        options.setdefault("top_k", self.top_k)
        drawn = sample_scale(self.transition(self.single_scale, ema=True), xt, self.single_scale, cond, g,
                             null_cond=self.null_cond(n) if cond else None, **options)
        return {f"x_{self.single_scale}": self.decode(xt.view(n, h, w)),
                f"samples_x_{self.single_scale - 1}": self.decode(drawn.view(n, h, w)),
                f"x_{self.single_scale - 1}": self.decode(prev.view(n, h, w))}

    def sampling_forward(self, n: int, cond: Any = None, guidance_scale: float = 1.0, use_ema: bool = True, **_: Any):
        """One pass of what sampling runs, without the sampling: per scale the encoder once and one cached
        decoder step per token on fixed tokens (the doubled batch under guidance). Its `steps_per_call`
        tells the benchmark how many sampling steps it stands for."""
        c = self.user_cond(cond, n)
        h, w = self.latent_shape[-2:]
        g = torch.Generator(device=self.device).manual_seed(0)
        x = torch.randint(0, self.codebook_size, (n, h * w), generator=g, device=self.device)
        labels = c.get("class_label") if c else None
        if guidance_scale != 1.0 and c:
            x, labels = torch.cat([x, x]), torch.cat([labels, self.null_cond(n)["class_label"]])

        def call() -> None:
            with torch.no_grad():
                for t in range(self.process.n_scales, 0, -1):
                    net = self.transition(t, use_ema)
                    state, token = net.start(x, torch.full((x.shape[0],), t, device=self.device), labels), None
                    for i in range(h * w):
                        net.next_logits(state, token)
                        token = x[:, i]

        call.steps_per_call = self.process.n_scales * h * w
        return call

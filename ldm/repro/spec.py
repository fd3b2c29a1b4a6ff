"""A reproduction config (`configs/repro/*.yaml`) read into checked dataclasses.

The file names a first stage (or several), every prior trained on it, the training budget of each (in
steps, so an interrupted and resumed run trains exactly what an uninterrupted one does) and the evaluation
settings. A misspelt key is an error that names it, as in the model configs.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.util import ConfigError


@dataclass
class Training:
    """A training budget: `max_steps` optimizer steps (main.py's `max_time` is switched off, so the budget
    does not depend on the machine), and the seconds a step is expected to take, for the time-left display."""

    max_steps: int
    seconds_per_step: float = 1.0


@dataclass
class FirstStage:
    """A first stage: reused from `checkpoint` when that file exists, else trained from `config` (run folder
    `<logdir>/<time>_<run_name>`) and copied there; its latents cached under `cache/<split>`."""

    key: str
    config: str = ""  # needed to train it; a first stage given by `checkpoint` alone is never trained
    label: str = ""
    run_name: str = ""
    checkpoint: str | None = None
    cache: str | None = None
    kind: str | None = None
    train: Training | None = None
    overrides: list[str] = field(default_factory=list)
    cached: bool = True  # priors train on its latent cache (False: on their own data config, encoding as they go)
    cache_minutes: float = 2.0


@dataclass
class Prior:
    """A prior trained on `first_stage`'s latent cache from `config`, or reused from `checkpoint`."""

    key: str
    config: str
    first_stage: str
    label: str = ""
    run_name: str = ""
    checkpoint: str | None = None
    train: Training | None = None
    overrides: list[str] = field(default_factory=list)
    guidance_scale: float | None = None  # the second setting of the main evaluation (None: no guided row)
    sweep: dict[str, list[Any]] = field(default_factory=dict)  # e.g. {steps: [8, 16, 32, 64]}: the cost curve
    elbo: bool = True  # score the likelihood (off for a prior without one)
    sampler: dict[str, Any] = field(default_factory=dict)  # sampler settings of every row, e.g. {temperature: 1.0}
    data: dict[str, Any] = field(default_factory=dict)  # data splits replacing the config's ({split: {target, params}})
    evaluate_minutes: float = 5.0


@dataclass
class Evaluation:
    """How every prior is scored (`scripts/evaluate.py`'s options) and what else the table shows."""

    num_samples: int = 1000
    sweep_samples: int | None = None  # samples per point of the step-count curves (default: num_samples)
    batch_size: int = 100
    seed: int = 0
    elbo_limit: int = 0
    elbo_strata: int | None = None
    features: str = "fmnist"
    eval_split: str = "test"
    floor: bool = True  # the data's own FD floor (two halves of the test split; test against train)
    floor_reference_split: str = "train"
    grid_per_class: int | None = 10  # a sample grid per prior, row k = class k (None: `grid_samples` unconditionally)
    grid_samples: int = 16
    # evaluate.py --bf16: `auto` where the hardware runs bfloat16 natively (a GPU that supports it, a CPU with
    # AVX512-BF16 or AMX), where it is about 2x faster and keeps the figures; emulated elsewhere, and 20x slower
    bf16: bool | str = "auto"
    extra_args: list[str] = field(default_factory=list)  # more evaluate.py flags, e.g. [--compile]


@dataclass
class Spec:
    name: str
    first_stages: dict[str, FirstStage]
    priors: dict[str, Prior]
    evaluation: Evaluation = field(default_factory=Evaluation)
    logdir: str = "logs"
    out: str = "results"
    title: str = ""
    reported: dict[str, Any] = field(default_factory=dict)  # a paper's numbers, shown beside ours
    train_args: list[str] = field(default_factory=list)  # more main.py flags for every training, e.g. [--gpus, "0,"]
    cache_device: str = "cpu"  # where cache_latents.py encodes
    source: str = ""  # the file it was read from


def _build(cls: type, node: Any, where: str, **extra: Any) -> Any:
    """`cls(**node)`, refusing unknown keys (with a close match) and missing required ones by their config key."""
    key = where
    if not isinstance(node, Mapping):
        raise ConfigError(key, f"expected a mapping, got {type(node).__name__}")
    fields = {f.name: f for f in dataclasses.fields(cls)}
    names = [n for n in fields if n not in extra]
    for k in node:
        if k not in names:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{key}.{k}", f"unknown key{hint}; {key} takes {', '.join(names)}")
    missing = [n for n, f in fields.items() if n not in extra and n not in node
               and f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING]
    if missing:
        raise ConfigError(f"{key}.{missing[0]}", "missing")
    return cls(**dict(node), **extra)


def _training(node: Any, key: str) -> Training | None:
    if node is None:
        return None
    training = _build(Training, node, key)
    if not isinstance(training.max_steps, int) or training.max_steps < 1:
        raise ConfigError(f"{key}.max_steps", f"expected an integer >= 1, got {training.max_steps!r}")
    return training


def load_spec(path: str | Path, overrides: Sequence[str] = ()) -> Spec:
    """Read a reproduction config, with dotted `key=value` overrides (`evaluation.num_samples=100`)."""
    if not Path(path).exists():
        raise FileNotFoundError(f"reproduction config not found: {path}")
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise ValueError(f"unrecognised argument(s) {bad}: overrides look like evaluation.num_samples=100")
    raw = OmegaConf.to_container(OmegaConf.merge(OmegaConf.load(path), OmegaConf.from_dotlist(list(overrides))),
                                 resolve=True)
    if not isinstance(raw, dict):
        raise ConfigError("<top level>", "expected a mapping")
    raw = dict(raw)
    stages = raw.pop("first_stages", None) or {}
    priors = raw.pop("priors", None) or {}
    evaluation = _build(Evaluation, raw.pop("evaluation", None) or {}, "evaluation")
    if evaluation.bf16 not in (True, False, "auto"):
        raise ConfigError("evaluation.bf16", f"must be true, false or auto, got {evaluation.bf16!r}")
    first_stages = {}
    for k, node in stages.items():
        node = dict(node or {})
        train = _training(node.pop("train", None), f"first_stages.{k}.train")
        fs = _build(FirstStage, node, f"first_stages.{k}", key=k, train=train)
        if not fs.checkpoint and not train:
            raise ConfigError(f"first_stages.{k}", "needs a checkpoint, a train budget, or both")
        if train and not fs.config:
            raise ConfigError(f"first_stages.{k}.config", "missing: a first stage with a train budget needs its config")
        first_stages[k] = fs
    built = {}
    for k, node in priors.items():
        node = dict(node or {})
        train = _training(node.pop("train", None), f"priors.{k}.train")
        prior = _build(Prior, node, f"priors.{k}", key=k, train=train)
        if prior.first_stage not in first_stages:
            raise ConfigError(f"priors.{k}.first_stage", f"{prior.first_stage!r} is not one of the first_stages "
                                                         f"({', '.join(first_stages) or 'none'})")
        if not prior.checkpoint and not train:
            raise ConfigError(f"priors.{k}", "needs a checkpoint, a train budget, or both")
        built[k] = prior
    if not first_stages:
        raise ConfigError("first_stages", "missing: name at least one first stage")
    spec = _build(Spec, raw, "<top level>", first_stages=first_stages, priors=built, evaluation=evaluation,
                  source=str(path))
    for fs in spec.first_stages.values():
        fs.label = fs.label or fs.key
        fs.run_name = fs.run_name or f"{spec.name}_{fs.key}"
    for prior in spec.priors.values():
        prior.label = prior.label or prior.key
        prior.run_name = prior.run_name or f"{spec.name}_{prior.key}"
    return spec

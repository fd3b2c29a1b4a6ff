"""The training entrypoint behind `main.py`: the anchors' command line on Lightning 2.

`python main.py --base configs/a.yaml [configs/b.yaml ...] -t --gpus 0, [key.path=value ...]`
"""

from __future__ import annotations

import argparse
import datetime
import difflib
import glob
import os
import re
import signal
import sys
import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from omegaconf import DictConfig, OmegaConf

from ldm.run_folder import RUN_DIR_ENV, RunLock, claim_new_folder, is_launched_rank, remove_stale_temporaries
from ldm.util import (
    Bounds,
    ConfigError,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    allow_targets,
    check_params,
    check_types,
    instantiate_from_config,
)

CONFIG_SECTIONS = ("model", "data", "lightning")
# Lightning's DDP launcher starts ranks > 0 by running this script again, seconds later: they take the
# run folder's timestamp from rank 0 through the environment they inherit, so all ranks share one folder.
RUN_TIME_ENV = "LDM_RUN_TIME"
RUN_LOCKS: list[RunLock] = []  # held until the process exits


def str2bool(v: str | bool) -> bool:
    if isinstance(v, bool):
        return v
    if v.lower() in ("yes", "true", "t", "y", "1"):
        return True
    if v.lower() in ("no", "false", "f", "n", "0"):
        return False
    raise argparse.ArgumentTypeError(f"boolean value expected, got {v!r}")


def get_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--name", default="", help="postfix for the run folder name")
    p.add_argument("-r", "--resume", default="", help="resume from a run folder or a .ckpt in one")
    p.add_argument("-b", "--base", nargs="*", metavar="base_config.yaml", default=[],
                   help="configs merged left to right; dotted key=value overrides follow the flags")
    p.add_argument("-t", "--train", type=str2bool, const=True, default=False, nargs="?", help="train")
    p.add_argument("--no-test", type=str2bool, const=True, default=False, nargs="?", help="skip the test split")
    p.add_argument("-d", "--debug", type=str2bool, nargs="?", const=True, default=False,
                   help="put the run under <logdir>/debug")
    p.add_argument("-s", "--seed", type=int, default=23, help="seed for seed_everything")
    p.add_argument("-f", "--postfix", default="", help="postfix for the default name")
    p.add_argument("-l", "--logdir", default="logs", help="root of the run folders")
    p.add_argument("--scale_lr", type=str2bool, nargs="?", const=True, default=False,
                   help="lr = accumulate_grad_batches * devices * num_nodes * batch_size * base_lr "
                        "(the anchors scale by default; here it is opt-in)")
    p.add_argument("--gpus", default=None, help="GPU ids in the anchors' form, e.g. '0,' or '0,1'; empty = CPU")
    p.add_argument("--accelerator", default=None, help="Lightning accelerator (cpu, gpu, auto)")
    p.add_argument("--devices", default=None, help="Lightning devices (a count or a list)")
    p.add_argument("--num_nodes", type=int, default=None)
    p.add_argument("--precision", default=None, help="e.g. 32, 16-mixed, bf16-mixed")
    p.add_argument("--max_steps", type=int, default=None)
    p.add_argument("--allow-target", action="append", default=[], metavar="PKG.MODULE",
                   help="let configs build classes from this package too (your own code); repeatable")
    return p


@dataclass
class RunPaths:
    now: str
    nowname: str
    logdir: str
    ckptdir: str
    cfgdir: str
    resume_ckpt: str | None


def parse_gpus(gpus: str | None) -> list[int] | None:
    """'0,' -> [0]; '0,1' -> [0, 1]; None/'' -> None (CPU)."""
    if gpus is None or str(gpus).strip(" ,") == "":
        return None
    try:
        return [int(g) for g in str(gpus).split(",") if g.strip() != ""]
    except ValueError as e:
        raise SystemExit(f"--gpus expects comma-separated GPU ids such as '0,' or '0,1', got {gpus!r}") from e


def resolve_run(opt: argparse.Namespace, now: str) -> RunPaths:
    """Work out the run folder, the checkpoint to resume and the configs a resumed run reuses."""
    if opt.name and opt.resume:
        raise SystemExit("-n/--name and -r/--resume cannot be given together: -r reuses the run's folder name.")
    resume_ckpt = None
    if opt.resume:
        if not os.path.exists(opt.resume):
            raise SystemExit(f"cannot resume: {opt.resume} does not exist")
        if os.path.isfile(opt.resume):
            resume_ckpt = opt.resume
            logdir = str(Path(opt.resume).resolve().parent.parent)
        else:
            logdir = opt.resume.rstrip("/")
            resume_ckpt = os.path.join(logdir, "checkpoints", "last.ckpt")
            if not os.path.exists(resume_ckpt):
                raise SystemExit(f"cannot resume: {resume_ckpt} does not exist (no checkpoint was saved in {logdir})")
        project = sorted(glob.glob(os.path.join(logdir, "configs", "*-project.yaml")))
        lightning = sorted(glob.glob(os.path.join(logdir, "configs", "*-lightning.yaml")))
        if not project:
            raise SystemExit(f"cannot resume: {logdir}/configs has no saved project config")
        # The run's own merged config first, then anything given on this command line.
        opt.base = project[-1:] + lightning[-1:] + list(opt.base)
        nowname = os.path.basename(logdir)
    else:
        if opt.name:
            name = "_" + opt.name
        elif opt.base:
            name = "_" + Path(opt.base[0]).stem
        else:
            name = ""
        nowname = now + name + opt.postfix
        logdir = os.path.join(opt.logdir, "debug" if opt.debug else "", nowname)
    return RunPaths(now, nowname, logdir, os.path.join(logdir, "checkpoints"), os.path.join(logdir, "configs"),
                    resume_ckpt)


def load_config(base: list[str], overrides: list[str]) -> DictConfig:
    """Merge configs left to right, then dotted `key=value` overrides."""
    if not base:
        raise SystemExit("no config given: use --base configs/<...>.yaml")
    configs = []
    for path in base:
        if not os.path.exists(path):
            raise SystemExit(f"config file not found: {path}")
        configs.append(OmegaConf.load(path))
    bad = [o for o in overrides if "=" not in o]
    if bad:
        raise SystemExit(f"unrecognised argument(s) {bad}: overrides look like model.params.key=value")
    config = OmegaConf.merge(*configs, OmegaConf.from_dotlist(overrides))
    stray = [k for k in config if k not in CONFIG_SECTIONS]
    if stray:
        raise ConfigError(stray[0], f"unknown top-level section; a config has {', '.join(CONFIG_SECTIONS)}")
    if "model" not in config:
        raise ConfigError("model", "missing: every config needs a model section")
    if isinstance(config.model, Mapping):
        check_types({"base_learning_rate": PositiveFloat}, config.model, "model")
    return config


# what `lightning:` may hold: Trainer arguments, callbacks ({name: {target, params}}), the best-checkpoint
# callback's parameters and how often `last.ckpt` is refreshed
LIGHTNING_KEYS = ("trainer", "callbacks", "modelcheckpoint", "checkpoint_every_n_steps")


def check_lightning_keys(lightning_config: DictConfig) -> None:
    """Misspelt keys under `lightning` are errors, as everywhere else in a config."""
    for k in lightning_config:
        if k not in LIGHTNING_KEYS:
            close = difflib.get_close_matches(str(k), LIGHTNING_KEYS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"lightning.{k}", f"unknown key{hint}; lightning holds {', '.join(LIGHTNING_KEYS)}")
    every = lightning_config.get("checkpoint_every_n_steps", 1)
    if not isinstance(every, int) or isinstance(every, bool) or every < 1:
        raise ConfigError("lightning.checkpoint_every_n_steps", f"expected an integer >= 1, got {every!r}")
    mc = lightning_config.get("modelcheckpoint") or {}
    stray = [k for k in mc if k not in ("target", "params")]
    if stray:
        raise ConfigError("lightning.modelcheckpoint", f"unexpected key(s) {', '.join(map(repr, stray))}; it holds "
                                                       "'params' (ModelCheckpoint's arguments) and optionally 'target'")
    from pytorch_lightning.callbacks import ModelCheckpoint

    check_params(ModelCheckpoint, dict(mc.get("params") or {}), "lightning.modelcheckpoint")
    callbacks = lightning_config.get("callbacks") or {}
    if not isinstance(callbacks, Mapping):
        raise ConfigError("lightning.callbacks", "expected a mapping of names to {target, params} nodes")


def trainer_kwargs_from(opt: argparse.Namespace, lightning_config: DictConfig) -> dict[str, Any]:
    import pytorch_lightning as pl

    trainer_cfg = OmegaConf.to_container(lightning_config.get("trainer", OmegaConf.create()), resolve=True)
    gpus = parse_gpus(opt.gpus)
    if gpus is not None:
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(f"--gpus {opt.gpus} asks for CUDA devices but torch sees none; drop --gpus to train on CPU")
        trainer_cfg.update(accelerator="gpu", devices=gpus)
    trainer_cfg.setdefault("accelerator", "cpu")
    if opt.precision is None:
        trainer_cfg = cpu_precision(trainer_cfg)
    for flag in ("accelerator", "devices", "num_nodes", "precision", "max_steps"):
        value = getattr(opt, flag)
        if value is not None:
            if flag == "devices" and isinstance(value, str) and value.isdigit():
                value = int(value)
            trainer_cfg[flag] = value
    check_params(pl.Trainer, trainer_cfg, "lightning.trainer", nested=False)
    check_types(TRAINER_BOUNDS, trainer_cfg, "lightning.trainer")
    check_trainer(trainer_cfg)
    return trainer_cfg


# Trainer arguments whose out-of-range values Lightning takes without complaint (-1 steps between logs, ...);
# the others it checks itself, in check_trainer.
TRAINER_BOUNDS = {"log_every_n_steps": NonNegativeInt, "accumulate_grad_batches": PositiveInt,
                  "check_val_every_n_epoch": PositiveInt | None, "num_sanity_val_steps": Annotated[int, Bounds(ge=-1)],
                  "gradient_clip_val": Annotated[float, Bounds(ge=0)] | None}


def check_trainer(trainer_cfg: dict[str, Any]) -> None:
    """Lightning's own checks of the Trainer arguments (a precision, strategy or `val_check_interval` it does not
    know), run now on a throwaway Trainer without loggers or callbacks, before a run folder exists; its messages
    and warnings are kept for the real one."""
    import logging
    import warnings

    import pytorch_lightning as pl

    quiet = {**trainer_cfg, "logger": False, "callbacks": [], "enable_checkpointing": False}
    previous = logging.root.manager.disable
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            pl.Trainer(**quiet)
    except (ValueError, TypeError, pl.utilities.exceptions.MisconfigurationException) as e:
        named = [k for k in trainer_cfg if re.search(rf"\b{k}\b", str(e), re.IGNORECASE)]
        raise ConfigError("lightning.trainer" + (f".{named[0]}" if len(named) == 1 else ""), str(e)) from e
    finally:
        logging.disable(previous)


def cpu_has_native_bf16() -> bool:
    """bfloat16 matrix products run natively (AVX512-BF16 or AMX); elsewhere torch emulates them."""
    import torch

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def cpu_precision(trainer_cfg: dict[str, Any]) -> dict[str, Any]:
    """A config's bf16 precision on a CPU without native bf16 becomes 32-true, with a notice.

    Emulated bf16 autocast is about 20x slower than float32 there (measured on an AVX2-only CPU: 5.4 s vs
    0.25 s per step of a 0.9M-parameter transformer), so a time-budgeted config would train a fraction of
    its steps. `--precision bf16-mixed` on the command line keeps bf16 regardless.
    """
    precision = str(trainer_cfg.get("precision", ""))
    if trainer_cfg.get("accelerator") == "cpu" and precision.startswith("bf16") and not cpu_has_native_bf16():
        print(f"lightning.trainer.precision={precision}: this CPU has no native bfloat16 (AVX512-BF16/AMX), "
              "where bf16 autocast is ~20x slower than float32; training in 32-true instead "
              f"(pass --precision {precision} to insist)")
        trainer_cfg = {**trainer_cfg, "precision": "32-true"}
    return trainer_cfg


def scale_learning_rate(model: Any, config: DictConfig, trainer_cfg: dict[str, Any], scale: bool) -> None:
    """Set `model.learning_rate` from `model.base_learning_rate`, scaled as in the anchors if asked."""
    base_lr = config.model.get("base_learning_rate")
    if base_lr is None:
        return
    if not scale:
        model.learning_rate = float(base_lr)
        print(f"Learning rate {model.learning_rate:.2e} (model.base_learning_rate, unscaled)")
        return
    bs = int(config.data.params.batch_size) if "data" in config else 1
    devices = trainer_cfg.get("devices", 1)
    ndev = len(devices) if isinstance(devices, (list, tuple)) else int(devices) if str(devices).isdigit() else 1
    accumulate = int(trainer_cfg.get("accumulate_grad_batches", 1))
    nodes = int(trainer_cfg.get("num_nodes", 1))
    model.learning_rate = accumulate * ndev * nodes * bs * float(base_lr)
    print(f"Setting learning rate to {model.learning_rate:.2e} = {accumulate} (accumulate_grad_batches) "
          f"* {ndev} (devices) * {nodes} (nodes) * {bs} (batch size) * {float(base_lr):.2e} (base_lr)")


def run_time() -> str:
    """The run's timestamp: this process's clock, or rank 0's in a rank that Lightning launched."""
    if int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 and os.environ.get(RUN_TIME_ENV):
        return os.environ[RUN_TIME_ENV]
    now = datetime.datetime.now().strftime("%Y-%m-%dT%H-%M-%S")
    os.environ[RUN_TIME_ENV] = now
    return now


def resolve_strategy(trainer_cfg: dict[str, Any], model: Any) -> None:
    """`strategy: ddp` becomes `ddp_find_unused_parameters_true` for a model that says some of its
    backward passes reach only part of its parameters (the first stage's discriminator step, its
    generator step before `disc_start`); plain DDP would stop with an error at the next step."""
    if trainer_cfg.get("strategy") == "ddp" and getattr(model, "ddp_find_unused_parameters", False):
        trainer_cfg["strategy"] = "ddp_find_unused_parameters_true"
        print(f"strategy ddp -> ddp_find_unused_parameters_true: {type(model).__name__} has backward passes "
              "that leave some parameters without gradients")


def resumable_step(model: Any, path: str) -> int:
    """The step a checkpoint resumes at, once it is known to fit `model` (refused before the run folder is
    touched). The file is read here and dropped: Lightning reads it again to restore."""
    from ldm.checkpoint import CheckpointError, check_shapes, read_checkpoint, state_dict_in

    resumed = read_checkpoint(path)
    if not isinstance(resumed, Mapping) or not isinstance(resumed.get("state_dict"), Mapping):
        raise CheckpointError(f"{path} is not a training checkpoint written by main.py "
                              "(it has no state_dict); -r resumes runs of this project")
    state = state_dict_in(resumed, path)
    check_shapes(model, state, path)
    if hasattr(model, "check_first_stage_in"):  # a prior resumed on another first stage than its config's
        model.check_first_stage_in(state, path)
    return int(resumed.get("global_step", 0))


def take_run_folder(paths: RunPaths, resume: bool) -> RunPaths:
    """Rank 0 claims a new run folder (another name if it exists) or the resumed one, locks it for the
    life of the process and removes temporary checkpoint files a killed run left; launched ranks take
    rank 0's folder."""
    if is_launched_rank():
        logdir = os.environ.get(RUN_DIR_ENV, paths.logdir)
    else:
        logdir = paths.logdir if resume else claim_new_folder(paths.logdir)
        if logdir != paths.logdir:
            print(f"{paths.logdir} exists: this run writes to {logdir}")
        RUN_LOCKS.append(RunLock(logdir).acquire())
        for stale in remove_stale_temporaries(os.path.join(logdir, "checkpoints")):
            print(f"removed {stale}, a temporary checkpoint file left by an interrupted run")
        os.environ[RUN_DIR_ENV] = logdir
    return RunPaths(paths.now, os.path.basename(logdir), logdir, os.path.join(logdir, "checkpoints"),
                    os.path.join(logdir, "configs"), paths.resume_ckpt)


def user_callbacks(lightning_config: DictConfig) -> list[Any]:
    """`lightning.callbacks`, built before the run folder is made (a bad one then leaves nothing behind)."""
    user = OmegaConf.to_container(lightning_config.get("callbacks", OmegaConf.create()), resolve=True)
    from pytorch_lightning import Callback

    return [instantiate_from_config(cfg, key=f"lightning.callbacks.{name}", expected=Callback)
            for name, cfg in user.items()]


def build_callbacks(paths: RunPaths, config: DictConfig, lightning_config: DictConfig, model: Any, resume: bool,
                    seed: int, user_callbacks: list[Any]):
    from pytorch_lightning.callbacks import LearningRateMonitor, ModelCheckpoint

    from ldm.callbacks import ImageLogger, SetupCallback, SignalCheckpoint, StepSeed

    callbacks: list[Any] = [
        SetupCallback(resume, paths.now, paths.logdir, paths.ckptdir, paths.cfgdir, config, lightning_config),
        StepSeed(seed),
        SignalCheckpoint(paths.ckptdir),
        LearningRateMonitor(logging_interval="step"),
    ]
    every = int(lightning_config.get("checkpoint_every_n_steps", 200))
    # last.ckpt, refreshed often, is what -r resumes from (also after kill -9).
    callbacks.append(ModelCheckpoint(dirpath=paths.ckptdir, filename="last", every_n_train_steps=every,
                                     save_top_k=1, enable_version_counter=False, save_on_train_epoch_end=True))
    mc = OmegaConf.to_container(lightning_config.get("modelcheckpoint", OmegaConf.create()), resolve=True)
    mc_params = dict(mc.get("params", {}))
    monitor = mc_params.pop("monitor", getattr(model, "monitor", None))
    if monitor:
        mc_params.setdefault("filename", "best-{epoch:06}-{step:07}")
        mc_params.setdefault("save_top_k", 1)
        callbacks.append(ModelCheckpoint(dirpath=paths.ckptdir, monitor=monitor, **mc_params))
    callbacks += user_callbacks
    if not any(isinstance(c, ImageLogger) for c in callbacks):
        callbacks.append(ImageLogger(batch_frequency=1000, max_images=16))
    return callbacks


def main(argv: list[str] | None = None) -> int:
    try:
        return train(argv)
    finally:
        while RUN_LOCKS:
            RUN_LOCKS.pop().release()


def train(argv: list[str] | None = None) -> int:
    sys.path.insert(0, os.getcwd())
    parser = get_parser()
    opt, unknown = parser.parse_known_args(argv)
    allow_targets(opt.allow_target)
    now = run_time()
    paths = resolve_run(opt, now)

    import pytorch_lightning as pl

    from ldm.callbacks import AtomicCheckpointIO, SignalCheckpoint
    from ldm.loggers import run_loggers

    # quietly: Lightning announces the seed on stderr, which holds only errors (ldm.cli); stdout gets it
    pl.seed_everything(opt.seed, workers=True, verbose=False)
    print(f"Seed set to {opt.seed}")
    # Lightning's DDP reseeds every rank from PL_GLOBAL_SEED as training starts; one process does not.
    # Every rank runs this same seeding and model construction, so their random streams already agree:
    # without the reseed they continue exactly as a single process's does (same restarts, same noise).
    os.environ.pop("PL_GLOBAL_SEED", None)
    config = load_config(opt.base, unknown)
    lightning_config = config.pop("lightning", OmegaConf.create())
    check_lightning_keys(lightning_config)
    trainer_cfg = trainer_kwargs_from(opt, lightning_config)
    lightning_config.trainer = trainer_cfg

    model = instantiate_from_config(config.model, key="model", expected=pl.LightningModule)
    data = instantiate_from_config(config.data, key="data", expected=pl.LightningDataModule) if "data" in config else None
    if data is None:
        raise ConfigError("data", "missing: training needs a data section")
    splits = getattr(data, "configs", None)  # DataModuleFromConfig's
    if opt.train and splits is not None and "train" not in splits:
        raise ConfigError("data.params.train", "missing: training needs a train split")
    scale_learning_rate(model, config, trainer_cfg, opt.scale_lr)
    resolve_strategy(trainer_cfg, model)
    lightning_config.trainer = trainer_cfg

    extra = user_callbacks(lightning_config)
    resume_step = resumable_step(model, paths.resume_ckpt) if paths.resume_ckpt else None
    if opt.train or paths.resume_ckpt:
        paths = take_run_folder(paths, resume=bool(opt.resume))
    loggers = run_loggers(paths.logdir, resume_step)
    callbacks = build_callbacks(paths, config, lightning_config, model, bool(paths.resume_ckpt), opt.seed, extra)
    trainer = pl.Trainer(**trainer_cfg, logger=loggers, callbacks=callbacks, default_root_dir=paths.logdir,
                         plugins=[AtomicCheckpointIO()])
    # The first stages optimise by hand; their checkpoints hold the weights after a step, which is what a
    # resumed run continues from. Lightning's advice to keep the state before it is noise here.
    warnings.filterwarnings("ignore", message="Using ModelCheckpoint with manual optimization")

    if opt.train:
        # SignalCheckpoint saves last.ckpt on an exception, SIGUSR1 or SIGTERM; -r resumes from it.
        trainer.fit(model, datamodule=data, ckpt_path=paths.resume_ckpt, weights_only=True)
        stopped_by = next(c.stopped_by for c in callbacks if isinstance(c, SignalCheckpoint))
        if stopped_by == signal.SIGTERM:
            # a scheduler that sent SIGTERM reads a non-zero status as "interrupted" (and may requeue)
            print(f"Stopped by SIGTERM after saving {paths.ckptdir}/last.ckpt: exit status {128 + stopped_by}.")
            return 128 + stopped_by
    if not opt.no_test and not trainer.interrupted and getattr(data, "has_test", True):
        if opt.train or paths.resume_ckpt:
            trainer.test(model, datamodule=data, ckpt_path=None if opt.train else paths.resume_ckpt,
                         weights_only=True)
    return 0

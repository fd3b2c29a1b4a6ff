"""Lightning callbacks of the training entrypoint: run folder, image grids, per-batch seeds, signals."""

from __future__ import annotations

import logging
import os
import random
import signal
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
import torchvision
from lightning_fabric.plugins import TorchCheckpointIO
from omegaconf import OmegaConf
from pytorch_lightning.loggers import TensorBoardLogger
from pytorch_lightning.utilities import rank_zero_only

from ldm.distributed import mix_seed
from ldm.util import NonNegativeInt, PositiveInt

log = logging.getLogger(__name__)


class AtomicCheckpointIO(TorchCheckpointIO):
    """Write checkpoints to a temporary file and rename, so a kill never leaves a torn `.ckpt`."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        torch.save(checkpoint, tmp)
        os.replace(tmp, path)


class SetupCallback(pl.Callback):
    """Create the run folder, write the merged configs, and put the resolved config in every checkpoint."""

    def __init__(self, resume: bool, now: str, logdir: str, ckptdir: str, cfgdir: str, config: Any, lightning_config: Any):
        super().__init__()
        self.resume = resume
        self.now, self.logdir, self.ckptdir, self.cfgdir = now, logdir, ckptdir, cfgdir
        self.config, self.lightning_config = config, lightning_config

    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if trainer.global_rank != 0:
            return
        for d in (self.logdir, self.ckptdir, self.cfgdir):
            os.makedirs(d, exist_ok=True)
        OmegaConf.save(self.config, os.path.join(self.cfgdir, f"{self.now}-project.yaml"))
        OmegaConf.save(OmegaConf.create({"lightning": self.lightning_config}),
                       os.path.join(self.cfgdir, f"{self.now}-lightning.yaml"))

    def on_save_checkpoint(self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, Any]) -> None:
        full = OmegaConf.merge(self.config, {"lightning": self.lightning_config})
        checkpoint["config"] = OmegaConf.to_container(full, resolve=True)
        # flush what the loggers buffer (the CSV writes every 100 steps): a run killed after this save and
        # resumed from it then has every step before it in its logs
        for logger in trainer.loggers:
            logger.save()


class StepSeed(pl.Callback):
    """Seed python, numpy and torch afresh before every training batch, from the run's seed and the batch's
    position (epoch, index in the epoch).

    Whatever runs between two batches (validation, image grids, a checkpoint restore) then cannot shift the
    random streams training draws from: a run resumed from any checkpoint draws what the uninterrupted run
    draws. Every rank seeds alike, as `seed_everything` does. The seed is kept in checkpoints, so a resumed
    run keeps it, and handed to the LightningModule as `run_seed` (the priors derive their per-batch noise
    generators from it).
    """

    def __init__(self, seed: int):
        super().__init__()
        self.seed = int(seed)

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.seed = int(state["seed"])

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        pl_module.run_seed = self.seed

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # counters (-1, epoch, batch): never the (epoch, batch) pair of the priors' own generators
        seed = mix_seed(self.seed, -1, trainer.current_epoch, batch_idx)
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.manual_seed(seed)


class SignalCheckpoint(pl.Callback):
    """On SIGUSR1 or SIGTERM, save `last.ckpt` at the end of the current batch and stop; on an
    exception, save it too.

    Under DDP a signal may reach one rank only (`kill -USR1 <pid>`) or all of them (a scheduler), at
    different moments. Each handler only raises a local flag; at every batch end the ranks agree
    (one boolean all-reduce: did ANY rank get one?), then all of them take part in the save, which is
    collective in Lightning 2 (rank 0 writes, all ranks reach its barrier), and all stop together.
    A second SIGTERM before that batch end terminates at once.

    An exception is different: it may have been raised on one rank only, while the others wait in a
    collective (a gradient all-reduce) that will never complete. A save that needs every rank would
    hang, so each rank that catches an exception writes its own state without any collective: DDP
    keeps weights and optimiser states equal across ranks, so any rank's state is the run's (up to a
    step the failing rank left half done), and the atomic rename keeps two such writes from tearing
    the file. The ranks still waiting then fail when the dead rank's connections close (gloo) or
    when the process group's timeout expires (NCCL), and save the same way.
    """

    SIGNALS = (signal.SIGUSR1, signal.SIGTERM)

    def __init__(self, ckptdir: str, signals: tuple[int, ...] = SIGNALS):
        super().__init__()
        self.ckptdir = ckptdir
        self.signals = tuple(signals)
        self.requested: int | None = None  # the signal this rank received, until the ranks agree on it
        self.stopped_by: int | None = None  # the signal training stopped for (any rank's), once it has
        self._previous: dict[int, Any] = {}
        self._saved_step = -1

    @property
    def path(self) -> str:
        return os.path.join(self.ckptdir, "last.ckpt")

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # here, not in setup: Lightning installs its own SIGTERM handler (which kills the other ranks and
        # raises on the next batch) just before training starts, and this one replaces it while training
        for signum in self.signals:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread)
                log.warning("cannot install the handler of signal %s outside the main thread", signum)

    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum: int, frame: Any) -> None:
        if self.requested == signal.SIGTERM and signum == signal.SIGTERM:
            signal.signal(signum, signal.SIG_DFL)  # asked twice: stop now
            os.kill(os.getpid(), signum)
            return
        print(f"Received signal {signum}: saving a checkpoint after this batch.", flush=True)
        self.requested = signum

    def _save(self, trainer: pl.Trainer, why: str) -> None:
        """Collective: every rank calls it at the same step."""
        if self._saved_step == trainer.global_step:
            return
        trainer.save_checkpoint(self.path)
        self._saved_step = trainer.global_step
        if trainer.is_global_zero:
            print(f"Saved {self.path} at step {trainer.global_step} ({why}).", flush=True)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        # one tiny all-reduce per batch: a signal that reached any rank stops all of them
        if trainer.strategy.reduce_boolean_decision(self.requested is not None, all=False):
            # SIGTERM on any rank wins: every rank then exits non-zero
            term = trainer.strategy.reduce_boolean_decision(self.requested == signal.SIGTERM, all=False)
            self.stopped_by = signal.SIGTERM if term else signal.SIGUSR1
            self._save(trainer, "signal")
            if trainer.is_global_zero:
                print("Stopping after the signal.", flush=True)
            trainer.should_stop = True
            self.requested = None

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        """Training stopped (max_steps, max_time, a signal): `last.ckpt` holds the final state."""
        if trainer.global_step > 0:
            self._save(trainer, "end of training")

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if trainer.global_step == 0 or trainer.state.fn != "fit":
            return
        print(f"[rank {trainer.global_rank}] {type(exception).__name__} during training: saving {self.path} "
              f"at step {trainer.global_step}.", flush=True)
        try:
            # no collective here (see the class docstring): dump this rank's state and write it directly
            checkpoint = trainer._checkpoint_connector.dump_checkpoint(weights_only=False)
            trainer.strategy.checkpoint_io.save_checkpoint(checkpoint, self.path)
        except Exception as e:  # never mask the original error
            log.error("could not save the emergency checkpoint: %s", e)


class ImageLogger(pl.Callback):
    """Write `pl_module.log_images` grids to `<logdir>/images/<split>/` and TensorBoard every N batches."""

    def __init__(self, batch_frequency: PositiveInt = 1000, max_images: NonNegativeInt = 16, clamp: bool = True,
                 increase_log_steps: bool = True, log_first_step: bool = False, log_on_batch_idx: bool = False,
                 disabled: bool = False, log_images_kwargs: dict | None = None, nrow: PositiveInt | None = None):
        super().__init__()
        if batch_frequency <= 0:
            raise ValueError(f"batch_frequency must be positive, got {batch_frequency}")
        self.batch_freq = batch_frequency
        self.max_images = max_images
        self.clamp = clamp
        self.log_first_step = log_first_step
        self.log_on_batch_idx = log_on_batch_idx
        self.disabled = disabled
        self.log_images_kwargs = log_images_kwargs or {}
        self.nrow = nrow
        # Early grids at 1, 2, 4, ... steps show whether training starts well.
        self.log_steps = [2**n for n in range(int(np.log2(batch_frequency)) + 1)] if increase_log_steps else []
        self.logged_val = False

    def _check_frequency(self, idx: int) -> bool:
        if (idx % self.batch_freq == 0 or idx in self.log_steps) and (idx > 0 or self.log_first_step):
            if idx in self.log_steps:
                self.log_steps.remove(idx)
            return True
        return False

    @rank_zero_only
    def _save(self, save_dir: str, split: str, images: dict[str, torch.Tensor], global_step: int,
              epoch: int, batch_idx: int, logger: Any) -> list[str]:
        root = Path(save_dir) / "images" / split
        root.mkdir(parents=True, exist_ok=True)
        paths = []
        for k, img in images.items():
            nrow = self.nrow or max(1, int(np.ceil(np.sqrt(img.shape[0]))))
            grid = torchvision.utils.make_grid(img, nrow=nrow)  # (C, H, W) in [-1, 1]
            grid = (grid + 1.0) / 2.0
            path = root / f"{k}_gs-{global_step:06}_e-{epoch:06}_b-{batch_idx:06}.png"
            torchvision.utils.save_image(grid, path)
            paths.append(str(path))
            if isinstance(logger, TensorBoardLogger):
                logger.experiment.add_image(f"{split}/{k}", grid.clamp(0, 1), global_step)
        return paths

    def log_img(self, pl_module: pl.LightningModule, batch: Any, batch_idx: int, split: str) -> None:
        if batch is None:  # every image of the batch was skipped (ldm.data.skipped)
            return
        if not hasattr(pl_module, "log_images") or not callable(pl_module.log_images) or self.max_images <= 0:
            return
        was_training = pl_module.training
        pl_module.eval()
        with torch.no_grad():
            images = pl_module.log_images(batch, N=self.max_images, split=split, **self.log_images_kwargs)
        if was_training:
            pl_module.train()
        out = {}
        for k, v in images.items():
            if isinstance(v, torch.Tensor) and v.dim() == 4:
                v = v[: self.max_images].detach().float().cpu()
                out[k] = v.clamp(-1.0, 1.0) if self.clamp else v
        trainer = pl_module.trainer  # main.py sets default_root_dir to the run folder
        self._save(trainer.default_root_dir, split, out, pl_module.global_step, pl_module.current_epoch, batch_idx,
                   trainer.logger)

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        if self.disabled:
            return
        idx = batch_idx if self.log_on_batch_idx else pl_module.global_step
        if self._check_frequency(idx):
            self.log_img(pl_module, batch, batch_idx, split="train")

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.logged_val = False

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                                batch_idx: int, dataloader_idx: int = 0) -> None:
        if (not self.disabled and not self.logged_val and batch is not None and not trainer.sanity_checking
                and pl_module.global_step > 0):
            self.logged_val = True
            self.log_img(pl_module, batch, batch_idx, split="val")

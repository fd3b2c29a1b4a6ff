"""The run's loggers (TensorBoard and CSV); a resumed run continues their files instead of replacing them."""

from __future__ import annotations

import csv
import os
from typing import Any

from lightning_fabric.loggers.logger import rank_zero_experiment
from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger
from pytorch_lightning.loggers.csv_logs import ExperimentWriter


class _ContinuingWriter(ExperimentWriter):
    """Keeps the rows of `metrics.csv` logged before `resume_step` (Lightning's writer deletes the file);
    rows from `resume_step` on were written after the checkpoint being resumed and are logged again."""

    def __init__(self, log_dir: str, resume_step: int):
        self.resume_step = resume_step
        super().__init__(log_dir)

    def _check_log_dir_exists(self) -> None:
        if not os.path.isfile(self.metrics_file_path):
            return
        with open(self.metrics_file_path, newline="") as f:
            reader = csv.DictReader(f)
            keys = list(reader.fieldnames or [])
            rows = [r for r in reader if r.get("step", "") != "" and int(float(r["step"])) < self.resume_step]
        with open(self.metrics_file_path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=keys)
            writer.writeheader()
            writer.writerows(rows)
        self.metrics_keys = keys


class ContinuingCSVLogger(CSVLogger):
    def __init__(self, *args: Any, resume_step: int = 0, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.resume_step = resume_step

    @property
    @rank_zero_experiment
    def experiment(self) -> ExperimentWriter:
        if self._experiment is None:
            os.makedirs(self.root_dir, exist_ok=True)
            self._experiment = _ContinuingWriter(self.log_dir, self.resume_step)
        return self._experiment


def run_loggers(logdir: str, resume_step: int | None) -> list[Any]:
    """TensorBoard and CSV in `<logdir>/tensorboard` and `<logdir>/csv`. Resuming from `resume_step`,
    both drop what the interrupted run logged from that step on (it is logged again) and keep the rest."""
    step = resume_step or 0
    return [TensorBoardLogger(logdir, name="tensorboard", version="", purge_step=resume_step),
            ContinuingCSVLogger(logdir, name="csv", version="", resume_step=step)]

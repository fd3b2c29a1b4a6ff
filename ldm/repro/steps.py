"""The steps of a reproduction, each a run of one of the project's programs, each able to tell whether it is done.

Nothing here keeps work in memory: a step is done when what it leaves on disk says so, as a user would
judge it.

- A training is done when its run folder's `last.ckpt` has reached the budget (`global_step >= max_steps`);
  a run folder with a `last.ckpt` short of it is resumed with `main.py -r` (exactly, as main.py resumes);
  one locked by a live process is waited for. Run folders are found by name, `<logdir>/<time>_<run_name>`,
  so runs trained by hand under that name are reused.
- A latent cache is done when its `meta.json` says complete and records the first stage's checkpoint hash.
- An evaluation, the data floor and a grid are done when their output exists and the runner's record
  (`<out>/state.json`) holds the same command for the same checkpoint; an interrupted evaluation is simply
  run again, and `evaluate.py` continues from the sample batches it kept.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from ldm.checkpoint import export_weights
from ldm.repro.spec import FirstStage, Prior, Spec, Training
from ldm.run_folder import RunLock

REPO = Path(__file__).resolve().parents[2]
SCRIPTS = REPO / "scripts"
CACHE_SPLITS = ("train", "validation", "test")
RUN_TIME = r"\d{4}-\d\d-\d\dT\d\d-\d\d-\d\d"


def native_bf16(setting: bool | str) -> bool:
    """`evaluation.bf16` resolved: `auto` is whether this machine runs bfloat16 natively."""
    if setting != "auto":
        return bool(setting)
    import torch

    from ldm.train import cpu_has_native_bf16

    return torch.cuda.is_bf16_supported() if torch.cuda.is_available() else cpu_has_native_bf16()


def python(script: str, *args: Any) -> list[str]:
    """The command line of one of the project's programs, run by this interpreter."""
    path = REPO / "main.py" if script == "main" else SCRIPTS / f"{script}.py"
    return [sys.executable, str(path), *map(str, args)]


def file_key(path: str | Path) -> dict[str, Any]:
    """What identifies a file's content cheaply: path, size, modification time."""
    stat = Path(path).stat()
    return {"path": str(path), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}


def atomic_write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


class State:
    """The runner's record of finished steps (`<out>/state.json`): each step's command signature, when it
    ended and how long it took, and the training steps reached by checkpoints already read."""

    def __init__(self, path: Path):
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.exists() else {}
        self.data.setdefault("steps", {})
        self.data.setdefault("checkpoints", {})

    def save(self) -> None:
        atomic_write(self.path, json.dumps(self.data, indent=2))

    def step(self, step_id: str) -> dict[str, Any] | None:
        return self.data["steps"].get(step_id)

    def finish(self, step_id: str, signature: str, seconds: float) -> None:
        self.data["steps"][step_id] = {"signature": signature, "seconds": round(seconds, 1),
                                       "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        self.save()

    def global_step(self, ckpt: Path) -> int:
        """The `global_step` stored in a checkpoint, read once per version of the file."""
        key = json.dumps(file_key(ckpt), sort_keys=True)
        known = self.data["checkpoints"].get(key)
        if known is None:
            from ldm.checkpoint import read_checkpoint

            known = int(read_checkpoint(ckpt).get("global_step", 0))
            self.data["checkpoints"][key] = known
            self.save()
        return known


def signature(command: list[str], *files: str | Path) -> str:
    """A step's identity: its command (interpreter left out) and the versions of the files it reads."""
    text = json.dumps([command[1:], [file_key(f) for f in files]], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:20]


def find_runs(logdir: str | Path, run_name: str) -> list[Path]:
    """Run folders main.py made for `-n run_name` under `logdir` (`<time>_<name>`, or `-1`, `-2`... when two
    started in the same second), oldest first."""
    pattern = re.compile(rf"^{RUN_TIME}_{re.escape(run_name)}(-\d+)?$")
    root = Path(logdir)
    found = [p for p in root.iterdir() if p.is_dir() and pattern.match(p.name)] if root.is_dir() else []
    return sorted(found, key=lambda p: p.name)


def logged_step(run: Path) -> int | None:
    """The newest training step in a run's `csv/metrics.csv` (written as training goes, unlike `last.ckpt`),
    or None before its first row."""
    path = run / "csv" / "metrics.csv"
    try:
        with open(path, "rb") as f:
            header = f.readline().decode().strip().split(",")
            f.seek(max(0, os.fstat(f.fileno()).st_size - 4096))
            # whole rows only: the first line read is the header or cut by the seek, the last one unended
            rows = f.read().decode(errors="replace").split("\n")[1:-1]
    except OSError:
        return None
    if "step" not in header:
        return None
    column = header.index("step")
    for row in reversed(rows):
        cells = row.split(",")
        if len(cells) > column and cells[column].isdigit():
            return int(cells[column])
    return None


@dataclass
class TrainingStatus:
    run: Path | None  # the newest run folder with a last.ckpt
    step: int  # its global_step (0 without one)
    holder: str | None  # the process training in it now, if any

    @property
    def checkpoint(self) -> Path | None:
        return self.run / "checkpoints" / "last.ckpt" if self.run else None


@dataclass
class Step:
    """One program run. `done()` looks at the disk; `command()` is built when the step runs, after the steps
    before it (so a checkpoint they make is known); `finish()` records what the step did."""

    id: str
    subject: str
    stage: str
    estimate_s: Callable[[], float]
    done: Callable[[], bool]
    command: Callable[[], list[str]]
    finish: Callable[[float], None] = lambda seconds: None
    busy: Callable[[], str | None] = lambda: None  # a process whose work this step must wait for
    detail: Callable[[], str] = lambda: ""
    units: Callable[[], tuple[int, int] | None] = lambda: None  # (done, total) while it runs, where known

    @property
    def log_name(self) -> str:
        return self.id.replace("/", "_") + ".log"


@dataclass
class Plan:
    """Every step of a reproduction and the paths they share."""

    spec: Spec
    out: Path
    logdir: Path
    state: State = field(init=False)

    def __post_init__(self) -> None:
        self.state = State(self.out / "state.json")

    # ---- where things are --------------------------------------------------------------------------------
    def eval_json(self, prior: Prior, part: str = "main") -> Path:
        return self.out / "eval" / (f"{prior.key}.json" if part == "main" else f"{prior.key}.{part}.json")

    def grid_png(self, prior: Prior) -> Path:
        return self.out / "grids" / f"{prior.key}.png"

    def floor_json(self) -> Path:
        return self.out / "eval" / "floor.json"

    def cache_dir(self, fs: FirstStage) -> Path:
        return Path(fs.cache) if fs.cache else self.out / "cache" / fs.key

    def training(self, run_name: str) -> TrainingStatus:
        runs = [r for r in find_runs(self.logdir, run_name) if (r / "checkpoints" / "last.ckpt").exists()]
        if not runs:
            return TrainingStatus(None, 0, None)
        run = runs[-1]
        holder = RunLock(str(run)).holder()
        step = 0 if holder else self.state.global_step(run / "checkpoints" / "last.ckpt")
        return TrainingStatus(run, step, holder)

    def trained(self, run_name: str, budget: Training | None) -> Path | None:
        """The final checkpoint of a finished training under `run_name`, or None."""
        status = self.training(run_name)
        if budget is None or status.run is None or status.holder or status.step < budget.max_steps:
            return None
        return status.checkpoint

    def first_stage_checkpoint(self, fs: FirstStage) -> Path | None:
        """The finished first stage: `checkpoint` when it exists, else the finished run's (copied to
        `checkpoint` when one is named, as the README's workflow does by hand; exported, with its config
        beside it, when that name ends in .safetensors)."""
        if fs.checkpoint and Path(fs.checkpoint).exists():
            return Path(fs.checkpoint)
        ckpt = self.trained(fs.run_name, fs.train)
        if ckpt is not None and fs.checkpoint:
            target = Path(fs.checkpoint)
            if target.suffix == ".safetensors":  # the weights and their config beside them, as the project ships
                return export_weights(ckpt, target)[0]
            target.parent.mkdir(parents=True, exist_ok=True)
            tmp = target.with_name(f".{target.name}.{os.getpid()}.tmp")
            shutil.copyfile(ckpt, tmp)
            os.replace(tmp, target)
            return target
        return ckpt

    def prior_checkpoint(self, prior: Prior) -> Path | None:
        if prior.checkpoint and Path(prior.checkpoint).exists():
            return Path(prior.checkpoint)
        return self.trained(prior.run_name, prior.train)

    def _require(self, ckpt: Path | None, what: str) -> Path:
        if ckpt is None:
            raise RuntimeError(f"{what} is not finished; run its training first")
        return ckpt

    # ---- configs written for fresh trainings ---------------------------------------------------------------
    def _budgeted(self, config: str, overrides: list[str], budget: Training) -> Any:
        cfg = OmegaConf.merge(OmegaConf.load(config), OmegaConf.from_dotlist(list(overrides)))
        cfg.lightning.trainer.max_steps = budget.max_steps
        cfg.lightning.trainer.max_time = None  # the budget is in steps: a resumed run trains what an uninterrupted one does
        return cfg

    def _write_config(self, key: str, cfg: Any) -> Path:
        path = self.out / "configs" / f"{key}.yaml"
        atomic_write(path, OmegaConf.to_yaml(cfg, resolve=True))
        return path

    def prior_config(self, prior: Prior) -> Path:
        """The prior's config on this reproduction's first stage and its latent caches."""
        fs = self.spec.first_stages[prior.first_stage]
        cfg = self._budgeted(prior.config, prior.overrides, prior.train)
        fs_ckpt = self._require(self.first_stage_checkpoint(fs), f"the first stage {fs.key}")
        cfg.model.params.first_stage_config.params.ckpt_path = str(fs_ckpt)
        for split in CACHE_SPLITS if fs.cached else ():
            cfg.data.params[split] = {"target": "ldm.data.cache.LatentCache",
                                      "params": {"root": str(self.cache_dir(fs) / split)}}
        for split, node in prior.data.items():
            cfg.data.params[split] = node
        return self._write_config(prior.key, cfg)

    # ---- steps -------------------------------------------------------------------------------------------
    def train_step(self, key: str, subject: str, run_name: str, budget: Training,
                   make_config: Callable[[], Path], done: Callable[[], bool]) -> Step:
        def status() -> TrainingStatus:
            return self.training(run_name)

        def command() -> list[str]:
            s = status()
            if s.run is not None:  # continue it exactly, to the budget
                return python("main", "-r", s.run, "-t", "--no-test", "--max_steps", budget.max_steps,
                              *self.spec.train_args, "lightning.trainer.max_time=null")
            return python("main", "--base", make_config(), "-t", "--no-test", "-n", run_name, "-l", self.logdir,
                          *self.spec.train_args)

        def estimate() -> float:
            s = status()
            return max(0, budget.max_steps - s.step) * budget.seconds_per_step

        def detail() -> str:
            s = status()
            where = (f"continuing {s.run} after {s.holder}" if s.holder else
                     f"resuming {s.run} at step {s.step}" if s.run else "a new run")
            return f"{budget.max_steps} steps ({where})"

        def units() -> tuple[int, int] | None:
            runs = find_runs(self.logdir, run_name)
            step = logged_step(runs[-1]) if runs else None
            return None if step is None else (step + 1, budget.max_steps)

        return Step(f"train/{key}", subject, "training", estimate, done, command,
                    busy=lambda: status().holder, detail=detail, units=units)

    def recorded_step(self, step_id: str, subject: str, stage: str, estimate_s: float,
                      command: Callable[[], list[str]], inputs: Callable[[], list[Path | None]],
                      outputs: Callable[[], list[Path]], complete: Callable[[], bool] = lambda: True) -> Step:
        """A step judged done by the runner's record of its command and inputs, and its outputs on disk."""
        def current() -> str | None:
            files = inputs()
            if any(f is None or not Path(f).exists() for f in files):
                return None
            return signature(command(), *files)

        def done() -> bool:
            record = self.state.step(step_id)
            if record is None or not all(p.exists() for p in outputs()) or not complete():
                return False
            return record["signature"] == current()

        def finish(seconds: float) -> None:
            self.state.finish(step_id, current() or "", seconds)

        return Step(step_id, subject, stage, lambda: estimate_s, done, command, finish=finish)

    def first_stage_steps(self, fs: FirstStage) -> list[Step]:
        steps = []
        if fs.train is not None:
            def make_config(fs: FirstStage = fs) -> Path:
                return self._write_config(fs.key, self._budgeted(fs.config, fs.overrides, fs.train))

            steps.append(self.train_step(fs.key, fs.label, fs.run_name, fs.train, make_config,
                                         lambda fs=fs: self.first_stage_checkpoint(fs) is not None))
        for split in CACHE_SPLITS if fs.cached else ():
            steps.append(self.cache_step(fs, split))
        return steps

    def cache_step(self, fs: FirstStage, split: str) -> Step:
        out = self.cache_dir(fs) / split

        def done() -> bool:
            from ldm.checkpoint import file_sha256
            from ldm.data.cache_meta import read_meta

            meta = read_meta(out) if out.exists() else None
            ckpt = self.first_stage_checkpoint(fs)
            if not meta or not meta.get("complete") or ckpt is None or meta.get("split") != split:
                return False
            return (meta.get("fingerprint") or {}).get("ckpt_sha256") == file_sha256(ckpt)

        def command() -> list[str]:
            ckpt = self._require(self.first_stage_checkpoint(fs), f"the first stage {fs.key}")
            kind = ["--kind", fs.kind] if fs.kind else []
            return python("cache_latents", "-r", ckpt, "--split", split, "--out", out, "--device",
                          self.spec.cache_device, *kind)

        return Step(f"cache/{fs.key}/{split}", fs.label, f"caching the {split} split",
                    lambda: fs.cache_minutes * 60, done, command)

    def floor_step(self) -> Step:
        fs = next(iter(self.spec.first_stages.values()))
        ev = self.spec.evaluation

        def command() -> list[str]:
            ckpt = self._require(self.first_stage_checkpoint(fs), f"the first stage {fs.key}")
            return python("data_floor", "-r", ckpt, "--split", ev.eval_split, "--reference-split",
                          ev.floor_reference_split, "--seed", ev.seed, "--out", self.floor_json())

        return self.recorded_step("floor", "the data", "its FD floor", 60.0, command,
                                  lambda: [self.first_stage_checkpoint(fs)], lambda: [self.floor_json()])

    def evaluate_args(self, prior: Prior, part: str) -> tuple[list[str], int]:
        """evaluate.py's arguments (after -r) for one part of a prior's evaluation, and its number of rows."""
        ev = self.spec.evaluation
        sampler = [f"{k}={v}" for k, v in prior.sampler.items()]
        if part == "main":
            n, sweep = ev.num_samples, ([f"guidance_scale=1,{prior.guidance_scale}"]
                                        if prior.guidance_scale is not None else [])
            sweep = sweep + [f"{k}={v}" for k, v in prior.sampler.items() if k != "guidance_scale"]
            elbo = (["--elbo-limit", ev.elbo_limit] + (["--elbo-strata", ev.elbo_strata] if ev.elbo_strata else [])
                    if prior.elbo and ev.elbo_limit else [])
            rows = 2 if prior.guidance_scale is not None else 1
        else:
            n = ev.sweep_samples or ev.num_samples
            sweep = [f"{k}={','.join(map(str, v))}" for k, v in prior.sweep.items()] + sampler
            elbo, rows = [], 1
            for v in prior.sweep.values():
                rows *= len(v)
        args = ["-n", n, "--batch-size", ev.batch_size, "--seed", ev.seed, "--eval-split", ev.eval_split,
                "--features", ev.features, *elbo, *(["--bf16"] if native_bf16(ev.bf16) else []), *ev.extra_args,
                "--out", self.eval_json(prior, part)]
        return [str(a) for a in args] + (["--sweep", *sweep] if sweep else []), rows

    def evaluate_step(self, prior: Prior, part: str) -> Step:
        args, rows = self.evaluate_args(prior, part)
        out = self.eval_json(prior, part)

        def command() -> list[str]:
            return python("evaluate", "-r", self._require(self.prior_checkpoint(prior), prior.label), *args)

        def complete() -> bool:
            try:
                return len(json.loads(out.read_text()).get("rows", [])) == rows
            except (OSError, ValueError):
                return False

        stage = "evaluation" if part == "main" else "evaluation across " + ", ".join(prior.sweep)
        minutes = prior.evaluate_minutes * (1 if part == "main" else max(1, rows // 2))
        return self.recorded_step(f"evaluate/{prior.key}/{part}", prior.label, stage, minutes * 60, command,
                                  lambda: [self.prior_checkpoint(prior)], lambda: [out], complete)

    def grid_step(self, prior: Prior) -> Step:
        ev = self.spec.evaluation
        rows = ["--per-class", ev.grid_per_class] if ev.grid_per_class else ["-n", ev.grid_samples]
        options = [f"{k}={v}" for k, v in prior.sampler.items()]

        def command() -> list[str]:
            ckpt = self._require(self.prior_checkpoint(prior), prior.label)
            return python("sample", "-r", ckpt, *rows, "--seed", ev.seed, "--out", self.grid_png(prior), *options)

        return self.recorded_step(f"grid/{prior.key}", prior.label, "sample grid", 30.0, command,
                                  lambda: [self.prior_checkpoint(prior)], lambda: [self.grid_png(prior)])

    def prior_steps(self, prior: Prior) -> list[Step]:
        steps = []
        if prior.train is not None:
            steps.append(self.train_step(prior.key, prior.label, prior.run_name, prior.train,
                                         lambda: self.prior_config(prior),
                                         lambda: self.prior_checkpoint(prior) is not None))
        steps.append(self.evaluate_step(prior, "main"))
        if prior.sweep:
            steps.append(self.evaluate_step(prior, "steps"))
        steps.append(self.grid_step(prior))
        return steps

    def steps(self) -> list[Step]:
        """In order: the first stages and their caches, the data floor, then each prior."""
        steps = [s for fs in self.spec.first_stages.values() for s in self.first_stage_steps(fs)]
        if self.spec.evaluation.floor:
            steps.append(self.floor_step())
        for prior in self.spec.priors.values():
            steps += self.prior_steps(prior)
        return steps

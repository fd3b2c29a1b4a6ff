"""Kill a training run with SIGKILL at random moments, resume it each time, and compare the final weights
with an uninterrupted run of the same number of steps (they should match to ~1e-6 or better).

    python scripts/kill_resume_check.py --base configs/first_stage/fmnist_vq.yaml --steps 60 --kills 10 \
        data.params.train.params.limit=640 lightning.trainer.val_check_interval=10
    python scripts/kill_resume_check.py --base configs/test/first_stage_vq.yaml --steps 24 --kills 3

Both runs train with `--max_steps <steps>` and a checkpoint every `--every` steps; each kill comes a
random moment (up to `--max-delay` seconds) after the checkpoint of a random step, so it can land
anywhere in a step, a validation or a checkpoint write, and resumes start mid-epoch and at epoch ends. Overrides (`key=value`) go to both runs. Prints the largest
weight difference and the tensor it is in, and exits non-zero when it exceeds `--tolerance`.
"""

from __future__ import annotations

import argparse
import glob
import os
import random
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from ldm.checkpoint import read_checkpoint  # noqa: E402
from ldm.cli import run  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--base", required=True, help="training config")
    p.add_argument("--steps", type=int, default=60, help="optimizer steps of both runs")
    p.add_argument("--kills", type=int, default=10, help="SIGKILLs of the interrupted run")
    p.add_argument("--every", type=int, default=2, help="checkpoint every N steps")
    p.add_argument("--max-delay", type=float, default=2.0, help="seconds after a checkpoint before a kill, at most")
    p.add_argument("--seed", type=int, default=0, help="seed of the kill moments")
    p.add_argument("--at", default=None, help="kill after the checkpoints of these steps (e.g. 8,16), not random ones")
    p.add_argument("--tolerance", type=float, default=1e-6)
    p.add_argument("--workdir", default=None, help="where the two runs go (default: a temporary folder)")
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The options, plus `overrides`: the `key.path=value` tokens both runs get."""
    args, rest = build_parser().parse_known_args(argv)
    bad = [r for r in rest if "=" not in r or r.startswith("-")]
    if bad:
        raise SystemExit(f"unrecognised argument(s) {bad}: overrides look like key.path=value")
    args.overrides = rest
    return args


def main_command(args: list[str]) -> list[str]:
    return [sys.executable, str(REPO / "main.py"), *args]


def last_step(logroot: Path) -> int:
    """The step of the run's `last.ckpt`, -1 before there is one (a torn file cannot exist: writes are atomic)."""
    found = glob.glob(str(logroot / "*" / "checkpoints" / "last.ckpt"))
    return int(read_checkpoint(found[0])["global_step"]) if found else -1


def run_folder(logroot: Path) -> Path:
    runs = [p for p in logroot.iterdir() if p.is_dir()]
    if len(runs) != 1:
        raise SystemExit(f"expected one run folder in {logroot}, found {runs}")
    return runs[0]


def train(args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "a") as f:
        return subprocess.Popen(main_command(args), cwd=REPO, stdout=f, stderr=subprocess.STDOUT)


def finish(proc: subprocess.Popen, log: Path) -> None:
    if proc.wait() != 0:
        raise SystemExit(f"training failed with status {proc.returncode}; see {log}")


def killed_run(fresh: list[str], logroot: Path, steps: int, kills: int, every: int, max_delay: float,
               rng: random.Random, log: Path, at: list[int] | None = None) -> tuple[Path, list[int]]:
    """Train to `steps`, killed `kills` times; returns the run folder and the step each resume started at.

    The kills are spread over the run: each comes a random moment after the checkpoint of a randomly
    drawn step (distinct steps, so some kills land across epoch ends and validations)."""
    checkpoints = list(range(every, steps, every))
    targets = sorted(at) if at else sorted(rng.sample(checkpoints, min(kills, len(checkpoints))))
    proc = train(fresh, log)
    resumed_from: list[int] = []
    for target in targets:
        while last_step(logroot) < target:
            if proc.poll() is not None:
                raise SystemExit(f"training exited with {proc.returncode} before it was killed; see {log}")
            time.sleep(0.05)
        time.sleep(rng.uniform(0.0, max_delay))
        if proc.poll() is not None:
            break  # it finished first
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        resumed_from.append(last_step(logroot))
        proc = train(["-r", str(run_folder(logroot)), "-t", "--no-test", "--max_steps", str(steps)], log)
    finish(proc, log)
    return run_folder(logroot), resumed_from


def largest_difference(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[str, float]:
    if a.keys() != b.keys():
        raise SystemExit(f"the runs' weights differ in keys: {sorted(a.keys() ^ b.keys())[:5]}")
    diffs = {k: (a[k].double() - b[k].double()).abs().max().item() if a[k].is_floating_point() and a[k].numel()
             else float(not torch.equal(a[k], b[k])) for k in a}
    key = max(diffs, key=diffs.get)
    return key, diffs[key]


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.steps < 1 or args.kills < 0 or args.every < 1:
        raise ValueError("--steps and --every must be >= 1 and --kills >= 0")
    if not os.path.isfile(args.base):
        raise FileNotFoundError(f"config not found: {args.base}")
    work = Path(args.workdir or tempfile.mkdtemp(prefix="kill_resume_"))
    work.mkdir(parents=True, exist_ok=True)
    common = [*args.overrides, f"lightning.checkpoint_every_n_steps={args.every}", "lightning.trainer.max_time=null"]

    def fresh(logroot: Path) -> list[str]:
        return ["--base", args.base, "-t", "--no-test", "-l", str(logroot), "--max_steps", str(args.steps), *common]

    print(f"uninterrupted run of {args.steps} steps in {work / 'straight'} ...", flush=True)
    finish(train(fresh(work / "straight"), work / "straight.log"), work / "straight.log")
    print(f"run killed up to {args.kills} times in {work / 'killed'} ...", flush=True)
    killed, resumed_from = killed_run(fresh(work / "killed"), work / "killed", args.steps, args.kills, args.every,
                                      args.max_delay, random.Random(args.seed), work / "killed.log",
                                      [int(s) for s in args.at.split(",")] if args.at else None)
    a = read_checkpoint(run_folder(work / "straight") / "checkpoints" / "last.ckpt")
    b = read_checkpoint(killed / "checkpoints" / "last.ckpt")
    key, diff = largest_difference(a["state_dict"], b["state_dict"])
    print(f"kills: {len(resumed_from)} (resumed from steps {resumed_from})")
    print(f"final steps: {a['global_step']} vs {b['global_step']}")
    print(f"max weight difference: {diff:.3g} (in {key})")
    ok = diff <= args.tolerance and a["global_step"] == b["global_step"] == args.steps
    print("exact resume: " + ("yes" if ok else "NO"))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(run(main))

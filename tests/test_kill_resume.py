"""`kill -9` during training, then `-r <logdir>`: the run continues from its last saved step."""

from __future__ import annotations

import glob
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from ldm.checkpoint import read_checkpoint
from tests.test_main import TOY

REPO = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow  # each test starts main.py in fresh processes and trains for seconds


def _start(args, log):
    return subprocess.Popen([sys.executable, "main.py", *args], cwd=REPO, stdout=log, stderr=subprocess.STDOUT)


def _wait_for(predicate, proc, timeout=120.0):
    t0 = time.time()
    while not predicate():
        if proc.poll() is not None:
            raise AssertionError(f"training exited early with {proc.returncode}")
        if time.time() - t0 > timeout:
            raise AssertionError("timed out")
        time.sleep(0.2)


def test_kill_9_then_resume(tmp_path):
    cfg = dict(TOY)
    cfg["model"] = {**TOY["model"], "params": {"step_seconds": 0.05}}
    cfg["lightning"] = {**TOY["lightning"], "trainer": {**TOY["lightning"]["trainer"], "max_steps": 100000}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    logroot = tmp_path / "logs"
    with open(tmp_path / "first.log", "w") as log:
        proc = _start(["--base", str(path), "-t", "-l", str(logroot), "-n", "kill"], log)
        ckpt = lambda: glob.glob(str(logroot / "*" / "checkpoints" / "last.ckpt"))  # noqa: E731
        _wait_for(lambda: bool(ckpt()) and read_checkpoint(ckpt()[0])["global_step"] >= 6, proc)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    saved = read_checkpoint(ckpt()[0])
    step = saved["global_step"]
    assert step % 2 == 0  # a periodic checkpoint (every 2 steps, or at validation every 4) survived the kill
    logdir = os.path.dirname(os.path.dirname(ckpt()[0]))
    with open(tmp_path / "second.log", "w") as log:
        proc = _start(["-r", logdir, "-t", "--no-test", "--max_steps", str(step + 4)], log)
        assert proc.wait(timeout=180) == 0
    text = (tmp_path / "second.log").read_text()
    assert "Restored all states from the checkpoint" in text
    final = read_checkpoint(ckpt()[0])
    assert final["global_step"] == step + 4
    assert [int(s["step"]) for s in final["optimizer_states"][0]["state"].values()] == [step + 4] * 2


def _signal_mid_run(tmp_path, signum) -> tuple[int, str, dict]:
    """Train the toy until step 4's grid exists, send `signum`: (exit status, log, last.ckpt)."""
    cfg = dict(TOY)
    cfg["model"] = {**TOY["model"], "params": {"step_seconds": 0.05}}
    cfg["lightning"] = {**TOY["lightning"], "checkpoint_every_n_steps": 100000,
                        "trainer": {**TOY["lightning"]["trainer"], "max_steps": 100000}}
    path = tmp_path / "toy.yaml"
    path.write_text(yaml.safe_dump(cfg))
    logroot = tmp_path / "logs"
    with open(tmp_path / "run.log", "w") as log:
        proc = _start(["--base", str(path), "-t", "--no-test", "-l", str(logroot)], log)
        _wait_for(lambda: bool(glob.glob(str(logroot / "*" / "images" / "train" / "*gs-000004*"))), proc)
        proc.send_signal(signum)
        status = proc.wait(timeout=60)
    saved = read_checkpoint(glob.glob(str(logroot / "*" / "checkpoints" / "last.ckpt"))[0])
    return status, (tmp_path / "run.log").read_text(), saved


def test_sigusr1_saves_and_stops(tmp_path):
    status, text, saved = _signal_mid_run(tmp_path, signal.SIGUSR1)
    assert status == 0
    assert "Received signal" in text
    # the signal's save is the final last.ckpt (not the one validation wrote at step 4): same step
    said = re.search(r"Saved \S+last\.ckpt at step (\d+) \(signal\)", text)
    assert said, text[-2000:]
    assert saved["global_step"] == int(said.group(1)) >= 4


def test_sigterm_saves_then_exits_non_zero(tmp_path):
    """A scheduler's SIGTERM: the state is saved and the status says the run did not finish (143)."""
    status, text, saved = _signal_mid_run(tmp_path, signal.SIGTERM)
    assert status == 128 + signal.SIGTERM
    said = re.search(r"Saved \S+last\.ckpt at step (\d+) \(signal\)", text)
    assert said and "Stopped by SIGTERM" in text, text[-2000:]
    assert saved["global_step"] == int(said.group(1)) >= 4


@pytest.mark.parametrize("config", ["configs/test/first_stage_vq.yaml", "configs/test/absorbing.yaml"])
def test_killed_and_resumed_run_equals_the_uninterrupted_one(tmp_path, config, capsys):
    """SIGKILL a random moment after the checkpoints of steps 6 (a validation follows), 8 (an epoch's
    last batch: 8 batches per epoch) and 14 (mid-epoch), resumed each time: the final weights equal
    those of a run never interrupted."""
    from tests.test_scripts import load

    assert load("kill_resume_check").main(["--base", config, "--steps", "20", "--at", "6,8,14", "--every", "2",
                                           "--max-delay", "0.5", "--seed", "1", "--workdir", str(tmp_path),
                                           "lightning.trainer.val_check_interval=6"]) == 0
    out = capsys.readouterr().out
    assert "kills: 3" in out and "max weight difference: 0 " in out, out

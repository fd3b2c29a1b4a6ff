"""Run folders: claimed atomically, locked against a second process, tidied; logs and data order resume."""

from __future__ import annotations

import csv
import os
import signal
import subprocess
import sys

import pytest
import torch

from ldm.data.datamodule import GlobalBatchSampler, ResumableLoader
from ldm.loggers import ContinuingCSVLogger
from ldm.run_folder import RunLock, claim_new_folder, remove_stale_temporaries


def test_two_runs_with_one_name_get_two_folders(tmp_path):
    first = claim_new_folder(str(tmp_path / "logs" / "2026-01-01T00-00-00_x"))
    second = claim_new_folder(str(tmp_path / "logs" / "2026-01-01T00-00-00_x"))
    assert first != second and os.path.isdir(first) and os.path.isdir(second)
    assert second == first + "-1"


def test_a_second_process_is_refused_and_a_dead_one_does_not_block(tmp_path):
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from ldm.run_folder import RunLock; "
         "lock = RunLock(sys.argv[1]).acquire(); print('locked', flush=True); time.sleep(60)", str(tmp_path)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(ValueError) as e:
            RunLock(str(tmp_path)).acquire()
        assert str(e.value).startswith(f"the run folder {tmp_path} is in use by process {holder.pid} on ")
        assert str(e.value).endswith("wait for it to finish or stop it before resuming this run")
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    lock = RunLock(str(tmp_path)).acquire()  # the kernel dropped the dead holder's lock
    assert f"process {os.getpid()} " in open(tmp_path / ".lock").read()
    lock.release()


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    (tmp_path / ".last.ckpt.tmp-123").write_bytes(b"torn")
    (tmp_path / "last.ckpt").write_bytes(b"kept")
    assert remove_stale_temporaries(str(tmp_path)) == [str(tmp_path / ".last.ckpt.tmp-123")]
    assert sorted(os.listdir(tmp_path)) == ["last.ckpt"]


def _steps(path) -> list[int]:
    with open(path, newline="") as f:
        return [int(r["step"]) for r in csv.DictReader(f)]


def test_a_resumed_run_continues_the_csv(tmp_path):
    first = ContinuingCSVLogger(tmp_path, name="csv", version="")
    for step in range(10):
        first.log_metrics({"loss": float(step)}, step=step)
    first.save()
    # killed after step 9, resumed from the checkpoint of step 6: steps 6.. are logged again
    second = ContinuingCSVLogger(tmp_path, name="csv", version="", resume_step=6)
    for step in range(6, 12):
        second.log_metrics({"loss": float(step), "new_metric": 1.0}, step=step)
    second.save()
    assert _steps(tmp_path / "csv" / "metrics.csv") == list(range(12))


def _loader(epoch: int) -> ResumableLoader:
    data = torch.arange(40).float()
    sampler = GlobalBatchSampler(data, batch_size=4, shuffle=True, seed=3)
    sampler.set_epoch(epoch)
    return ResumableLoader(data, batch_size=4, sampler=sampler)


def test_the_loader_resumes_mid_epoch_where_it_stopped():
    straight = [b.tolist() for b in _loader(2)]
    interrupted = _loader(2)
    batches = iter(interrupted)
    seen = [next(batches).tolist() for _ in range(3)]
    state = interrupted.state_dict()
    assert state == {"epoch": 2, "batches": 3}
    resumed = _loader(0)  # a fresh loader, as a restarted process builds it
    resumed.load_state_dict(state)
    resumed.sampler.set_epoch(2)  # Lightning sets the resumed epoch before the first batch
    assert seen + [b.tolist() for b in resumed] == straight
    assert [b.tolist() for b in resumed] == straight  # the next iteration is a whole epoch again


def test_a_loader_state_of_another_epoch_does_not_skip():
    """A checkpoint of an epoch's last batch: Lightning starts the next epoch, which is whole."""
    resumed = _loader(0)
    batches = iter(resumed)  # Lightning may create the iterator before it sets the epoch
    resumed.load_state_dict({"epoch": 1, "batches": 10})
    resumed.sampler.set_epoch(2)
    assert len(list(batches)) == 10 and resumed.state_dict() == {"epoch": 2, "batches": 10}


def test_every_sampler_epoch_is_a_permutation():
    sampler = GlobalBatchSampler(torch.zeros(10), batch_size=2, shuffle=True, seed=0)
    sampler.start_batch = 2
    assert len(list(sampler)) == 6 and sampler.start_batch == 0
    assert sorted(sampler) == list(range(10))

"""The runner's progress over a training: the step read from the run's metrics log, the time left at the
measured rate."""

from __future__ import annotations

import io

from ldm.repro.runner import Progress, UnitRate
from ldm.repro.steps import Step, logged_step


def test_logged_step_reads_the_newest_row(tmp_path):
    run = tmp_path / "2026-01-01T00-00-00_x"
    assert logged_step(run) is None  # no log yet
    (run / "csv").mkdir(parents=True)
    path = run / "csv" / "metrics.csv"
    path.write_text("epoch,lr,step,train/loss\n")
    assert logged_step(run) is None  # a header alone
    rows = "".join(f"0,0.001,{s},{1 / (s + 1):.6f}\n" for s in range(49, 5000, 50))
    path.write_text("epoch,lr,step,train/loss\n" + rows)
    assert logged_step(run) == 4999  # past the 4 KiB tail it reads
    with open(path, "a") as f:
        f.write("0,0.001,50")  # a row being written
    assert logged_step(run) == 4999  # only whole rows count


def test_time_left_follows_the_measured_rate(monkeypatch):
    clock = [100.0]
    monkeypatch.setattr("ldm.repro.runner.time.monotonic", lambda: clock[0])
    progress = [None]
    rate = UnitRate(lambda: progress[0])
    assert rate.left() is None and rate.note() == ""  # nothing logged: the runner keeps its estimate
    progress[0] = (100, 2600)
    assert rate.left() is None and rate.note() == "step 100 of 2600"  # one reading: no rate yet
    clock[0] += 60.0
    progress[0] = (140, 2600)  # 40 steps in 60 s
    assert rate.left() == (2600 - 140) * 1.5
    assert rate.note() == "step 140 of 2600, 1.50 s each"


def test_the_status_line_names_the_step_and_the_training_step(monkeypatch):
    clock = [0.0]
    monkeypatch.setattr("ldm.repro.runner.time.monotonic", lambda: clock[0])
    out = io.StringIO()
    progress = Progress(total=8, stream=out, every=60.0, start=0.0, _last=0.0)
    step = Step("train/vq", "VQ first stage", "training", lambda: 0.0, lambda: False, lambda: [])
    clock[0] = 30.0
    assert not progress.due()  # not a terminal: a line a minute
    clock[0] = 61.0
    assert progress.due()
    progress.status(1, step, began=1.0, left_s=3690.0, note="step 140 of 2600, 1.50 s each")
    assert out.getvalue() == ("[1/8] VQ first stage · training · 01:00 in this stage · 01:01 elapsed · ~1:01:30 left"
                              " · step 140 of 2600, 1.50 s each\n")

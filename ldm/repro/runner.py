"""Run a reproduction's unfinished steps, one subprocess each, with a progress display over the whole run.

Each step is the project's own program (`main.py`, `cache_latents.py`, `evaluate.py`, `sample.py`,
`data_floor.py`) in its own process group, its output in `<out>/logs/<step>.log`. A signal to the runner
(Ctrl-C, SIGTERM) is passed to the step as SIGTERM, on which `main.py` saves `last.ckpt` and stops; a runner
killed outright takes its step with it (the kernel sends it SIGTERM). Either way the disk holds what a user
who stopped that program would have, and the next run picks up from there.
"""

from __future__ import annotations

import ctypes
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TextIO

from ldm.repro.steps import Plan, Step

PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:
    """In the child, before exec: SIGTERM when the runner dies (Linux), so a killed runner stops its step too."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):  # not Linux: the step outlives a runner killed with SIGKILL
        pass


def clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rest = divmod(seconds, 3600)
    return f"{h}:{rest // 60:02d}:{rest % 60:02d}" if h else f"{rest // 60:02d}:{rest % 60:02d}"


class Interrupted(Exception):
    """The runner was asked to stop (the signal number is `signum`)."""

    def __init__(self, signum: int):
        self.signum = signum
        super().__init__(f"stopped by signal {signum}")


@dataclass
class Progress:
    """One line per event, and while a step runs a status line: the step k of n, which prior, which stage,
    the time in this stage and the estimate of what is left (rewritten in place on a terminal, repeated every
    `every` seconds otherwise)."""

    total: int
    stream: TextIO = sys.stdout
    every: float = 60.0
    start: float = field(default_factory=time.monotonic)
    _last: float = field(default_factory=time.monotonic)

    @property
    def tty(self) -> bool:
        return hasattr(self.stream, "isatty") and self.stream.isatty()

    def line(self, text: str) -> None:
        if self.tty:
            self.stream.write("\r\x1b[2K")
        self.stream.write(text + "\n")
        self.stream.flush()

    def due(self) -> bool:
        """Whether `status` would print now (always on a terminal)."""
        return self.tty or time.monotonic() - self._last >= self.every

    def status(self, index: int, step: Step, began: float, left_s: float, note: str = "") -> None:
        now = time.monotonic()
        in_stage = now - began
        text = (f"[{index}/{self.total}] {step.subject} · {step.stage} · {clock(in_stage)} in this stage · "
                f"{clock(now - self.start)} elapsed · ~{clock(left_s)} left" + (f" · {note}" if note else ""))
        if self.tty:
            self.stream.write("\r\x1b[2K" + text[:200])
            self.stream.flush()
        elif now - self._last >= self.every:
            self.line(text)
        else:
            return
        self._last = now


class UnitRate:
    """A running step's own progress (training steps from its metrics log): the time left at the rate
    measured since the runner first saw it move, and a note such as "step 412 of 2600, 1.43 s each"."""

    def __init__(self, units: Callable[[], tuple[int, int] | None]):
        self.units = units
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int, int] | None = None

    def _read(self) -> None:
        now = self.units()
        if now is None:
            return
        done, total = now
        if self.first is None:
            self.first = (time.monotonic(), done)
        self.last = (time.monotonic(), done, total)

    def seconds_per_unit(self) -> float | None:
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return None
        return (self.last[0] - self.first[0]) / (self.last[1] - self.first[1])

    def left(self) -> float | None:
        self._read()
        per = self.seconds_per_unit()
        return None if per is None else max(0, self.last[2] - self.last[1]) * per

    def note(self) -> str:
        if self.last is None:
            return ""
        per = self.seconds_per_unit()
        return f"step {self.last[1]} of {self.last[2]}" + (f", {per:.2f} s each" if per is not None else "")


@dataclass
class Runner:
    plan: Plan
    progress_every: float = 60.0
    poll_s: float = 1.0
    stream: TextIO = sys.stdout
    on_start: Callable[[Step, subprocess.Popen], None] | None = None  # a hook for tests
    stop_signal: int | None = None
    child: subprocess.Popen | None = None
    ran: list[str] = field(default_factory=list)

    def _handle(self, signum: int, frame: object) -> None:
        self.stop_signal = signum
        if self.child is not None and self.child.poll() is None:
            try:
                os.killpg(self.child.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def run(self) -> list[str]:
        """Run every unfinished step in order; the ids of the steps run. Raises `Interrupted` after a signal
        (the step was stopped and has saved what it could) and RuntimeError when a step fails."""
        steps = self.plan.steps()
        progress = Progress(len(steps), self.stream, self.progress_every)
        previous = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        try:
            done = [step.done() for step in steps]
            progress.line(f"{len(steps)} steps, {sum(done)} already done; estimated ~"
                          f"{clock(sum(s.estimate_s() for s, d in zip(steps, done) if not d))} of work left")
            for i, step in enumerate(steps, 1):
                if done[i - 1] or step.done():
                    progress.line(f"[{i}/{len(steps)}] {step.subject} · {step.stage}: done")
                    continue
                left_after = sum(s.estimate_s() for s, d in zip(steps[i:], done[i:]) if not d)
                self._wait_until_free(i, step, progress, left_after)
                self._run_step(i, step, progress, left_after)
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
        progress.line(f"finished in {clock(time.monotonic() - progress.start)}: ran {len(self.ran)} of "
                      f"{len(steps)} steps")
        return self.ran

    def _wait_until_free(self, index: int, step: Step, progress: Progress, left_after: float) -> None:
        """A training another process is running now: wait for it to end, then continue it to the budget."""
        began = time.monotonic()
        while (holder := step.busy()) is not None:
            if self.stop_signal is not None:
                raise Interrupted(self.stop_signal)
            progress.status(index, step, began, step.estimate_s() + left_after, f"waiting for {holder}")
            time.sleep(self.poll_s * 5)

    def _run_step(self, index: int, step: Step, progress: Progress, left_after: float) -> None:
        if self.stop_signal is not None:
            raise Interrupted(self.stop_signal)
        command = step.command()
        estimate = step.estimate_s()
        detail = step.detail()
        progress.line(f"[{index}/{progress.total}] {step.subject} · {step.stage}" + (f": {detail}" if detail else ""))
        log_path = self.plan.out / "logs" / step.log_name
        log_path.parent.mkdir(parents=True, exist_ok=True)
        began = time.monotonic()
        with open(log_path, "a") as log:
            log.write(f"\n$ {' '.join(command)}\n")
            log.flush()
            env = {**os.environ, "PYTHONUNBUFFERED": "1"}
            self.child = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env,
                                          start_new_session=True, preexec_fn=_die_with_parent)
            if self.on_start is not None:
                self.on_start(step, self.child)
            if self.stop_signal is not None:  # a signal that came while the step was being started
                self._handle(self.stop_signal, None)
            rate = UnitRate(step.units)
            while (code := self.child.poll()) is None:
                if progress.due():
                    left, note = rate.left(), rate.note()
                    if left is None:
                        left = max(0.0, estimate - (time.monotonic() - began))
                    progress.status(index, step, began, left + left_after, note)
                time.sleep(self.poll_s)
        self.child = None
        seconds = time.monotonic() - began
        if self.stop_signal is not None:
            progress.line(f"[{index}/{progress.total}] {step.subject} · {step.stage}: stopped after "
                          f"{clock(seconds)} (exit status {code}); run again to continue")
            raise Interrupted(self.stop_signal)
        if code != 0:
            tail = log_path.read_text().splitlines()[-15:]
            raise RuntimeError(f"{step.id} failed (exit status {code}); the end of {log_path}:\n" + "\n".join(tail))
        step.finish(seconds)
        self.ran.append(step.id)
        progress.line(f"[{index}/{progress.total}] {step.subject} · {step.stage}: done in {clock(seconds)}")

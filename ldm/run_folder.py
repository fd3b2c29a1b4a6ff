"""A run folder belongs to one process: claimed atomically, locked while training, tidied at start."""

from __future__ import annotations

import fcntl
import glob
import os
import socket
from typing import IO

LOCK_NAME = ".lock"
# Lightning's DDP launcher starts ranks > 0 by running the entrypoint again: they take rank 0's run
# folder from the environment they inherit instead of claiming one of their own.
RUN_DIR_ENV = "LDM_RUN_DIR"


def is_launched_rank() -> bool:
    """This process is a rank > 0 that Lightning started (it shares rank 0's run folder)."""
    return int(os.environ.get("LOCAL_RANK", "0") or 0) > 0 or int(os.environ.get("NODE_RANK", "0") or 0) > 0


def claim_new_folder(logdir: str) -> str:
    """Create `logdir`, or `logdir-1`, `logdir-2`, ... when it exists: `mkdir` is atomic, so two runs
    started in the same second under the same name get two folders."""
    os.makedirs(os.path.dirname(logdir) or ".", exist_ok=True)
    candidate, n = logdir, 0
    while True:
        try:
            os.mkdir(candidate)
            return candidate
        except FileExistsError:
            n += 1
            candidate = f"{logdir}-{n}"


class RunLock:
    """An exclusive `flock` on `<run folder>/.lock`, held for the life of the process (the kernel drops it
    when the process dies, even by SIGKILL, so a stale lock never blocks a resume)."""

    def __init__(self, logdir: str):
        self.path = os.path.join(logdir, LOCK_NAME)
        self._file: IO[str] | None = None

    def acquire(self) -> RunLock:
        f = open(self.path, "a+")
        try:
            fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            f.seek(0)
            holder = f.read().strip() or "another process"
            f.close()
            raise ValueError(f"the run folder {os.path.dirname(self.path)} is in use by {holder}; wait for it "
                             "to finish or stop it before resuming this run") from None
        f.seek(0)
        f.truncate()
        f.write(f"process {os.getpid()} on {socket.gethostname()}\n")
        f.flush()
        self._file = f
        return self

    def holder(self) -> str | None:
        """Who holds the lock now ("process <pid> on <host>"), or None when no process does; the lock
        file is only read and probed, never rewritten."""
        if not os.path.exists(self.path):
            return None
        with open(self.path) as f:
            try:
                fcntl.flock(f.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                return f.read().strip() or "another process"
            fcntl.flock(f.fileno(), fcntl.LOCK_UN)
        return None

    def release(self) -> None:
        if self._file is not None:
            fcntl.flock(self._file.fileno(), fcntl.LOCK_UN)
            self._file.close()
            self._file = None


def remove_stale_temporaries(ckptdir: str) -> list[str]:
    """Temporary checkpoint files (`.<name>.tmp-<pid>`) left by a process killed mid-write. Only called
    with the run's lock held, so no live process is writing them."""
    stale = sorted(glob.glob(os.path.join(ckptdir, ".*.tmp-*")))
    for path in stale:
        os.remove(path)
    return stale

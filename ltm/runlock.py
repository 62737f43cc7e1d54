"""One writer per run: a kernel lock on <runs>/locks/<key>.lock, held by the process that trains
or evaluates the run, from before it decides to skip, resume or start until it is done.

The lock is `fcntl.flock` on an open file, so the kernel releases it when the holder dies, however
it dies: a lock that is held always belongs to a live process, and no pid file can go stale or
name a reused pid. The file holds the holder's pid, host and purpose, for messages and for the
launcher to signal it; the file itself stays (deleting a lock file races with its next holder).
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from pathlib import Path


STUDY_DRIVER_ENV = "LTM_STUDY_DRIVER"
"""Set in a study's workers to the driver that started them (`studies.interrupt.driver_id`) and
recorded in the locks they take: a driver waits for and signals only its own workers."""


class RunBusy(RuntimeError):
    """Another live process holds the run; the message names it."""


def lock_path(runs_dir: str | Path, key: str) -> Path:
    return Path(runs_dir) / "locks" / f"{key}.lock"


class RunLock:
    """The held lock of one run key; release() (or leaving the `with`) lets the next writer in."""

    def __init__(self, runs_dir: str | Path, key: str, purpose: str) -> None:
        self.path = lock_path(runs_dir, key)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)  # not inherited by children
        try:
            fcntl.flock(self._fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(self._fd)
            self._fd = None
            who = holder(runs_dir, key) or {}
            raise RunBusy(f"run {key} is already being {who.get('purpose', 'run')} by process {who.get('pid', '?')} "
                          f"on {who.get('host', '?')} (since {who.get('since', '?')}; lock {self.path}); wait for it "
                          "to finish, or stop it (it checkpoints on SIGTERM) and start again") from None
        info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
                "since": time.strftime("%Y-%m-%d %H:%M:%S"), "driver": os.environ.get(STUDY_DRIVER_ENV)}
        os.ftruncate(self._fd, 0)
        os.pwrite(self._fd, json.dumps(info).encode(), 0)

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the only descriptor releases the flock
            self._fd = None

    def __enter__(self) -> "RunLock":
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def holder(runs_dir: str | Path, key: str) -> dict | None:
    """The live holder of the run's lock ({pid, host, purpose, since, driver}), or None when nobody holds it."""
    path = lock_path(runs_dir, key)
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:  # held exclusively: its writer is alive
            try:
                return json.loads(os.pread(fd, 4096, 0) or b"{}")
            except ValueError:  # the holder is between taking the lock and writing its name
                return {}
        return None
    finally:
        os.close(fd)

"""One writer per run: a kernel lock on <runs>/locks/<key>.lock, held by the process that trains
or evaluates the run, from before it decides to skip, resume or start until it is done. And a bounded,
stoppable wait for such a lock (`wait_for_lock`: the tracking store's), saying who holds it.

The lock is `fcntl.flock` on an open file, so the kernel releases it when the holder dies, however
it dies: a lock that is held always belongs to a live process, and no pid file can go stale or
name a reused pid. The file holds the holder's pid, host and purpose, for messages and for the
launcher to signal it; the file itself stays (deleting a lock file races with its next holder).
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path

from ltm.signals import waiting_for

log = logging.getLogger(__name__)


STUDY_DRIVER_ENV = "LTM_STUDY_DRIVER"
"""Set in a study's workers to the driver that started them (`studies.interrupt.driver_id`) and
recorded in the locks they take: a driver waits for and signals only its own workers."""


class RunBusy(RuntimeError):
    """Another live process holds the run; the message names it."""


class LockTimeout(RuntimeError):
    """A lock stayed held for longer than the wait allowed; the message names its holder and what to do."""


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
        _sign(self._fd, purpose, driver=os.environ.get(STUDY_DRIVER_ENV))

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
            return _read_holder(fd)
        return None
    finally:
        os.close(fd)


def _sign(fd: int, purpose: str, **extra) -> None:
    """Write this process's name into the lock file it has just locked, for messages and `holder`."""
    info = {"pid": os.getpid(), "host": socket.gethostname(), "purpose": purpose,
            "since": time.strftime("%Y-%m-%d %H:%M:%S"), **extra}
    os.ftruncate(fd, 0)
    os.pwrite(fd, json.dumps(info).encode(), 0)


def describe_process(who: dict) -> str:
    """A lock holder ({pid, host, ...}) for a message: its pid, its command line when it runs on this host,
    and how to resume it when it is stopped (SIGSTOP, Ctrl-Z); "an unnamed process" when it wrote no name."""
    import psutil

    pid, host = who.get("pid"), who.get("host")
    if not pid:
        return "an unnamed process"
    if host and host != socket.gethostname():
        return f"process {pid} on {host}"
    try:
        proc = psutil.Process(int(pid))
        command = " ".join(" ".join(proc.cmdline()).split())  # one line, even for `python -c "..."`
        text = f"process {pid} [{command[:200]}]"
        if proc.status() == psutil.STATUS_STOPPED:
            text += f", which is stopped (SIGSTOP or Ctrl-Z; `kill -CONT {pid}` resumes it)"
        return text
    except (psutil.Error, OSError, ValueError):
        return f"process {pid}"


def wait_for_lock(fd: int, path: Path, what: str, purpose: str, timeout: float) -> None:
    """Take the exclusive lock on `fd` (the open lock file `path`) and sign it, waiting at most `timeout` s.

    A wait longer than a second is logged with the holder (`describe_process`). A signal ends the wait
    where the process's `ltm.signals.Interrupt` is stoppable: its Stopped names the lock and the holder.
    Raises LockTimeout naming the holder when it is still held after `timeout` s.
    """
    started, told = time.monotonic(), False
    if not _try_lock(fd):
        held_by = describe_process(_read_holder(fd))
        with waiting_for(f"{what} {path}, held by {held_by}"):
            while not _try_lock(fd):
                waited = time.monotonic() - started
                if waited >= timeout:
                    raise LockTimeout(f"gave up waiting for {what} {path} after {timeout:.0f} s: it is held by "
                                      f"{describe_process(_read_holder(fd))}; let that process finish, or end it, "
                                      "and start again")
                if not told and waited >= 1.0:  # a lock held for less is a neighbour's routine work: no message
                    log.info("waiting for %s %s, held by %s (at most %.0f s) ...", what, path, held_by, timeout)
                    told = True
                time.sleep(0.1)
    _sign(fd, purpose)


def _try_lock(fd: int) -> bool:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False


def _read_holder(fd: int) -> dict:
    try:
        return json.loads(os.pread(fd, 4096, 0) or b"{}")
    except ValueError:  # the holder is between taking the lock and writing its name
        return {}

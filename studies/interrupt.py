"""Stopping a study: the driver's SIGTERM (or Ctrl-C) as one object handed to the backend, workers
of this host stopped through their run locks, and children that do not outlive their starter."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import time
from pathlib import Path
from typing import Callable


class Interruption:
    """Whether the driver was asked to stop, and what the running backend does about it at once.

    SIGTERM sets `requested` and calls `on_request` (set by the backend: Ray checkpoints its trials
    and breaks out of Tune; SLURM's poll loop sees the flag and cancels its array).
    """

    def __init__(self) -> None:
        self.requested = False
        self.on_request: Callable[[], None] | None = None

    def handle(self, signum=None, frame=None) -> None:
        self.requested = True
        if self.on_request is not None:
            self.on_request()

    @contextlib.contextmanager
    def on_sigterm(self):
        """SIGTERM calls `handle` inside the block."""
        previous = signal.signal(signal.SIGTERM, self.handle)
        try:
            yield self
        finally:
            signal.signal(signal.SIGTERM, previous)


def die_with_parent() -> None:
    """In a child (preexec_fn): receive SIGTERM when the thread that started it dies, so a worker
    checkpoints instead of running on as an orphan. Linux ties PR_SET_PDEATHSIG to the spawning *thread*."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def _held_here(runs_dir: Path, key: str) -> dict | None:
    """The live process of this host that holds the point's run lock (`ltm.runlock`), if any."""
    from ltm.runlock import holder

    who = holder(runs_dir, key)
    return who if who is not None and who.get("host") == socket.gethostname() else None


def wait_for_stragglers(runs_dir: Path, keys, timeout: float = 90.0) -> None:
    """Wait (bounded) until workers of an earlier start on this host have checkpointed and exited."""
    deadline = time.time() + timeout
    busy = [k for k in keys if _held_here(runs_dir, k) is not None]
    if busy:
        print(f"waiting for {len(busy)} worker(s) of an earlier start to checkpoint and exit ...")
    while busy and time.time() < deadline:
        time.sleep(0.5)
        busy = [k for k in busy if _held_here(runs_dir, k) is not None]


def stop_local_workers(runs_dir: Path, keys, timeout: float = 90.0) -> None:
    """SIGTERM the workers of this host (they checkpoint and mark their runs KILLED) and wait for them.

    Only a process that holds a run lock now is signalled: a held lock belongs to a live process,
    so a recorded pid is never a stale one that the system gave to something else.
    """
    for key in keys:
        who = _held_here(runs_dir, key)
        if who and who.get("pid"):
            try:
                os.kill(int(who["pid"]), signal.SIGTERM)
            except OSError:
                pass
    wait_for_stragglers(runs_dir, keys, timeout)

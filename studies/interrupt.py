"""Stopping a study: the driver's SIGTERM (or Ctrl-C) as one object handed to the backend, workers
of this host stopped through their run locks, and children that do not outlive their starter."""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Callable

from ltm.signals import Interrupt, Stopped, waiting_for

log = logging.getLogger(__name__)


class Interruption(Interrupt):
    """The study driver's `ltm.signals.Interrupt`: whether it was asked to stop, and what it does at once.

    Entered from the driver's first line. SIGTERM (and Ctrl-C, SIGINT; SIGUSR2) during startup raise
    Stopped at once (planning, waiting, `ray.init`: nothing is launched past that point). Once a
    backend has work running it calls `running(on_request)`: then a signal calls `on_request` (Ray
    checkpoints its trials and breaks out of Tune) or, with None, only sets `signal` (SLURM's poll
    loop sees it and cancels its array). Once the backend is done, `detach()`: a signal is only
    recorded while the driver writes the summary and ends the parent run.
    """

    __slots__ = ()

    def __enter__(self) -> Interruption:
        super().__enter__()
        self.set_raising(True)  # startup: stoppable until `running`
        return self

    @property
    def requested(self) -> bool:
        return self.signal is not None

    def request(self) -> None:
        """Stop as for Ctrl-C (for a KeyboardInterrupt that a backend caught before this handler saw it)."""
        self.signal = self.signal or signal.SIGINT

    @contextlib.contextmanager
    def deferred(self):
        """A startup step that must not be cut in half (creating the parent run): a signal inside it
        raises Stopped when it is done."""
        outer = self.set_raising(False)
        try:
            yield
        finally:
            self.set_raising(outer)
        if outer and self.requested:
            raise Stopped(self.name)

    def running(self, on_request: Callable[[], None] | None = None) -> None:
        """Work is launched from here on: signals stop it gracefully (and Ctrl-C is the backend's again).
        Raises Stopped for a signal that came before."""
        if self.requested:
            raise Stopped(self.name)
        self.set_raising(False)
        self.on_signal = on_request
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, signal.default_int_handler)

    def detach(self) -> None:
        """The backend is done (or gone): from here a signal (Ctrl-C too) is only recorded, never handed
        to the backend's `on_request` nor raised, so the summary is written and the parent run ended."""
        self.set_raising(False)
        self.on_signal = None
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGINT, self.handle)


def die_with_parent() -> None:
    """In a child (preexec_fn): receive SIGTERM when the thread that started it dies, so a worker
    checkpoints instead of running on as an orphan. Linux ties PR_SET_PDEATHSIG to the spawning *thread*."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


def driver_id(study_key: str) -> str:
    """This driver process's identity, which every worker it starts records in the run locks it takes
    (`ltm.runlock.STUDY_DRIVER_ENV`): "<study key>:<host>:<pid>"."""
    return f"{study_key}:{socket.gethostname()}:{os.getpid()}"


def _held_here(runs_dir: Path, key: str) -> dict | None:
    """The live process of this host that holds the point's run lock (`ltm.runlock`), if any."""
    from ltm.runlock import holder

    who = holder(runs_dir, key)
    return who if who is not None and who.get("host") == socket.gethostname() else None


def _of_study(who: dict | None, study_key: str) -> bool:
    return who is not None and str(who.get("driver") or "").startswith(f"{study_key}:")


def wait_for_stragglers(runs_dir: Path, keys, study_key: str, timeout: float = 90.0) -> None:
    """Wait (bounded) until workers that a start of this study left on this host have checkpointed and
    exited, naming them. A point held by any other process (a user's own `python -m ltm.train`) is not
    waited for: it is reported BUSY. A signal ends the wait where the driver is stoppable (Stopped names it)."""
    from ltm.runlock import describe_process

    deadline = time.time() + timeout
    busy = {k: who for k in keys if _of_study(who := _held_here(runs_dir, k), study_key)}
    if not busy:
        return
    held_by = "; ".join(describe_process(who) for who in busy.values())
    log.info("waiting for %d worker(s) of an earlier start to checkpoint and exit (at most %.0f s): %s ...",
             len(busy), timeout, held_by)
    with waiting_for(f"{len(busy)} worker(s) of an earlier start to exit ({held_by})"):
        while busy and time.time() < deadline:
            time.sleep(0.5)
            busy = {k: who for k in busy if _of_study(who := _held_here(runs_dir, k), study_key)}
    if busy:
        log.warning("%d worker(s) of an earlier start still run after %.0f s (%s); their points are reported BUSY",
                    len(busy), timeout, "; ".join(describe_process(who) for who in busy.values()))


def stop_local_workers(runs_dir: Path, keys, driver: str, timeout: float = 90.0) -> None:
    """SIGTERM the workers of this host that this driver started (they checkpoint and mark their runs
    KILLED) and wait for them; a process someone else started is never signalled.

    Only a process that holds a run lock now is signalled: a held lock belongs to a live process,
    so a recorded pid is never a stale one that the system gave to something else.
    """
    mine = []
    for key in keys:
        who = _held_here(runs_dir, key)
        if who and who.get("pid") and who.get("driver") == driver:
            mine.append(key)
            try:
                os.kill(int(who["pid"]), signal.SIGTERM)
            except OSError:
                pass
    deadline = time.time() + timeout
    while mine and time.time() < deadline:
        time.sleep(0.5)
        mine = [k for k in mine if (_held_here(runs_dir, k) or {}).get("driver") == driver]

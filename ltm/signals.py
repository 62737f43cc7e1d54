"""Stopping on SIGTERM, SIGUSR2 and SIGINT (Ctrl-C): SLURM's timeout and preemption signals, `kill`,
a study driver stopping its workers. One mechanism for training, evaluations and a study's driver
(`studies.interrupt.Interruption`)."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Callable


class Stopped(Exception):
    """A signal arrived while the run was set up or evaluated (an evaluation can outlast SLURM's signal
    delay): abandon that work."""


class Interrupt:
    """While installed (`with Interrupt() as interrupt:`), SIGTERM / SIGUSR2 / SIGINT set `signal`.

    Outside `stoppable()` that is all (the training loop checks it after each update, checkpoints and
    exits; creating an MLflow run is never cut in half). Inside `stoppable()` (setting a run up, an
    evaluation) a signal raises Stopped at once; outside, `on_signal` (when set) is called instead.
    Handlers are installed only in the main thread.
    """

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.signal: int | None = None
        self.on_signal = on_signal
        self._previous: dict = {}
        self._raise = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self.handle)
        return self

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler."""
        self.signal = signum
        if self._raise:
            raise Stopped(signal.Signals(signum).name)
        if self.on_signal is not None:
            self.on_signal()

    @contextlib.contextmanager
    def stoppable(self):
        """A signal that came before, or comes inside the block, raises Stopped."""
        if self.signal is not None:
            raise Stopped(signal.Signals(self.signal).name)
        outer, self._raise = self._raise, True
        try:
            yield
        finally:
            self._raise = outer

    @property
    def name(self) -> str:
        """The signal's name (SIGTERM, ...), or "" when none came."""
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

"""Stopping on SIGTERM, SIGUSR2 and SIGINT (Ctrl-C): SLURM's timeout and preemption signals, `kill`,
a study driver stopping its workers. One mechanism for training and for evaluations."""

from __future__ import annotations

import contextlib
import signal
import threading


class Stopped(Exception):
    """A signal arrived while the run was set up or evaluated (an evaluation can outlast SLURM's signal
    delay): abandon that work."""


class Interrupt:
    """While installed (`with Interrupt() as interrupt:`), SIGTERM / SIGUSR2 / SIGINT set `signal`.

    Outside `stoppable()` that is all (the training loop checks it after each update, checkpoints and
    exits; creating an MLflow run is never cut in half). Inside `stoppable()` (setting a run up, an
    evaluation) a signal raises Stopped at once. Handlers are installed only in the main thread.
    """

    def __init__(self) -> None:
        self.signal: int | None = None
        self._previous: dict = {}
        self._raise = False

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def _handle(self, signum, frame) -> None:
        self.signal = signum
        if self._raise:
            raise Stopped(signal.Signals(signum).name)

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

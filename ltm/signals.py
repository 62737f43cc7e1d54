"""Stopping on SIGTERM, SIGUSR2 and SIGINT (Ctrl-C): SLURM's timeout and preemption signals, `kill`,
a study driver stopping its workers. One mechanism for training, evaluations and a study's driver
(`studies.interrupt.Interruption`); `exit_on_signal` covers a command's first seconds, before it.

This module imports nothing heavy: a command installs its handlers before torch, MLflow or Ray load.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from collections.abc import Callable, Iterator

from ltm.names import Exit

SIGNALS = (signal.SIGTERM, signal.SIGUSR2, signal.SIGINT)
"""The signals that stop a command: `kill` and SLURM's timeout, SLURM's preemption warning, Ctrl-C."""


class Stopped(Exception):
    """A signal arrived while the run was set up or evaluated (an evaluation can outlast SLURM's signal
    delay), or while it waited (`waiting_for`): abandon that work. Its text names the signal and the wait."""


def _caused_by_stop(err: BaseException) -> bool:
    """Whether a Stopped is among the causes (or contexts) of `err`."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, Stopped):
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def exit_on_signal(module: str) -> None:
    """In a command's entry module (`exit_on_signal(__name__)`, before its heavy imports): until an
    `Interrupt` is entered, and again after it exits, a signal ends the process with Exit.INTERRUPTED and
    a line on stderr instead of killing it (status 143, silent). Nothing exists then to checkpoint or mark.
    Does nothing when `module` is not "__main__" (the module imported as a library)."""
    if module != "__main__" or threading.current_thread() is not threading.main_thread():
        return
    for sig in SIGNALS:
        signal.signal(sig, _exit_interrupted)


_entered = False
"""Whether an `Interrupt` was ever installed in this process: before that, the process is only importing."""


def _exit_interrupted(signum: int, frame=None) -> None:
    name = signal.Signals(signum).name
    # os.write: a signal can arrive in the middle of a write to sys.stderr (which would then raise)
    os.write(2, f"interrupted by {name} outside any run (starting up or shutting down): nothing was started "
                "or left running; start the same command again\n".encode())
    if not _entered:
        # While modules import, SystemExit can land inside a library's `except BaseException` and be
        # swallowed (seen: a study went on to run and exit 0). Nothing exists yet that needs cleaning up.
        os._exit(Exit.INTERRUPTED)
    raise SystemExit(Exit.INTERRUPTED)


@contextlib.contextmanager
def waiting_for(what: str) -> Iterator[None]:
    """A wait that a signal may end (inside `Interrupt.stoppable()`): its Stopped names what was waited for."""
    try:
        yield
    except Stopped as stop:
        raise Stopped(f"{stop} while waiting for {what}") from None


class Interrupt:
    """While installed (`with Interrupt() as interrupt:`), SIGTERM / SIGUSR2 / SIGINT set `signal`.

    Outside `stoppable()` that is all (the training loop checks it after each update, checkpoints and
    exits; creating an MLflow run is never cut in half). Inside `stoppable()` (setting a run up, an
    evaluation, a wait) a signal raises Stopped at once; outside, `on_signal` (when set) is called instead.
    `set_raising` is the switch between the two. Handlers are installed only in the main thread.
    """

    # a misspelt attribute is an error, not a no-op
    __slots__ = ("signal", "on_signal", "_previous", "_raise", "_swallowed", "_unraisable_before")

    def __init__(self, on_signal: Callable[[], None] | None = None) -> None:
        self.signal: int | None = None
        self.on_signal = on_signal
        self._previous: dict = {}
        self._raise = False
        self._swallowed = False
        self._unraisable_before = None

    def __enter__(self):
        global _entered
        _entered = True
        if threading.current_thread() is threading.main_thread():
            for sig in SIGNALS:
                self._previous[sig] = signal.signal(sig, self.handle)
            self._unraisable_before, sys.unraisablehook = sys.unraisablehook, self._unraisable
        return self

    def _unraisable(self, info) -> None:
        """A Stopped raised where Python ignores exceptions (a weakref callback of the import system, a
        __del__) would be printed as a traceback and lost: remember it, for `stoppable` to raise at its end."""
        if isinstance(info.exc_value, Stopped):
            self._swallowed = True
        else:
            (self._unraisable_before or sys.__unraisablehook__)(info)

    def handle(self, signum: int, frame=None) -> None:
        """The signal handler."""
        self.signal = signum
        if self._raise:
            raise Stopped(signal.Signals(signum).name)
        if self.on_signal is not None:
            self.on_signal()

    def set_raising(self, raising: bool) -> bool:
        """From now on a signal raises Stopped at once (True) or is only recorded and handed to `on_signal`
        (False); returns the setting before, for the caller to restore."""
        before, self._raise = self._raise, raising
        return before

    @contextlib.contextmanager
    def stoppable(self):
        """A signal that came before, or comes inside the block, raises Stopped, also where a library caught
        the Stopped raised inside its call and raised its own error from it (MLflow's store does)."""
        if self.signal is not None:
            raise Stopped(signal.Signals(self.signal).name)
        outer = self.set_raising(True)
        try:
            yield
            if self._swallowed:  # the block's Stopped was swallowed (`_unraisable`): it still stops the block
                raise Stopped(signal.Signals(self.signal).name)
        except Stopped:
            self._swallowed = False
            raise
        except Exception as err:
            if _caused_by_stop(err):
                raise Stopped(signal.Signals(self.signal).name) from err
            raise
        finally:
            self.set_raising(outer)

    @property
    def name(self) -> str:
        """The signal's name (SIGTERM, ...), or "" when none came."""
        return signal.Signals(self.signal).name if self.signal is not None else ""

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        if self._unraisable_before is not None:
            sys.unraisablehook = self._unraisable_before

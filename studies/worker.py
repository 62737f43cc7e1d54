"""Grid points in a process of their own: `python -m studies.worker --serve`, or one point by hand.

The Ray backend keeps one `--serve` worker per Ray actor: it reads one JSON line
`[SPEC, RESULT, LOG, PROGRESS]` per point from stdin, runs the point with its stdout and stderr
redirected to LOG (its messages, at the study's -v/-q level that the spec's context carries, go to
stderr: `studies.point.run_point`; and its latest logged numbers to PROGRESS), writes the result to RESULT and
answers with the point's exit status on a line of its stdout. Points run in the main thread, so
SIGTERM and SIGUSR2 checkpoint the running one (the worker then exits: the trial is being
stopped), and with exactly the trial's CPUs.

`python -m studies.worker SPEC.json RESULT.json` runs one point, e.g. again from the spec a trial
left in <runs>/logs/<key>.spec.json. Exit status as `python -m ltm.train` (`ltm.names.Exit`).
"""

import json
import logging
import os
import sys
from pathlib import Path

from ltm.signals import exit_on_signal

exit_on_signal(__name__)  # a signal while torch loads, or between points, exits 3 with a message, not 143
from ltm.files import atomic_write  # noqa: E402
from ltm.names import EXIT_OF, Exit, Status  # noqa: E402
from studies.messages import Point, Result, TrialContext  # noqa: E402

log = logging.getLogger("studies.worker")  # by name: run as a command, __name__ is "__main__"


def main(spec_path: str, result_path: str, progress_path: str | None = None) -> int:
    from studies.point import run_point

    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_point(Point.from_dict(spec["point"]), TrialContext.from_dict(spec["context"]),
                           progress=Path(progress_path) if progress_path else None)
    except Exception as err:  # reported to the trial, which raises so that Ray retries it
        log.exception("point %s failed", spec["point"]["key"])
        result = Result(Status.ERROR, reason=f"{type(err).__name__}: {err}")
    atomic_write(result_path, json.dumps(result.to_dict()))
    return EXIT_OF[result.status]


def serve() -> int:
    """Run the points sent on stdin until it closes, or until one is interrupted."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    idle_out, idle_err = os.open(os.devnull, os.O_WRONLY), os.dup(2)
    os.dup2(idle_out, 1)  # stray output between points must not corrupt the replies
    while line := sys.stdin.readline():
        spec, result, log, progress = json.loads(line)
        with open(log, "ab") as f:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                code = main(spec, result, progress)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(idle_out, 1)
                os.dup2(idle_err, 2)
        replies.write(f"{int(code)}\n")
        if code == Exit.INTERRUPTED:
            return code
    return Exit.OK


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(*sys.argv[1:3]))

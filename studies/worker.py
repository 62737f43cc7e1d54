"""Grid points in a process of their own: `python -m studies.worker --serve`, or one point by hand.

The launcher's Ray trials keep one `--serve` worker per Ray actor: it reads one JSON line
`[SPEC, RESULT, LOG]` per point from stdin, runs the point with its stdout and stderr redirected
to LOG, writes the result to RESULT and answers with the point's exit status on a line of its
stdout. Points run in the main thread, so SIGTERM and SIGUSR2 checkpoint the running one (the
worker then exits: the trial is being stopped), and with exactly the trial's CPUs.

`python -m studies.worker SPEC.json RESULT.json` runs one point, e.g. again from the spec a trial
left in <runs>/logs/<key>.spec.json. Exit status as `python -m ltm.train`: 0 finished or skipped,
1 failed, 3 interrupted, 4 another process holds the point.
"""

import json
import os
import sys
import traceback
from pathlib import Path

EXIT_INTERRUPTED, EXIT_BUSY = 3, 4


def main(spec_path: str, result_path: str) -> int:
    from studies.launcher import run_point

    spec = json.loads(Path(spec_path).read_text())
    try:
        result = run_point(spec["point"], spec["common"])
    except Exception as err:  # reported to the trial, which raises so that Ray retries it
        traceback.print_exc()
        result = {"status": "ERROR", "run_id": None, "reason": f"{type(err).__name__}: {err}", "metrics": {}}
    tmp = Path(result_path + ".tmp")
    tmp.write_text(json.dumps(result))
    tmp.replace(result_path)
    return {"FINISHED": 0, "SKIPPED": 0, "KILLED": EXIT_INTERRUPTED, "BUSY": EXIT_BUSY}.get(result["status"], 1)


def serve() -> int:
    """Run the points sent on stdin until it closes, or until one is interrupted."""
    replies = os.fdopen(os.dup(1), "w", buffering=1)
    idle_out, idle_err = os.open(os.devnull, os.O_WRONLY), os.dup(2)
    os.dup2(idle_out, 1)  # stray output between points must not corrupt the replies
    while line := sys.stdin.readline():
        spec, result, log = json.loads(line)
        with open(log, "ab") as f:
            sys.stdout.flush()
            sys.stderr.flush()
            os.dup2(f.fileno(), 1)
            os.dup2(f.fileno(), 2)
            try:
                code = main(spec, result)
            finally:
                sys.stdout.flush()
                sys.stderr.flush()
                os.dup2(idle_out, 1)
                os.dup2(idle_err, 2)
        replies.write(f"{code}\n")
        if code == EXIT_INTERRUPTED:
            return code
    return 0


if __name__ == "__main__":
    sys.exit(serve() if sys.argv[1:] == ["--serve"] else main(*sys.argv[1:3]))

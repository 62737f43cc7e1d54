"""One grid point in its own process: `python -m studies.worker SPEC.json RESULT.json`.

The launcher's Ray trials run this, so that `ltm.train.run` owns the process's main thread (SIGTERM
and SIGUSR2 then checkpoint the run) and uses exactly the trial's CPUs. Exit status as
`python -m ltm.train`: 0 finished or skipped, 1 failed, 3 interrupted.
"""

import json
import sys
import traceback
from pathlib import Path


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
    return {"FINISHED": 0, "SKIPPED": 0, "KILLED": 3}.get(result["status"], 1)


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:3]))

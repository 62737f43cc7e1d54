"""End-to-end check of the SLURM path: a submitit job array on a real cluster.

Skips unless `sbatch` is on PATH and `sinfo` reaches a controller. On CI (and locally)
start a one-node cluster first: `sudo bash slurm/start_local_slurm.sh`.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from slurm_jobs import slurm_unavailable_reason

REPO_ROOT = Path(__file__).resolve().parents[1]


_REASON = slurm_unavailable_reason()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def square_with_task_id(x: int) -> tuple[int, str | None]:
    """Runs in the SLURM worker (module level so the worker can import it)."""
    return x * x, os.environ.get("SLURM_ARRAY_TASK_ID")


def test_submitit_job_array(tmp_path):
    submitit = pytest.importorskip("submitit")
    executor = submitit.AutoExecutor(folder=tmp_path, cluster="slurm")
    executor.update_parameters(
        slurm_partition="debug",
        timeout_min=2,
        cpus_per_task=1,
        mem_gb=1,
        slurm_array_parallelism=2,
        # The workers unpickle `square_with_task_id` by reference to this module.
        slurm_setup=[f"export PYTHONPATH={REPO_ROOT}:{REPO_ROOT / 'tests'}:${{PYTHONPATH:-}}"],
    )
    jobs = executor.map_array(square_with_task_id, [3, 4])
    assert len(jobs) == 2
    deadline = time.monotonic() + 120
    while not all(job.done(force_check=True) for job in jobs):
        if time.monotonic() > deadline:
            for job in jobs:
                job.cancel(check=False)
            queue = subprocess.run(["squeue"], capture_output=True, text=True).stdout
            pytest.fail(f"SLURM jobs not done after 120 s: {[job.state for job in jobs]}\n{queue}")
        time.sleep(2)
    for job in jobs:
        if job.exception() is not None:
            print(f"--- job {job.job_id}\n{job.stdout()}\n{job.stderr()}", file=sys.stderr)
    results = [job.result() for job in jobs]
    assert [r[0] for r in results] == [9, 16]
    assert sorted(r[1] for r in results) == ["0", "1"]

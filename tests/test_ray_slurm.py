"""A study on a Ray cluster started inside a SLURM job: `sbatch slurm/ray_study.sbatch STUDY ...`.

Skips unless `sbatch` is on PATH and `sinfo` reaches a controller. On CI (and locally) start a
one-node cluster first: `sudo bash slurm/start_local_slurm.sh`.
"""

import subprocess
import time
from pathlib import Path

import pytest
from slurm_jobs import slurm_unavailable_reason

from studies.inference_scaling import STUDY as INFERENCE_SCALING
from studies.points import build_points

ROOT = Path(__file__).resolve().parents[1]

_REASON = slurm_unavailable_reason()
pytestmark = [pytest.mark.skipif(_REASON is not None, reason=_REASON or ""), pytest.mark.slow]


def _wait_for_job(job: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while subprocess.run(["squeue", "-h", "-j", job], capture_output=True, text=True).stdout.strip():
        if time.monotonic() > deadline:
            subprocess.run(["scancel", job], check=False)
            pytest.fail(f"SLURM job {job} not done after {timeout:.0f} s")
        time.sleep(2)


def test_smoke_study_on_a_ray_cluster_inside_a_slurm_job(tmp_path):
    from mlflow.tracking import MlflowClient

    runs, out = tmp_path / "runs", tmp_path / "job.out"
    job = subprocess.run(["sbatch", "--parsable", f"--output={out}", "--time=15", "slurm/ray_study.sbatch",
                          "inference_scaling", "--preset", "smoke", "--runs-dir", str(runs)],
                         cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip().split(";")[0]
    _wait_for_job(job, 600)
    log = out.read_text()
    assert "ray_study: inference_scaling exited with status 0" in log, log[-4000:]
    assert "Connected to Ray cluster" in log  # the driver joined the job's cluster (token accepted)

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("inference_scaling")
    found = client.search_runs([experiment.experiment_id])
    parents = [r for r in found if r.data.tags.get("ltm.role") == "study"]
    children = {r.data.tags["ltm.run_key"]: r for r in found if "ltm.run_key" in r.data.tags}
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert parents[0].data.tags["ltm.backend"] == "ray"
    assert set(children) == {p.key for p in build_points(INFERENCE_SCALING, "smoke", [0], None, [])}
    assert {r.info.status for r in children.values()} == {"FINISHED"}
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parents[0].info.run_id}
    assert not (Path.home() / ".ray" / f"study-{job}").exists()  # the job's token is gone

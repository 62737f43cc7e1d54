"""Running one grid point in this process: all a worker (Ray actor's worker, SLURM job) imports."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ltm.files import atomic_write
from ltm.names import Status
from studies.messages import Point, Result, TrialContext


def run_point(point: Point, context: TrialContext, progress: Path | None = None) -> Result:
    """Train the point's run (`ltm.train.run`) or, for an evaluation point, run its task
    (`studies.tasks`, which trains its checkpoint first when the point says how).

    Runs in the calling thread (the main thread, so SIGTERM/SIGUSR2 checkpoint it) with the trial's
    CPUs. Either path holds the point's run lock: a point another live process holds is BUSY.
    A training point keeps its latest logged numbers in `progress` (JSON), for the trial to report.
    A point of several processes (SLURM) runs this in each of them: rank 0 alone holds the lock, writes
    MLflow and `progress`; the backend counts the point once, by its job, whatever each rank returns.
    """
    import torch

    from ltm.cli import configure_logging
    from ltm.config import RunConfig
    from ltm.runlock import STUDY_DRIVER_ENV, RunBusy
    from ltm.tracking import configure_mlflow
    from ltm.train import run

    configure_logging(context.log_level)  # the process that runs a point shows its messages at the study's level
    torch.set_num_threads(context.threads)
    configure_mlflow(credentials_file=context.credentials_file)
    os.environ[STUDY_DRIVER_ENV] = context.driver  # recorded in the run locks this point takes
    try:
        if point.task:
            from studies.tasks import run_task

            return run_task(point, context)
        result = run(RunConfig.from_dict(point.config), tracking_uri=context.tracking_uri,
                     experiment=context.experiment, runs_dir=context.runs_dir, parent_run_id=context.parent_run_id,
                     tags=context.tags, progress=False, on_log=_progress_writer(progress))
    except RunBusy as busy:
        return Result(Status.BUSY, reason=str(busy))
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return Result(result.status, result.run_id, result.reason, metrics)


def _progress_writer(path: Path | None):
    """A callback that keeps the latest logged metrics of a run in `path` (None: no callback)."""
    if path is None:
        return None
    latest: dict[str, float] = {}

    def write(metrics: dict[str, float]) -> None:
        latest.update(metrics)
        atomic_write(path, json.dumps(latest))

    return write

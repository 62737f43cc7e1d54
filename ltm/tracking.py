"""MLflow: run identity, params, metrics keyed by tokens seen, artifacts, resuming the same run.

Everything goes through an explicit `MlflowClient` (no global "active run"), so one process can
track several runs and Ray or SLURM workers never depend on the fluent API's state.
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

RUN_KEY_TAG = "ltm.run_key"
REASON_TAG = "ltm.status_reason"


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says what to change."""


def default_tracking_uri(runs_dir: str | Path) -> str:
    """sqlite:///<absolute runs dir>/mlflow.db (absolute, so workers in other folders find it)."""
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with a fix, when the tracking store is unreachable or unusable."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(uri.rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError) as err:
            raise TrackingError(
                f"cannot reach the MLflow tracking server at {uri} ({err}); start one with "
                f"`mlflow server --backend-store-uri sqlite:///$PWD/runs/mlflow.db --port 5000`, or pass "
                f"--tracking-uri sqlite:///<absolute path>/mlflow.db to track in a local file") from None
    elif uri.startswith("sqlite:///"):
        path = Path(uri[len("sqlite:///"):])
        if not path.is_absolute():
            raise TrackingError(f"use an absolute SQLite path (sqlite:////abs/path/mlflow.db), got {uri}: "
                                "Ray and SLURM workers run in other folders")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as err:
            raise TrackingError(f"cannot create the folder for the tracking database {path}: {err}") from None
    elif "://" in uri and not uri.startswith(("file://", "databricks")):
        raise TrackingError(f"unsupported tracking URI {uri!r}; use sqlite:////abs/path/mlflow.db or http://host:port")


class Tracker:
    """One experiment in one MLflow store."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        check_tracking_uri(uri)
        # A dead server should fail in seconds, not after MLflow's default minutes of retries.
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
        os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
        self.uri = uri
        self.client = MlflowClient(uri)
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if artifact_root is not None:
                location = (Path(artifact_root).resolve() / experiment).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created concurrently by another worker: use theirs
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id
        else:
            self.experiment_id = found.experiment_id

    def find_run(self, run_key: str):
        """The newest run of this experiment with this run key, or None."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def create_run(self, run_key: str, run_name: str, params: dict, tags: dict,
                   parent_run_id: str | None = None) -> str:
        """A new RUNNING run with its params and tags; returns its id."""
        tags = {RUN_KEY_TAG: run_key, **tags}
        if parent_run_id:
            tags["mlflow.parentRunId"] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark an interrupted run RUNNING again (it resumes from its checkpoint)."""
        self.client.update_run(run_id, status="RUNNING")
        if REASON_TAG in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, REASON_TAG)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        self.client.log_batch(run_id, metrics=[Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, data: dict, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def max_logged_step(self, run_id: str, key: str = "tokens") -> int:
        """The largest step already logged for `key` (-1 if none): replays below it are not logged again."""
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def finish(self, run_id: str, status: str, reason: str | None = None) -> None:
        """End a run as FINISHED, FAILED or KILLED, with the reason as a tag."""
        if reason:
            self.set_tags(run_id, {REASON_TAG: reason[:5000]})
        self.client.set_terminated(run_id, status=status)

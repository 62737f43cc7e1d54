"""A study's MLflow parent run: found or created per study identity, its stale children, its summary."""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from ltm.names import (BACKEND_TAG, COUNT_TAG_PREFIX, NOTE_TAG, POINTS_TAG, REASON_TAG, ROLE_STUDY, ROLE_TAG,
                       RUN_KEY_TAG, STUDY_KEY_TAG, TOKENS, Status, status_is, tag_is)
from studies.messages import Point
from studies.order import point_done
from studies.plan import Plan
from studies.points import grid_table

if TYPE_CHECKING:
    from ltm.tracking import Tracker

log = logging.getLogger(__name__)


def open_tracker(plan: Plan) -> Tracker:
    """The study's experiment in its tracking store. It may wait for the store's lock
    (`ltm.tracking.store_creation_lock`), so the driver calls it where a signal stops it: nothing of the
    study exists yet."""
    from ltm.tracking import Tracker

    return Tracker(plan.tracking_uri, plan.experiment, artifact_root=plan.runs_dir / "artifacts")


def open_parent(plan: Plan, tracker: Tracker) -> str:
    """Find or create the study's parent run (RUNNING); mark children left RUNNING by dead workers KILLED.

    A child counts as dead only when nobody holds its run lock (`ltm.runlock`): a held lock is a
    live process, wherever it runs. Returns the parent run's id.
    """
    from ltm.runlock import holder

    client = tracker.client
    if plan.experiment == plan.study.name:  # the study's own experiment: describe it in the UI
        client.set_experiment_tag(tracker.experiment_id, NOTE_TAG, plan.study.description)
    found = client.search_runs([tracker.experiment_id], filter_string=f"{tag_is(STUDY_KEY_TAG, plan.study_key)} "
                                                                       f"and {tag_is(ROLE_TAG, ROLE_STUDY)}",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        parent = found[0].info.run_id
        client.update_run(parent, status=Status.RUNNING.value)
        client.set_tag(parent, BACKEND_TAG, plan.cluster)
    else:
        run = client.create_run(tracker.experiment_id, run_name=f"{plan.study.name}-{plan.preset}",
                                tags={**plan.tags, ROLE_TAG: ROLE_STUDY, POINTS_TAG: str(len(plan.points)),
                                      NOTE_TAG: plan.study.description})
        parent = run.info.run_id
        client.log_dict(parent, {"study": plan.study.name, "preset": plan.preset,
                                 "points": [p.to_dict() for p in plan.points]}, "grid.json")
    keys = {p.key for p in plan.points}
    stale = client.search_runs([tracker.experiment_id], filter_string=status_is(Status.RUNNING), max_results=5000)
    for run in stale:
        key = run.data.tags.get(RUN_KEY_TAG)
        if key in keys and holder(plan.runs_dir, key) is None:
            tracker.finish(run.info.run_id, Status.KILLED,
                           "left RUNNING by a worker that died; the study driver "
                           "marked it KILLED and resumes it from its last checkpoint")
            log.info("marked run %s KILLED (left RUNNING by a dead worker); it will resume", key)
    return parent


def finish_parent(tracker, parent_run_id: str, status: Status, counts: dict, reason: str = "") -> None:
    tags = {f"{COUNT_TAG_PREFIX}{k}": v for k, v in counts.items()}
    if reason:
        tags[REASON_TAG] = reason
    elif REASON_TAG in tracker.client.get_run(parent_run_id).data.tags:
        tracker.client.delete_tag(parent_run_id, REASON_TAG)
    tracker.set_tags(parent_run_id, tags)
    tracker.client.set_terminated(parent_run_id, status=status.value)


def summary(tracker, plan: Plan):
    """One row per point: the grid's axes, its MLflow status and the study's headline metrics."""
    import fnmatch

    patterns = ([] if plan.is_evaluation else [TOKENS]) + list(plan.study.summary_metrics)
    runs = [tracker.find_run(p.key) for p in plan.points]
    metrics = [run.data.metrics if run else {} for run in runs]
    names = [n for pattern in patterns for n in sorted({k for m in metrics for k in m if fnmatch.fnmatch(k, pattern)})]
    columns: dict[str, list] = {"status": [_status(run, plan, p) for run, p in zip(runs, plan.points)]}
    for n in dict.fromkeys(names):
        columns[n] = [None if n not in m else int(m[n]) if n == TOKENS else round(m[n], 4) for m in metrics]
    columns["mlflow_run"] = [run.info.run_id[:8] if run else "" for run in runs]
    return grid_table(plan.points, columns)


def _status(run, plan: Plan, point: Point) -> str:
    """A point's status: its MLflow run's (a trunk segment: FINISHED once its trunk has trained to its stop), or
    BUSY while another live process holds it (this driver's workers are gone by the time the summary is made)."""
    from ltm.runlock import holder

    if point_done(run, point):
        return Status.FINISHED.value
    if holder(plan.runs_dir, point.key) is not None:
        return Status.BUSY.value
    return run.info.status if run else Status.MISSING.value

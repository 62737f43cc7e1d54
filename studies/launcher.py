"""The study driver: a study's command line -> a validated plan -> one MLflow parent run -> its
points on one backend -> a summary and an exit status.

A study script declares a `studies.study.Study` and calls `main(study)`. The driver

1. plans (`studies.plan`): builds and validates every grid point before anything starts (unknown
   preset, impossible config, missing data, unusable tracking store: exit 2 with one line);
2. finds or creates the study's MLflow parent run (`studies.parent`; one per study identity =
   study name, preset and the run keys of its grid) and marks runs that a dead worker left
   RUNNING as KILLED;
3. runs every point as a child run on the backend named by --cluster: `local`/`ray`
   (`studies.ray_backend`, Ray Tune) or `slurm` (`studies.slurm_backend`, a submitit job array);
4. prints a summary table and exits 0 when every point FINISHED (1 if some failed, 3 if the study
   was interrupted: start it again to complete the missing points).

Points whose run already FINISHED are skipped by `ltm.train.run` itself; interrupted ones resume
from their checkpoint; a point is never run twice at once (`ltm.runlock`).
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import sys
import time

from ltm.names import EXIT_OF, Exit, Status
from ltm.signals import Stopped
from studies.costs import cost_columns, cost_summary, memory_columns, memory_summary, point_cost, signal_delay_note
from studies.interrupt import Interruption, wait_for_stragglers
from studies.messages import CheckpointSource
from studies.options import build_parser
from studies.parent import finish_parent, open_parent, open_tracker, summary
from studies.plan import Plan, UsageError, plan_from_args
from studies.resources import host_memory_note
from studies.savings import branch_savings, savings_lines
from studies.points import axes, grid_table
from studies.study import Study

log = logging.getLogger(__name__)

BACKENDS = {"local": "studies.ray_backend", "ray": "studies.ray_backend", "slurm": "studies.slurm_backend"}
"""--cluster -> the module that runs the points: `before_start(plan)` and `run(plan, tracker, interruption)`."""


def print_plan(plan_: Plan) -> None:
    import pandas as pd

    from ltm.tracking import redact

    costs = [point_cost(p) for p in plan_.points]
    with pd.option_context("display.max_rows", 500, "display.width", 200):
        columns = {**cost_columns(costs, plan_.mfu, plan_.peak_tflops), **memory_columns(plan_.memory)}
        if any(p.resumes for p in plan_.points):  # a trunk's later segment or a branch: tokens it trains from
            columns = {"from": [f"{p.resumes:,}" for p in plan_.points], **columns}
        print(grid_table(plan_.points, columns).to_string(index=False))
    per_trial = f"{plan_.cpus:g} CPU + {plan_.gpus:g} GPU per trial"
    if plan_.world > 1:
        per_trial = (f"each point one torch.distributed job of {plan_.world} processes ({plan_.processes} per node x "
                     f"{plan_.nodes} node(s)) with {plan_.cpus:g} CPU each and {plan_.gpus:g} GPU per node")
    print(f"\n{plan_.study.name} / {plan_.preset}: {len(plan_.points)} points, backend {plan_.cluster}, {per_trial}, "
          f"at most {plan_.trials_at_once} at once")
    print("\n".join(cost_summary(costs, plan_.mfu, plan_.peak_tflops, plan_.gpus * plan_.nodes, plan_.trials_at_once,
                                 plan_.profile)
                    + savings_lines(branch_savings(plan_.points, costs))
                    + memory_summary(plan_.memory, plan_.gpus, plan_.gpu_mem_gb, plan_.world)))
    notes = [host_memory_note(plan_.profile, plan_.processes)]
    if plan_.profile is not None:
        notes.append(signal_delay_note(plan_.points, costs, plan_.profile, plan_.mfu, plan_.peak_tflops,
                                       plan_.gpus * plan_.nodes))
    for note in filter(None, notes):
        print(note)
    print(f"tracking {redact(plan_.tracking_uri)}, experiment {plan_.experiment}, runs folder {plan_.runs_dir}")
    first = plan_.points[0] if plan_.points else None
    if first is not None and first.task:
        given = isinstance(first.source, CheckpointSource)
        sources = "the checkpoints given" if given else "each point's model, trained first"
        print(f"evaluation on {sources}: {json.dumps(first.task.to_dict())}")
    if plan_.cluster == "slurm":
        from studies.slurm_backend import sbatch_preview

        print("\nsbatch parameters (one job array):")
        print(sbatch_preview(plan_))
        waiting = sum(1 for p in plan_.points if p.after)
        if waiting:
            print(f"({waiting} points that wait for others are submitted as jobs of their own, each with "
                  "--dependency=afterany:<the jobs it waits for>)")


def main(study: Study, argv: list[str] | None = None) -> int:
    """Run a study from the command line; returns the exit status. SIGTERM and Ctrl-C are honoured from
    here on: during startup they end the driver with exit 3 before anything is launched."""
    with Interruption() as interruption:
        try:
            return _main(study, argv, interruption)
        except Stopped as stop:
            print(f"interrupted by {stop} during startup: nothing was launched; start the same command again",
                  file=sys.stderr)
            return Exit.INTERRUPTED


def _main(study: Study, argv: list[str] | None, interruption: Interruption) -> int:
    from ltm.cli import configure_logging
    from ltm.config import ConfigError

    args = build_parser(study).parse_args(argv)  # --help and a mistyped option answer before MLflow is imported
    from ltm.tracking import TrackingError, configure_mlflow, redact

    try:
        plan_ = plan_from_args(study, args)
    except (UsageError, ConfigError, TrackingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    configure_logging(plan_.log_level)  # -v/-q; the points' processes get the level in their TrialContext
    if plan_.dry_run:
        return _dry_run(plan_)
    configure_mlflow(plan_.tracking_uri)  # this driver's MLflow client: fail fast, authenticate
    backend = importlib.import_module(BACKENDS[plan_.cluster])
    keys = [p.key for p in plan_.points]
    started, tracker, completed = time.time(), None, False
    try:
        print_plan(plan_)
        backend.before_start(plan_)  # e.g. SLURM: no earlier job may still run, before any status is touched
        wait_for_stragglers(plan_.runs_dir, keys, plan_.study_key)
        tracker = open_tracker(plan_)  # may wait for the store's lock: a signal there ends the driver, exit 3
        with interruption.deferred():
            plan_ = dataclasses.replace(plan_, parent_run_id=open_parent(plan_, tracker))
        log.info("study parent run %s (key %s)", plan_.parent_run_id, plan_.study_key)
        completed = backend.run(plan_, tracker, interruption)
    except Stopped as stop:
        if plan_.parent_run_id is None:
            raise  # nothing was launched
        print(f"interrupted by {stop}: the study's parent run is marked KILLED", file=sys.stderr)
    except KeyboardInterrupt:
        interruption.request()
    except (UsageError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        if plan_.parent_run_id is not None:  # e.g. a Ray --address that answers nothing: end the parent, not RUNNING
            finish_parent(tracker, plan_.parent_run_id, Status.FAILED, {}, str(err)[:500])
        return Exit.USAGE
    finally:
        interruption.detach()  # from here a signal is recorded: the summary is written, the parent ended
    if plan_.parent_run_id is None:
        return Exit.INTERRUPTED
    if plan_.no_wait and completed and not interruption.requested:
        print(f"submitted; the jobs report to {redact(plan_.tracking_uri)}. Start the same command again (without "
              "--no-wait) to wait for them and print the summary")
        return Exit.OK
    if interruption.requested or not completed:
        wait_for_stragglers(plan_.runs_dir, keys, plan_.study_key, timeout=60)
    table = summary(tracker, plan_)
    counts = table["status"].value_counts().to_dict()
    # a signal during the summary counts too: an unfinished study ends KILLED (exit 3), not FAILED
    outcome, reason = _outcome(counts, len(plan_.points), interruption.requested or not completed)
    _log_summary(tracker, plan_, table)
    finish_parent(tracker, plan_.parent_run_id, PARENT_STATUS[outcome], counts, reason)
    _print_summary(plan_, tracker, table, f"in {time.time() - started:.0f} s", reason)
    return EXIT_OF[outcome]


def _print_summary(plan_: Plan, tracker, table, took: str, reason: str) -> None:
    """The points' table, the counts, where to browse them, and why the study ended as it did (stdout)."""
    import pandas as pd

    from ltm.tracking import redact

    counts = table["status"].value_counts().to_dict()
    with pd.option_context("display.max_rows", 500, "display.width", 200):
        print("\n" + table.to_string(index=False))
    print(f"\n{plan_.study.name}: {', '.join(f'{v} {k}' for k, v in counts.items())} of {len(plan_.points)} points "
          f"{took}; parent run {plan_.parent_run_id}")
    print(f"browse: mlflow ui --backend-store-uri {redact(plan_.tracking_uri)}, then open "
          f"http://127.0.0.1:5000/{ui_route(tracker.experiment_id)} (README: \"The MLflow UI\")")
    if reason:
        print(reason)


def ui_route(experiment_id: str) -> str:
    """The MLflow 3 UI's page of an experiment's training runs (it opens on its GenAI pages otherwise)."""
    return f"#/experiments/{experiment_id}/runs?workflowType=machine_learning"


def _log_summary(tracker, plan_: Plan, table) -> None:
    """The summary on the parent run (`studies.report`); a store that refuses it costs a warning, not the study."""
    from studies.report import log_summary

    try:
        log_summary(tracker, plan_.parent_run_id, table, axes(plan_.points), f"{plan_.study.name} / {plan_.preset}")
    except Exception as err:  # the points' runs hold every result; the summary only gathers them
        log.warning("the study's summary was not logged to its parent run %s: %s: %s", plan_.parent_run_id,
                    type(err).__name__, str(err)[:300])


def _dry_run(plan_: Plan) -> int:
    """The plan printed, nothing launched; Exit.USAGE if the plan has a problem (reported after it)."""
    print_plan(plan_)
    if plan_.problem is not None:
        print(f"error: {plan_.problem}", file=sys.stderr)
        return Exit.USAGE
    return Exit.OK


PARENT_STATUS = {Status.FINISHED: Status.FINISHED, Status.KILLED: Status.KILLED, Status.FAILED: Status.FAILED,
                 Status.BUSY: Status.KILLED}
"""A study's outcome -> its parent run's MLflow status (MLflow has no BUSY: a busy study is resumable)."""


def _outcome(counts: dict, n_points: int, stopped: bool) -> tuple[Status, str]:
    """How the study ended, and what to do about it: FINISHED; KILLED (interrupted); FAILED (a point did
    not finish for another reason); BUSY (every unfinished point is held by another live process)."""
    done, busy = counts.get(Status.FINISHED.value, 0), counts.get(Status.BUSY.value, 0)
    if done == n_points:
        return Status.FINISHED, ""
    if stopped:
        return Status.KILLED, "interrupted: start the same command again to complete the missing points"
    if done + busy == n_points:
        return Status.BUSY, (f"busy: {busy} point(s) are held by other live processes (see the error of each in the "
                             "logs); nothing failed. Start the study again once they have finished")
    return Status.FAILED, ""

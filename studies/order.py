"""The order of a study's points: what is left to run, and what each waits for.

A branch of a trunk (`studies.points.with_trunks`) waits for its trunk's segment; a segment for the one
before. Both backends start a point once the points it waits for are done (or given up on: a branch whose
trunk snapshot is missing trains the trunk up to its branch point itself, so it cannot hang on one):
Ray Tune through `studies.dependency_order`, SLURM through job dependencies (`submit`).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

from ltm.names import TOKENS, Status
from studies.messages import Point, TrialContext

if TYPE_CHECKING:
    import submitit

    from ltm.tracking import Tracker


def point_done(run, point: Point) -> bool:
    """Whether the point's work is in the store: its run FINISHED, or for a trunk segment its trunk run has
    trained up to the segment's stop (the trunk goes on in the later segments, under the same run)."""
    if run is None:
        return False
    if point.stop is None:
        return run.info.status == Status.FINISHED
    return run.data.metrics.get(TOKENS, 0) >= point.stop


def pending(points: list[Point], tracker: Tracker) -> list[Point]:
    """The points still to run, in order, each waiting only for pending points: those not done, less the
    segments that no pending point needs (every branch after them is done)."""
    runs = {p.key: tracker.find_run(p.key) for p in points}
    return still_needed(points, {p.id for p in points if point_done(runs[p.key], p)})


def still_needed(points: list[Point], done: set[str]) -> list[Point]:
    """`pending` given the ids of the points done."""
    import dataclasses

    needed: set[str] = set()
    for point in reversed(points):  # dependents come after what they wait for
        if point.id in done:
            continue
        waited_on = any(point.id in q.after for q in points if q.id in needed)
        if point.stop is None or waited_on:
            needed.add(point.id)
    return [dataclasses.replace(p, after=tuple(a for a in p.after if a in needed)) for p in points if p.id in needed]


def submit(executor: submitit.AutoExecutor, trial: Callable, points: list[Point], context: TrialContext,
           additional: dict) -> list[str]:
    """SLURM's order (`studies.slurm_backend`): `trial` on the points that wait for none as one job array, then
    each other point (in order: what it waits for comes first) as a job that SLURM starts once those jobs have
    ended (afterany: a branch whose trunk snapshot is missing trains it itself, so a failed segment holds
    nothing up forever); their job ids."""
    free = [p for p in points if not p.after]
    array = executor.map_array(trial, free, [context] * len(free)) if free else []
    jobs = {p.id: job.job_id for p, job in zip(free, array)}
    for point in points:
        if point.after:
            dependency = "afterany:" + ":".join(jobs[a] for a in point.after)
            executor.update_parameters(slurm_additional_parameters={**additional, "dependency": dependency})
            jobs[point.id] = executor.submit(trial, point, context).job_id
    executor.update_parameters(slurm_additional_parameters=dict(additional))
    return [jobs[p.id] for p in points]


def submitted(ids: list[str], waits: list[bool]) -> str:
    """What a submission made, in words ("array 41 (3 tasks) and 2 dependent job(s)"), from the job ids of
    `submit` and whether each point waited for others (submitit submits an array of one as a plain job)."""
    free = [i for i, w in zip(ids, waits) if not w]
    words = [f"array {free[0].split('_')[0]} ({len(free)} tasks)"] if free else []
    if len(ids) > len(free):
        words.append(f"{len(ids) - len(free)} dependent job(s)")
    return " and ".join(words)

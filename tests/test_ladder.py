"""The ladder study (issue 27): its points (trunk segments and wsd branches) and what each waits for, the
order the backends start them in, what the branches save, and bad input refused before anything runs.

The end-to-end tests run one trunk and two branches on Ray Tune (and on SLURM when a cluster answers):
each branch starts after its trunk's segment, and a second start runs nothing.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from ltm.config import RunConfig
from ltm.model import build_model
from ltm.names import RUN_KEY_TAG, TOKENS, TRUNK_RUN_TAG, Exit
from slurm_jobs import slurm_unavailable_reason
from studies import ladder
from studies.costs import point_cost
from studies.savings import branch_savings
from studies.launcher import main
from studies.messages import Point
from studies.order import still_needed
from studies.points import build_points

ROOT = Path(__file__).resolve().parents[1]
LADDER = ladder.STUDY


def _config(point: Point) -> RunConfig:
    return RunConfig.from_dict(point.config)


def _trunks(points: list[Point]) -> dict[str, list[Point]]:
    """Each trunk's points (its segments and branches), by the trunk's run key."""
    out: dict[str, list[Point]] = {}
    for p in points:
        cfg = _config(p)
        out.setdefault(p.key if p.stop is not None else cfg.trunk().run_key(), []).append(p)
    return out


# -- points and what each waits for (fast) ---------------------------------------------------------

def test_each_trunk_runs_in_segments_and_each_branch_waits_for_its_segment():
    points = build_points(LADDER, "smoke", [0, 1], None, [])
    ids = [p.id for p in points]
    assert len(ids) == len(set(ids))  # segments share their trunk's run key, not their identity
    trunks = _trunks(points)
    assert len(trunks) == 3 * 2 * 2  # one per (size, arm, seed)
    for key, own in trunks.items():
        segments = [p for p in own if p.stop is not None]
        branches = [p for p in own if p.stop is None]
        assert [s.stop for s in segments] == sorted(_config(b).branch_point() for b in branches)
        assert {s.key for s in segments} == {key} and all(_config(s).train.schedule == "constant" for s in segments)
        assert segments[0].after == () and segments[0].resumes == 0
        for before, segment in zip(segments, segments[1:]):
            assert segment.after == (before.id,) and segment.resumes == before.stop
            assert ids.index(before.id) < ids.index(segment.id)  # what a point waits for comes first
        for branch in branches:
            cfg = _config(branch)
            (segment,) = [s for s in segments if s.stop == cfg.branch_point()]
            assert branch.after == (segment.id,) and branch.resumes == segment.stop
            assert ids.index(segment.id) < ids.index(branch.id)
            assert branch.key != key and branch.key != cfg.with_overrides({"train.schedule": "cosine"}).run_key()
            assert point_cost(branch).tokens == cfg.updates * cfg.tokens_per_update - cfg.branch_point()


def test_a_segment_or_a_branch_crosses_a_process_boundary_as_json_and_comes_back_the_same_point():
    for point in build_points(LADDER, "smoke", [0], None, []):
        back = Point.from_dict(json.loads(json.dumps(point.to_dict())))
        assert (back.id, back.stop, back.after, back.resumes, back.label) == (
            point.id, point.stop, point.after, point.resumes, point.label)
        assert RunConfig.from_dict(back.config).run_key() == point.key


def test_the_micro_ladder_spans_16x_in_parameters_with_four_budgets_per_trunk_and_a_fixed_receptive_field():
    points = build_points(LADDER, "micro", [0], None, [])
    branches = [p for p in points if p.stop is None]
    arms: dict[tuple, set] = {}
    for p in branches:
        m = _config(p).model
        arms.setdefault((m.kind, m.window), set()).add(m)
    assert set(arms) == {("ltm", 8), ("ar", 8), ("ar", None)}
    for models in arms.values():
        assert len({m.d_model for m in models}) >= 5 and {(m.n_layers, m.ctx) for m in models} == {(2, 128)}
        with torch.device("meta"):
            sizes = [build_model(m).num_params(non_embedding=True) for m in models]
        assert max(sizes) / min(sizes) >= 16
    for own in _trunks(points).values():
        assert len([p for p in own if p.stop is None]) == 4
    (start,) = {(_config(p).inference.start, _config(p).inference.init_logvar, _config(p).inference.steps)
                for p in branches if _config(p).model.kind == "ltm"}
    assert start == ("fixed", 0.0, 4)  # docs/RESULTS.md 7.4: the start that keeps the most information
    corpus = {_config(p).data.synthetic_tokens for p in points}
    assert len(corpus) == 1 and corpus.pop() >= max(_config(p).train.tokens for p in branches)


def test_the_smallest_micro_runs_are_short():
    """The smallest rung's budgets: at most 400k tokens (a few CPU-minutes at the most for the LTM)."""
    points = build_points(LADDER, "micro", [0], None, [])
    smallest = min(_config(p).model.d_model for p in points)
    assert max(_config(p).train.tokens for p in points if _config(p).model.d_model == smallest) <= 400_000


@pytest.mark.parametrize("preset", ["micro", "paper"])
def test_the_branches_cost_at_least_1_5x_less_than_one_cosine_run_per_budget(preset):
    points = build_points(LADDER, preset, [0], None, [])
    costs = [point_cost(p) for p in points]
    savings = branch_savings(points, costs)
    assert savings.ratio >= 1.5 and savings.cosine.tokens / savings.ladder.tokens >= 1.5
    # the ladder trains each trunk to its last branch point once, then each branch's decay
    trunk_tokens = sum(max(p.stop for p in own if p.stop) for own in _trunks(points).values())
    decays = sum(c.tokens for p, c in zip(points, costs) if p.stop is None)
    assert savings.ladder.tokens == trunk_tokens + decays


def test_the_dry_run_prints_what_the_branches_save(tmp_path, capsys):
    assert main(LADDER, ["--runs-dir", str(tmp_path / "runs"), "--dry-run"]) == Exit.OK
    out = capsys.readouterr().out
    (line,) = [line for line in out.splitlines() if line.startswith("branches: ")]
    assert "60 budgets as wsd branches of 15 trunk(s)" in line
    assert float(line.rsplit(": ", 1)[1].split("x")[0]) >= 1.5
    assert not (tmp_path / "runs").exists()


def test_the_paper_preset_is_planned_with_gpu_hours_and_memory(tmp_path, capsys):
    argv = ["--preset", "paper", "--cluster", "slurm", "--runs-dir", str(tmp_path), "--set", "data.name=synthetic",
            "--dry-run"]
    assert main(LADDER, argv) == Exit.OK
    out = capsys.readouterr().out
    assert "GPU time: " in out and "GPU-h" in out and "fit_micro: " in out and "--dependency=afterany" in out


@pytest.mark.parametrize("args, message", [
    (["--set", "model.d_model=32", "--set", "model.n_heads=2"], "has 1 size(s); the L(N, D) fit with a held-out "
                                                                "size needs at least 3"),
    (["--set", "train.decay_fraction=1.5"], "train.decay_fraction is the share of the budget spent decaying, in (0, 1)"
                                            " (e.g. 0.2), got 1.5"),
    (["--set", "train.decay_fraction=0"], "in (0, 1)"),
    (["--set", "train.warmup_steps=400"], "inside its train.warmup_steps=400: raise train.tokens"),
])
@pytest.mark.parametrize("dry_run", [[], ["--dry-run"]])
def test_bad_ladders_are_refused_before_anything_runs(tmp_path, capsys, args, message, dry_run):
    assert main(LADDER, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), *args, *dry_run]) == Exit.USAGE
    out, err = capsys.readouterr()
    assert message in err and not out
    assert not (tmp_path / "runs").exists()


# -- what a (re)start runs, and in what order (fast) ----------------------------------------------

def _one_trunk() -> list[Point]:
    """One trunk's two segments and two branches (the smallest smoke rung, the AR; `ONE_TRUNK` runs them)."""
    return [p for p in build_points(LADDER, "smoke", [0], None, [])
            if _config(p).model.d_model == 8 and _config(p).model.kind == "ar"]


def test_a_restart_runs_only_what_is_not_done():
    seg1, seg2, short, long = _one_trunk()
    assert (seg1.stop, seg2.stop) == (short.resumes, long.resumes)
    assert still_needed([seg1, seg2, short, long], set()) == [seg1, seg2, short, long]
    assert still_needed([seg1, seg2, short, long], {seg1.id, seg2.id, short.id, long.id}) == []
    # the trunk stopped between its segments: the second segment, then the long branch, which waits for it
    left = still_needed([seg1, seg2, short, long], {seg1.id, short.id})
    assert [p.id for p in left] == [seg2.id, long.id] and left[0].after == () and left[1].after == (seg2.id,)
    # every branch done: a segment not done is not needed
    assert still_needed([seg1, seg2, short, long], {seg1.id, short.id, long.id}) == []


def test_a_segment_is_done_once_its_trunk_has_trained_to_its_stop_whatever_the_trunk_runs_status():
    from types import SimpleNamespace

    from studies.order import point_done

    seg1, seg2, short, _ = _one_trunk()
    trunk = SimpleNamespace(info=SimpleNamespace(status="KILLED"), data=SimpleNamespace(metrics={TOKENS: seg1.stop}))
    assert point_done(trunk, seg1) and not point_done(trunk, seg2)  # stopped between its segments
    assert not point_done(None, seg1) and not point_done(trunk, short)
    branch = SimpleNamespace(info=SimpleNamespace(status="FINISHED"), data=SimpleNamespace(metrics={}))
    assert point_done(branch, short)


def test_ray_tune_starts_a_point_only_when_what_it_waits_for_has_ended():
    from ray.tune.search import Searcher

    from studies.dependency_order import DependencyOrder

    seg1, seg2, short, long = _one_trunk()
    order = DependencyOrder([seg1, seg2, short, long])
    assert order.suggest("t1") == {"key": seg1.id}
    assert order.suggest("t2") is None  # everything else waits for the first segment
    order.on_trial_complete("t1")
    assert [order.suggest("t3"), order.suggest("t4")] == [{"key": seg2.id}, {"key": short.id}]
    assert order.suggest("t5") is None
    order.on_trial_complete("t3", error=True)  # a failed segment: the branch trains its trunk's missing part itself
    assert order.suggest("t6") == {"key": long.id}
    assert order.suggest("t7") is Searcher.FINISHED


def test_slurm_submits_each_waiting_point_with_a_dependency_on_the_jobs_it_waits_for():
    from studies.order import submit

    class Executor:
        """submitit's AutoExecutor as `submit` uses it: job ids in submission order, the parameters of each."""

        def __init__(self):
            self.params, self.jobs = {}, []

        def update_parameters(self, **params):
            self.params.update(params)

        def _job(self, point):
            job = type("Job", (), {"job_id": f"{100 + len(self.jobs)}"})()
            self.jobs.append((point.id, self.params.get("slurm_additional_parameters", {}).get("dependency")))
            return job

        def map_array(self, fn, points, contexts):
            return [self._job(p) for p in points]

        def submit(self, fn, point, context):
            return self._job(point)

    seg1, seg2, short, long = _one_trunk()
    executor = Executor()
    ids = submit(executor, print, [seg1, seg2, short, long], None, {"mail-type": "NONE"})
    assert ids == ["100", "101", "102", "103"]
    assert executor.jobs == [(seg1.id, None), (seg2.id, "afterany:100"), (short.id, "afterany:100"),
                             (long.id, "afterany:101")]
    assert executor.params["slurm_additional_parameters"] == {"mail-type": "NONE"}  # restored for later submissions


# -- one trunk and two branches, end to end (slow) -------------------------------------------------

ONE_TRUNK = """
import sys
from studies import ladder
from studies.launcher import main
from studies.study import Preset, Study
points = [e for e in ladder.STUDY.presets["smoke"].points if e["model.d_model"] == 8 and e["model.kind"] == "ar"]
study = Study("ladder", "one trunk, two branches", {"one": Preset("smoke", points)}, default_preset="one")
sys.exit(main(study, sys.argv[1:]))
"""


def _one_trunk_study(runs: Path, *args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", ONE_TRUNK, "--runs-dir", str(runs), *args], cwd=runs.parent,
                          env=env, capture_output=True, text=True, timeout=600)


def _runs(runs: Path) -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ladder")
    return [r for r in client.search_runs([experiment.experiment_id]) if RUN_KEY_TAG in r.data.tags]


def _assert_ran_in_order(runs: Path, logs: Path) -> None:
    """Each point started (its spec written) after what it waits for ended (its result written)."""
    seg1, seg2, short, long = _one_trunk()
    started = {p.id: (logs / f"{p.id}.spec.json").stat().st_mtime for p in (seg1, seg2, short, long)}
    ended = {p.id: (logs / f"{p.id}.result.json").stat().st_mtime for p in (seg1, seg2, short, long)}
    for point in (seg2, short, long):
        assert started[point.id] >= ended[point.after[0]], point.id


@pytest.mark.slow
def test_one_trunk_and_two_branches_run_in_order_a_second_start_runs_nothing_and_a_stopped_one_goes_on(tmp_path):
    runs = tmp_path / "runs"
    first = _one_trunk_study(runs)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 FINISHED of 4 points" in first.stdout
    _assert_ran_in_order(runs, runs / "logs")
    children = {r.data.tags[RUN_KEY_TAG]: r for r in _runs(runs)}
    seg1, seg2, short, long = _one_trunk()
    assert set(children) == {seg1.key, short.key, long.key}  # the trunk is one run
    assert children[seg1.key].data.metrics[TOKENS] == seg2.stop
    for branch in (short, long):
        assert children[branch.key].data.tags[TRUNK_RUN_TAG] == children[seg1.key].info.run_id
        assert children[branch.key].info.status == "FINISHED"
    specs = {p: p.stat().st_mtime for p in (runs / "logs").glob("*.spec.json")}
    again = _one_trunk_study(runs)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "every point is done; nothing to run" in again.stderr and "4 FINISHED of 4 points" in again.stdout
    assert {p: p.stat().st_mtime for p in (runs / "logs").glob("*.spec.json")} == specs
    assert {r.info.run_id for r in _runs(runs)} == {r.info.run_id for r in children.values()}
    # a ladder stopped in its last branch: a third start runs that branch alone, in its own run
    from mlflow.tracking import MlflowClient

    MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").set_terminated(children[long.key].info.run_id, "KILLED")
    third = _one_trunk_study(runs)
    assert third.returncode == 0, third.stdout[-3000:] + third.stderr[-3000:]
    rerun = {p.name for p in (runs / "logs").glob("*.spec.json") if p.stat().st_mtime != specs[p]}
    assert rerun == {f"{long.id}.spec.json"} and "4 FINISHED of 4 points" in third.stdout
    assert {r.info.run_id for r in _runs(runs)} == {r.info.run_id for r in children.values()}


_SLURM_REASON = slurm_unavailable_reason()


@pytest.mark.skipif(_SLURM_REASON is not None, reason=str(_SLURM_REASON))
@pytest.mark.slow
def test_on_slurm_one_trunk_and_two_branches_run_as_dependent_jobs_and_a_second_start_submits_nothing(tmp_path):
    runs = tmp_path / "runs"
    first = _one_trunk_study(runs, "--cluster", "slurm")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 FINISHED of 4 points" in first.stdout
    seg1, seg2, short, long = _one_trunk()
    children = {r.data.tags[RUN_KEY_TAG]: r for r in _runs(runs)}
    assert set(children) == {seg1.key, short.key, long.key}
    for branch in (short, long):  # a branch started after its trunk's snapshot was there
        assert children[branch.key].info.start_time >= children[seg1.key].info.start_time
        assert children[branch.key].data.tags[TRUNK_RUN_TAG] == children[seg1.key].info.run_id
    again = _one_trunk_study(runs, "--cluster", "slurm")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to submit" in again.stderr


def test_the_submission_line_names_the_array_and_the_dependent_jobs():
    from studies.order import submitted

    ids, waits = ["41_0", "41_1", "42", "41_2", "43"], [False, False, True, False, True]
    assert submitted(ids, waits) == "array 41 (3 tasks) and 2 dependent job(s)"
    assert submitted(["41"], [False]) == "array 41 (1 tasks)"  # an array of one is a plain job (tests/test_studies.py)
    assert submitted(["42"], [True]) == "1 dependent job(s)"

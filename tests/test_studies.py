"""The study launcher: grids, validation before launch, and whole studies on Ray Tune and SLURM.

The end-to-end tests run `python studies/inference_scaling.py --preset smoke` as a user would, in
a temporary runs folder, and read the result back from MLflow. SLURM tests skip unless `sbatch` is
on PATH and `sinfo` reaches a controller (`bash slurm/start_local_slurm.sh` starts one).
"""

import dataclasses
import json
import logging
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltm.config import RunConfig
from studies.inference_scaling import STUDY as INFERENCE_SCALING
from slurm_jobs import array_tasks, run_driver, slurm_unavailable_reason, stop_driver, task_running
from studies.launcher import main
from studies.messages import Point
from studies.points import build_points, study_key
from studies.study import grid
from studies.inference_cost import STUDY as INFERENCE_COST
from studies.sample_efficiency import STUDY as SAMPLE_EFFICIENCY

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "inference_scaling.py"


_SLURM_REASON = slurm_unavailable_reason()
needs_slurm = pytest.mark.skipif(_SLURM_REASON is not None, reason=str(_SLURM_REASON))


def study(runs: Path, *args: str, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run the smoke inference-scaling study as a user would, in `runs`' parent folder."""
    return run_driver([sys.executable, str(SCRIPT), "--preset", "smoke", "--runs-dir", str(runs), *args], runs,
                      runs.parent, timeout)


def child_runs(runs: Path, experiment: str = "inference_scaling") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if "ltm.run_key" in r.data.tags]


def parent_runs(runs: Path, experiment: str = "inference_scaling") -> list:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    return [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ltm.role") == "study"]


def assert_complete(runs: Path, n_points: int) -> None:
    """One FINISHED child per point, all under the study's single parent run."""
    children, parents = child_runs(runs), parent_runs(runs)
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(children) == n_points, [c.data.tags["ltm.run_key"] for c in children]
    assert len({c.data.tags["ltm.run_key"] for c in children}) == n_points
    assert {c.info.status for c in children} == {"FINISHED"}
    assert {c.data.tags["mlflow.parentRunId"] for c in children} == {parents[0].info.run_id}


# -- grids and options (fast) --------------------------------------------------------------------

def test_grid_is_a_product_of_zipped_axes():
    points = grid({"inference.steps": [1, 4]}, {"model.kind": ["ar", "ltm"], "model.n_latents": [0, 8]},
                  common={"seed": 3})
    assert points == [
        {"seed": 3, "inference.steps": 1, "model.kind": "ar", "model.n_latents": 0},
        {"seed": 3, "inference.steps": 1, "model.kind": "ltm", "model.n_latents": 8},
        {"seed": 3, "inference.steps": 4, "model.kind": "ar", "model.n_latents": 0},
        {"seed": 3, "inference.steps": 4, "model.kind": "ltm", "model.n_latents": 8},
    ]


@pytest.mark.parametrize("study_def", [INFERENCE_SCALING, SAMPLE_EFFICIENCY, INFERENCE_COST], ids=lambda s: s.name)
@pytest.mark.parametrize("preset", ["smoke", "micro", "paper"])
def test_every_preset_builds_valid_distinct_points(study_def, preset):
    points = build_points(study_def, preset, seeds=[0, 1], data=None, extra=[])
    assert len(points) == 2 * len(study_def.presets[preset].points)
    assert len({p.key for p in points}) == len(points)
    for p in points:  # a point crosses a process boundary as JSON and comes back the same run
        back = Point.from_dict(json.loads(json.dumps(p.to_dict())))
        assert back.key == p.key and RunConfig.from_dict(back.config).run_key() == p.key and back.label == p.label


def test_a_point_names_its_run_recipe():
    from ltm.config import run_preset
    from studies.study import Preset, Study

    mixed = Study("mixed", "two recipes", {"p": Preset("smoke", [{"recipe": "micro", "train.tokens": 1000}, {}])}, "p")
    named, plain = build_points(mixed, "p", [3], None, [])
    assert RunConfig.from_dict(named.config) == run_preset("micro").with_overrides({"train.tokens": 1000, "seed": 3})
    assert RunConfig.from_dict(plain.config) == run_preset("smoke").with_overrides({"seed": 3})
    assert named.label == {"recipe": "micro", "train.tokens": 1000, "seed": 3}
    # LTM-S/M/L of the paper presets are the ltm-s/m/l recipes, one per size
    layers = {RunConfig.from_dict(p.config).model.n_layers
              for p in build_points(INFERENCE_SCALING, "paper", [0], None, [])}
    assert layers == {run_preset(r).model.n_layers for r in ("ltm-s", "ltm-m", "ltm-l")} == {3, 6, 12}


def test_study_key_depends_on_the_grid_not_its_order():
    points = build_points(INFERENCE_SCALING, "smoke", [0], None, [])
    assert study_key(INFERENCE_SCALING, "smoke", points) == study_key(INFERENCE_SCALING, "smoke", points[::-1])
    more = build_points(INFERENCE_SCALING, "smoke", [0, 1], None, [])
    assert study_key(INFERENCE_SCALING, "smoke", points) != study_key(INFERENCE_SCALING, "smoke", more)


def test_a_plan_and_a_tracker_write_nothing_until_asked(tmp_path, monkeypatch):
    """Reading a plan writes no file and opening a store sets no environment: a password given in
    --tracking-uri reaches a file when a backend writes it, and MLflow's environment is set once where a
    process starts (`ltm.tracking.configure_mlflow`)."""
    from ltm.tracking import Tracker, configure_mlflow, default_tracking_uri
    from studies.plan import plan

    plan_ = plan(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--dry-run"])
    plan_.tracking_uri = "http://alice:hunter2@127.0.0.1:9/"
    context = plan_.context()
    assert context.credentials_file is None and context.tracking_uri == "http://127.0.0.1:9/"
    assert not (tmp_path / "runs" / "mlflow-credentials.json").exists()
    assert Path(plan_.write_credentials()) == tmp_path / "runs" / "mlflow-credentials.json"
    for var in ("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD",
                "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"):
        monkeypatch.delenv(var, raising=False)
    before = dict(os.environ)
    Tracker(default_tracking_uri(tmp_path), "e")
    assert dict(os.environ) == before
    configure_mlflow(plan_.tracking_uri)
    assert (os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]) == ("alice", "2")
    assert os.environ["MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"] == "false"  # no bar per config.json read


def test_importing_the_backends_makes_no_thread_pool():
    code = ("import gc, concurrent.futures as f, studies.ray_backend, studies.slurm_backend; "
            "print([getattr(o, '_thread_name_prefix', '') for o in gc.get_objects() "
            "if isinstance(o, f.ThreadPoolExecutor)])")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout
    assert "point-worker-spawner" not in out  # a Ray actor makes its spawning thread with its first worker


def test_dry_run_prints_the_grid_and_launches_nothing(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(runs), "--seeds", "0,1", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "8 points" in out and "steps" in out and "n_latents" in out
    assert not (runs / "mlflow.db").exists() and not (runs / "ray").exists()


def test_slurm_dry_run_prints_the_sbatch_parameters(tmp_path, capsys):
    args = ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--cluster", "slurm", "--dry-run"]
    assert main(INFERENCE_SCALING, args) == 0
    out = capsys.readouterr().out
    assert "#SBATCH --array=0-3%2" in out and "#SBATCH --partition=debug" in out and "#SBATCH --signal=USR2@" in out


def test_the_studys_message_level_reaches_the_process_that_runs_a_point(tmp_path):
    from ltm.cli import _HANDLER
    from ltm.names import Status
    from ltm.runlock import RunLock
    from studies.messages import CheckpointSource, TrialContext
    from studies.plan import plan
    from studies.point import run_point
    from studies.study import ZeroShotTask

    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path)]
    assert plan(INFERENCE_SCALING, argv).context().log_level == logging.INFO
    assert plan(INFERENCE_SCALING, [*argv, "-v"]).context().log_level == logging.DEBUG
    context = plan(INFERENCE_SCALING, [*argv, "-qq"]).context()
    assert context.log_level == logging.ERROR
    # a typed field across the process boundary (the worker's JSON spec, submitit's pickle); an older spec: INFO
    assert TrialContext.from_dict(json.loads(json.dumps(context.to_dict()))) == context
    assert TrialContext.from_dict({k: v for k, v in context.to_dict().items() if k != "log_level"}).log_level == 20
    # the process that runs the point shows its messages at that level, on stderr (the point's log)
    point = Point(key="evalkey", config={}, label={}, task=ZeroShotTask(), source=CheckpointSource("/nowhere"))
    with RunLock(tmp_path, "evalkey", "evaluated"):  # BUSY at once: only the set-up runs
        assert run_point(point, dataclasses.replace(context, log_level=logging.WARNING)).status == Status.BUSY
    for name in ("ltm", "studies", "analysis"):
        assert logging.getLogger(name).level == logging.WARNING and _HANDLER in logging.getLogger(name).handlers


def test_a_worker_process_reports_a_failed_point_on_its_stderr_even_at_the_quietest_level(tmp_path):
    from studies.messages import TrialContext

    context = TrialContext(f"sqlite:///{tmp_path / 'mlflow.db'}", "e", str(tmp_path), None, log_level=logging.ERROR)
    spec, result = tmp_path / "spec.json", tmp_path / "result.json"
    spec.write_text(json.dumps({"point": Point("badkey", {"model": {"no_such_field": 1}}, {}).to_dict(),
                                "context": context.to_dict()}))
    proc = subprocess.run([sys.executable, "-m", "studies.worker", str(spec), str(result)], cwd=ROOT,
                          capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(ROOT)}, timeout=300)
    assert proc.returncode == 1 and json.loads(result.read_text())["status"] == "ERROR"
    assert "error: point badkey failed\nTraceback" in proc.stderr and proc.stdout == "", proc.stderr[-3000:]


@pytest.mark.parametrize("args, message", [
    (["--preset", "huge"], "unknown preset 'huge'"),
    (["--set", "model.n_latents=3"], "model.n_latents=3 is not divisible"),
    (["--set", "train.tokens=0"], "train.tokens must be >= 1"),
    (["--data", "/nonexistent/corpus.txt"], "/nonexistent/corpus.txt"),
    (["--tracking-uri", "http://127.0.0.1:9"], "cannot reach the MLflow tracking server"),
    (["--tracking-uri", "sqlite:///relative.db"], "absolute SQLite path"),
    (["--cluster", "slurm", "--profile", "nowhere"], "no SLURM profile 'nowhere'"),
    (["--seeds", "a,b"], "--seeds takes comma-separated integers"),
], ids=["preset", "config", "budget", "data", "tracking-server", "tracking-path", "profile", "seeds"])
def test_bad_options_fail_before_anything_is_launched(tmp_path, capsys, args, message):
    runs = tmp_path / "runs"
    argv = ["--runs-dir", str(runs), *args]
    if "--preset" not in args:
        argv = ["--preset", "smoke", *argv]
    assert main(INFERENCE_SCALING, argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1
    assert not (runs / "mlflow.db").exists() and not (runs / "ray").exists() and not (runs / "slurm").exists()


# -- whole studies on Ray Tune (slow) --------------------------------------------------------------

@pytest.mark.slow
def test_local_smoke_study_finishes_and_a_second_start_adds_nothing(tmp_path):
    runs = tmp_path / "runs"
    first = study(runs)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "4 FINISHED of 4 points" in first.stdout
    assert_complete(runs, 4)
    from mlflow.tracking import MlflowClient

    experiment = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}").get_experiment_by_name("inference_scaling")
    assert experiment.tags["mlflow.note.content"] == INFERENCE_SCALING.description  # the UI describes the study
    # Tune's table shows every trial's point and numbers (tokens, tok/s, val ppl bound), not just its state, on
    # stderr: stdout carries the plan and the summary only
    assert "val ppl bound" in first.stderr and "val ppl bound" not in first.stdout and "TERMINATED" not in first.stdout
    for child in child_runs(runs):
        row = next(line for line in first.stderr.splitlines()
                   if child.data.tags["ltm.run_key"] in line and "TERMINATED" in line)
        assert f"{int(child.data.metrics['tokens'])}" in row and "FINISHED" in row
    ids = {c.info.run_id for c in child_runs(runs)}
    again = study(runs)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert {c.info.run_id for c in child_runs(runs)} == ids
    assert_complete(runs, 4)


def _wait_for(predicate, timeout: float, what: str) -> None:
    deadline = time.time() + timeout
    while not predicate():
        if time.time() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.5)


@pytest.mark.slow
def test_sigterm_to_the_driver_then_restart_completes_only_the_missing_points(tmp_path):
    runs = tmp_path / "runs"
    longer = ["--set", "train.tokens=131072", "--set", "train.checkpoint_every=16384"]
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "smoke", "--runs-dir", str(runs), *longer],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: any((runs / "checkpoints").glob("*/ckpt-*.pt")), 240, "a first checkpoint")
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=180)
    finally:
        stop_driver(proc, runs)
    assert proc.returncode == 3, out[-3000:]
    interrupted = {c.data.tags["ltm.run_key"]: c for c in child_runs(runs)}
    assert interrupted and all(c.info.status == "KILLED" for c in interrupted.values())  # checkpointed, resumable
    assert parent_runs(runs)[0].info.status == "KILLED"

    again = study(runs, *longer)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_complete(runs, 4)
    after = {c.data.tags["ltm.run_key"]: c.info.run_id for c in child_runs(runs)}
    assert all(after[k] == c.info.run_id for k, c in interrupted.items())  # resumed into the same runs
    resumed = "".join(p.read_text() for p in (runs / "logs").glob("*.log"))
    assert resumed.count("resuming run") == len(interrupted)


@pytest.mark.slow
def test_a_run_left_running_by_a_dead_worker_is_marked_killed_and_resumed(tmp_path):
    from ltm.config import RunConfig
    from ltm.tracking import Tracker

    runs = tmp_path / "runs"
    points = build_points(INFERENCE_SCALING, "smoke", [0], None, [])
    tracker = Tracker(f"sqlite:///{runs / 'mlflow.db'}", "inference_scaling", artifact_root=runs / "artifacts")
    key = points[0].key
    assert RunConfig.from_dict(points[0].config).run_key() == key
    orphan = tracker.create_run(key, "orphan", {}, {})  # RUNNING, its worker long gone
    result = study(runs)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"marked run {key} KILLED" in result.stderr
    runs_by_key = {c.data.tags["ltm.run_key"]: c for c in child_runs(runs)}
    assert runs_by_key[key].info.run_id == orphan and runs_by_key[key].info.status == "FINISHED"
    assert len(runs_by_key) == 4


# -- SLURM (slow; needs a cluster) -------------------------------------------------------------------

@needs_slurm
@pytest.mark.slow
def test_slurm_smoke_study_finishes_and_a_second_start_adds_nothing(tmp_path):
    runs = tmp_path / "runs"
    first = study(runs, "--cluster", "slurm")
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    assert "mlflow server" in first.stderr  # a sqlite store is served to the workers over http
    assert_complete(runs, 4)
    # ... with basic auth: the password is in a file only this user reads, and in no other file or output.
    (creds,) = runs.glob("slurm/*/mlflow-credentials.json")
    assert creds.stat().st_mode & 0o077 == 0
    password = json.loads(creds.read_text())["password"].encode()
    leaks = [f for f in runs.rglob("*") if f.is_file() and f != creds and password in f.read_bytes()]
    assert not leaks and password.decode() not in first.stdout + first.stderr
    ids = {c.info.run_id for c in child_runs(runs)}
    again = study(runs, "--cluster", "slurm")
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert "nothing to submit" in again.stderr
    assert {c.info.run_id for c in child_runs(runs)} == ids
    code = next((runs / "slurm").glob("inference_scaling-smoke-*/code/ltm/train.py"))
    assert code.read_text() == (ROOT / "ltm" / "train.py").read_text()  # the code was snapshotted


@needs_slurm
@pytest.mark.slow
def test_slurm_scancel_of_one_task_then_restart_completes_only_that_point(tmp_path):
    runs = tmp_path / "runs"
    longer = ["--set", "train.tokens=131072", "--set", "train.checkpoint_every=16384"]
    first_key = build_points(INFERENCE_SCALING, "smoke", [0], None, longer[1::2])[0].key
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "smoke", "--runs-dir", str(runs), "--cluster",
                             "slurm", *longer],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(array_tasks(runs)) == 4, 180, "the array's submission")
        victim = array_tasks(runs)[0]
        _wait_for(lambda: task_running(victim) and any((runs / "checkpoints" / first_key).glob("ckpt-*.pt")), 240,
                  "the first task running with a checkpoint")
        subprocess.run(["scancel", victim], check=True)
        out, _ = proc.communicate(timeout=600)
    finally:
        stop_driver(proc, runs)
    assert proc.returncode == 1, out[-3000:]  # one point did not finish
    statuses = sorted(c.info.status for c in child_runs(runs))
    assert statuses.count("FINISHED") == 3 and len(statuses) == 4, statuses
    killed = next(c for c in child_runs(runs) if c.info.status != "FINISHED")

    again = study(runs, "--cluster", "slurm", *longer)
    assert again.returncode == 0, again.stdout[-3000:] + again.stderr[-3000:]
    assert_complete(runs, 4)
    assert killed.info.run_id in {c.info.run_id for c in child_runs(runs)}  # resumed, not duplicated
    assert "(1 tasks)" in again.stderr  # only the missing point was submitted


@needs_slurm
@pytest.mark.slow
def test_slurm_preemption_signal_checkpoints_requeues_and_resumes_the_same_run(tmp_path):
    runs = tmp_path / "runs"
    longer = ["--set", "train.tokens=131072", "--set", "train.checkpoint_every=16384"]
    first_key = build_points(INFERENCE_SCALING, "smoke", [0], None, longer[1::2])[0].key
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--preset", "smoke", "--runs-dir", str(runs), "--cluster",
                             "slurm", "--seeds", "0", *longer], cwd=tmp_path, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        _wait_for(lambda: len(array_tasks(runs)) == 4, 180, "the array's submission")
        victim = array_tasks(runs)[0]
        _wait_for(lambda: task_running(victim) and any((runs / "checkpoints" / first_key).glob("ckpt-*.pt")), 240,
                  "the first task training")
        subprocess.run(["scancel", "--signal=USR2", victim], check=False)  # as SLURM does before a timeout
        out, _ = proc.communicate(timeout=600)  # SLURM holds a requeued task for about 2 minutes
    finally:
        stop_driver(proc, runs)
    assert proc.returncode == 0, out[-3000:]
    assert_complete(runs, 4)
    logs = "".join(p.read_text() for p in (runs / "slurm").glob(f"*/{victim}/*_log.*"))  # .out and .err
    assert "Requeued job" in logs and "resuming run" in logs, logs[-3000:]


def test_micro_presets_sit_where_the_latents_can_pay(tmp_path):
    """The micro grids (docs/RESULTS.md): the decoder's receptive field is shorter than the corpus's
    plan period, which fits in the block; the exact optimum of that receptive field is >= 0.3 nats
    per token worse than full context; T spans 4..64 with two latent counts, both decoder-gradient
    modes are trained, and the AR baselines have the same window and full context."""
    import math

    from ltm.config import RunConfig
    from ltm.data import load_blocks, optimal_ppl

    points = [RunConfig.from_dict(p.config) for p in build_points(INFERENCE_SCALING, "micro", [0], None, [])]
    ltm_runs = [c for c in points if c.model.kind == "ltm"]
    assert {4, 16, 32, 64} <= {c.inference.steps for c in ltm_runs}
    assert len({c.model.n_latents for c in ltm_runs}) >= 2
    assert {c.inference.decoder_grad for c in ltm_runs} == {"final", "trajectory"}
    assert {c.model.window for c in points if c.model.kind == "ar"} == {8, None}
    cfg = ltm_runs[0]
    period = cfg.data.synthetic_slots * (1 + cfg.data.synthetic_event_prob) / cfg.data.synthetic_event_prob
    assert cfg.model.receptive_field < period < cfg.model.ctx
    data = cfg.with_overrides({"data.cache_dir": str(tmp_path)}).data
    blocks = load_blocks(data, cfg.model.ctx, "validation")
    gap = math.log(optimal_ppl(blocks, window=cfg.model.receptive_field, n_blocks=32)
                   / optimal_ppl(blocks, n_blocks=32))
    assert gap >= 0.3, gap
    efficiency = [RunConfig.from_dict(p.config) for p in build_points(SAMPLE_EFFICIENCY, "micro", [0], None, [])]
    assert {c.model.window for c in efficiency if c.model.kind == "ar"} == {8, None}
    assert all(c.data.synthetic_tokens > c.train.tokens for c in efficiency)  # no epoch repeats

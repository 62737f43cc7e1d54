"""Orchestration overhead of the study launcher (Ray Tune + worker process + MLflow) on this machine.

    python benchmarks/bench_orchestration.py [--seconds 60] [--out benchmarks/orchestration.json]

Trials are micro LTM runs (T=16) sized to take about `--seconds` of training on one thread.

1. bare: each trial's config through `ltm.train.run` in this (warm) process, one thread, in a
   store whose experiment already exists (a study's driver creates it before any trial); the time
   spent inside MLflow calls (Tracker methods, run creation, the system-metrics sampler) is
   timed separately, so bare - mlflow = the training itself.
2. serial: the same trials as a study through the launcher, one at a time, 1 CPU each. Its
   timeline (trial function start = the spec file's mtime, the MLflow run's start and end, the
   result file's mtime) splits each trial into orchestration and the run itself:
   * per-trial orchestration = the gap between trials + trial start -> run created + run end ->
     result, for a trial whose Ray actor already has its worker (the steady state; run()'s setup
     and first MLflow calls fall in it too, so it errs high);
   * worker start = the same for the first trial of an actor, minus the steady state: once per
     actor (per concurrent slot), not per trial.
   Overhead per trial = (orchestration + MLflow) / training. Also reported, with the runs' times
   taken from this timeline: the overhead per trial of this 2-trial study (the previous version's
   figure: all but the driver's fixed cost, spread over the trials) and the whole study's overhead
   (fixed costs included).
3. concurrent: the same trials, 2 at a time, 1 CPU each: speed-up = serial wall / concurrent wall.
4. serial-2cpu: one at a time with 2 threads each (the other way to use two cores).
5. again: the serial study started again (every point already FINISHED): the driver's fixed cost
   (Ray start, MLflow queries, Tune bookkeeping).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ltm.names import RUN_KEY_TAG, Status  # noqa: E402
from studies.launcher import main  # noqa: E402
from studies.points import build_points  # noqa: E402
from studies.study import Preset, Study  # noqa: E402

TOKENS_PER_SECOND_1T = 1500  # micro-s, T=16, one thread, on the development CPU (measured: 51,200 tok in ~34 s)


def bench_study(tokens: int) -> Study:
    point = {"inference.steps": 16, "train.tokens": tokens, "train.eval_every": 0, "train.checkpoint_every": 0}
    return Study("bench_orchestration", "orchestration benchmark", {"bench": Preset("micro", [point])}, "bench")


@contextlib.contextmanager
def mlflow_timer():
    """Accumulate the wall time spent in MLflow calls made by ltm.train.run."""
    import ltm.tracking as tracking
    import ltm.lifecycle as lifecycle

    spent = {"s": 0.0}
    patched = []

    def wrap(owner, name):
        original = getattr(owner, name)

        def timed(*args, **kwargs):
            t = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                spent["s"] += time.perf_counter() - t
        setattr(owner, name, timed)
        patched.append((owner, name, original))

    for name in ("__init__", "find_run", "create_run", "reopen", "log_metrics", "set_tags", "log_dict",
                 "max_logged_step", "finish"):
        wrap(tracking.Tracker, name)
    wrap(lifecycle, "start_system_metrics")
    try:
        yield spent
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def bare(study: Study, seeds: list[int], runs: Path) -> dict:
    import torch

    from ltm.config import RunConfig
    from ltm.tracking import Tracker, default_tracking_uri
    from ltm.train import run

    torch.set_num_threads(1)
    Tracker(default_tracking_uri(runs), "bare")  # the store and experiment, as a study's driver creates them
    walls, mlflow_s = [], []
    for point in build_points(study, "bench", seeds, None, []):
        with mlflow_timer() as spent:
            t = time.perf_counter()
            result = run(RunConfig.from_dict(point.config), runs_dir=runs, experiment="bare", progress=False)
            walls.append(time.perf_counter() - t)
        assert result.status == Status.FINISHED, result
        mlflow_s.append(spent["s"])
    return {"trial_wall_s": walls, "mlflow_s": mlflow_s}


def launch(study: Study, runs: Path, *args: str) -> float:
    t = time.perf_counter()
    code = main(study, ["--runs-dir", str(runs), "--seeds", "0,1", *args])
    if code != 0:
        raise SystemExit(f"study failed with status {code}")
    return time.perf_counter() - t


def timeline(runs: Path, started: float) -> list[dict]:
    """Per trial of a serial study, in order: gap since the previous trial's result (or the study's
    start), trial start -> MLflow run created, the run, run end -> result file."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name("bench_orchestration")
    rows = []
    for r in client.search_runs([exp.experiment_id]):
        if key := r.data.tags.get(RUN_KEY_TAG):
            logs = runs / "logs"
            rows.append(((logs / f"{key}.spec.json").stat().st_mtime, r.info.start_time / 1e3, r.info.end_time / 1e3,
                         (logs / f"{key}.result.json").stat().st_mtime))
    out, previous = [], started
    for fn_start, run_start, run_end, result in sorted(rows):
        out.append({"gap_s": fn_start - previous, "start_to_run_s": run_start - fn_start,
                    "run_s": run_end - run_start, "run_end_to_result_s": result - run_end})
        previous = result
    return out


def summarize(out: dict) -> dict:
    """The headline numbers. Fractions divide by training time (a run's wall minus its MLflow time);
    the study-level ones take the run times from the serial study's own timeline, so a machine
    that trains slower during the study than during `bare` does not count as orchestration."""
    b, timeline_ = out["bare"], out["serial_timeline"]
    trials = len(timeline_)
    trial = sum(b["trial_wall_s"]) / len(b["trial_wall_s"])
    mlflow_s = sum(b["mlflow_s"]) / len(b["mlflow_s"])
    train_only = trial - mlflow_s
    first, steady = ({k: v for k, v in t.items() if k != "run_s"} for t in timeline_[:2])
    orchestration = sum(steady.values())
    runs_s = sum(t["run_s"] for t in timeline_)
    study_training = runs_s - trials * mlflow_s
    outside_runs = out["serial_wall_s"] - runs_s
    return {
        "bare_trial_s": round(trial, 2),
        "mlflow_per_trial_s": round(mlflow_s, 2),
        "mlflow_fraction_of_training": round(mlflow_s / train_only, 4),
        "orchestration_per_trial_s": round(orchestration, 2),
        "overhead_per_trial_fraction_of_training": round((orchestration + mlflow_s) / train_only, 4),
        "worker_start_per_actor_s": round(first["start_to_run_s"] - steady["start_to_run_s"], 2),
        "driver_to_first_trial_s": round(first["gap_s"], 2),
        "driver_fixed_s": round(out["again_wall_s"], 2),
        # The previous benchmark's figure: everything but the driver's fixed cost, spread over the trials.
        "overhead_per_trial_in_2_trial_study_fraction": round(
            ((outside_runs - out["again_wall_s"]) / trials + mlflow_s) / (study_training / trials), 4),
        "study_overhead_fraction_of_training": round((outside_runs + trials * mlflow_s) / study_training, 4),
        "speedup_2_concurrent_1cpu_vs_serial_1cpu": round(out["serial_wall_s"] / out["concurrent_wall_s"], 3),
        "speedup_2_concurrent_1cpu_vs_serial_2cpu": round(out["serial_2cpu_wall_s"] / out["concurrent_wall_s"], 3),
    }


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per trial (default 60)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "orchestration.json"))
    args = parser.parse_args(argv)
    tokens = max(2048, int(args.seconds * TOKENS_PER_SECOND_1T) // 2048 * 2048)
    study = bench_study(tokens)
    cpuinfo = Path("/proc/cpuinfo").read_text().splitlines() if Path("/proc/cpuinfo").exists() else []
    model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")),
                 platform.processor() or platform.machine())
    out: dict = {"command": " ".join(["python", "benchmarks/bench_orchestration.py", *(argv or sys.argv[1:])]),
                 "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": model,
                 "cpus": os.cpu_count(), "trial_tokens": tokens, "trials": 2}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = bare(study, [0, 1], tmp / "bare")
        out["bare"] = b
        started = time.time()
        out["serial_wall_s"] = launch(study, tmp / "serial", "--max-concurrent", "1", "--cpus-per-trial", "1")
        out["serial_timeline"] = timeline(tmp / "serial", started)
        out["again_wall_s"] = launch(study, tmp / "serial", "--max-concurrent", "1", "--cpus-per-trial", "1")
        out["concurrent_wall_s"] = launch(study, tmp / "concurrent", "--max-concurrent", "2", "--cpus-per-trial", "1")
        out["serial_2cpu_wall_s"] = launch(study, tmp / "serial2", "--max-concurrent", "1", "--cpus-per-trial", "2")
    out["summary"] = summarize(out)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["summary"], indent=2))
    return out


if __name__ == "__main__":
    main_()

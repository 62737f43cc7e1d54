"""Orchestration overhead of the study launcher (Ray Tune + worker process + MLflow) on this machine.

    python benchmarks/bench_orchestration.py [--seconds 60] [--out benchmarks/orchestration.json]

Trials are micro LTM runs (T=16) sized to take about `--seconds` of training on one thread.

1. bare: each trial's config through `ltm.train.run` in this (warm) process, one thread; the time
   spent inside MLflow calls (Tracker methods, run creation, the system-metrics sampler) is
   timed separately, so bare - mlflow = the training itself.
2. serial: the same trials as a study through the launcher, one at a time, 1 CPU each.
   Per-trial overhead = (study wall - driver fixed cost) / trials - bare trial wall.
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

from studies.launcher import Preset, Study, build_points, main  # noqa: E402

TOKENS_PER_SECOND_1T = 1500  # micro-s, T=16, one thread, on the development CPU (measured: 51,200 tok in ~34 s)


def bench_study(tokens: int) -> Study:
    point = {"inference.steps": 16, "train.tokens": tokens, "train.eval_every": 0, "train.checkpoint_every": 0}
    return Study("bench_orchestration", "orchestration benchmark", {"bench": Preset("micro", [point])}, "bench")


@contextlib.contextmanager
def mlflow_timer():
    """Accumulate the wall time spent in MLflow calls made by ltm.train.run."""
    import ltm.tracking as tracking
    import ltm.train as train

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
    wrap(train, "_system_metrics")
    try:
        yield spent
    finally:
        for owner, name, original in patched:
            setattr(owner, name, original)


def bare(study: Study, seeds: list[int], runs: Path) -> dict:
    import torch

    from ltm.config import RunConfig
    from ltm.train import run

    torch.set_num_threads(1)
    walls, mlflow_s = [], []
    for point in build_points(study, "bench", seeds, None, []):
        with mlflow_timer() as spent:
            t = time.perf_counter()
            result = run(RunConfig.from_dict(point["config"]), runs_dir=runs, experiment="bare", progress=False)
            walls.append(time.perf_counter() - t)
        assert result.status == "FINISHED", result
        mlflow_s.append(spent["s"])
    return {"trial_wall_s": walls, "mlflow_s": mlflow_s}


def launch(study: Study, runs: Path, *args: str) -> float:
    t = time.perf_counter()
    code = main(study, ["--runs-dir", str(runs), "--seeds", "0,1", *args])
    if code != 0:
        raise SystemExit(f"study failed with status {code}")
    return time.perf_counter() - t


def main_(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=60.0, help="training time per trial (default 60)")
    parser.add_argument("--out", default=str(ROOT / "benchmarks" / "orchestration.json"))
    args = parser.parse_args(argv)
    tokens = max(2048, int(args.seconds * TOKENS_PER_SECOND_1T) // 2048 * 2048)
    study = bench_study(tokens)
    out: dict = {"machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                 "trial_tokens": tokens, "trials": 2}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        b = bare(study, [0, 1], tmp / "bare")
        out["bare"] = b
        out["serial_wall_s"] = launch(study, tmp / "serial", "--max-concurrent", "1", "--cpus-per-trial", "1")
        out["again_wall_s"] = launch(study, tmp / "serial", "--max-concurrent", "1", "--cpus-per-trial", "1")
        out["concurrent_wall_s"] = launch(study, tmp / "concurrent", "--max-concurrent", "2", "--cpus-per-trial", "1")
        out["serial_2cpu_wall_s"] = launch(study, tmp / "serial2", "--max-concurrent", "1", "--cpus-per-trial", "2")
    trial = sum(b["trial_wall_s"]) / 2
    train_only = trial - sum(b["mlflow_s"]) / 2
    per_trial = (out["serial_wall_s"] - out["again_wall_s"]) / 2 - trial  # Ray actor + worker process + imports
    out["summary"] = {
        "bare_trial_s": round(trial, 2),
        "mlflow_per_trial_s": round(sum(b["mlflow_s"]) / 2, 2),
        "mlflow_fraction_of_training": round((trial - train_only) / train_only, 4),
        "ray_worker_per_trial_s": round(per_trial, 2),
        "driver_fixed_s": round(out["again_wall_s"], 2),
        "overhead_per_trial_fraction_of_training": round((per_trial + trial - train_only) / train_only, 4),
        "speedup_2_concurrent_1cpu_vs_serial_1cpu": round(out["serial_wall_s"] / out["concurrent_wall_s"], 3),
        "speedup_2_concurrent_1cpu_vs_serial_2cpu": round(out["serial_2cpu_wall_s"] / out["concurrent_wall_s"], 3),
    }
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(json.dumps(out["summary"], indent=2))
    return out


if __name__ == "__main__":
    main_()

"""The shared study launcher: a grid of run specs -> one MLflow parent run -> trials on a backend.

A study script declares a `Study` (named presets, each a base run preset and a list of override
dicts) and calls `main(study)`. The launcher

1. builds and validates every grid point before anything starts (unknown preset, impossible
   config, missing data, unusable tracking store: exit 2 with a one-line message);
2. finds or creates the study's MLflow parent run (one per study identity = study name + the
   run keys of its grid, so starting the same study again continues it instead of adding a new
   parent) and marks runs that a dead worker left RUNNING as KILLED;
3. runs every point as a child run through `ltm.train.run` on one backend:
   * `local` / `ray`: Ray Tune (`ray.tune.Tuner`), resources per trial, storage under the runs
     folder, retries through `FailureConfig`, `Tuner.restore` of an interrupted study; each Ray
     actor runs its trials one after another in one persistent worker process (`PointWorker`);
     `--address` joins an existing Ray cluster, e.g. one that `slurm/ray_study.sbatch` starts
     inside a SLURM allocation (`sbatch slurm/ray_study.sbatch STUDY [options]`);
   * `slurm`: one submitit job array; jobs requeue on timeout/preemption (SIGUSR2) and resume
     from their checkpoint into the same MLflow run;
4. prints a summary table and exits 0 when every point FINISHED (1 if some failed, 3 if the
   study was interrupted; start it again to complete the missing points).

Points whose run key already FINISHED are skipped by `ltm.train.run` itself; interrupted ones
resume from their checkpoint; no point is ever duplicated.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
"""The project root (holds ltm/ and studies/): put on workers' PYTHONPATH and snapshotted for SLURM."""
PROFILES_DIR = ROOT / "slurm" / "profiles"
STUDY_TAG, STUDY_KEY_TAG, ROLE_TAG = "ltm.study", "ltm.study_key", "ltm.role"
EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_INTERRUPTED = 0, 1, 2, 3


# -- declaring a study -----------------------------------------------------------------------

@dataclass(frozen=True)
class Preset:
    """One size of a study: a base run preset, the grid as override dicts, resources per trial."""

    base: str
    """A run preset of `ltm.config.run_preset` (smoke, micro, ltm-s, ...)."""
    points: list[dict]
    """One dict of dotted-key overrides per grid point (see `grid`)."""
    description: str = ""
    cpus: float = 1
    """CPUs per trial (Ray resources; SLURM cpus_per_task when the profile does not say)."""
    gpus: float = 0
    """GPUs per trial; fractional values share a GPU between Ray trials."""
    profile: str = "local"
    """Default SLURM profile (slurm/profiles/<name>.yaml)."""
    task: dict | None = None
    """An evaluation (`studies.tasks`: name plus arguments) run on each point's checkpoint, or on
    the checkpoints given with --checkpoint; None: the points are training runs."""


@dataclass(frozen=True)
class Study:
    """A named study: presets of grids over the paper's axes."""

    name: str
    description: str
    presets: dict[str, Preset]
    default_preset: str = "micro"
    summary_metrics: tuple[str, ...] = ("val/ppl_bound", "val/ppl_iw")
    """Final metrics shown in the summary table (shell-style patterns, e.g. "gsm8k/*/pass*")."""
    data_option: Callable[[str], tuple[dict, dict]] | None = None
    """How --data applies: (config overrides, task overrides); None: it sets data.name."""


def grid(*axes: dict[str, list], common: dict | None = None) -> list[dict]:
    """The product of axes; each axis maps dotted keys to equally long value lists (zipped).

    grid({"inference.steps": [1, 4]}, {"model.n_latents": [4, 16]}) -> 4 points;
    grid({"model.kind": ["ar", "ltm"], "inference.steps": [0, 16]}) -> 2 points (zipped).
    """
    options = []
    for axis in axes:
        lengths = {len(v) for v in axis.values()}
        if len(lengths) != 1:
            raise ValueError(f"the lists of one axis must have equal lengths, got {axis}")
        options.append([dict(zip(axis, values)) for values in zip(*axis.values())])
    return [{**(common or {}), **{k: v for part in combo for k, v in part.items()}}
            for combo in itertools.product(*options)]


# -- the grid as run specs -------------------------------------------------------------------

class UsageError(Exception):
    """Bad options: reported in one line, exit status 2, nothing launched."""


def build_points(study: Study, preset: str, seeds: list[int], data: str | None, extra: list[str]) -> list[dict]:
    """Every grid point as a JSON-able spec {key, config, label}; raises ConfigError on a bad point."""
    from ltm.config import ConfigError, run_preset

    if preset not in study.presets:
        raise ConfigError(f"unknown preset {preset!r} for study {study.name}; known: {', '.join(study.presets)}")
    p = study.presets[preset]
    base = run_preset(p.base)
    points, seen = [], set()
    for overrides in p.points:
        for seed in seeds:
            cfg = base.with_overrides({**overrides, "seed": seed})
            if data:
                cfg = cfg.with_overrides(study.data_option(data)[0] if study.data_option else {"data.name": data})
            if extra:
                cfg = cfg.with_overrides(extra)
            cfg = _absolute_paths(cfg)
            key = cfg.run_key()
            if key in seen:
                continue
            seen.add(key)
            points.append({"key": key, "config": cfg.to_dict(), "label": {**overrides, "seed": seed}})
    return points


def _absolute_paths(cfg):
    """Local data paths made absolute: trials run in other working directories."""
    data = cfg.data
    fix = {f"data.{k}": str(Path(v).resolve()) for k in ("name", "val_name", "cache_dir")
           if isinstance(v := getattr(data, k), str) and v != "synthetic" and (k == "cache_dir" or Path(v).exists())}
    return cfg.with_overrides(fix) if fix else cfg


def study_key(study: Study, preset: str, points: list[dict]) -> str:
    """The identity of a study invocation: its name, preset and the run keys of its points."""
    blob = json.dumps([study.name, preset, sorted(p["key"] for p in points)]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def varying_columns(points: list[dict]) -> list[str]:
    """Dotted config keys whose values differ between points (the grid's axes), plus seed."""
    from ltm.config import RunConfig

    flats = [RunConfig.from_dict(p["config"]).flat() for p in points]
    keys = [k for k in flats[0] if len({json.dumps(f[k], default=str) for f in flats}) > 1]
    return keys or ["seed"]


def grid_table(points: list[dict], extra_columns: dict[str, list] | None = None):
    """A DataFrame with one row per point: run key and the varying config values."""
    import pandas as pd
    from ltm.config import RunConfig

    cols = varying_columns(points)
    rows = []
    for i, p in enumerate(points):
        flat = RunConfig.from_dict(p["config"]).flat()
        row = {"key": p["key"], **{c.replace("model.", "").replace("inference.", "").replace("train.", ""): flat[c]
                                   for c in cols}}
        for name, values in (extra_columns or {}).items():
            row[name] = values[i]
        rows.append(row)
    return pd.DataFrame(rows)


# -- options -----------------------------------------------------------------------------------

def build_parser(study: Study) -> argparse.ArgumentParser:
    presets = "; ".join(f"{n}: {p.description}" for n, p in study.presets.items())
    parser = argparse.ArgumentParser(
        prog=f"python studies/{study.name}.py", description=f"{study.description} Presets: {presets}.",
        epilog="Starting the same study again skips finished points and resumes interrupted ones. "
               "Exit status: 0 all finished, 1 some failed, 2 bad options (nothing launched), 3 interrupted.")
    parser.add_argument("--cluster", choices=["local", "ray", "slurm"], default="local",
                        help="local: Ray Tune on this machine (default); ray: an existing Ray cluster (--address); "
                             "slurm: a submitit job array")
    parser.add_argument("--preset", default=study.default_preset, help=f"one of {', '.join(study.presets)} "
                                                                        f"(default {study.default_preset})")
    parser.add_argument("--data", help="data.name for every point: synthetic, openwebtext, a local path, ...")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value in every point, e.g. train.tokens=1e5 (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--experiment", default=None, help=f"MLflow experiment (default {study.name})")
    parser.add_argument("--runs-dir", default="runs", help="checkpoints, MLflow store, Ray and SLURM folders (default runs)")
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials at once (default: CPUs / CPUs per trial locally; unlimited otherwise)")
    parser.add_argument("--cpus-per-trial", type=float, help="CPUs per trial (default: the preset's)")
    parser.add_argument("--gpus-per-trial", type=float, help="GPUs per trial, fractions allowed (default: the preset's)")
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid, resources and sbatch parameters; launch nothing")
    if any(p.task for p in study.presets.values()):
        task_group = parser.add_argument_group("evaluation")
        task_group.add_argument("--checkpoint", action="append", default=[], metavar="PATH_OR_RUN_ID",
                                help="evaluate this checkpoint (a path, or a training run's MLflow id in the "
                                     "study's store) instead of training the preset's models (repeatable)")
        task_group.add_argument("--task", dest="task_overrides", action="append", default=[], metavar="KEY=VALUE",
                                help="override an argument of the evaluation, e.g. problems=100 or shots=0,5 "
                                     "(repeatable; --dry-run shows them)")
    ray_group = parser.add_argument_group("ray")
    ray_group.add_argument("--address", help="address of an existing Ray cluster (implies --cluster ray)")
    ray_group.add_argument("--fresh", action="store_true", help="do not restore the Tune experiment of an earlier start")
    slurm_group = parser.add_argument_group("slurm")
    slurm_group.add_argument("--profile", help="SLURM profile: a name in slurm/profiles/ or a YAML path "
                                               "(default: the preset's)")
    slurm_group.add_argument("--mlflow-server", choices=["auto", "off"], default="auto",
                             help="auto (default): with a sqlite URI the driver serves it with `mlflow server` on this "
                                  "node and workers log over http; off: workers write the sqlite file directly "
                                  "(only safe when every job runs on this node's local disk)")
    slurm_group.add_argument("--no-wait", action="store_true", help="submit and return (needs an http tracking URI)")
    return parser


@dataclass
class Plan:
    """Everything a backend needs, validated."""

    study: Study
    preset: str
    cluster: str
    points: list[dict]
    study_key: str
    runs_dir: Path
    tracking_uri: str
    experiment: str
    cpus: float
    gpus: float
    max_concurrent: int
    max_failures: int
    args: argparse.Namespace
    profile: dict = field(default_factory=dict)
    parent_run_id: str | None = None
    problem: Exception | None = None
    """A dry run's validation error, reported after the grid."""

    @property
    def tags(self) -> dict:
        return {STUDY_TAG: self.study.name, STUDY_KEY_TAG: self.study_key, "ltm.preset": self.preset,
                "ltm.backend": self.cluster}

    @property
    def credentials_file(self) -> str | None:
        """A user:password given in --tracking-uri, moved to a file only this user can read."""
        from ltm.tracking import split_credentials, write_credentials

        creds = split_credentials(self.tracking_uri)[1]
        return str(write_credentials(self.runs_dir / "mlflow-credentials.json", *creds)) if creds else None

    def common(self, tracking_uri: str | None = None, credentials_file: str | Path | None = None) -> dict:
        """What every trial needs besides its spec (JSON-able, absolute paths; no password: trials read
        the credentials file, so specs and logs never hold one)."""
        from ltm.tracking import split_credentials

        uri = split_credentials(tracking_uri or self.tracking_uri)[0]
        creds = credentials_file or self.credentials_file
        return {"tracking_uri": uri, "credentials_file": str(creds) if creds else None, "experiment": self.experiment,
                "runs_dir": str(self.runs_dir), "parent_run_id": self.parent_run_id, "tags": self.tags,
                "cpus": self.cpus, "gpus": self.gpus}


def plan(study: Study, argv: list[str] | None = None) -> Plan:
    """Parse and validate the options; raises UsageError / ConfigError / TrackingError / DataError."""
    from ltm.config import ConfigError
    from ltm.data import check_data
    from ltm.tracking import check_tracking_uri, default_tracking_uri

    args = build_parser(study).parse_args(argv)
    if args.address:
        args.cluster = "ray"
    if args.cluster == "ray" and not args.address:
        raise UsageError("--cluster ray needs --address of a running Ray cluster (or use --cluster local)")
    try:
        seeds = [int(s) for s in args.seeds.split(",") if s.strip()]
    except ValueError:
        raise UsageError(f"--seeds takes comma-separated integers, got {args.seeds!r}") from None
    if not seeds:
        raise UsageError("--seeds is empty")
    points = build_points(study, args.preset, seeds, args.data, args.overrides)
    preset = study.presets[args.preset]
    problem = None
    for data_cfg in {json.dumps(p["config"]["data"], sort_keys=True) for p in points}:
        from ltm.config import RunConfig

        try:
            check_data(RunConfig.from_dict({"data": json.loads(data_cfg)}).data)
        except (ConfigError, FileNotFoundError) as err:
            if not args.dry_run:
                raise
            problem = err  # a dry run still shows the grid, then reports the problem (exit 2)
    runs_dir = Path(args.runs_dir).resolve()
    uri = args.tracking_uri or default_tracking_uri(runs_dir)
    check_tracking_uri(uri)
    if preset.task is not None:
        points = evaluation_points(study, preset, points, args, uri, runs_dir)
    cpus = args.cpus_per_trial if args.cpus_per_trial is not None else preset.cpus
    gpus = args.gpus_per_trial if args.gpus_per_trial is not None else preset.gpus
    if cpus <= 0 or gpus < 0:
        raise UsageError(f"need --cpus-per-trial > 0 and --gpus-per-trial >= 0, got {cpus} and {gpus}")
    profile = {}
    if args.cluster == "slurm":
        profile = load_profile(args.profile or preset.profile)
        if not args.dry_run and shutil.which("sbatch") is None:
            raise UsageError("--cluster slurm needs SLURM's sbatch on PATH (start the one-node test cluster with "
                             "`bash slurm/start_local_slurm.sh`, or use --cluster local)")
        if args.no_wait and not uri.startswith("http"):
            raise UsageError("--no-wait needs an http --tracking-uri (an mlflow server that outlives this driver)")
    elif args.cluster == "local" and not args.dry_run:
        available = os.cpu_count() or 1
        if cpus > available:
            raise UsageError(f"a trial needs {cpus:g} CPUs but this machine has {available}; lower --cpus-per-trial")
    if args.max_concurrent < 0:
        raise UsageError(f"--max-concurrent must be >= 0, got {args.max_concurrent}")
    max_concurrent = args.max_concurrent
    if not max_concurrent and args.cluster == "local":
        max_concurrent = max(1, int((os.cpu_count() or 1) // cpus))
    return Plan(study, args.preset, args.cluster, points, study_key(study, args.preset, points), runs_dir, uri,
                args.experiment or study.name, cpus, gpus, max_concurrent, args.max_failures, args, profile, problem=problem)


def evaluation_points(study: Study, preset: Preset, train_points: list[dict], args: argparse.Namespace,
                      tracking_uri: str, runs_dir: Path) -> list[dict]:
    """The evaluation task of the preset, with --data and --task applied, on --checkpoint or the trained points."""
    from studies.tasks import check_task, resolve_checkpoint, task_points

    task = dict(preset.task)
    if args.data and study.data_option:
        task.update(study.data_option(args.data)[1])
    for item in args.task_overrides:
        key, _, raw = item.partition("=")
        if not _ or key not in task or key == "name":
            raise UsageError(f"--task takes KEY=VALUE with KEY one of {', '.join(k for k in task if k != 'name')}, "
                             f"got {item!r}")
        task[key] = _task_value(raw, task[key])
    task = check_task(task, tracking_uri, runs_dir)
    sources = [resolve_checkpoint(c, tracking_uri, runs_dir) for c in args.checkpoint]
    return task_points(train_points, task, sources)


def _task_value(raw: str, current: object) -> object:
    """A --task value typed like the preset's: lists from commas, numbers, strings; 'none' clears it."""
    def one(text: str) -> object:
        try:
            return json.loads(text)
        except ValueError:
            return text

    if raw.lower() in ("none", "null", ""):
        return None
    if isinstance(current, list):
        return [one(v) for v in raw.split(",") if v.strip()]
    return one(raw)


def load_profile(name: str) -> dict:
    """A SLURM profile from slurm/profiles/<name>.yaml or a YAML path."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise UsageError(f"no SLURM profile {name!r} ({path}); known: {', '.join(known)} or a YAML path")
    profile = yaml.safe_load(path.read_text()) or {}
    allowed = {"one_node", "partition", "cpus_per_task", "gpus_per_task", "mem_gb", "time_min", "setup", "array_parallelism",
               "signal_delay_s", "max_num_timeout", "account", "qos", "constraint", "additional_parameters"}
    bad = set(profile) - allowed
    if bad:
        raise UsageError(f"unknown keys {sorted(bad)} in SLURM profile {path}; known: {sorted(allowed)}")
    return profile


# -- MLflow: the parent run, stale children, the summary ---------------------------------------

def open_parent(plan_: Plan):
    """Find or create the study's parent run (RUNNING); mark children left RUNNING by dead workers KILLED."""
    from ltm.runlock import holder
    from ltm.tracking import RUN_KEY_TAG, Tracker

    tracker = Tracker(plan_.tracking_uri, plan_.experiment, artifact_root=plan_.runs_dir / "artifacts")
    client = tracker.client
    found = client.search_runs([tracker.experiment_id], filter_string=f"tags.`{STUDY_KEY_TAG}` = '{plan_.study_key}' "
                                                                       f"and tags.`{ROLE_TAG}` = 'study'",
                               order_by=["attributes.start_time ASC"], max_results=1)
    if found:
        parent = found[0].info.run_id
        client.update_run(parent, status="RUNNING")
        client.set_tag(parent, "ltm.backend", plan_.cluster)
    else:
        run = client.create_run(tracker.experiment_id, run_name=f"{plan_.study.name}-{plan_.preset}",
                                tags={**plan_.tags, ROLE_TAG: "study", "ltm.points": str(len(plan_.points))})
        parent = run.info.run_id
        client.log_dict(parent, {"study": plan_.study.name, "preset": plan_.preset, "points": plan_.points}, "grid.json")
    plan_.parent_run_id = parent
    keys = {p["key"] for p in plan_.points}
    stale = client.search_runs([tracker.experiment_id], filter_string="attributes.status = 'RUNNING'", max_results=5000)
    for run in stale:
        if run.data.tags.get(RUN_KEY_TAG) in keys and holder(plan_.runs_dir, run.data.tags[RUN_KEY_TAG]) is None:
            tracker.finish(run.info.run_id, "KILLED", "left RUNNING by a worker that died; the study driver marked it "
                                                      "KILLED and resumes it from its last checkpoint")
            print(f"marked run {run.data.tags[RUN_KEY_TAG]} KILLED (left RUNNING by a dead worker); it will resume")
    return tracker


def finish_parent(tracker, parent_run_id: str, status: str, counts: dict) -> None:
    tracker.set_tags(parent_run_id, {f"ltm.count.{k}": v for k, v in counts.items()})
    tracker.client.set_terminated(parent_run_id, status=status)


def summary(tracker, plan_: Plan):
    """One row per point: the grid's axes, its MLflow status and the study's headline metrics."""
    import fnmatch

    patterns = (["tokens"] if plan_.study.presets[plan_.preset].task is None else []) + list(plan_.study.summary_metrics)
    runs = [tracker.find_run(p["key"]) for p in plan_.points]
    metrics = [run.data.metrics if run else {} for run in runs]
    names = [n for pattern in patterns for n in sorted({k for m in metrics for k in m if fnmatch.fnmatch(k, pattern)})]
    columns: dict[str, list] = {"status": [run.info.status if run else "MISSING" for run in runs]}
    for n in dict.fromkeys(names):
        columns[n] = [None if n not in m else int(m[n]) if n == "tokens" else round(m[n], 4) for m in metrics]
    columns["mlflow_run"] = [run.info.run_id[:8] if run else "" for run in runs]
    return grid_table(plan_.points, columns)


# -- one trial: a worker process around ltm.train.run --------------------------------------------

def _held_here(runs_dir: Path, key: str) -> dict | None:
    """The live process of this host that holds the point's run lock (`ltm.runlock`), if any."""
    from ltm.runlock import holder

    who = holder(runs_dir, key)
    return who if who is not None and who.get("host") == socket.gethostname() else None


def wait_for_stragglers(runs_dir: Path, keys, timeout: float = 90.0) -> None:
    """Wait (bounded) until workers of an earlier start on this host have checkpointed and exited."""
    deadline = time.time() + timeout
    busy = [k for k in keys if _held_here(runs_dir, k) is not None]
    if busy:
        print(f"waiting for {len(busy)} worker(s) of an earlier start to checkpoint and exit ...")
    while busy and time.time() < deadline:
        time.sleep(0.5)
        busy = [k for k in busy if _held_here(runs_dir, k) is not None]


def run_point(point: dict, common: dict) -> dict:
    """Run one grid point in this process (the main thread, so SIGTERM/SIGUSR2 checkpoint it).

    A point trains a run (`ltm.train.run`), or, when it names a `task`, runs that evaluation
    task of `studies.tasks` (which trains its checkpoint first when the point says how). Either
    holds the point's run lock while it works: a point another live process holds is BUSY.
    """
    import torch

    from ltm.config import RunConfig
    from ltm.runlock import RunBusy
    from ltm.tracking import use_credentials
    from ltm.train import run

    torch.set_num_threads(max(1, int(common.get("cpus") or 1)))
    use_credentials(common.get("credentials_file"))
    try:
        if point.get("task"):
            from studies.tasks import run_task

            return run_task(point, common)
        result = run(RunConfig.from_dict(point["config"]), tracking_uri=common["tracking_uri"],
                     experiment=common["experiment"], runs_dir=common["runs_dir"],
                     parent_run_id=common["parent_run_id"], tags=common["tags"], progress=False)
    except RunBusy as busy:
        return {"status": "BUSY", "run_id": None, "reason": str(busy), "metrics": {}}
    metrics = {k: float(v) for k, v in result.metrics.items() if isinstance(v, (int, float))}
    return {"status": result.status, "run_id": result.run_id, "reason": result.reason, "metrics": metrics}


def _die_with_parent() -> None:
    """In the child: receive SIGTERM when the thread that started us dies (Ray kills actors), so the run
    checkpoints instead of being left RUNNING. Linux ties PR_SET_PDEATHSIG to the spawning *thread*."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except Exception:
        pass


class PointWorker:
    """A persistent `python -m studies.worker --serve` process that runs points one after another.

    Kept per Ray actor (Tune reuses actors between trials), so torch, MLflow and ltm are imported
    once per actor instead of once per trial (about 3-4 s each). Each point still runs in the
    worker's main thread (SIGTERM / SIGUSR2 checkpoint it) and logs to its own file.
    """

    # Tune runs each trial in a new thread, and a thread's exit would deliver PR_SET_PDEATHSIG to a
    # worker it spawned: spawn from one thread that lives as long as the actor process.
    _spawner: "concurrent.futures.ThreadPoolExecutor | None" = None

    def __init__(self, runs_dir: Path, threads: str) -> None:
        from concurrent.futures import ThreadPoolExecutor

        self.identity = (str(runs_dir), threads)
        env = {**os.environ, "OMP_NUM_THREADS": threads, "MKL_NUM_THREADS": threads,
               "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
        if PointWorker._spawner is None:
            PointWorker._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="point-worker-spawner")
        self.proc = PointWorker._spawner.submit(
            subprocess.Popen, [sys.executable, "-m", "studies.worker", "--serve"], cwd=runs_dir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=_die_with_parent).result()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, spec: Path, out: Path, log: Path) -> int | None:
        """Run one point; its exit status as `python -m studies.worker`, None if the worker died."""
        try:
            self.proc.stdin.write(json.dumps([str(spec), str(out), str(log)]) + "\n")
            self.proc.stdin.flush()
            reply = self.proc.stdout.readline()
        except BrokenPipeError:
            reply = ""
        except BaseException:
            self.stop()  # the trial is being stopped: checkpoint, then go
            raise
        return int(reply) if reply.strip() else None

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except BaseException:
            self.proc.kill()


_WORKER: PointWorker | None = None
"""This actor process's worker, reused by the trials it runs one after another."""


def run_point_subprocess(point: dict, common: dict) -> dict:
    """Run the point in this process's persistent worker (started, or restarted if it died, on demand).

    The spec and the result are files in <runs>/logs/ (`python -m studies.worker SPEC RESULT` reruns
    a point by hand); the point's output goes to <runs>/logs/<key>.log.
    """
    global _WORKER
    runs_dir = Path(common["runs_dir"])
    (runs_dir / "logs").mkdir(parents=True, exist_ok=True)
    spec = runs_dir / "logs" / f"{point['key']}.spec.json"
    out = runs_dir / "logs" / f"{point['key']}.result.json"
    log = runs_dir / "logs" / f"{point['key']}.log"
    spec.write_text(json.dumps({"point": point, "common": common}))
    out.unlink(missing_ok=True)
    threads = str(max(1, int(common.get("cpus") or 1)))
    worker = _WORKER
    if worker is None or not worker.alive() or worker.identity != (str(runs_dir), threads):
        if worker is not None:
            worker.stop()
        worker = _WORKER = PointWorker(runs_dir, threads)
    try:
        code = worker.run(spec, out, log)
    except BaseException:
        _WORKER = None
        raise
    if code is None or code == 3:  # died, or exits after an interruption: the next point gets a new one
        worker.stop()
        _WORKER = None
    if out.exists():
        return json.loads(out.read_text())
    raise RuntimeError(f"worker for point {point['key']} exited with status {worker.proc.returncode} without a "
                       f"result; see {log}")


# -- backend: Ray Tune (local or an existing cluster) -------------------------------------------

def _ray_trial(config: dict, points: dict, common: dict) -> None:
    from ray import tune

    result = run_point_subprocess(points[config["key"]], common)
    if result["status"] == "BUSY":  # another live process runs this point: no retry, no duplicate
        print(f"point {config['key']}: {result['reason']}")
    if result["status"] in ("ERROR", "KILLED"):
        # An exception (FailureConfig retries it) or an interruption: an errored trial is rerun by
        # Tuner.restore when the study is started again, and resumes from its checkpoint.
        raise RuntimeError(f"point {config['key']}: {result['status']}: {result['reason']}")
    m = result["metrics"]
    tune.report({"status": result["status"], "run_id": result["run_id"] or "",
                 "val_ppl_bound": m.get("val/ppl_bound", float("nan")), "tokens": m.get("tokens", 0.0)})


def run_ray(plan_: Plan) -> bool:
    """Run the grid as Ray Tune trials; returns False if the study was interrupted."""
    import ray
    from ray import tune

    os.environ["PYTHONPATH"] = os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    if plan_.cluster == "ray":
        try:
            ray.init(address=plan_.args.address, include_dashboard=False, log_to_driver=False)
        except ConnectionError as err:
            # A cluster with token authentication rejects a driver given an address unless told to
            # authenticate: `ray start` turns tokens on by itself when ~/.ray/auth_token exists.
            raise UsageError(f"{err}; wrong address, or the cluster uses token authentication: set RAY_AUTH_MODE=token "
                             f"and RAY_AUTH_TOKEN_PATH to its token (as slurm/ray_study.sbatch does)") from None
    else:
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
    signal.signal(signal.SIGTERM, _on_sigterm)  # ray.init installs its own (it aborts the driver)
    try:
        storage = plan_.runs_dir / "ray"
        name = f"{plan_.study.name}-{plan_.preset}-{plan_.study_key}"
        points = {p["key"]: p for p in plan_.points}
        trainable = tune.with_resources(tune.with_parameters(_ray_trial, points=points, common=plan_.common()),
                                        {"cpu": plan_.cpus, "gpu": plan_.gpus})
        path = storage / name
        if not plan_.args.fresh and tune.Tuner.can_restore(str(path)):
            print(f"restoring the Tune experiment {path}")
            tuner = tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
        else:
            tuner = tune.Tuner(
                trainable, param_space={"key": tune.grid_search(list(points))},
                tune_config=tune.TuneConfig(max_concurrent_trials=plan_.max_concurrent or None,
                                             reuse_actors=True),  # keeps each actor's PointWorker
                run_config=tune.RunConfig(name=name, storage_path=str(storage), verbose=1,
                                          failure_config=tune.FailureConfig(max_failures=plan_.max_failures),
                                          checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))
        tuner.fit()
    finally:
        ray.shutdown()
    return not _INTERRUPTED


# -- backend: SLURM through submitit ------------------------------------------------------------

class SlurmTrial:
    """The submitit callable: one grid point per array task; requeues itself on SIGUSR2."""

    def __call__(self, point: dict, common: dict) -> dict:
        result = run_point(point, common)
        if result["status"] == "KILLED" and "SIGUSR2" in result["reason"]:
            # Timeout or preemption: run() has checkpointed and restored submitit's handler; hand the
            # signal to it so it calls checkpoint() below and requeues this task (same point, same run).
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(5)
        return result

    def checkpoint(self, point: dict, common: dict):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTrial(), point, common)


def slurm_executor(plan_: Plan, folder) -> "submitit.AutoExecutor":
    """A submitit AutoExecutor for the study's array (requeues after a timeout: the profile's max_num_timeout)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=int(plan_.profile.get("max_num_timeout", 10)))
    executor.update_parameters(**slurm_parameters(plan_))
    return executor


def slurm_parameters(plan_: Plan) -> dict:
    """submitit AutoExecutor parameters from the profile, the preset and the options."""
    p = plan_.profile
    params = {
        "name": f"{plan_.study.name}-{plan_.preset}",
        "slurm_partition": p.get("partition", "debug"),
        "cpus_per_task": max(1, round(plan_.cpus if plan_.args.cpus_per_trial is not None
                                      else p.get("cpus_per_task", plan_.cpus))),
        "timeout_min": int(p.get("time_min", 60)),
        "slurm_array_parallelism": int(plan_.max_concurrent or p.get("array_parallelism", 64)),
        "slurm_signal_delay_s": int(p.get("signal_delay_s", 90)),
        "nodes": 1, "tasks_per_node": 1,
    }
    gpus = plan_.gpus if plan_.args.gpus_per_trial is not None else p.get("gpus_per_task", plan_.gpus)
    if gpus:
        params["slurm_gpus_per_task"] = int(gpus)
    if p.get("mem_gb"):
        params["mem_gb"] = p["mem_gb"]
    for key in ("account", "qos", "constraint"):
        if p.get(key):
            params[f"slurm_{key}"] = p[key]
    if p.get("additional_parameters"):
        params["slurm_additional_parameters"] = dict(p["additional_parameters"])
    params["slurm_setup"] = list(p.get("setup") or [])
    return params


def sbatch_preview(plan_: Plan) -> str:
    """The #SBATCH lines submitit would write for this study's array (nothing is submitted)."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        inner = slurm_executor(plan_, tmp)._executor  # private, for display only; fall back to the parameters
        try:
            inner.parameters["map_count"] = len(plan_.points)
            text = inner._make_submission_file_text("python -u -m submitit.core._submit <folder>", "preview")
        except Exception as err:
            return f"(preview unavailable: {err})\n" + json.dumps(slurm_parameters(plan_), indent=2)
    folder = str(slurm_folder(plan_) / "%j")
    return "\n".join(line.replace(tmp, folder) for line in text.splitlines() if line.startswith("#SBATCH"))


def snapshot_code(dest: Path) -> Path:
    """Copy ltm/ and studies/ into the submission folder, so editing the tree does not change queued jobs."""
    code = dest / "code"
    if code.exists():
        shutil.rmtree(code)
    for pkg in ("ltm", "studies"):
        shutil.copytree(ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return code


def _own_group_dying_with_parent() -> None:
    os.setsid()  # its own process group, so stop() ends the server and its uvicorn worker together
    _die_with_parent()  # and it does not outlive a driver killed with SIGKILL


def node_address() -> str:
    """This node's address on the network its jobs use (the interface of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class MlflowServer:
    """`mlflow server` for a sqlite store, on this node, for the duration of a SLURM study.

    It listens on 127.0.0.1 when every job runs on this node (profile `one_node: true`), else on
    the node's own address; it accepts only that Host, and only requests with the study's
    credentials (MLflow's basic-auth app; a fresh password per start, in a file only this user
    can read, which the jobs are pointed to: the password is never in a URI, a spec or a log).
    """

    USER = "ltm-study"

    def __init__(self, sqlite_uri: str, folder: Path, one_node: bool) -> None:
        import secrets

        from ltm.tracking import TrackingError, check_tracking_uri, write_credentials

        self.host = "127.0.0.1" if one_node else node_address()
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://{self.host}:{self.port}"
        password = secrets.token_urlsafe(24)
        self.credentials = write_credentials(folder / "mlflow-credentials.json", self.USER, password)
        auth_db = folder / "mlflow-auth.db"
        auth_db.unlink(missing_ok=True)  # it keeps the first admin password: start from the new one
        ini = folder / "mlflow-auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{auth_db}\n"
                       f"admin_username = {self.USER}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        log = folder / "mlflow-server.log"
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", sqlite_uri,
             "--host", self.host, "--port", str(self.port), "--workers", "1",
             "--allowed-hosts", f"{self.host}:{self.port},{self.host}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_own_group_dying_with_parent)

        deadline = time.time() + 120
        while True:
            try:
                check_tracking_uri(self.uri, timeout=2)
                return
            except TrackingError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise TrackingError(f"the mlflow server for {sqlite_uri} did not start; see {log} (the basic-auth "
                                        "app needs `pip install mlflow[auth]`)") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()


def _squeue_ids(job_ids: list[str]) -> set[str] | None:
    """The array tasks still pending or running (requeued tasks count as pending); None if squeue failed."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return set()
        return None
    return {line.strip() for line in proc.stdout.split()}


def slurm_folder(plan_: Plan) -> Path:
    return plan_.runs_dir / "slurm" / f"{plan_.study.name}-{plan_.preset}-{plan_.study_key}"


def check_earlier_jobs(plan_: Plan) -> None:
    """Refuse to start while jobs of an earlier start may still run (checked before any run status
    is touched): their runs are alive, not stale, and they must not be submitted twice."""
    jobs_file = slurm_folder(plan_) / "jobs.json"
    if not jobs_file.exists():
        return
    old = json.loads(jobs_file.read_text())
    alive = _squeue_ids(old)
    if alive is None:
        raise UsageError(f"cannot tell whether the jobs of an earlier start ({', '.join(old[:4])} ...) still run: "
                         "squeue did not answer; check `squeue` (is slurmctld up?) and start again")
    if alive:
        raise UsageError(f"{len(alive)} job(s) of an earlier start of this study are still queued or running "
                         f"({', '.join(sorted(alive)[:4])} ...); wait for them or `scancel` them, then start again")


def run_slurm(plan_: Plan, tracker) -> bool:
    """Submit the points not yet FINISHED as one submitit job array and wait; returns False if interrupted."""
    from tqdm import tqdm

    folder = slurm_folder(plan_)
    folder.mkdir(parents=True, exist_ok=True)
    jobs_file = folder / "jobs.json"
    todo = [p for p in plan_.points if (run := tracker.find_run(p["key"])) is None or run.info.status != "FINISHED"]
    if not todo:
        print("every point already FINISHED; nothing to submit")
        return True
    server = None
    tracking_uri = plan_.tracking_uri
    credentials = plan_.credentials_file
    if tracking_uri.startswith("sqlite:") and plan_.args.mlflow_server == "auto":
        server = MlflowServer(tracking_uri, folder, one_node=bool(plan_.profile.get("one_node")))
        tracking_uri, credentials = server.uri, server.credentials
        print(f"serving {plan_.tracking_uri} at {tracking_uri} for the workers (mlflow server on {socket.gethostname()}, "
              f"basic auth, credentials in {credentials})")
    elif tracking_uri.startswith("sqlite:"):
        print("workers write the sqlite store directly (--mlflow-server off): safe only on one node's local disk")
    try:
        code = snapshot_code(folder)
        executor = slurm_executor(plan_, folder / "%j")
        params = slurm_parameters(plan_)
        executor.update_parameters(slurm_setup=params["slurm_setup"] + [
            f"export PYTHONPATH={code}:$PYTHONPATH", f"export OMP_NUM_THREADS={params['cpus_per_task']}"])
        common = plan_.common(tracking_uri, credentials)
        jobs = executor.map_array(SlurmTrial(), todo, [common] * len(todo))
        ids = [j.job_id for j in jobs]
        tmp = jobs_file.with_name(f"jobs.json.{os.getpid()}.tmp")  # whole or absent, even if the driver dies now
        tmp.write_text(json.dumps(ids))
        os.replace(tmp, jobs_file)
        print(f"submitted array {ids[0].split('_')[0]} ({len(ids)} tasks) from {folder}")
        if plan_.args.no_wait:
            return True
        bar = tqdm(total=len(ids), unit="point", desc=plan_.study.name, dynamic_ncols=True)
        finished: set[str] = set()
        misses = 0
        while len(finished) < len(ids):
            try:
                time.sleep(2)
            except KeyboardInterrupt:  # Ctrl-C: as SIGTERM
                globals()["_INTERRUPTED"] = True
            if _INTERRUPTED:
                array = ids[0].split("_")[0]
                print("interrupted: cancelling pending tasks; running ones checkpoint on SIGTERM ...", flush=True)
                subprocess.run(["scancel", "--state=PENDING", array], check=False)
                subprocess.run(["scancel", "--signal=TERM", array], check=False)  # the steps, not the batch shell
                deadline = time.time() + 120
                while time.time() < deadline and (_squeue_ids(ids) or set()):
                    time.sleep(1)
                subprocess.run(["scancel", array], check=False)  # whatever did not stop in time
                return False
            alive = _squeue_ids(ids)
            if alive is None:
                misses += 1
                if misses > 30:
                    raise RuntimeError("squeue keeps failing; is the SLURM controller up?")
            else:
                done = {i for i in ids if i not in alive} - finished
                finished |= done
                bar.update(len(done))
        bar.close()
        return True
    finally:
        if server is not None:
            server.stop()


# -- driver ------------------------------------------------------------------------------------

_INTERRUPTED = False
_ACTIVE: Plan | None = None


def stop_local_workers(runs_dir: Path, keys, timeout: float = 90.0) -> None:
    """SIGTERM the workers of this host (they checkpoint and mark their runs KILLED) and wait for them.

    Only a process that holds a run lock now is signalled: a held lock belongs to a live process,
    so a recorded pid is never a stale one that the system gave to something else.
    """
    for key in keys:
        who = _held_here(runs_dir, key)
        if who and who.get("pid"):
            try:
                os.kill(int(who["pid"]), signal.SIGTERM)
            except OSError:
                pass
    wait_for_stragglers(runs_dir, keys, timeout)


def _on_sigterm(signum, frame) -> None:
    """SIGTERM to the driver: stop the study gracefully (trials checkpoint; start again to resume).

    Ray: the workers are told first and waited for (Ray kills an actor's child processes with
    SIGKILL when the actor goes), then Tune is stopped. SLURM: the poll loop cancels the array.
    """
    global _INTERRUPTED
    _INTERRUPTED = True
    if _ACTIVE is not None and _ACTIVE.cluster != "slurm":
        print("SIGTERM: checkpointing the running trials ...", flush=True)
        stop_local_workers(_ACTIVE.runs_dir, [p["key"] for p in _ACTIVE.points])
        raise KeyboardInterrupt


def print_plan(plan_: Plan) -> None:
    import pandas as pd

    from ltm.tracking import redact

    with pd.option_context("display.max_rows", 500, "display.width", 200):
        print(grid_table(plan_.points).to_string(index=False))
    at_once = plan_.max_concurrent or (slurm_parameters(plan_)["slurm_array_parallelism"] if plan_.cluster == "slurm"
                                       else "unlimited")
    print(f"\n{plan_.study.name} / {plan_.preset}: {len(plan_.points)} points, backend {plan_.cluster}, "
          f"{plan_.cpus:g} CPU + {plan_.gpus:g} GPU per trial, at most {at_once} at once")
    print(f"tracking {redact(plan_.tracking_uri)}, experiment {plan_.experiment}, runs folder {plan_.runs_dir}")
    task = plan_.points[0].get("task") if plan_.points else None
    if task:
        sources = "the checkpoints given" if "checkpoint" in plan_.points[0]["source"] else "each point's model, trained first"
        print(f"evaluation on {sources}: {json.dumps(task)}")
    if plan_.cluster == "slurm":
        print("\nsbatch parameters (one job array):")
        print(sbatch_preview(plan_))


def main(study: Study, argv: list[str] | None = None) -> int:
    """Run a study from the command line; returns the exit status."""
    global _INTERRUPTED
    from ltm.config import ConfigError
    from ltm.tracking import TrackingError, redact

    try:
        plan_ = plan(study, argv)
    except (UsageError, ConfigError, TrackingError, FileNotFoundError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    if plan_.args.dry_run:
        print_plan(plan_)
        if plan_.problem is not None:
            print(f"error: {plan_.problem}", file=sys.stderr)
            return EXIT_USAGE
        return EXIT_OK
    global _ACTIVE
    _INTERRUPTED, _ACTIVE = False, plan_
    previous = signal.signal(signal.SIGTERM, _on_sigterm)
    started = time.time()
    tracker = None
    try:
        print_plan(plan_)
        if plan_.cluster == "slurm":
            check_earlier_jobs(plan_)
        wait_for_stragglers(plan_.runs_dir, [p["key"] for p in plan_.points])
        tracker = open_parent(plan_)
        print(f"study parent run {plan_.parent_run_id} (key {plan_.study_key})\n")
        completed = run_slurm(plan_, tracker) if plan_.cluster == "slurm" else run_ray(plan_)
    except KeyboardInterrupt:
        _INTERRUPTED, completed = True, False
    except (UsageError, TrackingError) as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    finally:
        signal.signal(signal.SIGTERM, previous)
        _ACTIVE = None
    if tracker is None:
        return EXIT_INTERRUPTED
    if _INTERRUPTED or not completed:
        wait_for_stragglers(plan_.runs_dir, [p["key"] for p in plan_.points], timeout=60)
    table = summary(tracker, plan_)
    counts = table["status"].value_counts().to_dict()
    all_done = counts.get("FINISHED", 0) == len(plan_.points)
    status = "FINISHED" if all_done else ("KILLED" if (_INTERRUPTED or not completed) else "FAILED")
    finish_parent(tracker, plan_.parent_run_id, status, counts)
    import pandas as pd

    with pd.option_context("display.max_rows", 500, "display.width", 200):
        print("\n" + table.to_string(index=False))
    print(f"\n{study.name}: {', '.join(f'{v} {k}' for k, v in counts.items())} of {len(plan_.points)} points "
          f"in {time.time() - started:.0f} s; parent run {plan_.parent_run_id}")
    print(f"browse: mlflow ui --backend-store-uri {redact(plan_.tracking_uri)}")
    if all_done:
        return EXIT_OK
    if _INTERRUPTED or not completed:
        print("interrupted: start the same command again to complete the missing points")
        return EXIT_INTERRUPTED
    return EXIT_FAILED

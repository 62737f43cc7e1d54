"""Planning a study: the command line -> a typed, validated `Plan` (grid, store, resources, backend).

Everything a backend needs is resolved here once: nothing downstream reads the argv.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from ltm.cli import log_level
from ltm.config import ConfigError, parse_value, split_assignment
from ltm.paths import check_name
from ltm.names import BACKEND_TAG, PRESET_TAG, STUDY_KEY_TAG, STUDY_TAG
from studies.costs import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, Memory, memory_problem, point_memory, usable_gb
from studies.messages import Point, TrialContext
from studies.options import build_parser
from studies.points import build_points, study_key
from studies.resources import (ResourceError, SlurmProfile, check_world, gpu_memory, load_profile,
                               processes_per_node)
from studies.study import Preset, Study, Task

ROOT = Path(__file__).resolve().parents[1]
"""The project root (holds ltm/ and studies/): put on workers' PYTHONPATH and snapshotted for SLURM."""


class UsageError(Exception):
    """Bad options: reported in one line, exit status 2, nothing launched."""


@dataclass
class Plan:
    """A study invocation, validated: its points, where it tracks, what each trial gets, the backend."""

    study: Study
    preset: str
    cluster: str
    """local (Ray Tune on this machine), ray (an existing Ray cluster) or slurm."""
    points: list[Point]
    study_key: str
    runs_dir: Path
    tracking_uri: str
    experiment: str
    cpus: float
    """CPUs per trial (per process of a point of several), resolved once: --cpus-per-trial, else the SLURM
    profile's, else the preset's."""
    gpus: float
    """GPUs per trial on each of its nodes."""
    max_concurrent: int
    """Trials at once; 0: unlimited (SLURM: the profile's array_parallelism)."""
    max_failures: int
    dry_run: bool = False
    mfu: float = DEFAULT_MFU
    """The model FLOPs utilisation and the GPU peak that the printed GPU-hours assume."""
    peak_tflops: float = DEFAULT_PEAK_TFLOPS
    gpu_mem_gb: float | None = None
    """Memory of a trial's GPU (--gpu-mem-gb, else the SLURM profile's gpu_mem_gb); None: not known."""
    address: str | None = None
    """Ray: the cluster to join."""
    fresh: bool = False
    """Ray: do not restore the Tune experiment of an earlier start."""
    profile: SlurmProfile | None = None
    """SLURM: the profile (slurm/profiles/<name>.yaml); None under another backend."""
    mlflow_server: str = "auto"
    """SLURM: serve a sqlite store to the jobs (auto) or let them write it directly (off)."""
    no_wait: bool = False
    """SLURM: submit and return."""
    parent_run_id: str | None = None
    problem: Exception | None = None
    """A dry run's validation error, reported after the grid."""
    processes: int = 1
    """SLURM: processes of a point on each of its nodes (one per GPU when it has GPUs)."""
    nodes: int = 1
    """SLURM: nodes of a point."""
    log_level: int = logging.INFO
    """The messages shown (-v/-q), by the driver and by the processes that run the points."""
    verify: bool = True
    """Check each checkpoint's sha256 before it is read; False: --no-verify (`ltm.checkpoint.verify_checksum`)."""

    @property
    def world(self) -> int:
        """The processes of one point: its torch.distributed world size."""
        return self.processes * self.nodes

    @property
    def tags(self) -> dict:
        return {STUDY_TAG: self.study.name, STUDY_KEY_TAG: self.study_key, PRESET_TAG: self.preset,
                BACKEND_TAG: self.cluster}

    @property
    def folder(self) -> str:
        """This invocation's folder under <runs>/slurm and <runs>/ray: <study>-<preset>-<study key>, made safe
        (`ltm.paths.folder_name`)."""
        from ltm.paths import folder_name

        return folder_name(f"{self.study.name}-{self.preset}-{self.study_key}", "study")

    @property
    def trials_at_once(self) -> int:
        """Trials that run at once: --max-concurrent, SLURM's array_parallelism, else every point."""
        limit = self.max_concurrent or (self.profile.array_parallelism if self.profile else 0)
        return min(limit, len(self.points)) if limit else len(self.points)

    @functools.cached_property
    def memory(self) -> list[Memory | None]:
        """Each point's training update in memory on one of its processes, at the per-process batch
        (`studies.costs.point_memory`), on a GPU if trials get one."""
        usable = usable_gb(self.gpu_mem_gb, self.gpus) if self.gpus and self.gpu_mem_gb else None
        return [point_memory(p, self.gpus > 0, usable, self.world) for p in self.points]

    @property
    def is_evaluation(self) -> bool:
        return self.study.presets[self.preset].task is not None

    @property
    def driver(self) -> str:
        """This driver's identity, recorded in the run locks of the workers it starts (`studies.interrupt`)."""
        from studies.interrupt import driver_id

        return driver_id(self.study_key)

    def write_credentials(self) -> str | None:
        """Move a user:password given in --tracking-uri to a file only this user can read, for the trials;
        its path (None: the URI has none). A backend calls it once, before it hands the trials their context."""
        from ltm.tracking import split_credentials, write_credentials

        creds = split_credentials(self.tracking_uri)[1]
        return str(write_credentials(self.runs_dir / "mlflow-credentials.json", *creds)) if creds else None

    def context(self, tracking_uri: str | None = None, credentials_file: str | Path | None = None) -> TrialContext:
        """What every trial needs besides its point: the tracking URI without any password, and the file
        that holds it (`write_credentials`, or a server's)."""
        from ltm.tracking import split_credentials

        return TrialContext(tracking_uri=split_credentials(tracking_uri or self.tracking_uri)[0],
                            experiment=self.experiment, runs_dir=str(self.runs_dir), parent_run_id=self.parent_run_id,
                            tags=self.tags, cpus=self.cpus,
                            credentials_file=str(credentials_file) if credentials_file else None, driver=self.driver,
                            log_level=self.log_level, verify=self.verify)


def plan(study: Study, argv: list[str] | None = None) -> Plan:
    """Parse and validate the options; raises UsageError / ConfigError / TrackingError / DataError."""
    return plan_from_args(study, build_parser(study).parse_args(argv))


def plan_from_args(study: Study, args: argparse.Namespace) -> Plan:
    """Validate parsed options (`build_parser`); raises as `plan` does."""
    from ltm.tracking import tracking_uri_option

    seeds = _check_options(args)
    points = build_points(study, args.preset, seeds, args.data, args.overrides)
    if study.check is not None:
        study.check(points)
    preset = study.presets[args.preset]
    problem = _check_data(points, args.dry_run)  # a dry run still shows the grid, then reports it (exit 2)
    runs_dir = Path(args.runs_dir).resolve()
    uri = tracking_uri_option(args.tracking_uri, runs_dir)
    if preset.task is not None:
        points, problem = evaluation_points(study, preset, points, args, uri, runs_dir, problem)
    try:
        profile = load_profile(args.profile or preset.profile) if args.cluster == "slurm" else None
        cpus, gpus = _per_trial(args.cpus_per_trial, args.gpus_per_trial, profile, preset)
        gpu_mem = gpu_memory(args.gpu_mem_gb, profile, gpus)
        processes = processes_per_node(args.cluster, args.processes_per_trial, args.nodes_per_trial, gpus,
                                       bool(profile and profile.one_node))
        check_world(points, processes, args.nodes_per_trial)
    except ResourceError as err:
        raise UsageError(str(err)) from None
    _check_backend(args, uri, cpus)
    max_concurrent = args.max_concurrent
    if not max_concurrent and args.cluster == "local":
        max_concurrent = max(1, int((os.cpu_count() or 1) // cpus))
    result = Plan(study, args.preset, args.cluster, points, study_key(study, args.preset, points), runs_dir, uri,
                  args.experiment or study.name, cpus, gpus, max_concurrent, args.max_failures, dry_run=args.dry_run,
                  mfu=args.mfu, peak_tflops=args.peak_tflops, gpu_mem_gb=gpu_mem,
                  address=args.address, fresh=args.fresh, profile=profile, mlflow_server=args.mlflow_server,
                  no_wait=args.no_wait, problem=problem, processes=processes, nodes=args.nodes_per_trial,
                  log_level=log_level(args), verify=not getattr(args, "no_verify", False))
    unfit = result.gpu_mem_gb and memory_problem(result.points, result.memory, gpus, result.gpu_mem_gb)
    if unfit and not args.dry_run:
        raise UsageError(unfit)  # before anything is submitted
    result.problem = result.problem or (UsageError(unfit) if unfit else None)
    return result


def _check_options(args: argparse.Namespace) -> list[int]:
    """The backend's address, the seeds (returned), --mfu and --peak-tflops; raises UsageError."""
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
    if args.experiment is not None:  # before anything is created: a name the store refuses ends nothing
        check_name(args.experiment, "--experiment")
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu is a fraction of the peak in (0, 1], e.g. --mfu 0.4 for 40%; got {args.mfu:g}")
    if not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops must be > 0 (a GPU's peak TFLOP/s, e.g. 989 for an H100/H200 in bf16); "
                         f"got {args.peak_tflops:g}")
    return seeds


def _check_data(points: list[Point], dry_run: bool) -> Exception | None:
    """Every point's data is there; a dry run gets the problem back, to report after the grid."""
    from ltm.config import ConfigError, RunConfig
    from ltm.data import check_data

    problem = None
    for data_cfg in {json.dumps(p.config["data"], sort_keys=True) for p in points}:
        try:
            check_data(RunConfig.from_dict({"data": json.loads(data_cfg)}).data)
        except (ConfigError, FileNotFoundError) as err:
            if not dry_run:
                raise
            problem = err
    return problem


def _per_trial(cpus: float | None, gpus: float | None, profile: SlurmProfile | None,
               preset: Preset) -> tuple[float, float]:
    """CPUs and GPUs per trial: the options, else the SLURM profile's, else the preset's."""
    if cpus is None:
        cpus = profile.cpus_per_task if profile and profile.cpus_per_task is not None else preset.cpus
    if gpus is None:
        gpus = profile.gpus_per_task if profile and profile.gpus_per_task is not None else preset.gpus
    if cpus <= 0 or gpus < 0:
        raise ResourceError(f"need --cpus-per-trial > 0 and --gpus-per-trial >= 0, got {cpus} and {gpus}")
    return cpus, gpus


def _check_backend(args: argparse.Namespace, uri: str, cpus: float) -> None:
    """What the backend needs (sbatch, an http store for --no-wait, the CPUs here) and the retry and
    concurrency options; raises UsageError."""
    if args.cluster == "slurm":
        if not args.dry_run and shutil.which("sbatch") is None:
            raise UsageError("--cluster slurm needs SLURM's sbatch on PATH (start the one-node test cluster with "
                             "`bash slurm/start_local_slurm.sh`, or use --cluster local)")
        if args.no_wait and not uri.startswith("http"):
            raise UsageError("--no-wait needs an http --tracking-uri (an mlflow server that outlives this driver)")
    elif args.cluster == "local" and not args.dry_run and cpus > (os.cpu_count() or 1):
        raise UsageError(f"a trial needs {cpus:g} CPUs but this machine has {os.cpu_count()}; lower --cpus-per-trial")
    if args.max_failures < 0:
        raise UsageError("--max-failures is how many times a crashed trial is retried: 0 or more, "
                         f"got {args.max_failures}")
    if args.max_concurrent < 0:
        raise UsageError(f"--max-concurrent must be >= 0, got {args.max_concurrent}")


def evaluation_points(study: Study, preset: Preset, train_points: list[Point], args: argparse.Namespace,
                      tracking_uri: str, runs_dir: Path,
                      problem: Exception | None) -> tuple[list[Point], Exception | None]:
    """The evaluation task of the preset, with --data and --task applied, on --checkpoint or the trained points;
    and the plan's problem: a dry run gets a missing evaluation data set back (to report after the grid)."""
    from ltm.checkpoint import resolve
    from studies.tasks import resolve_task, task_points

    task = _task_with_options(preset.task, args, study)
    verify = not args.no_verify
    try:
        task = resolve_task(task, tracking_uri, runs_dir, verify)
    except (ConfigError, FileNotFoundError) as err:
        if not args.dry_run:
            raise
        problem = err
    sources = [resolve(c, tracking_uri, runs_dir, verify) for c in args.checkpoint]
    return task_points(train_points, task, sources), problem


def _task_with_options(task: Task, args: argparse.Namespace, study: Study) -> Task:
    """The preset's task with --data (`Study.data_option`) and each --task KEY=VALUE applied, checked."""
    changes = dict(study.data_option(args.data)[1]) if args.data and study.data_option else {}
    keys = task.arguments()
    for item in args.task_overrides:
        try:
            key, raw = split_assignment(item)
        except ConfigError:
            key = raw = ""
        if key not in keys:
            raise UsageError(f"--task takes KEY=VALUE with KEY one of {', '.join(keys)}, got {item!r}")
        changes[key] = parse_value(raw, changes.get(key, getattr(task, key)), f"--task {key}")
    return dataclasses.replace(task, **changes)



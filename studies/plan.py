"""Planning a study: the command line -> a typed, validated `Plan` (grid, store, resources, backend).

Everything a backend needs is resolved here once: nothing downstream reads the argv.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

from ltm.names import BACKEND_TAG, PRESET_TAG, STUDY_KEY_TAG, STUDY_TAG
from studies.costs import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS, Memory, memory_problem, point_memory, usable_gb
from studies.messages import Point, TrialContext
from studies.points import build_points, study_key
from studies.resources import ResourceError, check_world, gpu_memory, load_profile, processes_per_node
from studies.study import Preset, Study

ROOT = Path(__file__).resolve().parents[1]
"""The project root (holds ltm/ and studies/): put on workers' PYTHONPATH and snapshotted for SLURM."""
class UsageError(Exception):
    """Bad options: reported in one line, exit status 2, nothing launched."""


# -- options ------------------------------------------------------------------------------------

def build_parser(study: Study) -> argparse.ArgumentParser:
    presets = "; ".join(f"{n}: {p.description}" for n, p in study.presets.items())
    parser = argparse.ArgumentParser(
        prog=f"python studies/{study.name}.py", description=f"{study.description} Presets: {presets}.",
        epilog="Starting the same study again skips finished points and resumes interrupted ones. "
               "Exit status: 0 all finished, 1 some failed, 2 bad options (nothing launched), 3 interrupted, "
               "4 busy (points held by other processes).")
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
    parser.add_argument("--cpus-per-trial", type=float,
                        help="CPUs per trial, per process with --processes-per-trial (default: the SLURM profile's "
                             "cpus_per_task, else the preset's)")
    parser.add_argument("--gpus-per-trial", type=float,
                        help="GPUs per trial on each of its nodes; fractions share a GPU under Ray, SLURM takes whole "
                             "GPUs (default: the SLURM profile's gpus_per_task, else the preset's)")
    parser.add_argument("--processes-per-trial", type=int,
                        help="SLURM: processes of each point on each of its nodes, one torch.distributed job "
                             "(default 1; on GPUs one per GPU: --gpus-per-trial)")
    parser.add_argument("--nodes-per-trial", type=int, default=1, help="SLURM: nodes of each point (default 1)")
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid, its training FLOPs and GPU-hours, "
                                                               "resources and sbatch parameters; launch nothing")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation the GPU-hours assume, in (0, 1] (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"a GPU's peak TFLOP/s for the GPU-hours (default {DEFAULT_PEAK_TFLOPS:g}: H100/H200 "
                             "dense bf16)")
    parser.add_argument("--gpu-mem-gb", type=float, help="memory of the GPU a trial gets, in GB of 2^30 bytes (141: "
                        "H200, 80: H100): each point's micro-batch is fitted to it, and a point that cannot fit even "
                        "at micro-batch 1 is refused (default: the SLURM profile's gpu_mem_gb)")
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
    profile: dict = field(default_factory=dict)
    """SLURM: the profile (slurm/profiles/<name>.yaml)."""
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

    @property
    def world(self) -> int:
        """The processes of one point: its torch.distributed world size."""
        return self.processes * self.nodes

    @property
    def tags(self) -> dict:
        return {STUDY_TAG: self.study.name, STUDY_KEY_TAG: self.study_key, PRESET_TAG: self.preset,
                BACKEND_TAG: self.cluster}

    @property
    def trials_at_once(self) -> int:
        """Trials that run at once: --max-concurrent, SLURM's array_parallelism, else every point."""
        limit = self.max_concurrent or (self.profile.get("array_parallelism", 64) if self.cluster == "slurm" else 0)
        return min(limit, len(self.points)) if limit else len(self.points)

    @functools.cached_property
    def memory(self) -> list[Memory | None]:
        """Each point's training update in memory (`studies.costs.point_memory`), on a GPU if trials get one."""
        usable = usable_gb(self.gpu_mem_gb, self.gpus) if self.gpus and self.gpu_mem_gb else None
        return [point_memory(p, self.gpus > 0, usable) for p in self.points]

    @property
    def is_evaluation(self) -> bool:
        return self.study.presets[self.preset].task is not None

    @property
    def credentials_file(self) -> str | None:
        """A user:password given in --tracking-uri, moved to a file only this user can read."""
        from ltm.tracking import split_credentials, write_credentials

        creds = split_credentials(self.tracking_uri)[1]
        return str(write_credentials(self.runs_dir / "mlflow-credentials.json", *creds)) if creds else None

    def context(self, tracking_uri: str | None = None, credentials_file: str | Path | None = None) -> TrialContext:
        """What every trial needs besides its point; the tracking URI without any password."""
        from ltm.tracking import split_credentials

        creds = credentials_file or self.credentials_file
        from studies.interrupt import driver_id

        return TrialContext(tracking_uri=split_credentials(tracking_uri or self.tracking_uri)[0],
                            experiment=self.experiment, runs_dir=str(self.runs_dir), parent_run_id=self.parent_run_id,
                            tags=self.tags, cpus=self.cpus,
                            credentials_file=str(creds) if creds else None, driver=driver_id(self.study_key))


def plan(study: Study, argv: list[str] | None = None) -> Plan:
    """Parse and validate the options; raises UsageError / ConfigError / TrackingError / DataError."""
    from ltm.config import ConfigError, RunConfig
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
    if not 0 < args.mfu <= 1:
        raise UsageError(f"--mfu is a fraction of the peak in (0, 1], e.g. --mfu 0.4 for 40%; got {args.mfu:g}")
    if not args.peak_tflops > 0:
        raise UsageError(f"--peak-tflops must be > 0 (a GPU's peak TFLOP/s, e.g. 989 for an H100/H200 in bf16); "
                         f"got {args.peak_tflops:g}")
    points = build_points(study, args.preset, seeds, args.data, args.overrides)
    preset = study.presets[args.preset]
    problem = None
    for data_cfg in {json.dumps(p.config["data"], sort_keys=True) for p in points}:
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
    try:
        profile = load_profile(args.profile or preset.profile) if args.cluster == "slurm" else {}
        cpus = args.cpus_per_trial if args.cpus_per_trial is not None else profile.get("cpus_per_task", preset.cpus)
        gpus = args.gpus_per_trial if args.gpus_per_trial is not None else profile.get("gpus_per_task", preset.gpus)
        if cpus <= 0 or gpus < 0:
            raise ResourceError(f"need --cpus-per-trial > 0 and --gpus-per-trial >= 0, got {cpus} and {gpus}")
        gpu_mem = gpu_memory(args.gpu_mem_gb, profile, gpus)
        processes = processes_per_node(args.cluster, args.processes_per_trial, args.nodes_per_trial, gpus,
                                       bool(profile.get("one_node")))
        check_world(points, processes, args.nodes_per_trial)
    except ResourceError as err:
        raise UsageError(str(err)) from None
    if args.cluster == "slurm":
        if not args.dry_run and shutil.which("sbatch") is None:
            raise UsageError("--cluster slurm needs SLURM's sbatch on PATH (start the one-node test cluster with "
                             "`bash slurm/start_local_slurm.sh`, or use --cluster local)")
        if args.no_wait and not uri.startswith("http"):
            raise UsageError("--no-wait needs an http --tracking-uri (an mlflow server that outlives this driver)")
    elif args.cluster == "local" and not args.dry_run and cpus > (os.cpu_count() or 1):
        raise UsageError(f"a trial needs {cpus:g} CPUs but this machine has {os.cpu_count()}; lower --cpus-per-trial")
    if args.max_failures < 0:
        raise UsageError(f"--max-failures is how many times a crashed trial is retried: 0 or more, got {args.max_failures}")
    if args.max_concurrent < 0:
        raise UsageError(f"--max-concurrent must be >= 0, got {args.max_concurrent}")
    max_concurrent = args.max_concurrent
    if not max_concurrent and args.cluster == "local":
        max_concurrent = max(1, int((os.cpu_count() or 1) // cpus))
    result = Plan(study, args.preset, args.cluster, points, study_key(study, args.preset, points), runs_dir, uri,
                  args.experiment or study.name, cpus, gpus, max_concurrent, args.max_failures, dry_run=args.dry_run,
                  mfu=args.mfu, peak_tflops=args.peak_tflops, gpu_mem_gb=gpu_mem,
                  address=args.address, fresh=args.fresh, profile=profile, mlflow_server=args.mlflow_server,
                  no_wait=args.no_wait, problem=problem, processes=processes, nodes=args.nodes_per_trial)
    unfit = result.gpu_mem_gb and memory_problem(result.points, result.memory, gpus, result.gpu_mem_gb)
    if unfit and not args.dry_run:
        raise UsageError(unfit)  # before anything is submitted
    result.problem = result.problem or (UsageError(unfit) if unfit else None)
    return result


def evaluation_points(study: Study, preset: Preset, train_points: list[Point], args: argparse.Namespace,
                      tracking_uri: str, runs_dir: Path) -> list[Point]:
    """The evaluation task of the preset, with --data and --task applied, on --checkpoint or the trained points."""
    from ltm.checkpoint import resolve
    from studies.tasks import check_task, task_points

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
    sources = [resolve(c, tracking_uri, runs_dir) for c in args.checkpoint]
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

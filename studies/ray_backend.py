"""Backend `local` / `ray`: the grid as Ray Tune trials, each point in a persistent worker process.

Ray Tune gives resources per trial, retries (`FailureConfig`), storage under the runs folder and
`Tuner.restore` of an interrupted study. Each Ray actor keeps one `python -m studies.worker
--serve` process and runs its trials there one after another, so torch, MLflow and ltm are
imported once per actor instead of once per trial (about 3-4 s each). While a point runs, the
trial reports its progress (tokens, the latest validation bound, tokens/s) to Tune's table.
"""

from __future__ import annotations

import json
import logging
import os
import select
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from ltm.names import TOKENS, TOKENS_PER_S, VAL_PPL_BOUND, Exit, Status
from ltm.signals import waiting_for
from studies.interrupt import Interruption, die_with_parent, stop_local_workers
from studies.messages import Point, Result, TrialContext
from studies.order import pending
from studies.plan import ROOT, Plan, UsageError

log = logging.getLogger(__name__)

REPORT_EVERY_S = 5.0
"""How often a running trial reads its point's progress file and reports it to Tune."""
_TUNE_BOUND = VAL_PPL_BOUND.replace("/", "_")  # Tune's name for it in its status table ("/" would nest)


def _pythonpath() -> str:
    return os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)


def _hide_gpus_unless_given() -> dict[str, str]:
    """CUDA_VISIBLE_DEVICES="" for a trial given no GPU: Ray leaves the variable unset then
    (ray-project/ray#54868), and the worker would train and evaluate on the node's GPUs."""
    import ray

    return {} if ray.get_gpu_ids() else {"CUDA_VISIBLE_DEVICES": ""}


class PointWorker:
    """A persistent `python -m studies.worker --serve` process that runs points one after another.

    Each point runs in the worker's main thread (SIGTERM / SIGUSR2 checkpoint it) with the trial's
    threads and logs to its own file.
    """

    def __init__(self, runs_dir: Path, threads: int, spawner: ThreadPoolExecutor) -> None:
        self.identity = (str(runs_dir), threads)
        env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "PYTHONPATH": _pythonpath(), **_hide_gpus_unless_given()}
        self.proc = spawner.submit(
            subprocess.Popen, [sys.executable, "-m", "studies.worker", "--serve"], cwd=runs_dir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, preexec_fn=die_with_parent).result()

    def alive(self) -> bool:
        return self.proc.poll() is None

    def run(self, spec: Path, out: Path, log: Path, progress: Path) -> int | None:
        """Run one point, reporting its progress file meanwhile; its exit status, None if the worker died."""
        try:
            self.proc.stdin.write(json.dumps([str(spec), str(out), str(log), str(progress)]) + "\n")
            self.proc.stdin.flush()
            while not select.select([self.proc.stdout], [], [], REPORT_EVERY_S)[0]:
                _report_progress(progress)
            reply = self.proc.stdout.readline()
        except BrokenPipeError:
            reply = ""
        except BaseException:
            self.stop()  # the trial is being stopped: checkpoint, then go
            raise
        return int(reply) if reply.strip() else None

    def stop(self, timeout: float = 60) -> None:
        if self.alive():
            self.proc.terminate()
        try:
            self.proc.wait(timeout=timeout)
        except BaseException:
            self.proc.kill()


def _report_progress(progress: Path) -> None:
    """The point's latest logged numbers into Tune's status table (nothing if it logged none yet)."""
    from ray import tune

    try:
        latest = json.loads(progress.read_text())
    except (OSError, ValueError):
        return
    tune.report({"status": Status.RUNNING.value, TOKENS: latest.get(TOKENS, 0.0),
                 TOKENS_PER_S: latest.get(TOKENS_PER_S, 0.0), _TUNE_BOUND: latest.get(VAL_PPL_BOUND, float("nan"))})


class _ActorState:
    """What one Ray actor process keeps between the trials it runs (Tune reuses actors): its worker,
    and the one thread that spawns workers. A thread's exit would deliver PR_SET_PDEATHSIG to a
    worker it spawned, and Tune runs each trial in a new thread."""

    worker: PointWorker | None = None
    _spawner: ThreadPoolExecutor | None = None
    _lock = threading.Lock()

    @classmethod
    def spawner(cls) -> ThreadPoolExecutor:
        """The actor's one spawning thread, started with its first worker."""
        with cls._lock:
            if cls._spawner is None:
                cls._spawner = ThreadPoolExecutor(max_workers=1, thread_name_prefix="point-worker-spawner")
            return cls._spawner


def run_point_subprocess(point: Point, context: TrialContext) -> Result:
    """Run the point in this actor's worker (started, or restarted if it died, on demand).

    The spec and the result are files in <runs>/logs/ (`python -m studies.worker SPEC RESULT` reruns
    a point by hand); the point's output goes to <runs>/logs/<key>.log.
    """
    logs = Path(context.runs_dir) / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    name = point.id  # a trunk segment's files are its own, not its trunk's other segments'
    spec, out = logs / f"{name}.spec.json", logs / f"{name}.result.json"
    log, progress = logs / f"{name}.log", logs / f"{name}.progress.json"
    spec.write_text(json.dumps({"point": point.to_dict(), "context": context.to_dict()}))
    out.unlink(missing_ok=True)
    progress.unlink(missing_ok=True)
    worker = _ActorState.worker
    if worker is None or not worker.alive() or worker.identity != (context.runs_dir, context.threads):
        if worker is not None:
            worker.stop()
        worker = _ActorState.worker = PointWorker(Path(context.runs_dir), context.threads, _ActorState.spawner())
    try:
        code = worker.run(spec, out, log, progress)
    except BaseException:
        _ActorState.worker = None
        raise
    if code is None or code == Exit.INTERRUPTED:  # died, or exits after an interruption: the next point gets a new one
        worker.stop()
        _ActorState.worker = None
    if out.exists():
        return Result.from_dict(json.loads(out.read_text()))
    raise RuntimeError(f"worker for point {point.key} exited with status {worker.proc.returncode} without a "
                       f"result; see {log}")


def _trial(config: dict, points: dict, context: dict) -> None:
    from ray import tune

    from ltm.cli import configure_logging

    context = TrialContext.from_dict(context)
    configure_logging(context.log_level)  # this Ray actor's messages (its worker process configures its own)
    result = run_point_subprocess(Point.from_dict(points[config["key"]]), context)  # "key": the point's id
    if result.status == Status.BUSY:  # another live process runs this point: no retry, no duplicate
        log.warning("point %s: %s", config["key"], result.reason)
    if result.status in (Status.ERROR, Status.KILLED):
        # An exception (FailureConfig retries it) or an interruption: an errored trial is rerun by
        # Tuner.restore when the study is started again, and resumes from its checkpoint.
        raise RuntimeError(f"point {config['key']}: {result.status.value}: {result.reason}")
    m = result.metrics
    tune.report({"status": result.status.value, "run_id": result.run_id or "", TOKENS: m.get(TOKENS, 0.0),
                 TOKENS_PER_S: m.get(TOKENS_PER_S, 0.0), _TUNE_BOUND: m.get(VAL_PPL_BOUND, float("nan"))})


def _progress_table():
    """Tune's status table: a row per trial with its point and the numbers `_report_progress` sends, logged
    (stderr, -q hides it) where Tune would print it on stdout, which carries the plan and the summary."""
    from ray.tune import CLIReporter

    class LoggedTable(CLIReporter):
        def _print(self, msg: str) -> None:  # CLIReporter's one place of output
            log.info("%s", msg)

    return LoggedTable(parameter_columns={"key": "point"}, max_report_frequency=int(REPORT_EVERY_S),
                       print_intermediate_tables=True,
                       metric_columns={TOKENS: "tokens", TOKENS_PER_S: "tok/s", _TUNE_BOUND: "val ppl bound",
                                       "status": "run"})


def before_start(plan: Plan) -> None:
    """Nothing to check before the parent run is opened."""


def run(plan: Plan, tracker, interruption: Interruption) -> bool:
    """Run the grid as Ray Tune trials; returns False if the study was interrupted. A grid whose points wait
    for others (a ladder's trunks and branches) runs only what is not done yet, each point once the points it
    waits for have ended (`DependencyOrder`)."""
    import ray
    from ray import tune

    os.environ["PYTHONPATH"] = _pythonpath()
    os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")
    ordered = any(p.after or p.stop is not None for p in plan.points)
    todo = pending(plan.points, tracker) if ordered else plan.points
    if not todo:
        log.info("every point is done; nothing to run")
        return True

    def checkpoint_trials() -> None:
        # Ray kills an actor's child processes with SIGKILL when the actor goes: tell the workers
        # first and wait for their checkpoints, then break out of Tune.
        log.info("SIGTERM: checkpointing the running trials ...")
        stop_local_workers(plan.runs_dir, [p.key for p in plan.points], plan.driver)
        raise KeyboardInterrupt

    try:
        _start_ray(plan, interruption)
        interruption.running(checkpoint_trials)  # a signal that came during ray.init ends the study here
        points = {p.id: p.to_dict() for p in todo}
        context = plan.context(credentials_file=plan.write_credentials())
        trainable = tune.with_resources(tune.with_parameters(_trial, points=points, context=context.to_dict()),
                                        {"cpu": plan.cpus, "gpu": plan.gpus})
        _tuner(plan, trainable, todo if ordered else None).fit()
    finally:
        interruption.detach()  # a signal during the shutdown and the summary no longer stops the trials
        ray.shutdown()
    return not interruption.requested


def _tuner(plan: Plan, trainable, ordered: list[Point] | None):
    """Tune's experiment: restored from an earlier start unless --fresh; a grid of ordered points is never
    restored (what is done is skipped by `pending`), and its trials start in `DependencyOrder`."""
    from ray import tune

    path = plan.runs_dir / "ray" / plan.folder
    if ordered is None and not plan.fresh and tune.Tuner.can_restore(str(path)):
        log.info("restoring the Tune experiment %s", path)
        return tune.Tuner.restore(str(path), trainable, resume_unfinished=True, resume_errored=True)
    if ordered is None:
        space, search = {"key": tune.grid_search([p.id for p in plan.points])}, {}
    else:
        from studies.dependency_order import DependencyOrder

        space, search = {}, {"search_alg": DependencyOrder(ordered), "num_samples": len(ordered)}
    return tune.Tuner(
        trainable, param_space=space,
        tune_config=tune.TuneConfig(max_concurrent_trials=plan.max_concurrent or None,
                                    reuse_actors=True, **search),  # reuse_actors keeps each actor's PointWorker
        run_config=tune.RunConfig(name=plan.folder, storage_path=str(plan.runs_dir / "ray"), verbose=1,
                                  progress_reporter=_progress_table(),
                                  failure_config=tune.FailureConfig(max_failures=plan.max_failures),
                                  checkpoint_config=tune.CheckpointConfig(num_to_keep=1)))


def _start_ray(plan: Plan, interruption: Interruption) -> None:
    """Start Ray (or join the cluster at plan.address). A signal meanwhile raises Stopped, naming the wait."""
    import signal

    try:
        with waiting_for("Ray to start"):
            try:
                _ray_init(plan)
            except SystemExit as exit_:  # ray.init installs a SIGTERM handler that exits with the signal's number
                if exit_.code != signal.SIGTERM:
                    raise
                interruption.handle(signal.SIGTERM)  # recorded; during startup it raises Stopped
    finally:
        signal.signal(signal.SIGTERM, interruption.handle)  # the driver's again, not Ray's


def _ray_init(plan: Plan) -> None:
    import ray

    if plan.cluster != "ray":
        ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False,
                 configure_logging=True, logging_level="WARNING")
        return
    try:
        ray.init(address=plan.address, include_dashboard=False, log_to_driver=False)
    except ConnectionError as err:
        # A cluster with token authentication rejects a driver given an address unless told to
        # authenticate: `ray start` turns tokens on by itself when ~/.ray/auth_token exists.
        raise UsageError(f"{err}; wrong address, or the cluster uses token authentication: set "
                         "RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH to its token (as slurm/ray_study.sbatch "
                         "does)") from None

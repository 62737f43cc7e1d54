"""Backend `slurm`: the grid as one submitit job array, with requeue on timeout or preemption.

Each array task runs one point (`studies.point.run_point`); SIGUSR2 before the time limit
checkpoints it and submitit requeues it into the same MLflow run. A point of several processes
(`--processes-per-trial`, `--nodes-per-trial`) is one array task of that many SLURM tasks, which
form its torch.distributed process group. The driver serves a sqlite store to the jobs
(`studies.mlflow_server`) and polls squeue until every task has left the queue.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import TYPE_CHECKING

from ltm.files import atomic_write
from ltm.names import Status
from studies.interrupt import Interruption
from studies.messages import Point, Result, TrialContext
from studies.order import pending, submit, submitted
from studies.plan import ROOT, Plan, UsageError

if TYPE_CHECKING:
    import submitit  # for the annotations only: the functions below import it lazily

    from studies.mlflow_server import MlflowServer

log = logging.getLogger(__name__)


class SlurmTrial:
    """The submitit callable: one grid point per array task, run by each of its SLURM tasks (the point's
    processes); requeues itself on SIGUSR2."""

    def __call__(self, point: Point, context: TrialContext) -> Result:
        from studies.point import run_point

        rank = join_process_group()
        result = run_point(point, context)
        if rank == 0 and result.status == Status.KILLED and "SIGUSR2" in result.reason:
            # Timeout or preemption: every process stopped at the same update and rank 0 checkpointed;
            # run() has restored submitit's handler: hand the signal to it so it calls checkpoint() below
            # and requeues the job once (submitit's handler does nothing on the other ranks).
            os.kill(os.getpid(), signal.SIGUSR2)
            time.sleep(5)
        return result

    def checkpoint(self, point: Point, context: TrialContext):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmTrial(), point, context)


def join_process_group() -> int:
    """This task's rank in its job; with several tasks, torch.distributed's env:// variables (RANK,
    WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) from SLURM's, for `ltm.processes`.

    The tasks of a one-node job meet on 127.0.0.1: a node name that its own node cannot resolve would
    otherwise leave every task waiting in the rendezvous for torch's timeout (30 minutes). On several
    nodes they meet at the first node, whose name must resolve here; if it does not, this fails at once."""
    import submitit

    job = submitit.JobEnvironment()
    if job.num_tasks > 1:
        # sbatch passes the submitting shell's environment on: the job's own place counts, and a port of its own
        # (submitit draws it from the job id) so that jobs sharing a node do not collide.
        os.environ.pop("MASTER_PORT", None)
        # CUDA_VISIBLE_DEVICES as SLURM binds it: a task that sees one GPU takes it, one that sees its
        # node's takes cuda:<LOCAL_RANK> (ltm.processes.own_gpu).
        submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False, overwrite=True)
        if job.num_nodes == 1:
            os.environ["MASTER_ADDR"] = "127.0.0.1"
        else:
            _check_resolves(os.environ["MASTER_ADDR"])
    return job.global_rank


def _check_resolves(host: str) -> None:
    """Raise, naming the host and what to fix, when this node cannot resolve the point's first node."""
    try:
        socket.getaddrinfo(host, None)
    except OSError as err:
        raise RuntimeError(
            f"the point's first node {host!r} (rank 0, where its processes meet) does not resolve on "
            f"{socket.gethostname()}: {err}. Fix the cluster's name service (DNS or /etc/hosts) for its "
            "nodes, or run the point on one node (--nodes-per-trial 1)") from err


def slurm_executor(plan: Plan, folder) -> "submitit.AutoExecutor":
    """A submitit AutoExecutor for the study's array (requeues after a timeout: the profile's max_num_timeout)."""
    import submitit

    executor = submitit.AutoExecutor(folder=folder, cluster="slurm",
                                     slurm_max_num_timeout=int(plan.profile.max_num_timeout))
    executor.update_parameters(**slurm_parameters(plan))
    return executor


def slurm_parameters(plan: Plan) -> dict:
    """submitit AutoExecutor parameters from the profile and the plan's resources per trial."""
    p = plan.profile
    params = {
        "name": f"{plan.study.name}-{plan.preset}",
        "slurm_partition": p.partition,
        "cpus_per_task": max(1, round(plan.cpus)),
        "timeout_min": int(p.time_min),
        "slurm_array_parallelism": int(plan.max_concurrent or p.array_parallelism),
        "slurm_signal_delay_s": int(p.signal_delay_s),
        "nodes": plan.nodes, "tasks_per_node": plan.processes,
    }
    if plan.gpus and plan.processes > 1:  # per node: each process sees them all and takes its own
        params["slurm_gpus_per_node"] = int(plan.gpus)
    elif plan.gpus:
        params["slurm_gpus_per_task"] = int(plan.gpus)
    if p.mem_gb:
        params["mem_gb"] = p.mem_gb
    for key in ("account", "qos", "constraint"):
        if getattr(p, key):
            params[f"slurm_{key}"] = getattr(p, key)
    if p.additional_parameters:
        params["slurm_additional_parameters"] = dict(p.additional_parameters)
    params["slurm_setup"] = list(p.setup)
    return params


def sbatch_preview(plan: Plan) -> str:
    """The #SBATCH lines submitit would write for this study's array (nothing is submitted). Works where
    SLURM is absent (planning on a laptop): submitit's own text, else the parameters."""
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        try:  # submitit's private API, for display only: fall back to the parameters if it changes
            inner = _planning_executor(plan, tmp)
            inner.parameters["map_count"] = sum(1 for p in plan.points if not p.after)  # the others: jobs of their own
            text = inner._make_submission_file_text("python -u -m submitit.core._submit <folder>", "preview")
        except Exception as err:
            return f"(preview unavailable: {err})\n" + json.dumps(slurm_parameters(plan), indent=2)
    folder = str(slurm_folder(plan) / "%j")
    return "\n".join(line.replace(tmp, folder) for line in text.splitlines() if line.startswith("#SBATCH"))


def _planning_executor(plan: Plan, folder) -> "submitit.SlurmExecutor":
    """submitit's SLURM executor with the parameters `slurm_executor` gives it, made without `srun` on
    PATH (submitit refuses to make one there): AutoExecutor's translation of the generic parameters,
    then the slurm_-prefixed ones."""
    import submitit

    class Planning(submitit.SlurmExecutor):
        @classmethod
        def affinity(cls) -> int:
            return 1  # "available": it writes the submission file and submits nothing

    executor = Planning(folder, max_num_timeout=int(plan.profile.max_num_timeout))
    params = {k: v for k, v in slurm_parameters(plan).items() if v is not None}  # as AutoExecutor: None is unset
    generic = submitit.AutoExecutor._typed_parameters()
    specific = {k.removeprefix("slurm_"): v for k, v in params.items() if k.startswith("slurm_")}
    shared = {k: v for k, v in {**params, **specific}.items() if k in generic}  # slurm_<generic> wins
    converted = executor._convert_parameters(shared)
    converted.update({k: v for k, v in specific.items() if k not in generic})
    executor._internal_update_parameters(**converted)
    return executor


def snapshot_code(dest: Path) -> Path:
    """Copy ltm/ and studies/ into the submission folder, so editing the tree does not change queued jobs."""
    code = dest / "code"
    if code.exists():
        shutil.rmtree(code)
    for pkg in ("ltm", "studies"):
        shutil.copytree(ROOT / pkg, code / pkg, ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return code


def squeue_ids(job_ids: list[str]) -> set[str] | None:
    """The array tasks still pending or running (requeued tasks count as pending); None if squeue failed."""
    ids = sorted({j.split("_")[0] for j in job_ids})
    proc = subprocess.run(["squeue", "-h", "-r", "-o", "%i", "-j", ",".join(ids)], capture_output=True, text=True)
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return set()
        return None
    return {line.strip() for line in proc.stdout.split()}


def slurm_folder(plan: Plan) -> Path:
    return plan.runs_dir / "slurm" / plan.folder


def check_earlier_jobs(plan: Plan) -> None:
    """Refuse to start while jobs of an earlier start may still run (checked before any run status
    is touched): their runs are alive, not stale, and they must not be submitted twice."""
    jobs_file = slurm_folder(plan) / "jobs.json"
    if not jobs_file.exists():
        return
    old = json.loads(jobs_file.read_text())
    alive = squeue_ids(old)
    if alive is None:
        raise UsageError(f"cannot tell whether the jobs of an earlier start ({', '.join(old[:4])} ...) still run: "
                         "squeue did not answer; check `squeue` (is slurmctld up?) and start again")
    if alive:
        raise UsageError(f"{len(alive)} job(s) of an earlier start of this study are still queued or running "
                         f"({', '.join(sorted(alive)[:4])} ...); wait for them or `scancel` them, then start again")


def before_start(plan: Plan) -> None:
    check_earlier_jobs(plan)


def run(plan: Plan, tracker, interruption: Interruption) -> bool:
    """Submit the points not yet done as one submitit job array (each point that waits for others as a job of
    its own, dependent on theirs) and wait; returns False if interrupted."""
    folder = slurm_folder(plan)
    folder.mkdir(parents=True, exist_ok=True)
    todo = pending(plan.points, tracker)
    if not todo:
        log.info("every point already done; nothing to submit")
        return True
    server, tracking_uri, credentials = _store_for_jobs(plan, folder)
    try:
        code = snapshot_code(folder)
        executor = slurm_executor(plan, folder / "%j")
        params = slurm_parameters(plan)
        executor.update_parameters(slurm_setup=params["slurm_setup"] + [
            f"export PYTHONPATH={code}:$PYTHONPATH", f"export OMP_NUM_THREADS={params['cpus_per_task']}"])
        context = dataclasses.replace(plan.context(tracking_uri, credentials), cpus=params["cpus_per_task"])
        interruption.running()  # from the submission on, a signal cancels the array (the poll loop below)
        ids = submit(executor, SlurmTrial(), todo, context, params.get("slurm_additional_parameters", {}))
        jobs_file = folder / "jobs.json"
        atomic_write(jobs_file, json.dumps(ids))  # whole or absent, even if the driver dies now
        log.info("submitted %s from %s", submitted(ids, [bool(p.after) for p in todo]), folder)
        return True if plan.no_wait else _wait(plan, ids, interruption)
    finally:
        if server is not None:
            server.stop()


def _store_for_jobs(plan: Plan, folder: Path) -> tuple[MlflowServer | None, str, str | None]:
    """(the mlflow server this driver starts for the jobs or None, the tracking URI and credentials file the
    jobs get): a sqlite store is served over http unless --mlflow-server off."""
    tracking_uri = plan.tracking_uri
    if tracking_uri.startswith("sqlite:") and plan.mlflow_server == "auto":
        from studies.mlflow_server import MlflowServer

        server = MlflowServer(tracking_uri, folder, one_node=plan.profile.one_node)
        log.info("serving %s at %s for the workers (mlflow server on %s, basic auth, credentials in %s)",
                 plan.tracking_uri, server.uri, socket.gethostname(), server.credentials)
        return server, server.uri, str(server.credentials)
    if tracking_uri.startswith("sqlite:"):
        log.warning("workers write the sqlite store directly (--mlflow-server off): safe only on one node's local "
                    "disk")
    return None, tracking_uri, plan.write_credentials()


def _wait(plan: Plan, ids: list[str], interruption: Interruption) -> bool:
    """Poll squeue until every array task has left the queue; on SIGTERM or Ctrl-C cancel the pending ones,
    let the running ones checkpoint, and return False."""
    from tqdm import tqdm

    bar = tqdm(total=len(ids), unit="point", desc=plan.study.name, dynamic_ncols=True)
    finished: set[str] = set()
    misses = 0
    while len(finished) < len(ids):
        try:
            time.sleep(2)
        except KeyboardInterrupt:  # Ctrl-C: as SIGTERM
            interruption.request()
        if interruption.requested:
            jobs = sorted({i.split("_")[0] for i in ids})  # the array and any dependent jobs
            log.info("interrupted: cancelling pending tasks; running ones checkpoint on SIGTERM ...")
            subprocess.run(["scancel", "--state=PENDING", *jobs], check=False)
            subprocess.run(["scancel", "--signal=TERM", *jobs], check=False)  # the steps, not the batch shell
            deadline = time.time() + 120
            while time.time() < deadline and (squeue_ids(ids) or set()):
                time.sleep(1)
            subprocess.run(["scancel", *jobs], check=False)  # whatever did not stop in time
            return False
        alive = squeue_ids(ids)
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

"""A point that spans processes, GPUs and nodes: `--processes-per-trial`, `--nodes-per-trial`.

The option checks run anywhere. The SLURM tests (slow; skipped without a cluster: `bash
slurm/start_local_slurm.sh`) run smoke points as two gloo processes on the one-node cluster and
read their numbers back from MLflow against the same points trained in one process.
"""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ltm.config import RunConfig
from ltm.names import VAL_PPL_BOUND
from slurm_jobs import (array_tasks, run_driver, slurm_logs, slurm_unavailable_reason, stop_driver, task_running,
                        what_slurm_did)
from studies.inference_scaling import STUDY as INFERENCE_SCALING
from studies.launcher import main
from studies.messages import Point
from studies.plan import plan
from studies.points import build_points
from studies.slurm_backend import join_process_group, slurm_parameters
from studies.study import Preset, Study
from studies.zero_shot import STUDY as ZERO_SHOT

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "inference_scaling.py"

_SLURM_REASON = slurm_unavailable_reason()
needs_slurm = pytest.mark.skipif(_SLURM_REASON is not None, reason=str(_SLURM_REASON))


def refused(study, argv: list[str], capsys) -> str:
    """The one-line error of options refused with exit 2 (nothing created); fails if they are accepted."""
    assert main(study, argv) == 2
    return capsys.readouterr().err


def launched(runs: Path) -> list[str]:
    """What a study left in its runs folder: its MLflow store, Ray or SLURM folders."""
    return [name for name in ("mlflow.db", "ray", "slurm") if (runs / name).exists()]


@pytest.mark.parametrize("dry", [[], ["--dry-run"]], ids=["run", "dry-run"])
def test_a_fraction_of_a_gpu_on_slurm_is_refused_naming_the_ray_backends(tmp_path, capsys, dry):
    runs = tmp_path / "runs"
    err = refused(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(runs), "--cluster", "slurm",
                                      "--gpus-per-trial", "0.5", *dry], capsys)
    assert "--gpus-per-trial 0.5" in err and "whole" in err and "--cluster local|ray" in err
    assert not launched(runs)


def test_processes_on_gpus_are_one_per_gpu(tmp_path, capsys):
    err = refused(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm",
                                      "--gpus-per-trial", "2", "--processes-per-trial", "4", "--dry-run"], capsys)
    assert "--processes-per-trial 4 with --gpus-per-trial 2" in err and "one process per GPU" in err


def test_gpus_per_node_set_the_processes_and_the_sbatch_lines(tmp_path, capsys):
    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm", "--profile", "gpu",
            "--gpus-per-trial", "8", "--nodes-per-trial", "2", "--set", "train.batch_size=32", "--dry-run"]
    p = plan(INFERENCE_SCALING, argv)
    assert (p.processes, p.nodes, p.world) == (8, 2, 16)  # one process per GPU, without --processes-per-trial
    params = slurm_parameters(p)
    assert (params["tasks_per_node"], params["nodes"], params["slurm_gpus_per_node"]) == (8, 2, 8)
    assert "slurm_gpus_per_task" not in params  # each task must see its node's GPUs to take cuda:<local rank>
    assert main(INFERENCE_SCALING, argv) == 0
    out = capsys.readouterr().out
    assert "one torch.distributed job of 16 processes (8 per node x 2 node(s)) with 8 CPU each" in out
    for line in ("#SBATCH --ntasks-per-node=8", "#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8",
                 "#SBATCH --cpus-per-task=8"):
        assert line in out.splitlines(), line
    assert "with 4 trials x 16 GPU at once" in out  # the wall time counts every GPU of a point


def test_several_nodes_need_a_profile_of_several(tmp_path, capsys):
    err = refused(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm",
                                      "--profile", "local", "--nodes-per-trial", "2", "--dry-run"], capsys)
    assert "--nodes-per-trial 2 with a profile of one node" in err and "--profile gpu" in err


def test_one_gpu_stays_one_process_with_its_own_gpu(tmp_path):
    p = plan(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm",
                                 "--gpus-per-trial", "1", "--dry-run"])
    params = slurm_parameters(p)
    assert (p.world, params["tasks_per_node"], params["slurm_gpus_per_task"]) == (1, 1, 1)


@pytest.mark.parametrize("args", [["--processes-per-trial", "2"], ["--nodes-per-trial", "2"],
                                  ["--gpus-per-trial", "2"]], ids=["processes", "nodes", "gpus"])
def test_ray_refuses_a_point_of_several_processes_naming_slurm(tmp_path, capsys, args):
    # a dry run: the refusal is the same, and Tune would otherwise wait for GPUs this machine lacks
    err = refused(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--dry-run", *args], capsys)
    assert "--cluster local runs each point in one process" in err and "--cluster slurm" in err


def test_an_evaluation_point_runs_in_one_process(tmp_path, capsys):
    err = refused(ZERO_SHOT, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm",
                              "--processes-per-trial", "2", "--dry-run"], capsys)
    assert "an evaluation point runs in one process, not 2" in err


@pytest.mark.parametrize("args, multiple", [(["--processes-per-trial", "3"], 3),
                                            (["--processes-per-trial", "2", "--set", "train.micro_batch_size=8"], 16)],
                         ids=["batch", "micro-batch"])
def test_a_batch_that_does_not_split_over_the_processes_is_refused(tmp_path, capsys, args, multiple):
    err = refused(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm",
                                      "--dry-run", *args], capsys)
    assert "train.batch_size=8 does not split into" in err and f"a multiple of {multiple}" in err


def test_run_keys_do_not_depend_on_the_processes(tmp_path):
    base = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm", "--dry-run"]
    one, two = plan(INFERENCE_SCALING, base), plan(INFERENCE_SCALING, [*base, "--processes-per-trial", "2"])
    assert [p.key for p in one.points] == [p.key for p in two.points]
    assert one.study_key == two.study_key  # starting again with other processes resumes the same study


def slurm_task(monkeypatch, nodes: int, procid: int, localid: int, nodelist: str) -> None:
    """The environment SLURM gives task `procid` of array task 1230_4 with 4 tasks on `nodes` node(s), under
    what the submitting shell left behind (which must not count)."""
    slurm = {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "1234", "SLURM_ARRAY_JOB_ID": "1230",
             "SLURM_ARRAY_TASK_ID": "4", "SLURM_NTASKS": "4", "SLURM_JOB_NUM_NODES": str(nodes),
             "SLURM_NODEID": str(procid // (4 // nodes)), "SLURM_PROCID": str(procid), "SLURM_LOCALID": str(localid),
             "SLURM_JOB_NODELIST": nodelist, "CUDA_VISIBLE_DEVICES": "0,1", "WORLD_SIZE": "9", "MASTER_PORT": "1234"}
    for name, value in slurm.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR"):
        monkeypatch.delenv(name, raising=False)


def name_service(monkeypatch, known: set[str]) -> None:
    """This node resolves only the names in `known` (a cluster's DNS, or a node whose own name is missing)."""
    import socket

    def getaddrinfo(host, *args, **kwargs):
        if host not in known:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 0))]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_a_slurm_task_joins_its_points_process_group(monkeypatch):
    """SLURM's place of the task (rank 3 of 4, second task on the second node) becomes torch.distributed's;
    what the submitting shell left in the environment does not count, and every task sees its node's GPUs."""
    slurm_task(monkeypatch, nodes=2, procid=3, localid=1, nodelist="gpu[07-08]")
    name_service(monkeypatch, {"gpu07", "gpu08"})
    assert join_process_group() == 3
    env = {k: os.environ[k] for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "CUDA_VISIBLE_DEVICES")}
    assert env == {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "gpu07",
                   "CUDA_VISIBLE_DEVICES": "0,1"}
    port = os.environ["MASTER_PORT"]
    assert port != "1234"  # a port of this job's own, not the submitting shell's
    monkeypatch.setenv("SLURM_PROCID", "0")
    monkeypatch.setenv("SLURM_LOCALID", "0")
    assert join_process_group() == 0 and os.environ["MASTER_PORT"] == port  # every task of the job agrees


def test_the_tasks_of_a_one_node_point_meet_on_loopback_without_the_name_service(monkeypatch):
    """A node that cannot resolve its own name left both tasks of a one-node point waiting 30 minutes in
    torch's rendezvous (seen on CI); on one node they need no name at all."""
    slurm_task(monkeypatch, nodes=1, procid=1, localid=1, nodelist="vm")
    name_service(monkeypatch, set())
    assert join_process_group() == 1
    assert (os.environ["MASTER_ADDR"], os.environ["WORLD_SIZE"], os.environ["LOCAL_RANK"]) == ("127.0.0.1", "4", "1")


def test_a_first_node_that_does_not_resolve_fails_at_once_saying_what_to_fix(monkeypatch):
    slurm_task(monkeypatch, nodes=2, procid=2, localid=0, nodelist="gpu[07-08]")
    name_service(monkeypatch, {"gpu08"})
    with pytest.raises(RuntimeError) as err:
        join_process_group()
    message = str(err.value)
    assert "'gpu07'" in message and "does not resolve" in message
    assert "DNS or /etc/hosts" in message and "--nodes-per-trial 1" in message


def test_a_one_task_slurm_job_stays_one_process(monkeypatch):
    for name, value in {"SUBMITIT_EXECUTOR": "slurm", "SLURM_JOB_ID": "77", "SLURM_NTASKS": "1",
                        "SLURM_PROCID": "0", "SLURM_LOCALID": "0"}.items():
        monkeypatch.setenv(name, value)
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "SLURM_ARRAY_JOB_ID"):
        monkeypatch.delenv(name, raising=False)
    assert join_process_group() == 0
    assert "WORLD_SIZE" not in os.environ and "RANK" not in os.environ


# -- on the one-node SLURM cluster ----------------------------------------------------------------

def runs_by_key(runs: Path, experiment: str) -> dict:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(f"sqlite:///{runs / 'mlflow.db'}")
    exp = client.get_experiment_by_name(experiment)
    found = [r for r in client.search_runs([exp.experiment_id]) if "ltm.run_key" in r.data.tags]
    assert len(found) == len({r.data.tags["ltm.run_key"] for r in found}), "a point has two MLflow runs"
    return {r.data.tags["ltm.run_key"]: r for r in found}


def one_process_bound(point, runs: Path) -> float:
    """The point trained here, in one process, to its final validation bound."""
    from ltm.train import run

    result = run(RunConfig.from_dict(point.config), tracking_uri=f"sqlite:///{runs / 'mlflow.db'}",
                 runs_dir=runs, progress=False)
    assert result.status == "FINISHED", result.reason
    return result.metrics[VAL_PPL_BOUND]


SAME_MICRO_BATCHES = ["train.micro_batch_size=4"]
"""Two processes of the smoke batch of 8 compute it in 4s; one process computes it in 4s with this too. Without
it, one process's batch of 8 rounds differently (5e-8 of a gradient), and 16 updates make that 2e-4 of a bound."""


@needs_slurm
@pytest.mark.slow
def test_a_slurm_study_of_two_process_points_gives_the_one_process_numbers(tmp_path):
    runs = tmp_path / "runs"
    proc = run_driver([sys.executable, str(SCRIPT), "--preset", "smoke", "--runs-dir", str(runs), "--cluster",
                       "slurm", "--processes-per-trial", "2", "--set", *SAME_MICRO_BATCHES], runs, tmp_path, 1200)
    assert proc.returncode == 0, what_slurm_did(runs, proc.stdout + proc.stderr)
    assert "#SBATCH --ntasks-per-node=2" in proc.stdout
    points = build_points(INFERENCE_SCALING, "smoke", [0], None, SAME_MICRO_BATCHES)
    found = runs_by_key(runs, "inference_scaling")
    assert set(found) == {p.key for p in points}
    assert {r.info.status for r in found.values()} == {"FINISHED"}
    assert {r.data.tags["processes"] for r in found.values()} == {"2"}  # each run's world size
    for p in points:
        bound = found[p.key].data.metrics[VAL_PPL_BOUND]
        print(f"{p.key} {p.label}: 2 processes {bound:.6f}", end=" ")
        one = one_process_bound(p, tmp_path / "one")
        print(f"1 process {one:.6f}")
        assert bound == pytest.approx(one, rel=1e-4), p.label
    # every point ran as two tasks, each with its own log (%A_%a_%t)
    assert {f.name.rsplit("_", 2)[-2] for f in (runs / "slurm").glob("*/*/*_log.out")} == {"0", "1"}


ONE_POINT_STUDY = """
import sys
sys.path.insert(0, {root!r})
from studies.launcher import main
from studies.messages import Point
from studies.study import Preset, Study

sys.exit(main(Study(name="one_point", description="one smoke point", default_preset="smoke",
                    presets={{"smoke": Preset("smoke", [{{}}])}})))
"""


def one_point(overrides: list[str]) -> Point:
    """The point of ONE_POINT_STUDY, as its driver builds it."""
    study = Study(name="one_point", description="one smoke point", default_preset="smoke",
                  presets={"smoke": Preset("smoke", [{}])})
    (point,) = build_points(study, "smoke", [0], None, overrides)
    return point


@needs_slurm
@pytest.mark.slow
def test_sigusr2_to_a_two_process_point_requeues_it_once_and_it_resumes_to_the_same_numbers(tmp_path):
    runs, script = tmp_path / "runs", tmp_path / "one_point.py"
    script.write_text(ONE_POINT_STUDY.format(root=str(ROOT)))
    longer = ["train.tokens=131072", "train.checkpoint_every=16384", *SAME_MICRO_BATCHES]
    point = one_point(longer)
    proc = subprocess.Popen([sys.executable, str(script), "--runs-dir", str(runs), "--cluster", "slurm",
                             "--processes-per-trial", "2", *(a for o in longer for a in ("--set", o))],
                            cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.time() + 600
        while not ((task := next(iter(array_tasks(runs)), None)) and task_running(task)
                   and any((runs / "checkpoints" / point.key).glob("ckpt-*.pt"))):
            if proc.poll() is not None or time.time() > deadline:
                stop_driver(proc, runs)
                pytest.fail(f"the point never ran to a checkpoint\n{what_slurm_did(runs, proc.stdout.read())}")
            time.sleep(0.5)
        # to every task of the job, as SLURM does before its time limit
        subprocess.run(["scancel", "--signal=USR2", task], check=True)
        out, _ = proc.communicate(timeout=900)  # SLURM holds a requeued job for about 2 minutes
    finally:
        stop_driver(proc, runs)
    logs = slurm_logs(runs)
    assert proc.returncode == 0, out[-3000:] + logs[-3000:]
    assert logs.count("Requeued job") == 1, logs[-4000:]  # rank 0 alone requeues the job
    assert "resuming run" in logs, logs[-4000:]
    (run,) = runs_by_key(runs, "one_point").values()
    assert run.info.status == "FINISHED" and run.data.tags["processes"] == "2"
    one = one_process_bound(point, tmp_path / "one")
    print(f"requeued 2-process point: {run.data.metrics[VAL_PPL_BOUND]:.6f}, uninterrupted 1 process: {one:.6f}")
    assert run.data.metrics[VAL_PPL_BOUND] == pytest.approx(one, rel=1e-4)

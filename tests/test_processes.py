"""Several processes of one run (gloo on the CPU, as NCCL is on GPUs): a failure on one process
ends all of them with its reason, rank 0 writes a cold token cache once, the process group is
destroyed at the end, and mfu is per process."""

import json
import multiprocessing
import os
import socket
import threading
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from mlflow.tracking import MlflowClient

from ltm.config import run_preset
from ltm.processes import PeerFailed, Processes
from ltm.tracking import default_tracking_uri

HANG_GUARD_S = 300
"""Only a guard against a hang: the processes end long before it, or the test fails as hung."""

BROKEN = "rank 1's batch is broken"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def join_env(rank: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
                      WORLD_SIZE="2")


def spawn(target, *args) -> list[multiprocessing.Process]:
    """Run target(rank, port, *args) in two fresh processes (spawned, as torchrun's are) and wait for both."""
    port = free_port()
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=target, args=(rank, port, *args)) for rank in (0, 1)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_GUARD_S)
    hung = [p for p in procs if p.is_alive()]
    for p in hung:
        p.kill()
    assert not hung, "a process hung"
    return procs


def smoke(tmp_path: Path):
    return run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=2048",
                                               "train.peak_flops=1e12"])


def train_rank(rank: int, port: int, tmp: str, fail_on_rank_1: bool) -> None:
    """One process of a two-process smoke run; writes what it saw to rank<r>.json."""
    import time

    import ltm.objective as objective
    import ltm.train as train
    from ltm.data.synthetic import SyntheticCorpus

    join_env(rank, port)
    tmp_path = Path(tmp)
    generate = SyntheticCorpus.stream

    def counted(self, n, split):  # who generates (tokenises) the corpus
        with open(tmp_path / "generated.txt", "a") as f:
            f.write(f"{rank} {split}\n")
        time.sleep(0.5)  # widens the window in which a second writer would start
        return generate(self, n, split)

    SyntheticCorpus.stream = counted
    if fail_on_rank_1 and rank == 1:
        def broken(*args, **kwargs):
            raise RuntimeError(BROKEN)

        objective.decoder_loss = broken  # fails before the step's gradient all-reduce, where rank 0 waits
    try:
        result = train.run(smoke(tmp_path), runs_dir=tmp_path / "runs", experiment="p", progress=False)
        outcome = {"status": result.status, "run_id": result.run_id, "metrics": result.metrics}
    except Exception as err:
        outcome = {"error": f"{type(err).__name__}: {err}"}
    outcome["group_left"] = dist.is_initialized()
    (tmp_path / f"rank{rank}.json").write_text(json.dumps(outcome))


def outcomes(tmp_path: Path) -> list[dict]:
    return [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]


@pytest.mark.slow
def test_two_processes_write_a_cold_cache_once_log_mfu_per_process_and_destroy_their_group(tmp_path):
    spawn(train_rank, str(tmp_path), False)
    main, other = outcomes(tmp_path)
    assert main["status"] == other["status"] == "FINISHED", (main, other)
    assert sorted((tmp_path / "generated.txt").read_text().splitlines()) == ["0 train", "0 validation"]
    assert not main["group_left"] and not other["group_left"]
    m = main["metrics"]  # each process's share of the tokens/s, at the 1e12 FLOP/s of train.peak_flops
    assert m["mfu"] == pytest.approx(m["tokens_per_s"] / 2 * (m["flops"] / m["tokens"]) / 1e12, rel=1e-9)


@pytest.mark.slow
def test_an_error_on_one_process_ends_every_process_with_its_reason(tmp_path):
    spawn(train_rank, str(tmp_path), True)
    main, other = outcomes(tmp_path)
    assert other["error"] == f"RuntimeError: {BROKEN}"
    assert main["error"] == f"PeerFailed: process 1 failed: RuntimeError: {BROKEN}"
    assert not main["group_left"] and not other["group_left"]
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("p").experiment_id])
    assert run.info.status == "FAILED" and BROKEN in run.data.tags["ltm.status_reason"]


def fail_one(rank: int, port: int, tmp: str, failing: int) -> None:
    """Process `failing` records a failure and stays alive, in the group, joining nothing. The other one
    either waits for rank 0 on the store (as during rank 0's evaluation: failing=0), or, once it has
    seen the failure, calls a collective (failing=1). Each writes the PeerFailed it got, if any."""
    import time

    join_env(rank, port)
    tmp_path = Path(tmp)
    procs = Processes.from_env("cpu")
    seen = []
    try:
        if rank == failing:
            procs.fail(RuntimeError(f"process {rank} ran out of memory"))
            while not (tmp_path / f"rank{1 - rank}.json").exists():
                time.sleep(0.05)
        elif failing == 0:
            try:
                procs.after_main()
            except PeerFailed as err:
                seen.append(str(err))
        else:
            while procs.peer_failure is None:  # its watcher has seen the failure in the store
                time.sleep(0.05)
            try:
                procs.all_sum(torch.ones(1))
            except PeerFailed as err:
                seen.append(str(err))
    finally:
        (tmp_path / f"rank{rank}.json").write_text(json.dumps(seen))
        procs.close()


@pytest.mark.parametrize("failing", [0, 1], ids=["waiting-for-rank-0", "collective-after-the-failure"])
def test_a_process_stops_with_the_reason_another_one_failed(tmp_path, failing):
    spawn(fail_one, str(tmp_path), failing)
    seen = [json.loads((tmp_path / f"rank{rank}.json").read_text()) for rank in (0, 1)]
    assert seen[failing] == []
    assert seen[1 - failing] == [f"process {failing} failed: RuntimeError: process {failing} ran out of memory"]


def test_one_process_has_no_process_group_and_no_watcher(monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    procs = Processes.from_env("cpu")
    procs.after_main()
    procs.fail(RuntimeError("nothing to tell"))
    assert procs.broadcast("x") == "x" and procs.world == 1 and procs.is_main
    assert not dist.is_initialized() and not [t for t in threading.enumerate() if t.name.startswith("ltm-failure")]
    procs.close()


# -- which GPU a process takes, under any binding (issue 31) -------------------------------------------

@pytest.mark.parametrize("visible, local_rank, local_world, index", [
    (1, 5, 8, 0),  # bound to one GPU (--gpu-bind, cgroups): ranks 1-7 once asked for an "invalid device ordinal"
    (8, 5, 8, 5),  # sees the node's 8, one per process
    (8, 0, 1, 0),  # one process on a node of 8
    (4, 1, 2, 1),  # more GPUs than processes: one each
], ids=["bound", "node", "alone", "spare"])
def test_a_process_takes_the_gpu_it_sees(monkeypatch, visible, local_rank, local_world, index):
    from ltm.processes import resolve_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    assert resolve_device(None, local_rank, True, local_world) == torch.device("cuda", index)
    assert resolve_device("cuda", local_rank, True, local_world) == torch.device("cuda", index)
    assert resolve_device("cuda:0", local_rank, True, local_world) == torch.device("cuda", 0)  # as given
    assert resolve_device(None, local_rank, False, local_world) == torch.device("cpu")


@pytest.mark.parametrize("visible", [0, 2])
def test_a_process_that_sees_neither_one_gpu_nor_one_per_process_is_refused_naming_what_it_sees(monkeypatch,
                                                                                               visible):
    from ltm.processes import resolve_device

    monkeypatch.setattr(torch.cuda, "device_count", lambda: visible)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "0,1"[:2 * visible - 1] if visible else "")
    with pytest.raises(RuntimeError) as err:
        resolve_device("cuda", 5, True, 8)
    assert f"process LOCAL_RANK=5 of 8 on this node sees {visible} GPU(s)" in str(err.value)
    assert "give each process exactly one GPU" in str(err.value) and "CUDA_VISIBLE_DEVICES=" in str(err.value)


def test_a_process_bound_to_one_gpu_sets_cuda_0_from_torchruns_environment(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "1")
    monkeypatch.setenv("LOCAL_RANK", "5")
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    chosen = []
    monkeypatch.setattr(torch.cuda, "set_device", chosen.append)
    assert Processes.from_env("cuda").device == torch.device("cuda", 0) and chosen == [torch.device("cuda", 0)]


# -- the stop reason every rank agrees on (issue 31) ---------------------------------------------------

class _TwoRanks:
    """A stand-in for two processes' reduction: this rank's votes summed with the other rank's."""

    def __init__(self, other: torch.Tensor) -> None:
        self.device, self.other = torch.device("cpu"), other

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.add_(self.other)


def test_sigusr2_on_any_rank_is_the_reason_every_rank_stops_for():
    import signal

    from ltm.loop import STOP_PRIORITY, agreed_stop

    usr2 = torch.tensor([float(s == signal.SIGUSR2) for s in STOP_PRIORITY] + [0.0])
    nothing = torch.zeros(len(STOP_PRIORITY) + 1)
    # rank 0 got SIGTERM (or nothing) while SLURM sent SIGUSR2 to rank 1: both say SIGUSR2, so rank 0 requeues
    assert agreed_stop(_TwoRanks(usr2), signal.SIGTERM, False) == ("SIGUSR2", False)
    assert agreed_stop(_TwoRanks(usr2), None, False) == ("SIGUSR2", False)
    assert agreed_stop(_TwoRanks(nothing), signal.SIGUSR2, False) == ("SIGUSR2", False)
    assert agreed_stop(_TwoRanks(nothing), signal.SIGINT, False) == ("SIGINT", False)
    assert agreed_stop(_TwoRanks(nothing), None, True) == ("", True)
    assert agreed_stop(_TwoRanks(nothing), None, False) == ("", False)


def stop_rank(rank: int, port: int, tmp: str) -> None:
    """One of two gloo processes: rank 1 got SIGUSR2, rank 0 nothing; writes what each agrees on."""
    import signal

    from ltm.loop import agreed_stop

    join_env(rank, port)
    procs = Processes.from_env("cpu")
    try:
        agreed = agreed_stop(procs, signal.SIGUSR2 if rank == 1 else None, False)
    finally:
        procs.close()
    (Path(tmp) / f"stop{rank}.json").write_text(json.dumps(agreed))


def test_two_gloo_processes_agree_on_sigusr2_when_only_one_got_it(tmp_path):
    procs = spawn(stop_rank, str(tmp_path))
    assert [p.exitcode for p in procs] == [0, 0]
    assert [json.loads((tmp_path / f"stop{r}.json").read_text()) for r in (0, 1)] == [["SIGUSR2", False]] * 2

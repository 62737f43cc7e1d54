"""The torchrun processes of a run: this process's rank and device, and summing over the processes.

Without torchrun a run is rank 0 of 1 and nothing is communicated, watched or waited for.

With several processes, two things keep a failure or a slow rank 0 from turning into a hang:

* Where rank 0 works alone (tokenising a cold cache, the MLflow decision, an evaluation), the
  others wait for it by polling the process group's key-value store, not inside a collective,
  which NCCL's watchdog would end after its timeout (10 minutes by default).
* A process that fails records why in the store (`fail`). The others see it while they wait, and
  a thread that watches the store aborts the process group under a collective they are blocked
  in, so every process stops with that reason (`PeerFailed`) instead of waiting for a timeout.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

WATCH_INTERVAL_S = 0.5
"""How often each process looks for another's failure in the store."""

_GROUPS = itertools.count()
"""Process groups this process has joined: every process counts alike, so each run's keys in the
store (which torchrun's agent keeps from one group to the next) have their own prefix."""


class PeerFailed(RuntimeError):
    """Another process of the run failed; the message is its reason."""


def resolve_device(device: str | None, local_rank: int, cuda_available: bool, local_world: int = 1) -> torch.device:
    """The device of this process: None picks this process's GPU (or the CPU), and a bare "cuda"
    means this process's GPU (an index, as torch.cuda.set_device needs): `own_gpu`."""
    if device is None:
        device = "cuda" if cuda_available else "cpu"
    dev = torch.device(device)
    return own_gpu(local_rank, local_world) if dev.type == "cuda" and dev.index is None else dev


def own_gpu(local_rank: int, local_world: int = 1) -> torch.device:
    """This process's GPU among those it can see (torch.cuda.device_count(), after CUDA_VISIBLE_DEVICES), one
    rule for every binding: seeing one GPU (bound to it: --gpu-bind, cgroups, a CUDA_VISIBLE_DEVICES per task),
    cuda:0; seeing at least one per process of its node (`local_world`, LOCAL_WORLD_SIZE), cuda:<LOCAL_RANK>;
    anything else is refused, naming what it sees."""
    visible = torch.cuda.device_count()
    if visible == 1:
        return torch.device("cuda", 0)
    if visible >= max(local_world, local_rank + 1):
        return torch.device("cuda", local_rank)
    shown = os.environ.get("CUDA_VISIBLE_DEVICES", "unset")
    raise RuntimeError(f"process LOCAL_RANK={local_rank} of {local_world} on this node sees {visible} GPU(s) "
                       f"(CUDA_VISIBLE_DEVICES={shown}): give each process exactly one GPU (bind one per task, e.g. "
                       "srun --gpu-bind=single:1) or let every process see all of its node's GPUs, one per process")


@dataclass
class Processes:
    """This process's place among the torchrun processes of a run (rank 0 of 1 without torchrun)."""

    rank: int = 0
    world: int = 1
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    owns_group: bool = False
    """from_env created the process group, so `close` destroys it."""
    _store: dist.Store | None = field(default=None, repr=False)
    _prefix: str = ""
    _syncs: int = 0
    _peer_failure: str | None = None
    _watcher: _FailureWatcher | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, device: str | None = None) -> "Processes":
        """This process's place, from torchrun's environment; sets the GPU and, with several processes,
        joins the process group (unless the caller has) and starts watching the store for failures."""
        world = int(os.environ.get("WORLD_SIZE", "1"))
        local = int(os.environ.get("LOCAL_RANK", "0"))
        local_world = int(os.environ.get("LOCAL_WORLD_SIZE", "1"))
        dev = resolve_device(device, local, torch.cuda.is_available(), local_world)
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        if world == 1:
            return cls(device=dev)
        owns = not dist.is_initialized()
        if owns:
            dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
        procs = cls(rank=dist.get_rank(), world=world, device=dev, owns_group=owns,
                    _store=dist.distributed_c10d._get_default_store(), _prefix=f"ltm/{next(_GROUPS)}/")
        procs._watcher = _FailureWatcher(procs)
        return procs

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def peer_failure(self) -> str | None:
        """Why another process failed, once this one has seen it (it looks every WATCH_INTERVAL_S)."""
        return self._peer_failure

    def all_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor summed over the processes, in place."""
        if self.world > 1:
            self._collective(dist.all_reduce, tensor)
        return tensor

    def broadcast(self, obj: T) -> T:
        """rank 0's value of a picklable object, on every process (however long rank 0 takes to make it)."""
        if self.world == 1:
            return obj
        self.after_main()
        box = [obj]
        self._collective(dist.broadcast_object_list, box, src=0)
        return box[0]

    def after_main(self) -> None:
        """Every process goes on once rank 0 has come here: the others poll the store meanwhile, so
        no watchdog ends a long wait, and they stop with the reason if a process fails."""
        if self.world == 1:
            return
        self._syncs += 1
        key = f"{self._prefix}reached/{self._syncs}"
        if self.is_main:
            self._store.set(key, b"1")
            return
        pause = 0.001
        while True:
            try:
                if self._store.check([key]):
                    return
                reason = self._failure()
            except Exception as err:
                raise PeerFailed(_lost_store(err)) from err
            if reason is not None:
                raise PeerFailed(reason)
            time.sleep(pause)
            pause = min(2 * pause, 0.1)

    @contextlib.contextmanager
    def main_first(self) -> Iterator[None]:
        """Rank 0 runs the block before the others do: what it writes (a cold token cache, a trained
        tokenizer) is written once, and the others read it."""
        if not self.is_main:
            self.after_main()
        yield
        if self.is_main:
            self.after_main()

    def fail(self, err: BaseException) -> None:
        """Record why this process failed, so the others stop with that reason rather than wait for it."""
        if self.world == 1 or self._peer_failure is not None:  # another's failure is the cause: keep its reason
            return
        with contextlib.suppress(Exception):  # a store that is gone tells the others by itself
            # compare_set with "" sets the key only where it is absent: the first failure stays
            self._store.compare_set(self._reason_key, "", f"process {self.rank} failed: {type(err).__name__}: {err}")

    def close(self) -> None:
        """Stop watching the store, and destroy the process group if from_env created it."""
        if self._watcher is not None:
            self._watcher.stop()
        if self.owns_group and dist.is_initialized():
            dist.destroy_process_group()

    @property
    def _reason_key(self) -> str:
        return f"{self._prefix}failed"

    def _failure(self) -> str | None:
        """Another process's recorded failure, if there is one (a store round trip until there is)."""
        if self._peer_failure is None and self._store.check([self._reason_key]):
            reason = self._store.get(self._reason_key).decode()
            if not reason.startswith(f"process {self.rank} "):
                self._peer_failure = reason
        return self._peer_failure

    def _collective(self, op, *args, **kwargs) -> None:
        """Run a collective; if another process failed, raise its reason instead."""
        if self._peer_failure is not None:  # it will never join: do not wait for it
            raise PeerFailed(self._peer_failure)
        try:
            op(*args, **kwargs)
        except Exception as err:
            try:
                reason = self._failure()
            except Exception:  # the store is gone as well
                reason = self._peer_failure
            if reason is not None:
                raise PeerFailed(reason) from err
            raise
        if self._peer_failure is not None:  # the watcher aborted the group: this result may be incomplete
            raise PeerFailed(self._peer_failure)


def _lost_store(err: BaseException) -> str:
    return (f"lost the process group's store ({type(err).__name__}: {err}): the process that hosts it "
            "(rank 0, or torchrun's agent) has died")


class _FailureWatcher(threading.Thread):
    """Watches the store for another process's failure and then aborts this process's group, which
    ends a collective this process is blocked in (NCCL does not notice a peer that died; gloo does,
    by its closed connection)."""

    def __init__(self, procs: Processes) -> None:
        super().__init__(name=f"ltm-failure-watcher-{procs.rank}", daemon=True)
        self.procs = procs
        self._stopped = threading.Event()
        self.start()

    def run(self) -> None:
        while not self._stopped.wait(WATCH_INTERVAL_S):
            try:
                reason = self.procs._failure()
            except Exception as err:
                reason = self.procs._peer_failure = _lost_store(err)
            if reason is not None:
                abort = getattr(dist.distributed_c10d, "_abort_process_group", None)  # torch >= 2.5
                if abort is not None and dist.is_initialized():
                    with contextlib.suppress(Exception):
                        abort()
                return

    def stop(self) -> None:
        self._stopped.set()
        self.join(10 * WATCH_INTERVAL_S)  # a store that stopped answering must not hold the run's end


def all_reduce_gradients(model: torch.nn.Module, procs: Processes) -> None:
    """Sum every gradient over the processes with one coalesced all-reduce."""
    if procs.world == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.flatten() for g in grads])
    procs.all_sum(flat)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()

"""The resources of a point (SLURM profile, GPU memory, processes per node), checked against the
backend, the GPUs and every point's batch before anything starts (`studies.plan` reports a failure
as a usage error, exit 2).

SLURM runs a point of several processes as one torch.distributed job, one SLURM task per process
and one process per GPU (`studies.slurm_backend`); Ray runs each point in one worker process.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

from studies.messages import Point

PROFILES_DIR = Path(__file__).resolve().parents[1] / "slurm" / "profiles"
HOST_GB_PER_PROCESS = 16
"""Host memory (GB) one training process of a point needs, by desk estimate: torch with the CUDA libraries
and context mapped (3-4 GB resident), Inductor's compile workers (one per CPU of the task, 0.3-0.5 GB each:
up to 4 GB at 8 CPUs), the checkpoint's host copy of the weights and AdamW state (1.2 GB for LTM-L) and
the data's pages in memory; rounded up for margin. The GPU profile's mem_gb of 64 covers one process."""


class ResourceError(ValueError):
    """Processes, nodes or GPUs that the backend cannot give a point, with what to change."""


@dataclass(frozen=True)
class SlurmProfile:
    """A SLURM profile (slurm/profiles/<name>.yaml): where the study's job array runs and what each job
    gets. A key the YAML leaves out takes the default here."""

    partition: str = "debug"
    one_node: bool = False
    """Every job runs on this node (the one-node test cluster): the study's mlflow server listens on
    127.0.0.1 only, and a point gets one node."""
    cpus_per_task: float | None = None
    """CPUs per process of a trial; None: the preset's (--cpus-per-trial wins over both)."""
    gpus_per_task: float | None = None
    """GPUs per trial on each of its nodes; None: the preset's (--gpus-per-trial wins over both)."""
    gpu_mem_gb: float | None = None
    """Memory of one GPU in GB: the dry run fits each point's micro-batch to it (--gpu-mem-gb wins)."""
    mem_gb: float | None = None
    """Memory per node; None: the partition's default."""
    time_min: int = 60
    """A job's time limit: a longer point requeues and resumes from its checkpoint."""
    array_parallelism: int = 64
    """Array tasks at once, unless --max-concurrent says."""
    signal_delay_s: int = 90
    """SIGUSR2 this long before the time limit: checkpoint, then requeue."""
    max_num_timeout: int = 10
    """Requeues after a timeout before a point gives up."""
    account: str | None = None
    qos: str | None = None
    constraint: str | None = None
    additional_parameters: dict = field(default_factory=dict)
    """More #SBATCH parameters, as submitit's slurm_additional_parameters."""
    setup: list[str] = field(default_factory=list)
    """Shell lines run before each job (module load, conda activate, ...)."""

    @classmethod
    def from_dict(cls, data: dict, where: Path | str = "") -> SlurmProfile:
        """The profile a YAML file holds; raises ResourceError on an unknown key."""
        known = sorted(f.name for f in dataclasses.fields(cls))
        bad = set(data) - set(known)
        if bad:
            raise ResourceError(f"unknown keys {sorted(bad)} in SLURM profile {where}; known: {known}")
        given = {k: v for k, v in data.items() if v is not None}
        return cls(**{**given, "setup": list(given.get("setup") or []),
                      "additional_parameters": dict(given.get("additional_parameters") or {})})


def processes_per_node(cluster: str, processes: int | None, nodes: int, gpus: float, one_node: bool = False) -> int:
    """A point's processes on each of its nodes: --processes-per-trial, else one per GPU of a node, else 1.
    `one_node`: the SLURM profile's cluster is this one node."""
    if nodes < 1 or (processes is not None and processes < 1):
        raise ResourceError(f"--processes-per-trial and --nodes-per-trial count processes and nodes (>= 1), got "
                            f"{processes} and {nodes}")
    if nodes > 1 and one_node:
        raise ResourceError(f"--nodes-per-trial {nodes} with a profile of one node (one_node: true, as the local "
                            "profile); give --profile gpu or a profile of your cluster, or more --processes-per-trial")
    if cluster != "slurm":
        if (processes or 1) > 1 or nodes > 1 or gpus > 1:
            raise ResourceError(f"--cluster {cluster} runs each point in one process with at most one GPU; a point "
                                "of several processes, GPUs or nodes runs with --cluster slurm "
                                "(--processes-per-trial, --nodes-per-trial, --gpus-per-trial)")
        return 1
    if gpus != int(gpus):
        raise ResourceError(f"--gpus-per-trial {gpus:g} (or the profile's gpus_per_task): a SLURM job gets whole "
                            "GPUs; give a whole number, or share GPUs with fractions under --cluster local|ray")
    if gpus and processes is not None and processes != gpus:
        raise ResourceError(f"--processes-per-trial {processes} with --gpus-per-trial {gpus:g}: on GPUs a point runs "
                            "one process per GPU of each node; give them equal, or leave out --processes-per-trial")
    return int(gpus) if gpus else (processes or 1)


def check_world(points: list[Point], processes: int, nodes: int) -> None:
    """Every point's batch splits into whole micro-batches over its processes; an evaluation runs in one."""
    from ltm.config import RunConfig

    world = processes * nodes
    if world == 1:
        return
    if any(p.task for p in points):
        raise ResourceError(f"an evaluation point runs in one process, not {world}: leave out --processes-per-trial "
                            "and --nodes-per-trial, and give at most one GPU (--gpus-per-trial 1)")
    for p in points:
        train = RunConfig.from_dict(p.config).train
        micro = train.micro_batch_size
        if train.batch_size % world or (micro and train.batch_size // world % micro):
            whole = f" of whole micro-batches of {micro}" if micro else ""
            raise ResourceError(f"point {p.key}: train.batch_size={train.batch_size} does not split into {world} "
                                f"processes ({processes} per node x {nodes} node(s)){whole}; give --set "
                                f"train.batch_size=N with N a multiple of {world * (micro or 1)}, or fewer processes")


def host_memory_note(profile: SlurmProfile | None, processes: int) -> str | None:
    """A warning when the profile's mem_gb (per node) is short of `processes` per node at HOST_GB_PER_PROCESS
    each, naming the value to set; None when it suffices or the profile leaves memory to the partition."""
    if profile is None or not profile.mem_gb or profile.mem_gb >= processes * HOST_GB_PER_PROCESS:
        return None
    return (f"warning: the SLURM profile's mem_gb: {profile.mem_gb:g} is per node, shared by the point's "
            f"{processes} processes there, each of which needs about {HOST_GB_PER_PROCESS} GB of host memory (CUDA "
            f"context, compile workers, checkpoint copies): set mem_gb: {processes * HOST_GB_PER_PROCESS} (or more) "
            "in the profile, or fewer --processes-per-trial")


def gpu_memory(option: float | None, profile: SlurmProfile | None, gpus: float) -> float | None:
    """The memory (GB) of a trial's GPU: --gpu-mem-gb, else the SLURM profile's gpu_mem_gb; None without GPUs."""
    gpu_mem = option if option is not None else profile.gpu_mem_gb if profile else None
    if gpu_mem is not None and not (isinstance(gpu_mem, (int, float)) and gpu_mem > 0):
        raise ResourceError(f"the GPU's memory (--gpu-mem-gb, or the profile's gpu_mem_gb) is in GB and > 0, e.g. 80 "
                            f"for an H100; got {gpu_mem!r}")
    if option is not None and not gpus:
        raise ResourceError("--gpu-mem-gb sizes the GPU a trial gets, but the trials get none: add --gpus-per-trial 1 "
                            "or drop --gpu-mem-gb")
    return float(gpu_mem) if gpus and gpu_mem else None


def load_profile(name: str) -> SlurmProfile:
    """A SLURM profile from slurm/profiles/<name>.yaml or a YAML path."""
    import yaml

    path = Path(name) if name.endswith((".yaml", ".yml")) else PROFILES_DIR / f"{name}.yaml"
    if not path.is_file():
        known = sorted(p.stem for p in PROFILES_DIR.glob("*.yaml"))
        raise ResourceError(f"no SLURM profile {name!r} ({path}); known: {', '.join(known)} or a YAML path")
    return SlurmProfile.from_dict(yaml.safe_load(path.read_text()) or {}, path)

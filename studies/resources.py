"""The processes of a point: how many per node, checked against the backend, the GPUs and every
point's batch before anything starts (`studies.plan` reports a failure as a usage error, exit 2).

SLURM runs a point of several processes as one torch.distributed job, one SLURM task per process
and one process per GPU (`studies.slurm_backend`); Ray runs each point in one worker process.
"""

from __future__ import annotations

from studies.messages import Point


class ResourceError(ValueError):
    """Processes, nodes or GPUs that the backend cannot give a point, with what to change."""


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

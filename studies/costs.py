"""What a study costs before it runs: each point's training tokens and FLOPs (`ltm.flops`, exact and
paper conventions), the GPU-hours they take at a stated MFU of a stated peak, and the memory per
process of its training update (`ltm.memory`) with the largest micro-batch that fits a stated GPU.

Counted: the training updates a point runs (an evaluation point: the training of its checkpoint when
it trains one first, else nothing). Not counted: periodic validation, the evaluations themselves, and
the saving from points already finished (they are skipped at run time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from ltm.names import FLOPS, FLOPS_PAPER, TOKENS
from studies.messages import Point, TrainSource

if TYPE_CHECKING:
    from ltm.config import RunConfig
    from studies.resources import SlurmProfile

DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100/H200 in TFLOP/s (the same as ltm.flops.GPU_PEAKS)."""
HEADROOM = 0.10
"""Share of a GPU's memory kept free for what `ltm.memory` leaves out: the caching allocator's
rounding and fragmentation, and the transient workspaces of cuBLAS and the attention kernels."""
CUDA_CONTEXT_GB = 1.0
"""Per process, outside torch's allocator: the CUDA context and its kernel images (0.5-1 GB)."""


@dataclass(frozen=True)
class Cost:
    """The training one point runs."""

    tokens: int
    flops: float
    """Exact convention: what the code executes."""
    flops_paper: float
    """The paper's convention, (T + 1) * (6 N + 24 L d w) per token."""


@dataclass(frozen=True)
class Memory:
    """One point's training update: its peak memory per process and the micro-batch that fits."""

    micro_batch: int
    """Sequences per forward on one process (train.micro_batch_size, or the per-process batch)."""
    peak_gb: float
    """The estimated peak per process at that micro-batch, in GB of 2^30 bytes."""
    least_gb: float | None
    """The same at micro-batch 1, when a GPU's memory is given."""
    largest_fit: int | None
    """The largest micro-batch dividing the per-process batch that fits the usable memory (0: none,
    not even 1); None when no GPU memory is given."""


def point_cost(point: Point) -> Cost:
    """The training a point runs: its own, or for an evaluation the checkpoint it trains first."""
    from ltm.flops import run_flops_per_token

    cfg = trained_config(point)
    if cfg is None:
        return Cost(0, 0.0, 0.0)  # evaluates a checkpoint that exists
    tokens = trained_tokens(cfg) - point.resumes  # a branch or a later segment goes on from its trunk's tokens
    return Cost(tokens, tokens * run_flops_per_token(cfg, cfg.model),
                tokens * run_flops_per_token(cfg, cfg.model, "paper"))


def trained_config(point: Point) -> RunConfig | None:
    """The config a point trains, with the data's vocabulary; None for an evaluation of a given checkpoint."""
    from ltm.config import RunConfig
    from ltm.data import planned_vocab_size

    if point.task and not isinstance(point.source, TrainSource):
        return None
    cfg = RunConfig.from_dict(point.config)
    return dataclasses.replace(cfg, model=dataclasses.replace(cfg.model, vocab_size=planned_vocab_size(cfg.data)))


def point_memory(point: Point, on_gpu: bool, usable_gb: float | None, processes: int = 1) -> Memory | None:
    """The point's update on a GPU (at the precision it runs there) or a CPU, on one of its `processes`
    (each holds batch_size / processes sequences of an update), and with `usable_gb` (what a process may
    fill of its GPU) the micro-batch that fits; None for an evaluation of a given checkpoint."""
    from ltm.memory import gib, step_memory

    cfg = trained_config(point)
    if cfg is None:
        return None
    memory = step_memory(cfg, "cuda" if on_gpu else "cpu", processes)
    if usable_gb is None:
        return Memory(memory.micro_batch, gib(memory.peak_bytes()), None, None)
    return Memory(memory.micro_batch, gib(memory.peak_bytes()), gib(memory.peak_bytes(1)),
                  memory.largest_micro_batch(usable_gb * 2**30))


def usable_gb(gpu_mem_gb: float, gpus_per_trial: float) -> float:
    """What one trial's process may fill of its GPU (its share when trials share one): less HEADROOM and
    the CUDA context."""
    return gpu_mem_gb * min(1.0, gpus_per_trial) * (1 - HEADROOM) - CUDA_CONTEXT_GB


def trained_tokens(cfg: RunConfig) -> int:
    """train.tokens rounded up to whole updates of batch_size x ctx tokens, as training runs them."""
    return cfg.updates * cfg.tokens_per_update


def gpu_hours(flops: float, mfu: float, peak_tflops: float) -> float:
    """Hours of one GPU that delivers `mfu` of `peak_tflops`."""
    return flops / (mfu * peak_tflops * 1e12) / 3600


def cost_columns(costs: list[Cost], mfu: float, peak_tflops: float) -> dict[str, list]:
    """The grid table's cost columns, FLOPs to 3 significant digits."""
    return {TOKENS: [f"{c.tokens:,}" for c in costs], FLOPS: [f"{c.flops:.2e}" for c in costs],
            FLOPS_PAPER: [f"{c.flops_paper:.2e}" for c in costs],
            "gpu_h": [_number(gpu_hours(c.flops, mfu, peak_tflops)) for c in costs]}


def cost_summary(costs: list[Cost], mfu: float, peak_tflops: float, gpus_per_trial: float,
                 trials_at_once: int, slurm_profile: SlurmProfile | None = None) -> list[str]:
    """The lines after the grid: total FLOPs, GPU-hours, an estimate of the wall time, and on SLURM
    how many points outlast one job (they go on by requeue, from their checkpoints)."""
    flops, paper = sum(c.flops for c in costs), sum(c.flops_paper for c in costs)
    hours = [gpu_hours(c.flops, mfu, peak_tflops) for c in costs]
    lines = [f"training: {flops:.2e} FLOPs exact, {paper:.2e} FLOPs paper convention "
             f"({sum(c.tokens for c in costs):,} tokens; validation and evaluations not counted)",
             f"GPU time: {gpu_time(sum(hours))} of exact FLOPs at {mfu * 100:g}% MFU of {peak_tflops:g} TFLOP/s "
             f"(--mfu, --peak-tflops)"]
    if gpus_per_trial <= 0:
        lines.append("wall time: not estimated, the trials get no GPU (--gpus-per-trial)")
    elif hours:
        # Perfect packing, bounded below by the longest point: an estimate, not a schedule.
        wall = max(sum(hours) / trials_at_once, max(hours)) / gpus_per_trial
        lines.append(f"wall time: about {_duration(wall)} with {trials_at_once} trials x {gpus_per_trial:g} GPU "
                     "at once (estimate: GPU-h over the GPUs at once, at least the longest point)")
        if slurm_profile is not None:
            lines += _requeues(hours, gpus_per_trial, slurm_profile)
    return lines


def memory_columns(memory: list[Memory | None]) -> dict[str, list]:
    """The grid table's memory columns: the micro-batch, the peak there (GB), the largest that fits ("-": not known)."""
    def column(value) -> list[str]:
        return ["-" if m is None or value(m) is None else str(value(m)) for m in memory]

    return {"micro": column(lambda m: m.micro_batch), "mem_gb": column(lambda m: _number(m.peak_gb)),
            "fit_micro": column(lambda m: m.largest_fit)}


def memory_summary(memory: list[Memory | None], gpus_per_trial: float, gpu_mem_gb: float | None,
                   processes: int = 1) -> list[str]:
    """The lines that read the memory columns: what is estimated, the usable memory, the points over it.
    `processes`: of one point (its world size), each holding batch_size / processes sequences."""
    where = ("on a GPU (train.precision=auto: bf16 autocast)" if gpus_per_trial
             else "on a CPU (train.precision=auto: fp32)")
    split = f" (each of a point's {processes} processes holds train.batch_size / {processes} sequences of an update)"
    lines = [f"memory: mem_gb is the peak per process{split if processes > 1 else ''} of a training update at the "
             f"point's micro-batch, in GB of 2^30 bytes, at the precision it runs at {where}: weights, gradients, "
             "AdamW state and the eager step's activations (ltm.memory; a compiled step usually holds less)"]
    if not gpus_per_trial:
        return lines
    if gpu_mem_gb is None:
        return lines + ["fit_micro: not checked; give the GPU's memory with --gpu-mem-gb "
                        "(or a SLURM profile's gpu_mem_gb)"]
    share = f" ({gpus_per_trial:g} of it per trial)" if gpus_per_trial < 1 else ""
    lines.append(f"fit_micro: the largest micro-batch dividing the per-process batch whose peak fits "
                 f"{usable_gb(gpu_mem_gb, gpus_per_trial):.3g} GB: a {gpu_mem_gb:g} GB GPU{share} less "
                 f"{HEADROOM:.0%} headroom (allocator rounding, fragmentation, workspaces) and {CUDA_CONTEXT_GB:g} GB "
                 "for the CUDA context")
    over = sum(1 for m in memory if m is not None and 0 < (m.largest_fit or 0) < m.micro_batch)
    if over:
        lines.append(f"note: {over} point(s) need more than that at their micro-batch: set train.micro_batch_size "
                     "to their fit_micro (--set train.micro_batch_size=N)")
    return lines


def memory_problem(points: list[Point], memory: list[Memory | None], gpus_per_trial: float,
                   gpu_mem_gb: float) -> str | None:
    """Why the points that do not fit their GPU even at micro-batch 1 cannot run, and what to change;
    None if all fit."""
    unfit = [(p, m) for p, m in zip(points, memory) if m is not None and m.largest_fit == 0]
    if not unfit:
        return None
    shown = ", ".join(f"{p.key} needs {_number(m.least_gb)} GB" for p, m in unfit[:3]) + (", ..." if unfit[3:] else "")
    whole = ", or a whole GPU per trial (--gpus-per-trial 1)" if gpus_per_trial < 1 else ""
    return (f"{len(unfit)} point(s) cannot fit a {gpu_mem_gb:g} GB GPU even at micro-batch 1 ({shown}; "
            f"{usable_gb(gpu_mem_gb, gpus_per_trial):.3g} GB usable per process after {HEADROOM:.0%} headroom and "
            f"{CUDA_CONTEXT_GB:g} GB for the CUDA context): run them on GPUs with more memory (--gpu-mem-gb, or the "
            f"SLURM profile's gpu_mem_gb){whole}, or make them smaller (the model's size, model.ctx, the vocabulary); "
            "fewer inference steps would not help, the peak does not grow with inference.steps")


CHECKPOINT_BYTES_PER_PARAM = 12
"""A checkpoint holds fp32 weights and AdamW's two fp32 moments per parameter (no gradients)."""
CHECKPOINT_WRITE_GBPS = 0.25
"""Checkpoint write rate assumed (GB/s), with its sha256: a busy network filesystem from one client."""
SIGNAL_MARGIN = 1.5
"""The signal delay asked for over one update and a checkpoint write: MFU below the stated one, the exit."""


def signal_delay_note(points: list[Point], costs: list[Cost], profile: SlurmProfile, mfu: float,
                      peak_tflops: float, gpus_per_point: float) -> str | None:
    """A warning when the profile's signal_delay_s (SIGUSR2 before the time limit) is shorter than the slowest
    point's update at --mfu plus writing its checkpoint (with SIGNAL_MARGIN), naming the value to set; None
    when it suffices or the points get no GPU (nothing to time)."""
    if gpus_per_point <= 0:
        return None
    worst = max((_stop_seconds(p, c, mfu, peak_tflops, gpus_per_point) for p, c in zip(points, costs)),
                default=None, key=lambda t: sum(t[1:]) if t else 0.0)
    if not worst or SIGNAL_MARGIN * (worst[1] + worst[2]) <= profile.signal_delay_s:
        return None
    key, update_s, write_s = worst
    needed = math.ceil(SIGNAL_MARGIN * (update_s + write_s) / 10) * 10
    return (f"warning: the SLURM profile's signal_delay_s: {profile.signal_delay_s} is shorter than point {key} needs "
            f"to finish an update (about {update_s:.0f} s at {mfu * 100:g}% MFU of {peak_tflops:g} TFLOP/s on "
            f"{gpus_per_point:g} GPU(s)) and write its checkpoint (about {write_s:.0f} s at "
            f"{CHECKPOINT_WRITE_GBPS:g} GB/s), with a margin of {SIGNAL_MARGIN:g}x: set signal_delay_s: {needed} in "
            "the profile, or a preempted job loses the updates since its last checkpoint")


def _stop_seconds(point: Point, cost: Cost, mfu: float, peak_tflops: float,
                  gpus: float) -> tuple[str, float, float] | None:
    """(key, seconds of one update, seconds to write its checkpoint) of a point that trains; None otherwise."""
    import torch

    from ltm.model import build_model

    cfg = trained_config(point)
    if cfg is None:
        return None
    with torch.device("meta"):  # shapes only
        params = build_model(cfg.model, cfg.inference).num_params()
    update_s = cost.flops / cfg.updates / (mfu * peak_tflops * 1e12 * gpus)
    return point.key, update_s, CHECKPOINT_BYTES_PER_PARAM * params / (CHECKPOINT_WRITE_GBPS * 1e9)


def _requeues(hours: list[float], gpus_per_trial: float, profile: SlurmProfile) -> list[str]:
    """The points a SLURM job's time limit cuts short, and whether the requeues allowed finish them."""
    job_min, allowed = profile.time_min, profile.max_num_timeout
    jobs = [math.ceil(h / gpus_per_trial * 60 / job_min) for h in hours]
    longer = sum(j > 1 for j in jobs)
    if not longer:
        return []
    line = (f"note: {longer} point(s) outlast one job (time_min={job_min:g}): each goes on in requeued jobs from "
            f"its last checkpoint, up to {max(jobs)} jobs")
    if max(jobs) - 1 > allowed:
        line += f", more than the profile's max_num_timeout={allowed} requeues: raise it or time_min"
    return [line]


def _number(x: float) -> str:
    """3 significant digits (0.0123, 90.3, 1.2e-09), whole numbers from 1,000 up (1,531)."""
    return f"{x:,.0f}" if x >= 1000 else f"{x:.3g}"


def gpu_time(hours: float) -> str:
    """GPU-hours as a person reads them: 1,531 GPU-h, 0.25 GPU-h, 5 GPU-min, 3.4 GPU-s, under 1 GPU-s."""
    if hours >= 0.1:
        return f"{_number(hours)} GPU-h"
    if hours >= 1 / 60:
        return f"{hours * 60:.3g} GPU-min"
    return f"{hours * 3600:.3g} GPU-s" if hours >= 1 / 3600 else "under 1 GPU-s"


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{_number(hours)} h ({hours / 24:.1f} days)"
    if hours >= 1:
        return f"{hours:.3g} h"
    return f"{hours * 60:.3g} min" if hours >= 1 / 60 else f"{hours * 3600:.3g} s"

"""What a study costs before it runs: each point's training tokens and FLOPs (`ltm.flops`, exact and
paper conventions) and the GPU-hours they take at a stated MFU of a stated peak.

Counted: the training updates a point runs (an evaluation point: the training of its checkpoint when
it trains one first, else nothing). Not counted: periodic validation, the evaluations themselves, and
the saving from points already finished (they are skipped at run time).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

from studies.messages import Point

if TYPE_CHECKING:
    from ltm.config import RunConfig

DEFAULT_MFU = 0.4
DEFAULT_PEAK_TFLOPS = 989.0
"""Dense bf16 peak of an H100/H200 in TFLOP/s (the same as ltm.train's table of GPU peaks)."""


@dataclass(frozen=True)
class Cost:
    """The training one point runs."""

    tokens: int
    flops: float
    """Exact convention: what the code executes."""
    flops_paper: float
    """The paper's convention, (T + 1) * (6 N + 24 L d w) per token."""


def point_cost(point: Point) -> Cost:
    """The training a point runs: its own, or for an evaluation the checkpoint it trains first."""
    from ltm.config import RunConfig
    from ltm.data import planned_vocab_size
    from ltm.flops import flops_per_token

    if point.task and not point.source.get("train"):
        return Cost(0, 0.0, 0.0)  # evaluates a checkpoint that exists
    cfg = RunConfig.from_dict(point.config)
    model = dataclasses.replace(cfg.model, vocab_size=planned_vocab_size(cfg.data))
    steps, tokens = cfg.inference.steps, trained_tokens(cfg)
    exact = flops_per_token(model, steps, decoder_grad=cfg.inference.decoder_grad)
    return Cost(tokens, tokens * exact, tokens * flops_per_token(model, steps, convention="paper"))


def trained_tokens(cfg: RunConfig) -> int:
    """train.tokens rounded up to whole updates of batch_size x ctx tokens, as training runs them."""
    per_update = cfg.train.batch_size * cfg.model.ctx
    return math.ceil(cfg.train.tokens / per_update) * per_update


def gpu_hours(flops: float, mfu: float, peak_tflops: float) -> float:
    """Hours of one GPU that delivers `mfu` of `peak_tflops`."""
    return flops / (mfu * peak_tflops * 1e12) / 3600


def cost_columns(costs: list[Cost], mfu: float, peak_tflops: float) -> dict[str, list]:
    """The grid table's cost columns, FLOPs to 3 significant digits."""
    return {"tokens": [f"{c.tokens:,}" for c in costs], "flops": [f"{c.flops:.2e}" for c in costs],
            "flops_paper": [f"{c.flops_paper:.2e}" for c in costs],
            "gpu_h": [_number(gpu_hours(c.flops, mfu, peak_tflops)) for c in costs]}


def cost_summary(costs: list[Cost], mfu: float, peak_tflops: float, gpus_per_trial: float,
                 trials_at_once: int, slurm_profile: dict | None = None) -> list[str]:
    """The lines after the grid: total FLOPs, GPU-hours, an estimate of the wall time, and on SLURM
    how many points outlast one job (they go on by requeue, from their checkpoints)."""
    flops, paper = sum(c.flops for c in costs), sum(c.flops_paper for c in costs)
    hours = [gpu_hours(c.flops, mfu, peak_tflops) for c in costs]
    lines = [f"training: {flops:.2e} FLOPs exact, {paper:.2e} FLOPs paper convention "
             f"({sum(c.tokens for c in costs):,} tokens; validation and evaluations not counted)",
             f"GPU time: {_number(sum(hours))} GPU-h of exact FLOPs at {mfu * 100:g}% MFU of {peak_tflops:g} TFLOP/s "
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


def _requeues(hours: list[float], gpus_per_trial: float, profile: dict) -> list[str]:
    """The points a SLURM job's time limit cuts short, and whether the requeues allowed finish them."""
    job_min, allowed = profile.get("time_min", 60), profile.get("max_num_timeout", 10)  # slurm_backend's defaults
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


def _duration(hours: float) -> str:
    if hours >= 48:
        return f"{_number(hours)} h ({hours / 24:.1f} days)"
    if hours >= 1:
        return f"{hours:.3g} h"
    return f"{hours * 60:.3g} min" if hours >= 1 / 60 else f"{hours * 3600:.3g} s"

"""The training loop: an update (`train_step`), an evaluation (`evaluate`) and a checkpoint (`save`)
over a typed `TrainState`, and `train`, which runs them to the token budget.

Each decoder update (docs/METHOD.md section 5): infer z_T for every sequence (T inner steps, z_T
detached), then one AdamW step on the mean cross-entropy of the decoder at z_T. Several processes
split each global batch; gradients are summed with one all-reduce. Where the run is recorded
(`ltm.lifecycle`) and how it is started (`ltm.train.run`) live elsewhere.
"""

from __future__ import annotations

import logging
import math
import signal
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

import ltm.evaluate
from ltm import lifecycle, names, objective
from ltm.checkpoint import Checkpoint, restore_rng, rng_state, save_checkpoint, save_snapshot
from ltm.config import ModelConfig, RunConfig
from ltm.flops import mfu, peak_flops, run_flops_per_token
from ltm.lifecycle import RunResult
from ltm.model import LatentThoughtModel, build_model
from ltm.names import Status
from ltm.processes import Processes, all_reduce_gradients
from ltm.signals import Interrupt, Stopped

if TYPE_CHECKING:
    from ltm.data import TokenBlocks
    from ltm.tracking import Tracker

logger = logging.getLogger(__name__)


@dataclass
class TrainState:
    """What a checkpoint holds besides the RNGs: the model, its optimiser and where the loop stands."""

    model: LatentThoughtModel
    optimizer: torch.optim.Optimizer
    step: int = 0
    """Updates done."""
    samples: int = 0
    """Training sequences consumed."""
    eval_pending: bool = False
    """A signal stopped the evaluation at this step: it is done first on resume."""
    start_tokens: int = 0
    """Tokens the run started from (a wsd branch's branch point): its own FLOPs count from there."""

    def load(self, checkpoint: Checkpoint) -> None:
        """Continue from a checkpoint's state (the RNGs too)."""
        self.model.load_state_dict(checkpoint.model)
        self.optimizer.load_state_dict(checkpoint.optimizer)
        self.step, self.samples = checkpoint.step, checkpoint.samples
        self.eval_pending, self.start_tokens = checkpoint.eval_pending, checkpoint.start_tokens
        restore_rng(checkpoint.rng)

    def branch_from(self, snapshot: Checkpoint) -> None:
        """Start a wsd branch from its trunk's snapshot: the trunk's whole state (its step, data position and
        RNGs: the branch goes on exactly as one run would), its tokens the branch's start."""
        self.load(snapshot)
        self.eval_pending, self.start_tokens = False, snapshot.tokens


@dataclass(frozen=True)
class StepPlan:
    """The run's fixed arithmetic: how its batch splits and what an update costs."""

    tokens_per_step: int
    total_steps: int
    local: int
    """Sequences per process per update."""
    micro: int
    """Sequences per forward and backward."""
    flops_per_token: float
    flops_per_token_paper: float
    peak_flops: float
    """One device's peak FLOP/s (0: no mfu)."""
    compiled: bool

    @classmethod
    def of(cls, cfg: RunConfig, model_cfg: ModelConfig, procs: Processes) -> StepPlan:
        """The plan of `cfg` on these processes; ValueError when the batch does not split."""
        tc = cfg.train
        tokens_per_step, total_steps = cfg.tokens_per_update, cfg.updates
        if tc.batch_size % procs.world:
            raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {procs.world} processes")
        local = tc.batch_size // procs.world
        micro = tc.micro_batch_size or local
        if local % micro:
            raise ValueError(f"per-process batch {local} is not a multiple of train.micro_batch_size={micro}")
        fpt, fpt_paper = run_flops_per_token(cfg, model_cfg), run_flops_per_token(cfg, model_cfg, "paper")
        compiled = objective.use_compile(tc.compile, procs.device, fpt * total_steps * tokens_per_step)
        return cls(tokens_per_step, total_steps, local, micro, fpt, fpt_paper,
                   peak_flops(procs.device, tc.peak_flops), compiled)


class BlockOrder:
    """Training blocks in a fresh seeded permutation each epoch; position = sequences consumed."""

    def __init__(self, n_blocks: int, seed: int) -> None:
        self.n, self.seed = n_blocks, seed
        self._epoch, self._perm = -1, None

    def indices(self, start: int, count: int) -> list[int]:
        out = []
        for g in range(start, start + count):
            epoch, pos = divmod(g, self.n)
            if epoch != self._epoch:
                self._epoch, self._perm = epoch, np.random.default_rng([self.seed, epoch]).permutation(self.n)
            out.append(int(self._perm[pos]))
        return out


@dataclass
class TrainContext:
    """What the loop works with and does not change: the config, the processes, the data, the MLflow run."""

    cfg: RunConfig
    model_cfg: ModelConfig
    plan: StepPlan
    procs: Processes
    interrupt: Interrupt
    tracker: Tracker | None
    """rank 0's; None on the other processes."""
    run_id: str
    run_dir: Path
    train_blocks: TokenBlocks
    order: BlockOrder
    val_batches: list[torch.Tensor]
    skip_logged: int
    """The last step the MLflow run already has metrics at: a resumed run does not log replayed steps twice."""
    patience: float
    """Seconds the loop goes on while the tracking store does not answer."""
    on_log: Callable[[dict[str, float]], None] | None = None


def new_state(cfg: RunConfig, model_cfg: ModelConfig, plan: StepPlan, device: torch.device) -> TrainState:
    """A freshly seeded model and its optimiser, at step 0, with the attention kernel `plan` allows."""
    torch.manual_seed(cfg.seed)
    model = build_model(model_cfg, cfg.inference).to(device)
    if plan.compiled:  # a worker trains run after run: start each from empty graph caches, far from dynamo's limit
        torch._dynamo.reset()
    elif device.type == "cuda" and model.attention == "auto":
        model.attention = "chunked"  # FlexAttention is compiled by Triton too: "off" compiles nothing
    return TrainState(model, objective.make_optimizer(model, cfg.train))


def validation_batches(blocks: TokenBlocks, cfg: RunConfig, device: torch.device) -> list[torch.Tensor]:
    """The first train.eval_blocks validation blocks, in batches of train.eval_batch_size, on the device."""
    tc = cfg.train
    n = min(tc.eval_blocks, len(blocks))
    return [blocks.batch(list(range(i, min(i + tc.eval_batch_size, n)))).to(device)
            for i in range(0, n, tc.eval_batch_size)]


# -- one update, one evaluation, one checkpoint --------------------------------------------------

def train_step(ctx: TrainContext, state: TrainState) -> tuple[float, float]:
    """One update over the next global batch: (mean cross-entropy, KL per token). A non-finite loss
    leaves the model, the optimiser and the step as they were."""
    tc, plan, procs = ctx.cfg.train, ctx.plan, ctx.procs
    for group in state.optimizer.param_groups:
        group["lr"] = objective.lr_at(state.step, plan.total_steps, tc)
    first = state.samples + procs.rank * plan.local  # this process's first sequence of the batch
    mine = ctx.order.indices(state.samples, tc.batch_size)[procs.rank * plan.local:(procs.rank + 1) * plan.local]
    loss_sum = torch.zeros(2, device=procs.device)  # (sum of per-sequence mean CE, sum of KL)
    for i in range(0, plan.local, plan.micro):
        batch = ctx.train_blocks.batch(mine[i:i + plan.micro]).to(procs.device)
        seeds = [objective.sample_seed(ctx.cfg.seed, first + i + j) for j in range(len(batch))]
        with objective.autocast_for(procs.device, tc.precision):
            loss, kl = objective.decoder_loss(state.model, batch, ctx.cfg.inference, seeds, plan.compiled,
                                              state.step / plan.total_steps)
        (loss * len(batch) / tc.batch_size).backward()
        loss_sum += torch.stack((loss.detach() * len(batch), kl.detach()))
    all_reduce_gradients(state.model, procs)
    procs.all_sum(loss_sum)
    mean_loss = loss_sum[0].item() / tc.batch_size
    if math.isfinite(mean_loss):
        torch.nn.utils.clip_grad_norm_(state.model.parameters(), tc.grad_clip)
        state.optimizer.step()
        state.optimizer.zero_grad(set_to_none=True)
        state.step += 1
        state.samples += tc.batch_size
    return mean_loss, loss_sum[1].item() / plan.tokens_per_step


def evaluate(ctx: TrainContext, state: TrainState) -> dict | None:
    """The validation metrics ({} on the other processes, which wait for rank 0's on the store); None
    when a signal stopped the evaluation (it is redone on resume)."""
    metrics: dict | None = {}
    if ctx.procs.is_main:
        state.model.eval()
        started = time.perf_counter()
        try:
            with ctx.interrupt.stoppable(), objective.autocast_for(ctx.procs.device, ctx.cfg.train.precision):
                metrics = ltm.evaluate.evaluate_bounds(state.model, ctx.val_batches, ctx.cfg.inference,
                                                       seed=objective.EVAL_SEED, iw_samples=ctx.cfg.train.iw_samples,
                                                       compiled=ctx.plan.compiled)
            metrics[names.EVAL_SECONDS] = time.perf_counter() - started  # what this evaluation cost
        except Stopped:
            metrics = None
        finally:
            state.model.train()
    ctx.procs.after_main()
    return metrics


def save(ctx: TrainContext, state: TrainState, tokens: int, last: bool = False) -> None:
    """Checkpoint the loop (rank 0 writes it); at its last update a constant-rate trunk also keeps it as its
    snapshot at these tokens (`ltm.checkpoint.save_snapshot`), which its branches start from."""
    if ctx.procs.is_main:
        checkpoint = Checkpoint(
            model=state.model.state_dict(), optimizer=state.optimizer.state_dict(), step=state.step,
            samples=state.samples, tokens=tokens, run_id=ctx.run_id, run_key=ctx.cfg.run_key(),
            config=ctx.cfg.to_dict(), model_overrides={"vocab_size": ctx.model_cfg.vocab_size},
            eval_pending=state.eval_pending, rng=rng_state(),
            # logged but maybe not yet stored: a process killed now would lose them, the resume sends them
            unsent_metrics=ctx.tracker.unsent(), start_tokens=state.start_tokens)
        save_checkpoint(ctx.run_dir, checkpoint)
        if last and ctx.cfg.train.schedule == "constant":
            save_snapshot(ctx.run_dir, checkpoint)


def log(ctx: TrainContext, metrics: dict[str, float], tokens: int) -> None:
    """Send metrics to the MLflow run (rank 0), and to `on_log`."""
    if ctx.procs.is_main and tokens > ctx.skip_logged:  # a resumed run does not log replayed steps twice
        ctx.tracker.log_metrics(ctx.run_id, metrics, step=tokens)
        if ctx.on_log is not None:
            ctx.on_log(metrics)


def close(ctx: TrainContext, status: Status, tokens: int, metrics: dict[str, float], reason: str = "") -> RunResult:
    """End the MLflow run (rank 0) and say how the run ended."""
    if ctx.procs.is_main:
        status, reason = lifecycle.finish(ctx.tracker, ctx.run_id, status, reason, patience=ctx.patience,
                                          run_dir=ctx.run_dir, tokens=tokens)
    return RunResult(status, ctx.run_id, metrics, ctx.run_dir, reason)


# -- the loop ------------------------------------------------------------------------------------

WARMUP_UPDATES = 1
"""Updates after every start or resume that tokens/s and MFU leave out: the first includes torch.compile's
compile of the training shapes and the device's warm-up (CUDA context, cuBLAS handles, the allocator's pool)."""


class _Window:
    """Training loss and KL summed since the last logged step, and the time of the updates it times.

    Throughput (tokens/s, MFU) skips the first WARMUP_UPDATES updates of every start or resume: their
    loss counts, their time does not (a compiling run logs the first update's time apart, as a message).
    A window of only such updates logs no tokens/s or MFU."""

    def __init__(self) -> None:
        self.updates = 0
        """Updates since this start: the first WARMUP_UPDATES are not timed."""
        self.reset()

    def reset(self) -> None:
        self.loss = self.kl = self.seconds = 0.0
        self.steps = self.timed = 0

    def add(self, loss: float, kl: float, seconds: float) -> None:
        self.loss += loss
        self.kl += kl
        self.steps += 1
        self.updates += 1
        if self.updates > WARMUP_UPDATES:
            self.seconds += seconds
            self.timed += 1

    def metrics(self, ctx: TrainContext, lr: float) -> dict[str, float]:
        """The window's means and throughput; the window starts again."""
        n, plan = self.steps, ctx.plan
        point = {names.TRAIN_LOSS: self.loss / n, names.TRAIN_BOUND: (self.loss + self.kl) / n,
                 names.TRAIN_PPL_BOUND: math.exp((self.loss + self.kl) / n), names.TRAIN_LR: lr}
        if self.timed:
            tps = point[names.TOKENS_PER_S] = self.timed * plan.tokens_per_step / self.seconds
            if plan.peak_flops:
                point[names.MFU] = mfu(tps, plan.flops_per_token, plan.peak_flops, ctx.procs.world)
        self.reset()
        return point


def train(ctx: TrainContext, state: TrainState, progress: bool) -> RunResult:
    """Update to the token budget, logging, evaluating and checkpointing on the way; how the run ended."""
    from tqdm import tqdm

    plan, metrics = ctx.plan, {}
    ctx.procs.after_main()  # rank 0 may have spent long on the tracking store (resending spooled metrics)
    if state.eval_pending and (ended := _pending_evaluation(ctx, state, metrics)):
        return ended
    compiling = _announce_compile(ctx)
    with tqdm(total=plan.total_steps * plan.tokens_per_step, initial=state.step * plan.tokens_per_step, unit="tok",
              unit_scale=True, disable=not (progress and ctx.procs.is_main), dynamic_ncols=True) as bar:
        window, ended = _Window(), None
        while ended is None and state.step < plan.total_steps:
            ended = _update(ctx, state, window, bar, metrics)
            if compiling is not None:
                logger.info("compiled: the first update took %.0f s; the next ones reuse the compiled graphs (an "
                            "evaluation's shapes compile at the first evaluation)", time.perf_counter() - compiling)
                compiling = None
    return ended or close(ctx, Status.FINISHED, state.step * plan.tokens_per_step, metrics)


def _announce_compile(ctx: TrainContext) -> float | None:
    """Say (rank 0) that the first update compiles, before it starts; when it started, None if nothing compiles."""
    if not (ctx.plan.compiled and ctx.procs.is_main):
        return None
    logger.info(objective.compile_notice(ctx.procs.device))
    return time.perf_counter()


def _pending_evaluation(ctx: TrainContext, state: TrainState, metrics: dict) -> RunResult | None:
    """The evaluation a signal stopped before, done first; a RunResult if a signal stops it again."""
    tokens = state.step * ctx.plan.tokens_per_step
    found = evaluate(ctx, state)
    if ctx.procs.broadcast(found is None):  # rank 0 evaluates; every process stops with it
        return close(ctx, Status.KILLED, tokens, metrics,
                     f"interrupted during the evaluation at {tokens:,} tokens; run the same command again to resume")
    if ctx.procs.is_main:
        ctx.tracker.log_metrics(ctx.run_id, found, step=tokens)
    metrics.update(found)
    state.eval_pending = False
    return None


def _update(ctx: TrainContext, state: TrainState, window: _Window, bar, metrics: dict) -> RunResult | None:
    """One update and what follows it (log, evaluation, checkpoint); a RunResult when the run ends early."""
    tc, plan = ctx.cfg.train, ctx.plan
    started = time.perf_counter()
    loss, kl = train_step(ctx, state)
    if not math.isfinite(loss):
        reason = f"non-finite training loss ({loss}) at update {state.step}; the last good checkpoint is kept"
        return close(ctx, Status.FAILED, state.step * plan.tokens_per_step, metrics, reason)
    tokens = state.step * plan.tokens_per_step
    bar.update(plan.tokens_per_step)
    window.add(loss, kl, time.perf_counter() - started)
    last = state.step == plan.total_steps
    point: dict[str, float] = {}  # everything logged at this step, in one call
    if last or _crossed(tokens, plan.tokens_per_step, tc.log_every or plan.tokens_per_step):
        point.update(window.metrics(ctx, state.optimizer.param_groups[0]["lr"]))
        bar.set_postfix(loss=f"{point[names.TRAIN_LOSS]:.3f}")
    state.eval_pending = False
    if last or (tc.eval_every and _crossed(tokens, plan.tokens_per_step, tc.eval_every)):
        found = evaluate(ctx, state)
        state.eval_pending = found is None
        point.update(found or {})
    if point:
        trained = tokens - state.start_tokens  # a branch's own: its trunk's FLOPs are the trunk run's
        point.update({names.TOKENS: tokens, names.FLOPS: trained * plan.flops_per_token,
                      names.FLOPS_PAPER: trained * plan.flops_per_token_paper})
        log(ctx, point, tokens)
        metrics.update(point)
    return _checkpoint_or_stop(ctx, state, tokens, last, metrics)


def _checkpoint_or_stop(ctx: TrainContext, state: TrainState, tokens: int, last: bool,
                        metrics: dict) -> RunResult | None:
    """Checkpoint when due or when stopping; a RunResult when a signal or a tracking outage stops the run."""
    procs, every = ctx.procs, ctx.cfg.train.checkpoint_every
    signal_name, outage = agreed_stop(procs, ctx.interrupt.signal,
                                      procs.is_main and ctx.tracker.outage() > ctx.patience)
    if last or signal_name or outage or (every and _crossed(tokens, ctx.plan.tokens_per_step, every)):
        save(ctx, state, tokens, last)
    if outage:  # the store is gone: keep what it did not take, stop while nothing is lost
        reason = f"the tracking store did not answer for {ctx.patience:.0f} s"
        if procs.is_main:
            reason += f" ({ctx.tracker.last_error}); {lifecycle.keep_unsent(ctx.tracker, ctx.run_dir, tokens)}"
        return RunResult(Status.KILLED, ctx.run_id, metrics, ctx.run_dir, reason)
    if signal_name and (not last or state.eval_pending):
        during = " during the evaluation" if state.eval_pending else ""
        return close(ctx, Status.KILLED, tokens, metrics, f"interrupted by {signal_name}{during} at "
                                                     f"{tokens:,} tokens; run the same command again to resume")
    return None


STOP_PRIORITY = (signal.SIGUSR2, signal.SIGTERM, signal.SIGINT)
"""The signal a run's processes agree they stop for when they got different ones: SIGUSR2 first, SLURM's
warning before the time limit, on which a point requeues (`studies.slurm_backend`)."""


def agreed_stop(procs: Processes, own: int | None, outage: bool) -> tuple[str, bool]:
    """The signal every process stops for ("": none came to any) and whether the tracking store is gone (rank 0
    sees it): one vote per signal summed over the processes, so every rank names the same one."""
    votes = torch.tensor([float(own == s) for s in STOP_PRIORITY] + [float(outage)], device=procs.device)
    procs.all_sum(votes)
    counts = votes.tolist()
    return next((s.name for s, n in zip(STOP_PRIORITY, counts) if n), ""), bool(counts[-1])


def _crossed(tokens: int, per_step: int, every: int) -> bool:
    """Whether the update that reached `tokens` crossed a multiple of `every`."""
    return tokens // every > (tokens - per_step) // every

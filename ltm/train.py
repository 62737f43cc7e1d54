"""Slow learning: one training run from a RunConfig to metrics, checkpoints and an MLflow run.

    python -m ltm.train --preset micro --data synthetic --set inference.steps=32

Each decoder update (METHOD.md section 3): infer z_T for every sequence (T inner steps, z_T
detached), then one AdamW step on the mean cross-entropy of the decoder at z_T. The run is
identified by the hash of its config (the run key): running the same command again resumes an
interrupted run from its last checkpoint into the same MLflow run, or reports a FINISHED one.
Several processes (torchrun) split each global batch; gradients are summed with one all-reduce.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import shutil
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F

from ltm.checkpoint import (checkpoints, load_latest_checkpoint, remove_stale_temporaries, restore_rng, rng_state,
                            run_folder, save_checkpoint, write_run_config)
from ltm.config import InferenceConfig, ModelConfig, RunConfig, run_preset
from ltm.evaluate import evaluate_bounds
from ltm.flops import flops_per_token, mfu
from ltm.model import LatentThoughtModel, build_model
from ltm import names
from ltm.names import EXIT_OF, Exit, Status
from ltm.posterior import infer_posterior, start_bound
from ltm.start import NO_DECAY
from ltm.signals import Interrupt, Stopped
from ltm.processes import Processes, all_reduce_gradients

if TYPE_CHECKING:
    from ltm.data import TokenBlocks
    from ltm.tracking import Tracker

EVAL_SEED = 20_250_000
"""Every evaluation of every run uses the same noise seeds, so curves are not jittered by them."""

UNSENT_FILE = "unsent-metrics.jsonl"
"""Beside the checkpoints: metrics the tracking store did not take before the run stopped; sent at the next start."""


def decoder_loss(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig | None,
                 seeds: Sequence[int] | None, compiled: bool = False,
                 progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy at the inferred z_T, summed KL of the posteriors).

    For an LTM this runs the inference loop first (which, with decoder_grad="trajectory",
    already accumulates into the decoder's .grad); an AR model is scored directly (KL 0).
    `compiled` runs both through torch.compile (one graph per shape). `progress` (0 to 1, the share
    of training done) sets a trained start's KL weight while `cfg.start_kl_warmup` anneals it.
    """
    post = infer_posterior(model, tokens, cfg, seeds=seeds, compiled=compiled) if model.cfg.kind == "ltm" else None
    z, kl = (post.z, post.kl().sum()) if post is not None else (None, torch.zeros((), device=tokens.device))
    loss = (_compiled_cross_entropy if compiled else _cross_entropy)(model, tokens, z)
    if model.start is not None:
        # A trained start learns from its own bound per token (the decoder is frozen for it). Added as
        # bound - bound.detach(): its gradient joins the backward, while the loss keeps the CE's value.
        weight = min(1.0, progress / cfg.start_kl_warmup) if cfg.start_kl_warmup else 1.0
        start = start_bound(model, tokens, post, kl_weight=weight).sum() / tokens[:, 1:].numel()
        loss = loss + (start - start.detach())
    return loss, kl


def _cross_entropy(model: LatentThoughtModel, tokens: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    logits = model(tokens[:, :-1], z)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


_compiled_cross_entropy = torch.compile(_cross_entropy, dynamic=False)


def use_compile(setting: str, device: torch.device, training_flops: float) -> bool:
    """Whether train.compile=setting compiles: "auto" on CUDA, and on a CPU for runs of at least
    CPU_COMPILE_MIN_FLOPS (below it the compile costs more than it saves; benchmarks/RESULTS.md)."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" or training_flops >= CPU_COMPILE_MIN_FLOPS


def sample_seed(run_seed: int, sample_index: int) -> int:
    """The inference-noise seed of the sample_index-th training sequence of a run: independent of
    batching and of the number of processes."""
    return run_seed * 10**12 + sample_index


def lr_at(step: int, total_steps: int, cfg) -> float:
    """Linear warmup, then cosine from lr to min_lr at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm gains or a learned start's centre."""
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and name not in NO_DECAY]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or name in NO_DECAY]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for the whole update on a GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if fused else {"foreach": True}))


CPU_COMPILE_MIN_FLOPS = 1e13
"""Training FLOPs (exact) from which "auto" compiles on a CPU; see use_compile."""

_GPU_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A10G": 70e12,  # AWS's A10 variant: fewer tensor FLOPs than the A10 (A10G datasheet)
    "NVIDIA L4": 121e12,
}
"""Dense (no sparsity) bf16 tensor peaks in FLOP/s, by the exact name torch.cuda.get_device_name
gives: an H100 PCIe or an H200 NVL is not an SXM part, and a name not listed gets no mfu."""


def peak_flops(device: torch.device, configured: float) -> float:
    """The configured peak (train.peak_flops), else the GPU's dense bf16 peak by its exact name, else 0:
    no mfu (on a CPU, or with a warning on a GPU not in the table)."""
    if configured or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    if name not in _GPU_PEAKS:
        warnings.warn(f"no dense bf16 peak is known for the GPU {name!r}, so mfu is not logged; give it as "
                      "FLOP/s with --set train.peak_flops=<peak> (e.g. 989e12 for an H100 SXM)", stacklevel=2)
        return 0.0
    return _GPU_PEAKS[name]


def c_compiler(environ: Mapping[str, str] | None = None) -> str | None:
    """The C compiler Triton would build its CUDA launchers with: $CC, else gcc, else clang on $PATH
    (triton/runtime/build.py), or None."""
    environ = os.environ if environ is None else environ
    path = environ.get("PATH", os.defpath)
    if "CC" in environ:
        return shutil.which(environ["CC"], path=path)
    return shutil.which("gcc", path=path) or shutil.which("clang", path=path)


def check_c_compiler(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a compiling CUDA run up front when Triton would find no C compiler (it needs one at the
    first compiled step, long after the run is created)."""
    environ = os.environ if environ is None else environ
    if c_compiler(environ) is None:
        named = f"CC={environ['CC']!r} is not an executable" if "CC" in environ else "neither gcc nor clang is on PATH"
        raise RuntimeError(f"torch.compile on CUDA needs a C compiler for Triton, and {named}; install one "
                           "(e.g. `apt install gcc`, `conda install -c conda-forge gcc`, or `module load gcc` "
                           "on a cluster) or set CC to it, or run without compiling: --set train.compile=off")


# -- the run ---------------------------------------------------------------------------------

@dataclass
class RunResult:
    status: str
    """FINISHED, FAILED, KILLED (interrupted, resumable) or SKIPPED (already finished)."""
    run_id: str | None
    metrics: dict[str, float]
    run_dir: Path
    reason: str = ""


class _BlockOrder:
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


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast where train.precision asks for it ("auto": on CUDA), else nothing: training and evaluations."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


def _git_commit() -> str:
    try:
        import subprocess

        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


def run(cfg: RunConfig, *, tracking_uri: str | None = None, experiment: str = "ltm", runs_dir: str | Path = "runs",
        force: bool = False, parent_run_id: str | None = None, tags: dict | None = None,
        progress: bool = True, device: str | None = None, tracking_patience: float = 600.0,
        on_log: Callable[[dict[str, float]], None] | None = None) -> RunResult:
    """Train one run to its token budget (or resume it), tracked in MLflow; see the module docstring.

    Raises RunBusy when another live process holds the run. If the tracking store stops answering
    for `tracking_patience` seconds the run checkpoints, keeps the unsent metrics and returns KILLED.
    `on_log` receives every set of metrics logged (e.g. a launcher's progress report).
    """
    from ltm.data import check_data
    from ltm.runlock import RunBusy, RunLock
    from ltm.tracking import check_tracking_uri, default_tracking_uri

    if tracking_patience <= 0:
        raise ValueError(f"tracking_patience must be > 0 seconds, got {tracking_patience}")
    runs_dir = Path(runs_dir).resolve()
    tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
    key = cfg.run_key()
    with Interrupt() as interrupt:
        procs, lock = None, None
        try:
            with interrupt.stoppable():  # nothing exists yet: a signal simply ends the run here
                procs = Processes.from_env(device)
                check_data(cfg.data)  # cheap checks first: nothing is tokenised or created for a doomed run
                if procs.device.type == "cuda" and use_compile(cfg.train.compile, procs.device, 0.0):  # FLOPs: moot
                    check_c_compiler()
                if procs.is_main:
                    check_tracking_uri(tracking_uri)
                busy = None
                if procs.is_main:  # one writer per run key, from before the skip/resume decision to the end
                    try:
                        lock = RunLock(runs_dir, key, "trained")
                    except RunBusy as err:
                        busy = str(err)
                busy = procs.broadcast(busy)
                if busy:
                    raise RunBusy(busy)
            return _run_locked(cfg, procs, tracking_uri, experiment, runs_dir, force, parent_run_id, tags or {},
                               progress, tracking_patience, on_log, interrupt)
        except Stopped as stop:
            if procs is not None:
                procs.fail(stop)  # a process the signal missed stops too, rather than wait for this one
            return _not_started(stop, runs_dir / "checkpoints" / key)
        except BaseException as err:
            if procs is not None:
                procs.fail(err)  # the other processes stop with this reason instead of waiting for this one
            raise
        finally:
            if lock is not None:
                lock.release()
            if procs is not None:
                procs.close()


def _not_started(stop: Stopped, run_dir: Path) -> RunResult:
    """A signal before the MLflow run was created or reopened: nothing to mark, nothing lost."""
    return RunResult(Status.KILLED.value, None, {}, run_dir,
                     f"interrupted by {stop} before the run started; nothing was changed; run the same command again")


def _run_locked(cfg: RunConfig, procs: Processes, tracking_uri: str, experiment: str, runs_dir: Path, force: bool,
                parent_run_id: str | None, tags: dict, progress: bool, patience: float, on_log,
                interrupt: Interrupt) -> RunResult:
    from ltm.data import load_blocks
    from ltm.tracking import Tracker, TrackingError

    key = cfg.run_key()
    with interrupt.stoppable():
        with procs.main_first():  # a cold token cache is tokenised once, by rank 0; the others then read it
            train_blocks = load_blocks(cfg.data, cfg.model.ctx, "train")
            val_blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
        model_cfg = dataclasses.replace(cfg.model, vocab_size=train_blocks.vocab_size)
        tracker = Tracker(tracking_uri, experiment, artifact_root=runs_dir / "artifacts") if procs.is_main else None
    decision = None  # not stoppable: a signal waits until the MLflow run is created or reopened
    if procs.is_main:
        decision = _decide(tracker, cfg, key, runs_dir, model_cfg, force, parent_run_id, tags, procs)
    decision = procs.broadcast(decision)
    run_dir, run_id = decision.run_dir, decision.run_id
    if decision.skipped:
        if procs.is_main:
            print(f"run {key} already FINISHED as MLflow run {run_id}; skipping (use --force to rerun)")
        return RunResult(Status.SKIPPED.value, run_id, decision.metrics, run_dir)

    monitor = None
    try:  # from here on the MLflow run exists: any failure marks it FAILED with the reason, a signal KILLED
        with interrupt.stoppable():
            if procs.is_main:
                remove_stale_temporaries(run_dir)
                tracker.send_spooled(run_dir / UNSENT_FILE, timeout=patience)
                write_run_config(run_dir, cfg, model_cfg, run_id)
            torch.manual_seed(cfg.seed)
            model = build_model(model_cfg, cfg.inference).to(procs.device)
            optimizer = make_optimizer(model, cfg.train)
            loop = _Loop(cfg, model_cfg, procs, tracker, run_id, run_dir, model, optimizer, train_blocks, val_blocks,
                         skip_logged=decision.logged_step, patience=patience, on_log=on_log)
            state = load_latest_checkpoint(run_dir, procs.device, run_id) if decision.resume else None
            if state is not None:
                loop.resume(state)
                if procs.is_main:
                    tracker.relog(state.get("unsent_metrics", []), after_step=tracker.max_logged_step(run_id))
                    print(f"resuming run {key} (MLflow {run_id}) from {state['tokens']:,} tokens")
            elif decision.resume and procs.is_main and (checkpoints(run_dir) or decision.logged_step >= 0):
                print(f"warning: no usable checkpoint of run {key} (MLflow {run_id}) in {run_dir} (see any warnings "
                      "above); it starts again from zero tokens", file=sys.stderr)
            monitor = _system_metrics(run_id, tracking_uri, resumed=state is not None) if procs.is_main else None
        return _train(loop, interrupt, progress)
    except Stopped as stop:
        reason = (f"interrupted by {stop} while the run was being set up, before its first update here; run the "
                  "same command again to resume")
        if procs.is_main:
            try:
                tracker.finish(run_id, Status.KILLED.value, reason, patience=min(patience, 60.0))
            except TrackingError as tracking_err:
                print(f"warning: {tracking_err}", file=sys.stderr)
        return RunResult(Status.KILLED.value, run_id, {}, run_dir, reason)
    except Exception as err:
        if procs.is_main:
            try:
                tracker.finish(run_id, "FAILED", f"{type(err).__name__}: {err}", patience=min(patience, 60.0))
            except TrackingError as tracking_err:  # the original error matters more
                print(f"warning: {tracking_err}", file=sys.stderr)
        raise
    finally:
        if monitor is not None:
            monitor.finish()


def _system_metrics(run_id: str, tracking_uri: str, resumed: bool):
    """MLflow's CPU/memory/GPU sampler for the run (system/* metrics, this process's GPUs), or None without psutil."""
    from ltm.system_metrics import system_metrics_monitor

    monitor = system_metrics_monitor(run_id, tracking_uri, resumed)
    if monitor is not None:
        monitor.start()
    return monitor


@dataclass(frozen=True)
class _Decision:
    """Rank 0's answer to "what do we do with this run key", broadcast to every process."""

    run_id: str
    run_dir: Path
    """The run's own checkpoint folder (`ltm.checkpoint.run_folder`)."""
    skipped: bool = False
    """Already FINISHED: nothing to do."""
    resume: bool = False
    """An interrupted run reopened: continue from its own latest checkpoint."""
    logged_step: int = -1
    metrics: dict = dataclasses.field(default_factory=dict)


def _decide(tracker, cfg: RunConfig, key: str, runs_dir: Path, model_cfg: ModelConfig, force: bool,
            parent_run_id, tags: dict, procs: Processes) -> _Decision:
    """Rank 0: skip a finished run, reopen an interrupted one, or create a new one. Each MLflow run has
    its own checkpoint folder: nothing here removes or resumes from another run's."""
    existing = tracker.find_run(key)
    if existing is not None and not force:
        run_id = existing.info.run_id
        if existing.info.status == Status.FINISHED.value:
            return _Decision(run_id, run_folder(runs_dir, key, run_id), skipped=True,
                             metrics=dict(existing.data.metrics))
        tracker.reopen(run_id)
        tracker.set_tags(run_id, {"device": str(procs.device), "processes": procs.world})  # this start's
        return _Decision(run_id, run_folder(runs_dir, key, run_id), resume=True,
                         logged_step=tracker.max_logged_step(run_id))
    elsewhere = [r for r in tracker.find_runs_anywhere(key) if r.info.experiment_id != tracker.experiment_id]
    with torch.device("meta"):
        counted = build_model(model_cfg, cfg.inference)
    params = {**cfg.flat(), "model.vocab_size": model_cfg.vocab_size, "n_params": counted.num_params(),
              "n_params_nonembedding": counted.num_params(non_embedding=True)}
    run_tags = {"git_commit": _git_commit(), "torch_version": torch.__version__, "device": str(procs.device),
                "processes": procs.world, "model.kind": cfg.model.kind, **tags}
    steps = f"-T{cfg.inference.steps}" if cfg.model.kind == "ltm" else ""
    name = f"{cfg.model.kind}-L{cfg.model.n_layers}-d{cfg.model.d_model}{steps}-s{cfg.seed}"
    run_id = tracker.create_run(key, name, params, run_tags, parent_run_id)
    run_dir = run_folder(runs_dir, key, run_id)
    for other in elsewhere:
        print(f"note: run key {key} is also MLflow run {other.info.run_id} ({other.info.status}) in experiment "
              f"{tracker.experiment_name(other.info.experiment_id)!r}; this is a new run of experiment "
              f"{tracker.experiment_name(tracker.experiment_id)!r} with its own checkpoints in {run_dir}")
    # the config as run: its vocabulary is the data's (the same run key: identity() leaves vocab_size out)
    tracker.log_dict(run_id, dataclasses.replace(cfg, model=model_cfg).to_dict(), "config.json")
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
    source_type = ("synthetic" if cfg.data.name == "synthetic" else "local" if Path(cfg.data.name).exists()
                   else "hugging_face")
    tracker.log_dataset(run_id, Path(cfg.data.name).name, data, source_type, cfg.data.name)
    return _Decision(run_id, run_dir)


@dataclass
class _Loop:
    """What the training loop works on, and where it stands: step, samples and eval_pending advance
    as it goes, and a checkpoint holds them with the model, the optimizer and the RNGs."""

    cfg: RunConfig
    model_cfg: ModelConfig
    procs: Processes
    tracker: Tracker | None
    """rank 0's; None on the other processes."""
    run_id: str
    run_dir: Path
    model: LatentThoughtModel
    optimizer: torch.optim.Optimizer
    train_blocks: TokenBlocks
    val_blocks: TokenBlocks
    skip_logged: int
    """The last step the MLflow run already has metrics at: a resumed run does not log replayed steps twice."""
    patience: float
    """Seconds the loop goes on while the tracking store does not answer."""
    on_log: Callable[[dict[str, float]], None] | None = None
    step: int = 0
    samples: int = 0
    """Training sequences consumed."""
    eval_pending: bool = False
    """A signal stopped the evaluation at this step: it is done first on resume."""

    def save(self, tokens: int) -> None:
        """Checkpoint the loop (rank 0 writes it)."""
        if self.procs.is_main:
            save_checkpoint(self.run_dir, {
                "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(), "step": self.step,
                "samples": self.samples, "tokens": tokens, "run_id": self.run_id, "run_key": self.cfg.run_key(),
                "config": self.cfg.to_dict(), "model_overrides": {"vocab_size": self.model_cfg.vocab_size},
                "eval_pending": self.eval_pending, "rng": rng_state(),
                # logged but maybe not yet stored: a process killed now would lose them, the resume sends them
                "unsent_metrics": self.tracker.unsent(),
            })

    def resume(self, state: dict) -> None:
        """Continue from a checkpoint's state."""
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.step, self.samples, self.eval_pending = state["step"], state["samples"], state.get("eval_pending", False)
        restore_rng(state["rng"])


def _train(loop: _Loop, interrupt: Interrupt, progress: bool) -> RunResult:
    from ltm.tracking import TrackingError

    cfg, procs, model, optimizer, tracker = loop.cfg, loop.procs, loop.model, loop.optimizer, loop.tracker
    run_id, run_dir, model_cfg = loop.run_id, loop.run_dir, loop.model_cfg
    tc, icfg = cfg.train, cfg.inference
    ctx = model_cfg.ctx
    tokens_per_step = tc.batch_size * ctx
    total_steps = max(1, math.ceil(tc.tokens / tokens_per_step))
    if tc.batch_size % procs.world:
        raise ValueError(f"train.batch_size={tc.batch_size} must be divisible by the {procs.world} processes")
    local = tc.batch_size // procs.world
    micro = tc.micro_batch_size or local
    if local % micro:
        raise ValueError(f"per-process batch {local} is not a multiple of train.micro_batch_size={micro}")
    order = _BlockOrder(len(loop.train_blocks), cfg.seed)
    start = {"start": icfg.start, "encoder_layers": icfg.encoder_layers}
    fpt = flops_per_token(model_cfg, icfg.steps, decoder_grad=icfg.decoder_grad, **start)
    fpt_paper = flops_per_token(model_cfg, icfg.steps, convention="paper", **start)
    peak = peak_flops(procs.device, tc.peak_flops)
    compiled = use_compile(tc.compile, procs.device, fpt * total_steps * tokens_per_step)
    if compiled:  # a worker trains run after run: start each from empty graph caches, far from dynamo's limit
        torch._dynamo.reset()
    elif procs.device.type == "cuda" and model.attention == "auto":
        model.attention = "chunked"  # FlexAttention is compiled by Triton too: "off" compiles nothing
    n_val = min(tc.eval_blocks, len(loop.val_blocks))
    val_batches = [loop.val_blocks.batch(list(range(i, min(i + tc.eval_batch_size, n_val)))).to(procs.device)
                   for i in range(0, n_val, tc.eval_batch_size)]

    def log(metrics: dict, tokens: int) -> None:
        if procs.is_main and tokens > loop.skip_logged:  # a resumed run does not log replayed steps twice
            tracker.log_metrics(run_id, metrics, step=tokens)
            if loop.on_log is not None:
                loop.on_log(metrics)

    def evaluate(tokens: int) -> dict | None:
        """The validation metrics ({} on the other processes, which wait for rank 0's on the store); None
        when a signal stopped the evaluation (it is redone on resume)."""
        metrics: dict | None = {}
        if procs.is_main:
            model.eval()
            try:
                with interrupt.stoppable(), autocast_for(procs.device, tc.precision):
                    metrics = evaluate_bounds(model, val_batches, icfg, seed=EVAL_SEED, iw_samples=tc.iw_samples,
                                              compiled=compiled)
            except Stopped:
                metrics = None
            finally:
                model.train()
        procs.after_main()
        return metrics

    def close(status: str, tokens: int, reason: str = "") -> RunResult:
        """End the MLflow run; if the store never answers, keep the unsent metrics and say how to finish."""
        if procs.is_main:
            try:
                tracker.finish(run_id, status, reason or None, patience=loop.patience)
            except TrackingError as err:
                kept = tracker.spool(run_dir / UNSENT_FILE)
                note = (f"{err}; checkpointed at {tokens:,} tokens, {kept} unsent metrics kept in {run_dir / UNSENT_FILE}; "
                        "run the same command again once the store answers")
                return RunResult("FAILED" if status == "FAILED" else "KILLED", run_id, last_metrics, run_dir,
                                 f"{reason}; {note}" if reason else note)
        return RunResult(status, run_id, last_metrics, run_dir, reason)

    last_metrics: dict[str, float] = {}
    procs.after_main()  # rank 0 may have spent long on the tracking store (resending spooled metrics)
    if loop.eval_pending:  # a signal stopped the evaluation at this step before: do it now, then go on
        tokens = loop.step * tokens_per_step
        metrics = evaluate(tokens)
        if procs.broadcast(metrics is None):  # rank 0 evaluates; every process stops with it
            return close("KILLED", tokens, f"interrupted during the evaluation at {tokens:,} tokens; run the same "
                                           "command again to resume")
        if procs.is_main:
            tracker.log_metrics(run_id, metrics, step=tokens)
        last_metrics.update(metrics)
        loop.eval_pending = False

    from tqdm import tqdm

    bar = tqdm(total=total_steps * tokens_per_step, initial=loop.step * tokens_per_step, unit="tok", unit_scale=True,
               disable=not (progress and procs.is_main), dynamic_ncols=True)
    window = {"loss": 0.0, "kl": 0.0, "steps": 0, "time": 0.0}
    while loop.step < total_steps:
        started = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = lr_at(loop.step, total_steps, tc)
        mine = order.indices(loop.samples, tc.batch_size)[procs.rank * local:(procs.rank + 1) * local]
        loss_sum = torch.zeros(2, device=procs.device)  # (sum of per-sequence mean CE, sum of KL)
        for i in range(0, local, micro):
            batch = loop.train_blocks.batch(mine[i:i + micro]).to(procs.device)
            seeds = [sample_seed(cfg.seed, loop.samples + procs.rank * local + i + j) for j in range(len(batch))]
            with autocast_for(procs.device, tc.precision):
                loss, kl = decoder_loss(model, batch, icfg, seeds, compiled, loop.step / total_steps)
            (loss * len(batch) / tc.batch_size).backward()
            loss_sum += torch.stack((loss.detach() * len(batch), kl.detach()))
        all_reduce_gradients(model, procs)
        procs.all_sum(loss_sum)
        mean_loss = loss_sum[0].item() / tc.batch_size
        if not math.isfinite(mean_loss):
            reason = f"non-finite training loss ({mean_loss}) at update {loop.step}; the last good checkpoint is kept"
            bar.close()
            return close("FAILED", loop.step * tokens_per_step, reason)
        torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loop.step += 1
        loop.samples += tc.batch_size
        tokens = loop.step * tokens_per_step
        bar.update(tokens_per_step)

        window["loss"] += mean_loss
        window["kl"] += loss_sum[1].item() / (tc.batch_size * ctx)
        window["steps"] += 1
        window["time"] += time.perf_counter() - started
        last = loop.step == total_steps
        point: dict[str, float] = {}  # everything logged at this step, in one call
        if last or _crossed(tokens, tokens_per_step, tc.log_every or tokens_per_step):
            n = window["steps"]
            tps = n * tokens_per_step / window["time"]
            point.update({names.TRAIN_LOSS: window["loss"] / n,
                          names.TRAIN_PPL_BOUND: math.exp((window["loss"] + window["kl"]) / n),
                          names.TRAIN_LR: optimizer.param_groups[0]["lr"], names.TOKENS_PER_S: tps})
            if peak:
                point[names.MFU] = mfu(tps, fpt, peak, procs.world)
            bar.set_postfix(loss=f"{point['train/loss']:.3f}")
            window = {"loss": 0.0, "kl": 0.0, "steps": 0, "time": 0.0}
        loop.eval_pending = False
        if last or (tc.eval_every and _crossed(tokens, tokens_per_step, tc.eval_every)):
            metrics = evaluate(tokens)
            loop.eval_pending = metrics is None
            point.update(metrics or {})
        if point:
            point.update({names.TOKENS: tokens, names.FLOPS: tokens * fpt, names.FLOPS_PAPER: tokens * fpt_paper})
            log(point, tokens)
            last_metrics.update(point)
        outage = procs.is_main and tracker.outage() > loop.patience
        stop = procs.all_sum(torch.tensor([float(interrupt.signal is not None), float(outage)], device=procs.device))
        if last or stop.any().item() or (tc.checkpoint_every and _crossed(tokens, tokens_per_step, tc.checkpoint_every)):
            loop.save(tokens)
        if stop[1].item():  # the store is gone: keep what it did not take, stop while nothing is lost
            bar.close()
            reason = f"the tracking store did not answer for {loop.patience:.0f} s"
            if procs.is_main:
                kept = tracker.spool(run_dir / UNSENT_FILE)
                reason += (f" ({tracker.last_error}); checkpointed at {tokens:,} tokens, {kept} unsent metrics "
                           f"kept in {run_dir / UNSENT_FILE}; run the same command again once the store answers")
            return RunResult("KILLED", run_id, last_metrics, run_dir, reason)
        if stop[0].item() and (not last or loop.eval_pending):
            bar.close()
            name = interrupt.name or "signal"
            during = " during the evaluation" if loop.eval_pending else ""
            return close("KILLED", tokens, f"interrupted by {name}{during} at {tokens:,} tokens; run the same "
                                           "command again to resume")
    bar.close()
    return close("FINISHED", loop.step * tokens_per_step)


def bound_summary(metrics: dict[str, float], prefix: str = "val") -> str:
    """Lines that read an LTM bound (nats per token): NLL given z, KL above the start's floor and the
    floor, the information the decoder takes from its own z, how much it relies on z, and for a
    trained start the amortisation gap."""
    m = {k.removeprefix(f"{prefix}/"): v for k, v in metrics.items()}
    floor = m.get("kl_floor")
    kl = (f"KL above the floor {m['kl'] - floor:.3f} + KL floor {floor:.3f}" if floor is not None
          else f"KL {m['kl']:.3f} (an encoder's start has no floor)")
    lines = [f"bound {m['nll'] + m['kl']:.3f} nats/token = NLL given z {m['nll']:.3f} + {kl}"]
    if "nll_mixture" in m:
        lines.append(f"its own z tells the decoder {m['nll_mixture'] - m['nll']:.3f} nats/token more than a mixture of "
                     f"other blocks' ({prefix}/nll_mixture - {prefix}/nll)")
    lines.append(f"one other block's z costs it {m['nll_other_z'] - m['nll']:.3f} (reliance on z: {prefix}/nll_other_z "
                 f"- {prefix}/nll); NLL given a prior sample {m['nll_prior']:.3f}")
    if "amortisation_gap" in m:
        lines.append(f"bound at the start (T=0) {m['bound_start']:.3f}: refinement gains {m['amortisation_gap']:.3f} "
                     "(the amortisation gap)")
    return "\n".join(lines)


def corpus_optimum(cfg: RunConfig) -> str:
    """The synthetic corpus's Bayes-optimal perplexity on the run's evaluation blocks, with the whole
    block and within the model's receptive field: the floor the run's numbers are read against."""
    from ltm.data import load_blocks, optimal_ppl

    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    n = cfg.train.eval_blocks
    full, seen = optimal_ppl(blocks, n_blocks=n), optimal_ppl(blocks, window=cfg.model.receptive_field, n_blocks=n)
    return (f"this corpus's Bayes-optimal perplexity on the same {min(n, len(blocks))} blocks: {full:.3f} with the "
            f"whole block, {seen:.3f} within the model's {cfg.model.receptive_field}-token receptive field")


def _crossed(tokens: int, per_step: int, every: int) -> bool:
    """Whether the update that reached `tokens` crossed a multiple of `every`."""
    return tokens // every > (tokens - per_step) // every


# -- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltm.train", description="Train one LTM or AR run, tracked in MLflow and resumable.",
        epilog="Run the same command again to resume an interrupted run or to skip a finished one. "
               "Several processes: torchrun --nproc-per-node N -m ltm.train ... "
               "Exit status: 0 finished (or skipped), 1 failed, 3 interrupted (resumable), 4 another process "
               "is running this run.")
    parser.add_argument("--preset", default="micro", help="run preset: smoke, micro, ltm-s, ltm-m, ltm-l (default micro)")
    parser.add_argument("--config", help="a JSON run config (as logged in config.json) instead of a preset")
    parser.add_argument("--data", help="data.name: 'synthetic', a hub name or a local path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value by its dotted key, e.g. inference.steps=32, model.n_latents=8, "
                             "train.tokens=1e6, seed=1 (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--experiment", default="ltm", help="MLflow experiment name (default ltm)")
    parser.add_argument("--runs-dir", default="runs", help="folder for checkpoints, the default MLflow store and artifacts")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--force", action="store_true", help="rerun even if this config already FINISHED")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--tracking-patience", type=float, default=600.0, metavar="SECONDS",
                        help="how long training goes on while the tracking store does not answer (metrics are kept "
                             "and sent when it is back); after that the run checkpoints and exits 3 (default 600)")
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig named by --preset/--config, --data and --set."""
    cfg = RunConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else run_preset(args.preset)
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.name={args.data}")
    return cfg.with_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    from ltm.runlock import RunBusy

    args = build_parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        result = run(cfg, tracking_uri=args.tracking_uri, experiment=args.experiment, runs_dir=args.runs_dir,
                     force=args.force, progress=not args.no_progress, device=args.device,
                     tracking_patience=args.tracking_patience)
    except RunBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.BUSY
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.FAILED
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.status}: run {cfg.run_key()} (MLflow run {result.run_id})" + (f": {result.reason}" if result.reason else ""))
        for k, v in sorted(result.metrics.items()):
            print(f"  {k:24s} {v:.6g}")
        if names.VAL_NLL_OTHER_Z in result.metrics:
            print(bound_summary(result.metrics))
        if cfg.data.name == "synthetic" and result.metrics:
            print(corpus_optimum(cfg))
    return EXIT_OF[Status(result.status)]


if __name__ == "__main__":
    sys.exit(main())

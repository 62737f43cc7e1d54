"""A run's life in MLflow: find its run key, skip it (FINISHED), reopen it (interrupted) or create it,
and finish it, keeping what the tracking store did not take.

Training (`ltm.train.run`) and the studies' evaluation tasks (`studies.tasks`) both go through
`decide` and `open_run`; a training run adds its own checkpoint folder, params and lineage
(`decide_training`) and ends through `finish`, which spools unsent metrics when the store is away.
"""

from __future__ import annotations

import dataclasses
import logging
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from ltm.checkpoint import run_folder
from ltm.config import ModelConfig, RunConfig, describe
from ltm.names import FLOPS_PER_TOKEN, N_PARAMS, N_PARAMS_NONEMBEDDING, NOTE_TAG, TOKENS, Status

if TYPE_CHECKING:
    from ltm.tracking import Tracker

log = logging.getLogger(__name__)

UNSENT_FILE = "unsent-metrics.jsonl"
"""Beside the checkpoints: metrics the tracking store did not take before the run stopped; sent at the next start."""


@dataclass
class RunResult:
    """How a training run ended (`ltm.train.run`)."""

    status: Status
    """FINISHED, FAILED, KILLED (interrupted, resumable) or SKIPPED (already finished)."""
    run_id: str | None
    metrics: dict[str, float]
    run_dir: Path
    reason: str = ""


@dataclass(frozen=True)
class RunDecision:
    """Rank 0's answer to "what do we do with this run key", broadcast to every process."""

    run_id: str | None
    """The MLflow run; None for a new run until `open_run` creates it."""
    skipped: bool = False
    """Already FINISHED: nothing to do."""
    resume: bool = False
    """An interrupted run to reopen: a training run continues from its own latest checkpoint."""
    metrics: dict = dataclasses.field(default_factory=dict)
    """A skipped run's final metrics."""
    run_dir: Path | None = None
    """A training run's own checkpoint folder (`ltm.checkpoint.run_folder`)."""
    logged_step: int = -1
    """The last step a resumed run already has metrics at: replayed steps are not logged twice."""


def decide(tracker: Tracker, key: str, force: bool = False) -> RunDecision:
    """Skip the run key's FINISHED run, resume its interrupted one, or (none, or `force`) create a new one."""
    existing = tracker.find_run(key)
    if existing is None or force:
        return RunDecision(None)
    if existing.info.status == Status.FINISHED:
        return RunDecision(existing.info.run_id, skipped=True, metrics=dict(existing.data.metrics))
    return RunDecision(existing.info.run_id, resume=True)


def open_run(tracker: Tracker, decision: RunDecision, start_tags: dict, create: Callable[[], str]) -> str:
    """The MLflow run this start works in: the interrupted one reopened (RUNNING, its reason cleared,
    tagged with this start's `start_tags`), or a new one from `create`."""
    if not decision.resume:
        return create()
    tracker.reopen(decision.run_id)
    tracker.set_tags(decision.run_id, start_tags)
    return decision.run_id


def decide_training(tracker: Tracker, cfg: RunConfig, model_cfg: ModelConfig, runs_dir: Path, *, force: bool,
                    parent_run_id: str | None, tags: dict, device: torch.device, processes: int) -> RunDecision:
    """Rank 0: skip a finished training run, reopen an interrupted one, or create a new one. Each MLflow
    run has its own checkpoint folder: nothing here removes or resumes from another run's."""
    key = cfg.run_key()
    decision = _beyond_finished_trunk(decide(tracker, key, force), cfg)
    if decision.skipped:
        return dataclasses.replace(decision, run_dir=run_folder(runs_dir, key, decision.run_id))
    # the description too: a run created before it was written gets it when it resumes
    start_tags = {"device": str(device), "processes": processes, NOTE_TAG: describe(cfg)}
    run_id = open_run(tracker, decision, start_tags, lambda: _create_training_run(
        tracker, cfg, model_cfg, runs_dir, parent_run_id, {**start_tags, "model.kind": cfg.model.kind, **tags}))
    logged_step = tracker.max_logged_step(run_id) if decision.resume else -1
    return dataclasses.replace(decision, run_id=run_id, run_dir=run_folder(runs_dir, key, run_id),
                               logged_step=logged_step)


def _beyond_finished_trunk(decision: RunDecision, cfg: RunConfig) -> RunDecision:
    """A constant-rate trunk (one run key whatever its tokens) that FINISHED short of `cfg`'s tokens is reopened
    to go on from its checkpoint there; one that reached them is skipped."""
    if not (decision.skipped and cfg.train.schedule == "constant"):
        return decision
    if decision.metrics.get(TOKENS, 0) >= cfg.updates * cfg.tokens_per_update:
        return decision
    return RunDecision(decision.run_id, resume=True)


def _create_training_run(tracker: Tracker, cfg: RunConfig, model_cfg: ModelConfig, runs_dir: Path,
                         parent_run_id: str | None, tags: dict) -> str:
    """A new MLflow run with the config's params, its size (parameter counts, FLOPs per token: params and
    step-0 metrics, which the UI's runs table can show as columns), the run's config and its data."""
    from ltm.flops import run_flops_per_token
    from ltm.model import build_model

    key = cfg.run_key()
    elsewhere = [r for r in tracker.find_runs_anywhere(key) if r.info.experiment_id != tracker.experiment_id]
    with torch.device("meta"):
        counted = build_model(model_cfg, cfg.inference)
    size = {N_PARAMS: counted.num_params(), N_PARAMS_NONEMBEDDING: counted.num_params(non_embedding=True)}
    params = {**cfg.flat(), "model.vocab_size": model_cfg.vocab_size, **size}
    run_tags = {"git_commit": _git_commit(), "torch_version": torch.__version__, **tags}
    steps = f"-T{cfg.inference.steps}" if cfg.model.kind == "ltm" else ""
    name = f"{cfg.model.kind}-L{cfg.model.n_layers}-d{cfg.model.d_model}{steps}-s{cfg.seed}"
    run_id = tracker.create_run(key, name, params, run_tags, parent_run_id)
    tracker.log_metrics(run_id, {**size, FLOPS_PER_TOKEN: run_flops_per_token(cfg, model_cfg)}, step=0)
    run_dir = run_folder(runs_dir, key, run_id)
    for other in elsewhere:
        log.info("note: run key %s is also MLflow run %s (%s) in experiment %r; this is a new run of experiment %r "
                 "with its own checkpoints in %s", key, other.info.run_id, other.info.status,
                 tracker.experiment_name(other.info.experiment_id), tracker.experiment_name(tracker.experiment_id),
                 run_dir)
    # the config as run: its vocabulary is the data's (the same run key: identity() leaves vocab_size out)
    tracker.log_dict(run_id, dataclasses.replace(cfg, model=model_cfg).to_dict(), "config.json")
    data = {k: v for k, v in dataclasses.asdict(cfg.data).items() if k != "cache_dir"}
    source_type = ("synthetic" if cfg.data.name == "synthetic" else "local" if Path(cfg.data.name).exists()
                   else "hugging_face")
    tracker.log_dataset(run_id, Path(cfg.data.name).name, data, source_type, cfg.data.name)
    return run_id


def _git_commit() -> str:
    try:
        root = Path(__file__).resolve().parents[1]
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=5).stdout.strip() or "unknown"
    except Exception:
        return "unknown"


# -- the end of a run ----------------------------------------------------------------------------

def finish(tracker: Tracker, run_id: str, status: Status, reason: str, *, patience: float, run_dir: Path,
           tokens: int) -> tuple[Status, str]:
    """End the MLflow run as `status`; the (status, reason) the run ends with. If the store never
    answers, the unsent metrics are kept beside the checkpoints and a run that was not FAILED is
    KILLED (resumable), its reason saying how to finish it."""
    from ltm.tracking import TrackingError

    try:
        tracker.finish(run_id, status, reason or None, patience=patience)
    except TrackingError as err:
        note = f"{err}; {keep_unsent(tracker, run_dir, tokens)}"
        return (Status.FAILED if status == Status.FAILED else Status.KILLED), (f"{reason}; {note}" if reason else note)
    return status, reason


def finish_after_setup(tracker: Tracker, run_id: str, status: Status, reason: str, patience: float) -> None:
    """End a run that stopped before or while it was set up; a store that does not answer only gets
    a warning (the original error matters more)."""
    from ltm.tracking import TrackingError

    try:
        tracker.finish(run_id, status, reason, patience=min(patience, 60.0))
    except TrackingError as err:
        log.warning("%s", err)


def keep_unsent(tracker: Tracker, run_dir: Path, tokens: int) -> str:
    """Spool the metrics the store has not taken to the run's UNSENT_FILE (sent at the next start); says so."""
    kept = tracker.spool(run_dir / UNSENT_FILE)
    return (f"checkpointed at {tokens:,} tokens, {kept} unsent metrics kept in {run_dir / UNSENT_FILE}; "
            "run the same command again once the store answers")


def start_system_metrics(run_id: str, tracking_uri: str, resumed: bool):
    """MLflow's CPU/memory/GPU sampler for the run (system/* metrics, this process's GPUs), started;
    None without psutil."""
    from ltm.system_metrics import system_metrics_monitor

    monitor = system_metrics_monitor(run_id, tracking_uri, resumed)
    if monitor is not None:
        monitor.start()
    return monitor

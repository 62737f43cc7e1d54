"""Slow learning: one training run from a RunConfig to metrics, checkpoints and an MLflow run.

    python -m ltm.train --preset micro --data synthetic --set inference.steps=32

The run is identified by the hash of its config (the run key): running the same command again
resumes an interrupted run from its last checkpoint into the same MLflow run, or reports a FINISHED
one. `run` starts one (processes, run lock, data, the MLflow decision of `ltm.lifecycle`) and hands
it to the loop (`ltm.loop`); several processes (torchrun) split each global batch.

A wsd run (train.schedule=wsd) is a branch of its constant-rate trunk (`RunConfig.trunk`, one run key
whatever its tokens): it starts from the trunk's snapshot at its branch point, first training (or resuming)
the trunk there, as its own MLflow run under its own lock, when the snapshot is missing and the branch has
not started. The branch's MLflow run is tagged with its trunk's (`names.TRUNK_RUN_TAG`, `TRUNK_KEY_TAG`,
`BRANCH_POINT_TAG`); its `tokens` metric counts the model's tokens (the trunk's included: the D of a
scaling fit), its `flops` only its own updates: its total compute is flops + branch point x flops_per_token.
"""

# ruff: noqa: E402 (the signal handlers go in before the imports, which load torch and MLflow)
from __future__ import annotations

from ltm.signals import exit_on_signal

exit_on_signal(__name__)  # run as a command: a signal while torch loads exits 3 with a message, not 143
import argparse
import dataclasses
import functools
import json
import logging
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from ltm import names
from ltm.cli import add_run_options, add_verbosity, add_verify_option, configure_logging, log_level
from ltm.config import RUN_PRESETS, ConfigError, ModelConfig, RunConfig, run_preset
from ltm.names import EXIT_OF, Exit, Status
from ltm.paths import check_name
from ltm.signals import Interrupt, Stopped

# torch, MLflow and the loop load where a run starts (in `run`), so that --help and a mistyped option answer at once.
if TYPE_CHECKING:
    from ltm import loop
    from ltm.data import TokenBlocks
    from ltm.lifecycle import RunDecision, RunResult
    from ltm.processes import Processes
    from ltm.tracking import Tracker

log = logging.getLogger("ltm.train")  # by name: run as a command, __name__ is "__main__"


def run(cfg: RunConfig, *, tracking_uri: str | None = None, experiment: str = "ltm", runs_dir: str | Path = "runs",
        force: bool = False, parent_run_id: str | None = None, tags: dict | None = None,
        progress: bool = True, device: str | None = None, tracking_patience: float = 600.0,
        on_log: Callable[[dict[str, float]], None] | None = None, verify: bool = True,
        from_trunk: bool = True) -> RunResult:
    """Train one run to its token budget (or resume it), tracked in MLflow; see the module docstring.
    A wsd run starts from its trunk's snapshot (the module docstring), checked against its .sha256 unless
    `verify` is False; `from_trunk` False trains it from zero tokens instead (the same numbers).

    Raises RunBusy when another live process holds the run. If the tracking store stops answering
    for `tracking_patience` seconds the run checkpoints, keeps the unsent metrics and returns KILLED.
    `on_log` receives every set of metrics logged (e.g. a launcher's progress report). Sets this process's
    MLflow client up for `tracking_uri` (`ltm.tracking.configure_mlflow`: fail fast, credentials from a
    user:password in the URI).
    """
    from ltm.data import check_data
    from ltm.objective import check_c_compiler, use_compile
    from ltm.processes import Processes
    from ltm.tracking import check_tracking_uri, configure_mlflow, default_tracking_uri

    if tracking_patience <= 0:
        raise ValueError(f"tracking_patience must be > 0 seconds, got {tracking_patience}")
    check_name(experiment, "--experiment")  # before anything is created: a name the store refuses ends nothing
    runs_dir = Path(runs_dir).resolve()
    tracking_uri = tracking_uri or default_tracking_uri(runs_dir)
    configure_mlflow(tracking_uri)
    key = cfg.run_key()
    snapshot = _trunk_first(cfg, tracking_uri, experiment, runs_dir, force, parent_run_id, progress, device,
                            tracking_patience, verify) if cfg.train.schedule == "wsd" and from_trunk else None
    if snapshot is not None and not isinstance(snapshot, _Snapshot):
        return snapshot  # how the trunk stopped
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
                lock = _lock(procs, runs_dir, key)
            return _run_locked(cfg, procs, tracking_uri, experiment, runs_dir, force, parent_run_id, tags or {},
                               progress, tracking_patience, on_log, interrupt, snapshot)
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


def _lock(procs: Processes, runs_dir: Path, key: str):
    """The run key's lock, held by rank 0 (one writer per run key, from before the skip/resume decision to the
    end); RunBusy on every process when another live process holds it."""
    from ltm.runlock import RunBusy, RunLock

    lock, busy = None, None
    if procs.is_main:
        try:
            lock = RunLock(runs_dir, key, "trained")
        except RunBusy as err:
            busy = str(err)
    busy = procs.broadcast(busy)
    if busy:
        raise RunBusy(busy)
    return lock


@dataclasses.dataclass(frozen=True)
class _Snapshot:
    """Where a wsd branch starts when it has no checkpoint of its own: its trunk's snapshot file."""

    path: Path
    verify: bool
    """Check it against its .sha256 (False: --no-verify)."""


def _trunk_first(cfg: RunConfig, tracking_uri: str, experiment: str, runs_dir: Path, force: bool,
                 parent_run_id: str | None, progress: bool, device: str | None, patience: float,
                 verify: bool) -> _Snapshot | RunResult:
    """A wsd branch's trunk run (or resumed) up to the branch point, when its snapshot there is missing and the
    branch has not started (a finished branch is skipped later, a started one resumes from its own checkpoint):
    where the branch starts, or a RunResult saying how the trunk stopped before it."""
    from ltm.checkpoint import key_folders, trunk_snapshot
    from ltm.lifecycle import RunResult

    start = _Snapshot(trunk_snapshot(runs_dir, cfg), verify)
    if start.path.is_file() or (not force and (
            key_folders(runs_dir, cfg.run_key()) or _finished(cfg, tracking_uri, experiment, runs_dir))):
        return start
    trunk = cfg.trunk()
    log.info("run %s branches from its trunk %s at %s tokens, which has no snapshot there: training the trunk first",
             cfg.run_key(), trunk.run_key(), f"{cfg.branch_point():,}")
    result = run(trunk, tracking_uri=tracking_uri, experiment=experiment, runs_dir=runs_dir,
                 parent_run_id=parent_run_id, progress=progress, device=device, tracking_patience=patience)
    if result.status not in (Status.FINISHED, Status.SKIPPED):
        return RunResult(result.status, None, {}, result.run_dir,
                         f"its trunk {trunk.run_key()} (MLflow run {result.run_id}) stopped before the branch point "
                         f"{cfg.branch_point():,}: {result.reason}")
    start = _Snapshot(trunk_snapshot(runs_dir, cfg), verify)
    # a trunk already past the point without a snapshot there: refused before the branch exists (one that just
    # FINISHED there has one, written by rank 0, which the other processes may not see yet)
    if result.status == Status.SKIPPED and not start.path.is_file():
        raise _no_snapshot(cfg, start.path)
    return start


def _no_snapshot(cfg: RunConfig, path: Path) -> FileNotFoundError:
    return FileNotFoundError(
        f"run {cfg.run_key()} branches from its trunk {cfg.trunk().run_key()} at {cfg.branch_point():,} tokens, but "
        f"the trunk has no snapshot there ({path}): it went past the branch point without stopping at it (run a "
        "trunk's budgets from the smallest up), or the file was removed; train the trunk to that point again (a new "
        "run of it: --force with train.schedule=constant and train.tokens at the branch point)")


def _finished(cfg: RunConfig, tracking_uri: str, experiment: str, runs_dir: Path) -> bool:
    """Whether the run key has a FINISHED run in the experiment (one that the run then skips)."""
    from ltm.tracking import Tracker

    found = Tracker(tracking_uri, experiment, artifact_root=runs_dir / "artifacts").find_run(cfg.run_key())
    return found is not None and found.info.status == Status.FINISHED


def _not_started(stop: Stopped, run_dir: Path) -> RunResult:
    """A signal before the MLflow run was created or reopened: nothing to mark, nothing lost."""
    from ltm.lifecycle import RunResult

    return RunResult(Status.KILLED, None, {}, run_dir,
                     f"interrupted by {stop} before the run started; nothing was changed; run the same command again")


def _run_locked(cfg: RunConfig, procs: Processes, tracking_uri: str, experiment: str, runs_dir: Path, force: bool,
                parent_run_id: str | None, tags: dict, progress: bool, patience: float, on_log,
                interrupt: Interrupt, snapshot: _Snapshot | None) -> RunResult:
    from ltm import lifecycle, loop
    from ltm.data import load_blocks
    from ltm.lifecycle import RunResult
    from ltm.tracking import Tracker

    key = cfg.run_key()
    with interrupt.stoppable():
        with procs.main_first():  # a cold token cache is tokenised once, by rank 0; the others then read it
            blocks = load_blocks(cfg.data, cfg.model.ctx, "train"), load_blocks(cfg.data, cfg.model.ctx, "validation")
        if procs.is_main:
            log.info("%s: %s training blocks, %s validation blocks of %d tokens", _data_name(cfg),
                     f"{len(blocks[0]):,}", f"{len(blocks[1]):,}", cfg.model.ctx + 1)
        model_cfg = dataclasses.replace(cfg.model, vocab_size=blocks[0].vocab_size)
        tracker = Tracker(tracking_uri, experiment, artifact_root=runs_dir / "artifacts") if procs.is_main else None
    decision = None  # not stoppable: a signal waits until the MLflow run is created or reopened
    if procs.is_main:
        decision = lifecycle.decide_training(tracker, cfg, model_cfg, runs_dir, force=force,
                                             parent_run_id=parent_run_id, tags=tags, device=procs.device,
                                             processes=procs.world)
    decision = procs.broadcast(decision)
    if decision.skipped:
        if procs.is_main:
            log.info("run %s already FINISHED as MLflow run %s; skipping (use --force to rerun)", key, decision.run_id)
        return RunResult(Status.SKIPPED, decision.run_id, decision.metrics, decision.run_dir)

    monitor = None
    try:  # from here on the MLflow run exists: any failure marks it FAILED with the reason, a signal KILLED
        with interrupt.stoppable():
            ctx, state, resumed = _set_up(cfg, model_cfg, procs, interrupt, tracker, decision, blocks, patience, on_log,
                                          snapshot)
            if procs.is_main:
                monitor = lifecycle.start_system_metrics(decision.run_id, tracking_uri, resumed)
        return loop.train(ctx, state, progress)
    except Stopped as stop:
        reason = (f"interrupted by {stop} while the run was being set up, before its first update here; run the "
                  "same command again to resume")
        if procs.is_main:
            lifecycle.finish_after_setup(tracker, decision.run_id, Status.KILLED, reason, patience)
        return RunResult(Status.KILLED, decision.run_id, {}, decision.run_dir, reason)
    except Exception as err:
        if procs.is_main:
            lifecycle.finish_after_setup(tracker, decision.run_id, Status.FAILED, f"{type(err).__name__}: {err}",
                                         patience)
        raise
    finally:
        if monitor is not None:
            monitor.finish()


def _data_name(cfg: RunConfig) -> str:
    return "synthetic corpus" if cfg.data.name == "synthetic" else f"data {cfg.data.name}"


def _set_up(cfg: RunConfig, model_cfg: ModelConfig, procs: Processes, interrupt: Interrupt, tracker: Tracker | None,
            decision: RunDecision, blocks: tuple[TokenBlocks, TokenBlocks], patience: float,
            on_log, snapshot: _Snapshot | None) -> tuple[loop.TrainContext, loop.TrainState, bool]:
    """The run's folder made ready (rank 0), what the loop works with, and its state: its latest checkpoint's
    when resuming, else its trunk's `snapshot` (a wsd branch), else new; whether it was resumed."""
    from ltm import loop
    from ltm.checkpoint import checkpoints, load_latest_checkpoint, remove_stale_temporaries, write_run_config
    from ltm.lifecycle import UNSENT_FILE

    key, run_id, run_dir = cfg.run_key(), decision.run_id, decision.run_dir
    if procs.is_main:
        remove_stale_temporaries(run_dir)
        tracker.send_spooled(run_dir / UNSENT_FILE, timeout=patience)
        write_run_config(run_dir, cfg, model_cfg, run_id)
    train_blocks, val_blocks = blocks
    ctx = loop.TrainContext(cfg, model_cfg, loop.StepPlan.of(cfg, model_cfg, procs), procs, interrupt, tracker,
                            run_id, run_dir, train_blocks, loop.BlockOrder(len(train_blocks), cfg.seed),
                            loop.validation_batches(val_blocks, cfg, procs.device), decision.logged_step, patience,
                            on_log)
    state = loop.new_state(cfg, model_cfg, ctx.plan, procs.device)
    checkpoint = load_latest_checkpoint(run_dir, procs.device, run_id) if decision.resume else None
    if checkpoint is not None:
        state.load(checkpoint)
        if procs.is_main:
            tracker.relog(checkpoint.unsent_metrics, after_step=tracker.max_logged_step(run_id))
            log.info("resuming run %s (MLflow %s) from %s tokens", key, run_id, f"{checkpoint.tokens:,}")
    elif snapshot is not None:
        _branch(cfg, state, snapshot, procs, tracker, run_id)
    elif decision.resume and procs.is_main and (checkpoints(run_dir) or decision.logged_step >= 0):
        log.warning("no usable checkpoint of run %s (MLflow %s) in %s (see any warnings above); it starts again "
                    "from zero tokens", key, run_id, run_dir)
    return ctx, state, checkpoint is not None


def _branch(cfg: RunConfig, state: loop.TrainState, snapshot: _Snapshot, procs: Processes, tracker: Tracker | None,
            run_id: str) -> None:
    """Start wsd run `cfg` from its trunk's snapshot (CheckpointError naming the file when it does not match its
    .sha256), and tag its MLflow run with the trunk's (rank 0)."""
    from ltm.checkpoint import read_snapshot

    trunk_key = cfg.trunk().run_key()
    if not snapshot.path.is_file():
        raise _no_snapshot(cfg, snapshot.path)
    start = read_snapshot(snapshot.path, procs.device, snapshot.verify)
    state.branch_from(start)
    if procs.is_main:
        tracker.set_tags(run_id, {names.TRUNK_RUN_TAG: start.run_id, names.TRUNK_KEY_TAG: trunk_key,
                                  names.BRANCH_POINT_TAG: start.tokens})
        log.info("run %s branches from trunk %s (MLflow %s) at %s tokens", cfg.run_key(), trunk_key, start.run_id,
                 f"{start.tokens:,}")


def bound_summary(metrics: dict[str, float], prefix: str = names.VAL) -> str:
    """Lines that read an LTM bound (nats per token): NLL given z, KL above the start's floor and the
    floor, the information the decoder takes from its own z, how much it relies on z, and for a
    trained start the amortisation gap."""
    key = functools.partial(names.metric, prefix)
    m = {measure: metrics[key(measure)] for measure in (names.NLL, names.KL, names.KL_FLOOR, names.NLL_MIXTURE,
         names.NLL_OTHER_Z, names.NLL_PRIOR, names.BOUND_START, names.AMORTISATION_GAP) if key(measure) in metrics}
    nll, floor = m[names.NLL], m.get(names.KL_FLOOR)
    kl = (f"KL above the floor {m[names.KL] - floor:.3f} + KL floor {floor:.3f}" if floor is not None
          else f"KL {m[names.KL]:.3f} (an encoder's start has no floor)")
    lines = [f"bound {nll + m[names.KL]:.3f} nats/token = NLL given z {nll:.3f} + {kl}"]
    if names.NLL_MIXTURE in m:
        lines.append(f"its own z tells the decoder {m[names.NLL_MIXTURE] - nll:.3f} nats/token more than a mixture of "
                     f"other blocks' ({key(names.NLL_MIXTURE)} - {key(names.NLL)})")
    lines.append(f"one other block's z costs it {m[names.NLL_OTHER_Z] - nll:.3f} (reliance on z: "
                 f"{key(names.NLL_OTHER_Z)} - {key(names.NLL)}); NLL given a prior sample {m[names.NLL_PRIOR]:.3f}")
    if names.AMORTISATION_GAP in m:
        lines.append(f"bound at the start (T=0) {m[names.BOUND_START]:.3f}: refinement gains "
                     f"{m[names.AMORTISATION_GAP]:.3f} (the amortisation gap)")
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


# -- command line ----------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ltm.train", description="Train one LTM or AR run, tracked in MLflow and resumable.",
        epilog="Run the same command again to resume an interrupted run or to skip a finished one. "
               "Several processes: torchrun --nproc-per-node N -m ltm.train ... "
               + names.exit_help("finished (or skipped)", "failed", "another process is running this run"))
    parser.add_argument("--preset", default="micro", help=f"run preset: {', '.join(RUN_PRESETS)} (default micro)")
    parser.add_argument("--config", help="a JSON run config (as logged in config.json) instead of a preset")
    add_run_options(parser, experiment_default="ltm")
    parser.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    parser.add_argument("--force", action="store_true", help="rerun even if this config already FINISHED")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    add_verify_option(parser, "start a wsd branch (train.schedule=wsd) from its trunk's")
    parser.add_argument("--tracking-patience", type=float, default=600.0, metavar="SECONDS",
                        help="how long training goes on while the tracking store does not answer (metrics are kept "
                             "and sent when it is back); after that the run checkpoints and exits 3 (default 600)")
    add_verbosity(parser)
    return parser


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The RunConfig named by --preset/--config, --data and --set."""
    cfg = RunConfig.from_dict(json.loads(Path(args.config).read_text())) if args.config else run_preset(args.preset)
    overrides = list(args.overrides)
    if args.data:
        overrides.insert(0, f"data.name={args.data}")
    return cfg.with_overrides(overrides)


def main(argv: list[str] | None = None) -> int:
    """Train one run from the command line; returns the exit status (`ltm.names.Exit`): bad options
    (the config, --data, --tracking-uri, --tracking-patience) are refused with Exit.USAGE."""
    args = build_parser().parse_args(argv)  # --help and a mistyped option answer before MLflow is imported
    from ltm.runlock import RunBusy
    from ltm.tracking import TrackingUnusable

    configure_logging(log_level(args))
    try:
        if args.tracking_patience <= 0:
            raise ConfigError(f"--tracking-patience must be > 0 seconds, got {args.tracking_patience}")
        cfg = config_from_args(args)
    except (ConfigError, OSError, ValueError) as err:  # a bad --config file too
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    try:
        result = run(cfg, tracking_uri=args.tracking_uri, experiment=args.experiment, runs_dir=args.runs_dir,
                     force=args.force, progress=not args.no_progress, device=args.device,
                     tracking_patience=args.tracking_patience, verify=not args.no_verify)
    except RunBusy as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.BUSY
    except (ConfigError, TrackingUnusable) as err:  # --data, --tracking-uri: refused by run's checks, nothing started
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    except (ValueError, FileNotFoundError, RuntimeError, OSError) as err:  # a TrackingError once the run exists too
        print(f"error: {err}", file=sys.stderr)
        return Exit.FAILED
    if int(os.environ.get("RANK", "0")) == 0:
        print(f"{result.status.value}: run {cfg.run_key()} (MLflow run {result.run_id})"
              + (f": {result.reason}" if result.reason else ""))
        for k, v in sorted(result.metrics.items()):
            print(f"  {k:24s} {v:.6g}")
        if names.VAL_NLL_OTHER_Z in result.metrics:
            print(bound_summary(result.metrics))
        if cfg.data.name == "synthetic" and result.metrics:
            print(corpus_optimum(cfg))
    return EXIT_OF[result.status]


if __name__ == "__main__":
    sys.exit(main())

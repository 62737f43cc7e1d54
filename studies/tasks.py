"""Evaluation tasks on checkpoints, run by the launcher as grid points of the evaluation studies.

A task point names a checkpoint (a path or the MLflow run id of a training run) or a training
config to train first (`ltm.train.run`: skipped when already FINISHED, resumed when interrupted),
and a task: `gsm8k`, `zero_shot` or `generation` (`studies.study.Gsm8kTask`, `ZeroShotTask`,
`GenerationTask`: typed and checked where a study declares them). Each point's evaluation is one MLflow run
(a child of the study's parent) tagged `ltm.role=eval`, `ltm.task` and `ltm.source_run_id`, with
the metrics at step 0 and its outputs (per-problem answers, samples) as artifacts. It runs on the
trial's GPU when it was given one (`trial_device`, tagged `device`), under the checkpoint's training
precision (bf16 autocast on CUDA by default), checked before its setup (`trial_device`). The point's key
(from the checkpoint's identity and the task) makes a finished evaluation skip when the study is
started again; an interrupted one (SIGTERM, SIGUSR2) is rerun from the start of the evaluation.
"""

from __future__ import annotations

import ast
import dataclasses
import hashlib
import json
import logging
import tempfile
import time
from pathlib import Path

import torch

from ltm.checkpoint import CheckpointError, CheckpointRef, load_model, resolve
from ltm.config import ModelConfig, RunConfig
from ltm.names import (ENTROPY, GEN_PPL, GENERATION, ROLE_EVAL, ROLE_TAG, SECONDS, SOURCE_RUN_TAG, TASK_TAG, Status,
                       gsm8k_metric, metric)
from ltm.signals import Interrupt, Stopped
from studies.messages import CheckpointSource, Point, Result, TrainSource, TrialContext
from studies.study import GenerationTask, Gsm8kTask, Task, ZeroShotTask

log = logging.getLogger(__name__)


# -- building the points -------------------------------------------------------------------------

def resolve_task(task: Task, tracking_uri: str, runs_dir: Path, verify: bool = True) -> Task:
    """The task with local paths made absolute, its data and reference found (the reference's sha256
    checked unless `verify` is False); raises ConfigError (DataError) on what would fail later."""
    from ltm.data import resolve_source
    from ltm.data.paths import expand

    if isinstance(task, Gsm8kTask):
        from ltm.gsm8k import load_problems

        data = Path(expand(task.data)).expanduser()
        task = dataclasses.replace(task, data=str(data.resolve())) if data.exists() else task
        load_problems(task.data, "test")
    elif isinstance(task, ZeroShotTask):
        corpora = [expand(c) for c in task.corpora]  # data:NAME as its path, so the corpus is labelled by its file
        task = dataclasses.replace(task, corpora=[str(Path(c).expanduser().resolve()) if Path(c).expanduser().exists()
                                                  else c for c in corpora])
        for corpus in task.corpora:
            resolve_source(corpus)
    elif isinstance(task, GenerationTask) and task.reference:
        task = dataclasses.replace(task, reference=resolve(str(task.reference), tracking_uri, runs_dir,
                                                                  verify).checkpoint)
    return task


def task_points(train_points: list[Point], task: Task, sources: list[CheckpointRef]) -> list[Point]:
    """One evaluation point per checkpoint source (`ltm.checkpoint.resolve`), or per training point
    when no source is given."""
    if sources:
        return [Point(key=evaluation_key(s.identity, task.to_dict()), config=s.config, task=task,
                      source=CheckpointSource(s.checkpoint, s.run_id),
                      label={"checkpoint": s.run_id or s.checkpoint}) for s in sources]
    return [Point(key=evaluation_key(p.key, task.to_dict()), config=p.config, task=task, source=TrainSource(p.key),
                  label=p.label) for p in train_points]


def evaluation_key(identity: str, task: dict) -> str:
    """An evaluation's run key: its checkpoint's identity (a training run key or "<file>:<size>") and task,
    as JSON (`Task.to_dict()`; `studies.rekey`: as logged, `logged_task`)."""
    blob = json.dumps([identity, task], sort_keys=True).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def task_params(task: Task) -> dict:
    """The task as its evaluation run's MLflow params: task.<argument>."""
    return {f"task.{k}": v for k, v in task.to_dict().items()}


def logged_task(params: dict[str, str]) -> dict:
    """The task as JSON from an evaluation run's params (`task_params`, logged as str(value)): literals
    read back, everything else a string. Not checked: a run may have logged a task of an older shape."""
    task = {}
    for name, text in params.items():
        if name.startswith("task."):
            try:
                task[name[5:]] = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                task[name[5:]] = text
    return task


# -- running one point ---------------------------------------------------------------------------

def run_task(point: Point, context: TrialContext) -> Result:
    """Train the point's checkpoint if needed, evaluate it, track the evaluation.

    Holds the evaluation's run lock throughout (raises RunBusy when another process holds it). A
    signal (SIGTERM, SIGUSR2, Ctrl-C) at any moment ends it KILLED; an evaluation has no state worth
    a checkpoint, so the next start reruns it.
    """
    from ltm.runlock import RunLock

    with Interrupt() as interrupt:
        try:
            with interrupt.stoppable():
                lock = RunLock(context.runs_dir, point.key, "evaluated")
        except Stopped as stop:
            return Result(Status.KILLED, None, f"interrupted by {stop} before the evaluation started")
        with lock:
            return _run_task_locked(point, context, interrupt)


def trial_device(model: ModelConfig | None = None) -> torch.device:
    """Where a trial evaluates: its GPU when it sees one, else the CPU, as `ltm.train` picks for its
    training (a trial sees the GPUs it was given: Ray and SLURM set CUDA_VISIBLE_DEVICES to them); given the
    model, checked as training checks it (`ltm.objective.check_window_compiler`: raises RuntimeError)."""
    from ltm.objective import check_window_compiler
    from ltm.processes import resolve_device

    device = resolve_device(None, 0, torch.cuda.is_available())
    if model is not None:
        log.info("evaluating on %s with %s attention", device, check_window_compiler(model, device))
    return device


def _run_task_locked(point: Point, context: TrialContext, interrupt: Interrupt) -> Result:
    from ltm.lifecycle import decide, open_run
    from ltm.objective import autocast_for
    from ltm.tracking import Tracker

    try:
        device = trial_device(RunConfig.from_dict(point.config).model)
    except RuntimeError as err:  # before anything of the evaluation (or its checkpoint's training) exists
        return Result(Status.FAILED, None, str(err))
    try:
        with interrupt.stoppable():  # nothing of the evaluation exists yet
            runs_dir = Path(context.runs_dir)
            tracker = Tracker(context.tracking_uri, context.experiment, artifact_root=runs_dir / "artifacts")
            decision = decide(tracker, point.key)  # a FINISHED evaluation is skipped, any other rerun in its run
            if decision.skipped:
                return Result(Status.SKIPPED, decision.run_id, metrics=decision.metrics)
            if isinstance(point.source, TrainSource):
                checkpoint, source_run, failed = _trained_checkpoint(point, context)
                if failed is not None:
                    return failed
            else:
                checkpoint, source_run = point.source.checkpoint, point.source.run_id
            model, cfg = load_model(checkpoint, device=str(device), verify=context.verify)
    except Stopped as stop:
        return Result(Status.KILLED, None, f"interrupted by {stop} before the evaluation run was created")
    except CheckpointError as err:  # refused (its sha256) or unreadable: nothing of the evaluation exists yet
        return Result(Status.FAILED, None, str(err))
    task = point.task

    def create() -> str:
        params = {**cfg.flat(), **task_params(task), "source.checkpoint": str(checkpoint)}
        tags = {**context.tags, ROLE_TAG: ROLE_EVAL, TASK_TAG: task.name, SOURCE_RUN_TAG: source_run or "",
                "model.kind": cfg.model.kind, "device": str(device)}
        name = f"{task.name}-{cfg.model.kind}-L{cfg.model.n_layers}-T{cfg.inference.steps}"
        return tracker.create_run(point.key, name, params, tags, context.parent_run_id)

    # signals wait while the evaluation's run is reopened (on this start's device) or created
    run_id = open_run(tracker, decision, {"device": str(device)}, create)
    started = time.time()
    try:
        # The checkpoint's training precision ("auto": bf16 autocast on CUDA, fp32 on a CPU).
        with interrupt.stoppable(), autocast_for(device, cfg.train.precision):
            metrics, artifacts = EVALUATORS[task.name](model, cfg, task, context.verify)
    except Stopped as stop:
        reason = f"interrupted by {stop}; start the study again to rerun this evaluation"
        tracker.finish(run_id, Status.KILLED, reason)
        return Result(Status.KILLED, run_id, reason)
    except Exception as err:
        tracker.finish(run_id, Status.FAILED, f"{type(err).__name__}: {err}")
        raise
    metrics[metric(task.name, SECONDS)] = time.time() - started
    tracker.log_metrics(run_id, metrics, step=0)
    with tempfile.TemporaryDirectory() as tmp:
        for name, content in artifacts.items():
            (Path(tmp) / name).write_text(content)
        tracker.client.log_artifacts(run_id, tmp)
    tracker.finish(run_id, Status.FINISHED)
    return Result(Status.FINISHED, run_id, metrics=metrics)


def _trained_checkpoint(point: Point, context: TrialContext) -> tuple[Path, str | None, Result | None]:
    """Train the point's model (skipped when FINISHED, resumed when interrupted): (its own checkpoint
    folder, its training run, None), or a Result to return when it did not finish or holds no
    checkpoint of its own."""
    from ltm.checkpoint import owner
    from ltm.train import run

    trained = run(RunConfig.from_dict(point.config), tracking_uri=context.tracking_uri,
                  experiment=context.experiment, runs_dir=context.runs_dir, parent_run_id=context.parent_run_id,
                  tags=context.tags, progress=False)
    if trained.status not in (Status.FINISHED, Status.SKIPPED):
        return trained.run_dir, trained.run_id, Result(trained.status, trained.run_id,
                                                       f"training: {trained.reason}")
    if owner(trained.run_dir) != trained.run_id:
        return trained.run_dir, trained.run_id, Result(
            Status.FAILED, trained.run_id, f"training run {trained.run_id} FINISHED but {trained.run_dir} holds no "
            "checkpoint of its own (removed, or never written); train it again with --force")
    return trained.run_dir, trained.run_id, None


# -- the evaluators: (model, run config, task) -> (metrics, artifacts {file name: text}) --------------

def _gsm8k(model, cfg, task: Gsm8kTask, verify: bool) -> tuple[dict, dict]:
    from ltm.data import load_tokenizer
    from ltm.gsm8k import evaluate_gsm8k, load_problems

    tok = load_tokenizer(cfg.data)
    test = load_problems(task.data, "test")[: task.problems]
    pool = load_problems(task.data, task.shots_from)
    inference = _inference(cfg, task)
    metrics, outputs = {}, {}
    for k in task.shots:
        def progress(done: int, total: int, k=k) -> None:
            if done % 10 == 0 or done == total:
                log.info("gsm8k %d-shot: %d/%d problems", k, done, total)

        values, records = evaluate_gsm8k(model, tok, inference, test, pool, shots=k, pass_k=task.pass_k,
                                         max_new_tokens=task.max_new_tokens, seed=int(task.seed), progress=progress)
        metrics.update({gsm8k_metric(k, name): v for name, v in values.items()})
        outputs[f"gsm8k_k{k}.json"] = json.dumps(records, indent=1)
    return metrics, outputs


def _zero_shot(model, cfg, task: ZeroShotTask, verify: bool) -> tuple[dict, dict]:
    from ltm.downstream import zero_shot

    cfg = _with_inference(cfg, task)
    metrics = {}
    for corpus in task.corpora:
        def progress(done: int, total: int, corpus=corpus) -> None:
            log.info("zero-shot %s: %d/%d blocks", corpus, done, total)

        metrics.update(zero_shot(model, cfg, corpus, max_blocks=task.max_blocks, iw_samples=int(task.iw_samples),
                                 seed=int(task.seed), progress=progress))
    return metrics, {"zero_shot.json": json.dumps(metrics, indent=1)}


def _generation(model, cfg, task: GenerationTask, verify: bool) -> tuple[dict, dict]:
    from ltm.data import load_blocks, load_tokenizer
    from ltm.downstream import (check_same_tokenizer, conditional_samples, generative_perplexity,
                                unconditional_samples, unigram_entropy)

    tok = load_tokenizer(cfg.data)
    seed, n, length, top_p = int(task.seed), task.samples, task.length, task.top_p
    log.info("generation: %d unconditional samples of %d tokens per prior temperature ...", n, length)
    sets = unconditional_samples(model, tok.bos_id, n=n, length=length, seed=seed,
                                 prior_temperatures=[float(s) for s in task.prior_temperatures], top_p=top_p)
    device = next(model.parameters()).device
    val = load_blocks(cfg.data, cfg.model.ctx, "validation")
    prefixes = val.batch(range(min(n, len(val))))[:, : task.prefix].to(device)
    log.info("generation: %d continuations of validation prefixes ...", len(prefixes))
    sets.append(conditional_samples(model, _inference(cfg, task), prefixes, length=length, seed=seed, top_p=top_p))
    reference = None
    if task.reference:
        reference, ref_cfg = load_model(task.reference, device=str(device), verify=verify)
        check_same_tokenizer(cfg, ref_cfg)
        reference.eval()
    metrics, text = {}, []
    for i, s in enumerate(sets, 1):
        log.info("generation: scoring %s (%d/%d)", s.name, i, len(sets))
        tokens = s.tokens.cpu()  # counted and decoded token by token
        metrics[metric(GENERATION, s.name, ENTROPY)] = unigram_entropy(tokens[:, s.prompt_length:])
        if reference is not None:
            metrics[metric(GENERATION, s.name, GEN_PPL)] = generative_perplexity(reference, ref_cfg.inference, s,
                                                                                 seed=seed)
        text.append(f"## {s.name}\n")
        for row in tokens:
            prompt, cont = tok.decode(row[: s.prompt_length]), tok.decode(row[s.prompt_length:])
            text.append(f"* [{prompt}] {cont}\n")
    return metrics, {"samples.md": "\n".join(text)}


def _inference(cfg, task: Task):
    return _with_inference(cfg, task).inference


def _with_inference(cfg, task: Task):
    """The checkpoint's config, with the task's inference steps when it sets them."""
    return cfg.with_overrides({"inference.steps": int(task.steps)}) if task.steps else cfg


EVALUATORS = {"gsm8k": _gsm8k, "zero_shot": _zero_shot, "generation": _generation}
"""Each task's evaluation of (model, its run config, the task, verify: check the sha256 of any other
checkpoint it reads, as generation's reference): (metrics, artifacts by file name)."""

"""Tracked runs to tidy pandas frames: one row per run, and metric histories (step = tokens seen).

Histories of FINISHED runs never change, so they are cached on disk (one parquet file per run)
and replotting reads no history from the tracking store twice. Replayed steps (a resumed run
logging a step again) are deduplicated: the last value logged for a step wins.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import urllib.parse
from pathlib import Path

import numpy as np
import pandas as pd
from mlflow.tracking import MlflowClient

from ltm import names
from ltm.files import atomic_file
from ltm.names import (AMORTISATION_GAP, FINAL, KL, KL_FLOOR, NLL, NLL_OTHER_Z, NLL_OTHER_Z_OLD, NLL_PRIOR,
                       PARENT_TAG, PPL_BOUND, PPL_REUSE, ROLE_EVAL, ROLE_STUDY, ROLE_TAG, RUN_KEY_TAG, SECONDS,
                       SOURCE_RUN_TAG, STUDY_TAG, TASK_TAG, VAL, Z_INFO_CAP, Z_INFO_LB, Z_INFO_LB_CI, Status, metric,
                       status_is, tag_is)

HISTORY_KEYS = (names.TOKENS, names.FLOPS, names.FLOPS_PAPER, names.TRAIN_LOSS, names.TRAIN_PPL_BOUND, names.VAL_NLL,
                names.VAL_KL, names.VAL_PPL_BOUND, names.VAL_PPL_IW, names.VAL_KL_FLOOR, names.VAL_NLL_OTHER_Z,
                names.VAL_Z_INFO_LB)
"""The metric histories the figures need."""

_PARAMS = {"model.kind": str, "model.n_layers": int, "model.d_model": int, "model.n_latents": int,
           "inference.steps": int, "train.tokens": int, "data.name": str, "seed": int,
           "n_params": int, "n_params_nonembedding": int, "inference.decoder_grad": str, "model.window": str,
           "inference.start": str, "inference.init_logvar": float, "inference.encoder_layers": int,
           "inference.lr_max": float, "inference.start_kl_warmup": float, "train.schedule": str}


FULL_CONTEXT = "None"
"""model.window of a full-context run as the analysis reads it: MLflow stores params as text, and the
window stays text so that pandas keeps a full-context run (None) apart from a run without the param (NaN)."""


_NOT_CONFIG = ("seed", "data.cache_dir", "train.compile", "model.vocab_size", "n_params", "n_params_nonembedding")
"""Params that are not the config a seed was trained with: the seed, what a run ignores, what is derived."""


def config_key(params: dict[str, str]) -> str:
    """A hash of a training run's params without its seed: runs of one key differ only in their training seed."""
    blob = json.dumps({k: v for k, v in params.items() if k not in _NOT_CONFIG}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


class NoRunsError(LookupError):
    """Nothing to analyse; the message says which study to run first, or what exists."""


def missing_store(tracking_uri: str) -> str | None:
    """Why `tracking_uri` names no store to read (a SQLite file or a folder store that does not exist), or
    None. The analysis only reads runs: opening a store that is not there would create an empty one (and
    its folder) at a mistyped path, and then report that it holds nothing."""
    if tracking_uri.startswith("sqlite:///"):
        path = Path(tracking_uri[len("sqlite:///"):])
    elif tracking_uri.startswith("file:"):
        path = Path(urllib.parse.unquote(urllib.parse.urlsplit(tracking_uri).path))
    else:
        return None  # a server: it answers for itself
    if path.exists():
        return None
    return (f"no tracking store at {path}: pass the --runs-dir (or --tracking-uri) your runs were tracked in, or "
            "run a study there first, e.g. `python studies/inference_scaling.py --preset smoke`; nothing was created")


def run_first(experiment: str) -> str:
    """The command that puts training runs into `experiment`: a study's own script (a study's experiment is
    named after it by default), `python -m ltm.train` for its default experiment, else a study told to use it."""
    from ltm.train import build_parser

    if experiment == build_parser().get_default("experiment"):
        return "`python -m ltm.train --preset smoke`"
    script = Path(__file__).resolve().parents[1] / "studies" / f"{experiment}.py"
    if experiment.isidentifier() and script.is_file():
        return f"`python studies/{experiment}.py --preset smoke` (its --help lists what it needs)"
    return f"`python studies/inference_scaling.py --preset smoke --experiment {experiment}`"


@dataclasses.dataclass(frozen=True)
class StudyRun:
    """One invocation of a study: its parent run (the training runs are its children)."""

    name: str | None  # None: a run that is not a study's parent
    experiment: str
    parent_run_id: str
    time: int  # ms: when it last started or ended (a study started again reuses its parent run)

    def __str__(self) -> str:
        when = datetime.datetime.fromtimestamp(self.time / 1000).strftime("%Y-%m-%d %H:%M")
        return f"{self.name or 'run'} (experiment {self.experiment!r}, {when})"


def study_runs(tracking_uri: str) -> list[StudyRun]:
    """Every study parent run in the store, most recent first."""
    client = MlflowClient(tracking_uri)
    experiments = {e.experiment_id: e.name for e in client.search_experiments()}
    runs = client.search_runs(list(experiments), filter_string=f"tags.`{ROLE_TAG}` = '{ROLE_STUDY}'",
                              max_results=50_000)
    return sorted((_study_run(r, experiments[r.info.experiment_id]) for r in runs), key=lambda s: s.time, reverse=True)


def _study_run(run, experiment: str) -> StudyRun:
    return StudyRun(run.data.tags.get(STUDY_TAG), experiment, run.info.run_id,
                    max(run.info.start_time or 0, run.info.end_time or 0))


def find_study(tracking_uri: str, name: str | None = None, experiment: str | None = None) -> StudyRun:
    """The most recent invocation of study `name` (of any study if None), in `experiment` if given."""
    studies = study_runs(tracking_uri)
    for study in studies:
        if name in (None, study.name) and experiment in (None, study.experiment):
            return study
    what = "study" + (f" {name!r}" if name else "") + (f" in experiment {experiment!r}" if experiment else "")
    if not studies:
        raise NoRunsError(f"no {what} in {tracking_uri} (experiments: {', '.join(experiment_names(tracking_uri))}); "
                          "run a study first, e.g. `python studies/inference_scaling.py --preset smoke`, "
                          "or choose runs with --experiment NAME")
    latest: dict[tuple, StudyRun] = {}
    for study in studies:  # most recent first: keep each (study, experiment)'s latest invocation
        latest.setdefault((study.name, study.experiment), study)
    raise NoRunsError(f"no {what} in {tracking_uri}; studies, latest first: {', '.join(map(str, latest.values()))}")


def parent_run(tracking_uri: str, run_id: str) -> StudyRun:
    """The run `run_id` as a study invocation (its experiment, and its study if it is one's parent)."""
    from mlflow.exceptions import MlflowException

    client = MlflowClient(tracking_uri)
    try:
        run = client.get_run(run_id)
    except MlflowException:
        raise NoRunsError(f"no run {run_id!r} in {tracking_uri}") from None
    return _study_run(run, client.get_experiment(run.info.experiment_id).name)


def experiment_names(tracking_uri: str) -> list[str]:
    return sorted(e.name for e in MlflowClient(tracking_uri).search_experiments())


def load_runs(tracking_uri: str, experiment: str, *, parent_run_id: str | None = None,
              include_unfinished: bool = False) -> pd.DataFrame:
    """One row per training run of an experiment (or of one study's parent run): params, final metrics, and
    `config_key` (equal for runs that differ only in their seed)."""
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        raise NoRunsError(f"no experiment {experiment!r} in {tracking_uri} (experiments: "
                          f"{', '.join(experiment_names(tracking_uri))}); run a study first, e.g. "
                          f"{run_first(experiment)}")
    query = f"tags.`{RUN_KEY_TAG}` != ''"
    if parent_run_id:
        query += f" and {tag_is(PARENT_TAG, parent_run_id)}"
    runs = client.search_runs([exp.experiment_id], filter_string=query, max_results=50_000)
    rows = []
    for r in runs:
        if r.info.status != Status.FINISHED and not include_unfinished or r.data.tags.get(ROLE_TAG) == ROLE_EVAL:
            continue
        row = {"run_id": r.info.run_id, "status": r.info.status, "run_key": r.data.tags.get(RUN_KEY_TAG),
               "config_key": config_key(r.data.params), "end_time": r.info.end_time}
        for key, kind in _PARAMS.items():
            if key in r.data.params:
                row[key] = kind(r.data.params[key])
        row.update({metric(FINAL, k): v for k, v in r.data.metrics.items()})
        rows.append(row)
    if not rows:
        where = f"parent run {parent_run_id}" if parent_run_id else f"experiment {experiment!r}"
        raise NoRunsError(f"{where} has no finished training runs; run a study first, e.g. {run_first(experiment)}")
    runs = pd.DataFrame(rows)
    if "inference.start" not in runs:  # runs from before the option: the paper's fixed start
        runs["inference.start"] = "fixed"
    runs["inference.start"] = runs["inference.start"].fillna("fixed")
    return decompose(runs)


def decompose(runs: pd.DataFrame) -> pd.DataFrame:
    """`runs` with each final bound split into what it is made of, in nats per token:

    nll (given z), kl, kl_floor (the KL if z carried nothing), kl_above_floor, nll_other_z (given
    another sequence's z; `val/nll_swap` in runs before the rename), z_reliance = nll_other_z - nll
    (how much a wrong z misleads the decoder), z_info_lb with z_info_lb_ci and z_info_cap (a lower
    bound on what z carries, never above the KL on average: `ltm.evaluate.info_lower_bound`; NaN for
    runs before 2026-12-07, whose retired nll_mixture is not read as information), nll_prior,
    amortisation_gap (trained starts), and
    reuse_gap = log ppl_bound - log ppl_reuse (how optimistic the released code's scoring is).
    AR runs get nll and kl = 0; the LTM-only columns stay NaN for them."""
    out = runs.copy()

    def final(measure: str) -> pd.Series:
        return out.get(metric(FINAL, VAL, measure), pd.Series(np.nan, index=out.index))

    for measure in (NLL, KL, KL_FLOOR, Z_INFO_LB, Z_INFO_LB_CI, Z_INFO_CAP, NLL_PRIOR, AMORTISATION_GAP):
        out[measure] = final(measure)
    out[NLL_OTHER_Z] = final(NLL_OTHER_Z).fillna(final(NLL_OTHER_Z_OLD))
    out["kl_above_floor"] = out[KL] - out[KL_FLOOR]
    out["z_reliance"] = out[NLL_OTHER_Z] - out[NLL]
    out["reuse_gap"] = np.log(final(PPL_BOUND)) - np.log(final(PPL_REUSE))
    return out


def load_evaluations(tracking_uri: str, experiment: str, *, parent_run_id: str | None = None) -> pd.DataFrame:
    """One row per FINISHED evaluation run (`studies.tasks`): task, evaluated model, final metrics.

    Empty (no rows) when the experiment has none.
    """
    client = MlflowClient(tracking_uri)
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return pd.DataFrame()
    query = f"{tag_is(ROLE_TAG, ROLE_EVAL)} and {status_is(Status.FINISHED)}"
    if parent_run_id:
        query += f" and {tag_is(PARENT_TAG, parent_run_id)}"
    rows = []
    for r in client.search_runs([exp.experiment_id], filter_string=query, max_results=50_000):
        row = {"run_id": r.info.run_id, "task": r.data.tags.get(TASK_TAG),
               "source_run_id": r.data.tags.get(SOURCE_RUN_TAG, ""),
               "checkpoint": r.data.params.get("source.checkpoint", "")}
        for key, kind in _PARAMS.items():
            if key in r.data.params:
                row[key] = kind(r.data.params[key])
        row.update({k: v for k, v in r.data.metrics.items() if not k.endswith("/" + SECONDS)})
        rows.append(row)
    return pd.DataFrame(rows)


def load_histories(tracking_uri: str, runs: pd.DataFrame, *, keys=HISTORY_KEYS,
                   cache_dir: str | Path | None = None) -> pd.DataFrame:
    """Wide frame, one row per (run_id, step): the metrics in `keys` (NaN where not logged at that step)."""
    client = MlflowClient(tracking_uri)
    cache = Path(cache_dir) if cache_dir else None
    frames = []
    for run in runs.itertuples():
        path = cache / f"{run.run_id}-{run.end_time}.parquet" if cache else None
        if path is not None and path.exists():
            frames.append(pd.read_parquet(path))
            continue
        points = [(run.run_id, key, m.step, m.timestamp, m.value)
                  for key in keys for m in client.get_metric_history(run.run_id, key)]
        tidy = pd.DataFrame(points, columns=["run_id", "key", "step", "timestamp", "value"])
        frame = dedupe(tidy).pivot(index=["run_id", "step"], columns="key", values="value").reset_index()
        frame.columns.name = None
        if path is not None and run.status == Status.FINISHED:
            path.parent.mkdir(parents=True, exist_ok=True)
            with atomic_file(path) as f:  # a reader never finds half a cache file
                frame.to_parquet(f)
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=["run_id", "step"])


def dedupe(tidy: pd.DataFrame) -> pd.DataFrame:
    """Keep the last logged value of each (run_id, key, step)."""
    return tidy.sort_values("timestamp", kind="stable").drop_duplicates(["run_id", "key", "step"], keep="last")

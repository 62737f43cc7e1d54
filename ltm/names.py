"""Every name that crosses a module boundary: MLflow tags, metric keys, and the exit-status table.

Training, evaluation, the studies and the analysis all import these, so a renamed metric or tag
is renamed everywhere at once.
"""

from __future__ import annotations

import enum

# -- MLflow tags ----------------------------------------------------------------------------------
RUN_KEY_TAG = "ltm.run_key"
"""The run's identity (hash of its config; for evaluations, of the checkpoint and the task)."""
REASON_TAG = "ltm.status_reason"
"""Why a run ended FAILED or KILLED, and how to go on."""
ROLE_TAG = "ltm.role"
"""`study` for a study's parent run, `eval` for an evaluation; absent for training runs."""
ROLE_STUDY, ROLE_EVAL = "study", "eval"
STUDY_TAG = "ltm.study"
STUDY_KEY_TAG = "ltm.study_key"
"""The identity of one study invocation (name, preset, run keys of its grid)."""
PRESET_TAG = "ltm.preset"
BACKEND_TAG = "ltm.backend"
POINTS_TAG = "ltm.points"
COUNT_TAG_PREFIX = "ltm.count."
"""ltm.count.<STATUS>: how many points of a study ended so."""
TASK_TAG = "ltm.task"
SOURCE_RUN_TAG = "ltm.source_run_id"
"""The training run an evaluation scored."""
PARENT_TAG = "mlflow.parentRunId"
NOTE_TAG = "mlflow.note.content"
"""An MLflow experiment's (or run's) description, shown in the UI."""
PREVIOUS_KEY_TAG = "ltm.previous_run_key"
"""The run key a run had before `python -m studies.rekey` gave it the current one."""
PREVIOUS_STUDY_KEY_TAG = "ltm.previous_study_key"
"""A study parent run's ltm.study_key before `studies.rekey` re-keyed its points."""
ANALYSIS_TAG = "ltm.analysis"
"""On a run that holds an analysis's figures and tables: which analysis (`plot_scaling`)."""
N_RUNS_TAG = "ltm.n_runs"
"""How many training runs that analysis read."""
TRUNK_RUN_TAG = "ltm.trunk_run_id"
"""On a wsd branch: the MLflow run of the constant-rate trunk it started from (`ltm.config.RunConfig.trunk`)."""
TRUNK_KEY_TAG = "ltm.trunk_run_key"
"""On a wsd branch: its trunk's run key."""
BRANCH_POINT_TAG = "ltm.branch_point"
"""On a wsd branch: the tokens at which it left its trunk (the trunk's share of its compute)."""


def tag_is(tag: str, value: str) -> str:
    """An MLflow search filter: runs whose tag `tag` is `value`."""
    return f"tags.`{tag}` = '{value}'"


# -- metrics (step = tokens seen) -------------------------------------------------------------------
def metric(prefix: str, *parts: object) -> str:
    """A metric key: its prefix and parts joined by "/" (`metric(VAL, NLL)` is "val/nll")."""
    return "/".join((prefix, *map(str, parts)))


TOKENS = "tokens"
"""Tokens the model has trained on (a branch's count its trunk's: the budget D of a scaling fit)."""
FLOPS = "flops"
FLOPS_PAPER = "flops_paper"
"""Training FLOPs this run spent itself: a wsd branch's leave out its trunk's (BRANCH_POINT_TAG x flops_per_token)."""
TOKENS_PER_S = "tokens_per_s"
MFU = "mfu"
TRAIN = "train"
TRAIN_LOSS = metric(TRAIN, "loss")
TRAIN_PPL_BOUND = metric(TRAIN, "ppl_bound")
TRAIN_LR = metric(TRAIN, "lr")
BOUND = "bound"
"""The headline number, in nats per token: an LTM's negative ELBO (NLL given z + KL), an AR's exact NLL."""
TRAIN_BOUND = metric(TRAIN, BOUND)
N_PARAMS, N_PARAMS_NONEMBEDDING = "n_params", "n_params_nonembedding"
FLOPS_PER_TOKEN = "flops_per_token"
"""A run's size, logged as metrics (step 0) as well as params, so the UI's runs table can show them as columns;
FLOPS_PER_TOKEN is the exact training FLOPs per token (`ltm.flops`)."""

# What `ltm.evaluate.evaluate_bounds` measures, under a prefix: VAL during training, ZERO_SHOT's per corpus.
NLL, KL, PPL_BOUND, PPL_BOUND_SEQMEAN = "nll", "kl", "ppl_bound", "ppl_bound_seqmean"
PPL_REUSE, PPL_IW, KL_FLOOR, NLL_PRIOR = "ppl_reuse", "ppl_iw", "kl_floor", "nll_prior"
KL_ABOVE_FLOOR = "kl_above_floor"
"""KL - KL_FLOOR: what the posterior spends beyond the floor its start leaves."""
NLL_OTHER_Z = "nll_other_z"
"""Named nll_swap before 2026-12: old runs carry that name (analysis.runs reads both)."""
NLL_OTHER_Z_OLD = "nll_swap"
NLL_MIXTURE = "nll_mixture"
"""Retired 2026-12-07 (runs before then carry it): the NLL under a mixture of other blocks' samples. Its
difference from NLL, once read as information, is biased upwards and exceeded the KL; see Z_INFO_LB."""
Z_INFO_LB, Z_INFO_LB_CI, Z_INFO_CAP = "z_info_lb", "z_info_lb_ci", "z_info_cap"
"""What z carries, nats/token: a contrastive lower bound on I(x; z) that never exceeds the KL on average
(`ltm.evaluate.info_lower_bound`); its 95 % half-width over blocks; log K per block, the most it can read."""
BOUND_START, AMORTISATION_GAP = "bound_start", "amortisation_gap"
IW_AT = "ppl_iw_k"
"""ppl_iw_k<K>: the IW perplexity at K samples, from `python -m ltm.rescore` (does it still move with K?)."""
BLOCKS = "blocks"
"""How many blocks a zero-shot corpus's bounds were measured on."""
VAL = "val"
"""Prefix of the validation metrics during training."""
VAL_NLL, VAL_KL, VAL_PPL_BOUND, VAL_PPL_IW = (metric(VAL, n) for n in (NLL, KL, PPL_BOUND, PPL_IW))
VAL_PPL_REUSE = metric(VAL, PPL_REUSE)
VAL_KL_FLOOR, VAL_NLL_PRIOR, VAL_NLL_OTHER_Z = (metric(VAL, n) for n in (KL_FLOOR, NLL_PRIOR, NLL_OTHER_Z))
VAL_NLL_MIXTURE, VAL_BOUND_START = metric(VAL, NLL_MIXTURE), metric(VAL, BOUND_START)
VAL_Z_INFO_LB, VAL_Z_INFO_LB_CI, VAL_Z_INFO_CAP = (metric(VAL, n) for n in (Z_INFO_LB, Z_INFO_LB_CI, Z_INFO_CAP))
VAL_AMORTISATION_GAP = metric(VAL, AMORTISATION_GAP)
VAL_BOUND, VAL_KL_ABOVE_FLOOR = metric(VAL, BOUND), metric(VAL, KL_ABOVE_FLOOR)
EVAL_SECONDS = metric("eval", "seconds")
"""Wall-clock seconds of one evaluation during training (what evaluating costs), logged with its val/ metrics."""

# The evaluation tasks' metrics (studies/tasks.py), step 0 of an evaluation run.
SECONDS = "seconds"
"""<task>/seconds: how long the task's evaluation took."""
ZERO_SHOT = "zeroshot"
"""zeroshot/<corpus>/<measure>: `evaluate_bounds`'s measures on another corpus (ltm.downstream)."""
GSM8K = "gsm8k"
"""gsm8k/k<shots>/<measure>: accuracy and friends of k-shot prompting (ltm.gsm8k)."""
GENERATION = "gen"
"""gen/<sample set>/<measure>: ENTROPY and GEN_PPL of generated samples (ltm.downstream)."""
ENTROPY, GEN_PPL = "entropy", "gen_ppl"
FINAL = "final"
"""Prefix of a run's last logged value of each metric in the analysis tables (final/val/ppl_bound)."""


def iw_metric(prefix: str, k: int) -> str:
    """<prefix>/ppl_iw_k<K>, e.g. val/ppl_iw_k512: the IW perplexity at K importance samples."""
    return metric(prefix, f"{IW_AT}{k}")


def gsm8k_metric(shots: int, measure: str) -> str:
    """gsm8k/k<shots>/<measure>, e.g. gsm8k/k8/accuracy."""
    return metric(GSM8K, f"k{shots}", measure)


# -- outcomes -----------------------------------------------------------------------------------------
class Status(str, enum.Enum):
    """How a run, an evaluation or a grid point ended."""

    FINISHED = "FINISHED"
    SKIPPED = "SKIPPED"
    """Already FINISHED before: nothing was done."""
    FAILED = "FAILED"
    KILLED = "KILLED"
    """Interrupted, checkpointed: starting it again resumes it."""
    BUSY = "BUSY"
    """Another live process holds the run's lock."""
    ERROR = "ERROR"
    """An exception before or outside the run (a launcher retries it)."""
    RUNNING = "RUNNING"
    """An MLflow run still open (or left open by a process that died); never how a point ended."""
    MISSING = "MISSING"
    """A study's point with no MLflow run (never started, or its run was deleted): in its summary only."""


class Exit(enum.IntEnum):
    """The exit status of every command of the suite (`ltm.train`, the studies, the worker, the analysis)."""

    OK = 0
    FAILED = 1
    USAGE = 2
    """Bad options: nothing was started."""
    INTERRUPTED = 3
    """Start the same command again to resume."""
    BUSY = 4


EXIT_OF = {Status.FINISHED: Exit.OK, Status.SKIPPED: Exit.OK, Status.FAILED: Exit.FAILED, Status.ERROR: Exit.FAILED,
           Status.KILLED: Exit.INTERRUPTED, Status.BUSY: Exit.BUSY}


def status_is(status: Status) -> str:
    """An MLflow search filter: runs whose status is `status`."""
    return f"attributes.status = '{status.value}'"


def exit_help(ok: str, failed: str, busy: str) -> str:
    """The exit-status sentence of a command's --help, from `Exit`: what 0, 1 and 4 mean for it."""
    meaning = {Exit.OK: ok, Exit.FAILED: failed, Exit.USAGE: "bad options (nothing started)",
               Exit.INTERRUPTED: "interrupted (the same command resumes)", Exit.BUSY: busy}
    return "Exit status: " + ", ".join(f"{int(code)} {text}" for code, text in meaning.items()) + "."

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

# -- metrics (step = tokens seen) -------------------------------------------------------------------
TOKENS = "tokens"
FLOPS = "flops"
FLOPS_PAPER = "flops_paper"
TOKENS_PER_S = "tokens_per_s"
MFU = "mfu"
TRAIN_LOSS = "train/loss"
TRAIN_PPL_BOUND = "train/ppl_bound"
TRAIN_LR = "train/lr"
VAL = "val"
"""Prefix of the validation metrics: <prefix>/nll, /kl, /ppl_bound, /ppl_iw, ... (ltm.evaluate)."""
VAL_NLL = "val/nll"
VAL_KL = "val/kl"
VAL_PPL_BOUND = "val/ppl_bound"
VAL_PPL_IW = "val/ppl_iw"
VAL_KL_FLOOR = "val/kl_floor"
VAL_NLL_OTHER_Z = "val/nll_other_z"
"""Named val/nll_swap before 2026-12: old runs carry that name (analysis.runs reads both)."""
VAL_NLL_MIXTURE = "val/nll_mixture"
VAL_NLL_PRIOR = "val/nll_prior"
VAL_BOUND_START = "val/bound_start"
VAL_AMORTISATION_GAP = "val/amortisation_gap"
EVAL_SECONDS = "eval/seconds"
"""Wall-clock seconds of one evaluation during training (what evaluating costs), logged with its val/ metrics."""


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

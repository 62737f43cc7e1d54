"""Inference cost: where should a posterior start, and what does each start's bound cost?

The paper's loop starts every posterior at logvar -5, and at small T the bound is mostly the KL
floor that start leaves (docs/RESULTS.md). This study puts the other starts (`inference.start`,
`inference.init_logvar`) beside it on the micro-rf corpus, every run 600k tokens as in the
inference-scaling study: the paper's loop at T = 4..64; a fixed start at the prior's log-variance
(logvar 0) at T = 1, 4, 16, 64; a learned start (from logvar -5 and from 0); a semi-amortised encoder at
T = 0 (purely amortised), 1 and 4, with a gentler inner learning rate, and with its KL annealed; the
same-window and full-context ARs, and the same-window AR with the best start's training FLOPs. The analysis
draws each bound against training FLOPs and against inference FLOPs per evaluated token, with the
receptive-field optimum (the same-window AR's ceiling) as a line:

    python studies/inference_cost.py                          # micro: 19 runs, one seed each
    python studies/inference_cost.py --preset verdict --seeds 0,1,2   # the verdict comparisons, 3 seeds
    python analysis/plot_scaling.py --experiment inference_cost   # runs/figures/inference_cost/
    python studies/inference_cost.py --preset smoke           # about a minute, for tests
    python studies/inference_cost.py --preset paper --cluster slurm --profile gpu

The `verdict` preset holds the points whose comparisons carry a verdict (the lowest bound, the
logvar-0 start at T = 64, and the best start at T <= 4, the encoder at T = 0 with its KL annealed,
against the same-window AR at equal tokens and at equal training FLOPs; the best start at T = 4
against the paper's); run with `--seeds 0,1,2` (seed 0 is shared with the micro preset and skipped), so
that `analysis/compare.py A0,A1,A2 B0,B1,B2` gives an interval over training seeds as well as over
validation blocks.
"""

import dataclasses
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402
exit_on_signal(__name__)  # first: a signal while torch and Ray load exits 3 with a message
from ltm.config import run_preset  # noqa: E402
from ltm.flops import flops_per_token  # noqa: E402
from studies.launcher import main  # noqa: E402
from studies.study import Preset, Study  # noqa: E402

TOKENS = 600_000
BUDGET = {"train.tokens": TOKENS, "train.eval_every": 150_000, "train.checkpoint_every": 150_000}
PAPER = {"inference.start": "fixed", "inference.init_logvar": -5.0}
PRIOR = {"inference.start": "fixed", "inference.init_logvar": 0.0}
LEARNED = {"inference.start": "learned"}
ENCODER = {"inference.start": "encoder"}
GENTLE = {"inference.lr_max": 0.05, "inference.lr_min": 0.005}
"""An inner learning rate for a start that is already near its posterior: the paper's 0.34 moves every
coordinate by about 0.34 in the first step (AdamW), more than a sharp posterior's width."""
AR = {"model.kind": "ar", "inference.steps": 0}

WARMUP = {"inference.start_kl_warmup": 0.5}
"""The encoder's KL weight annealed from 0 to 1 over the first half of training: without it the encoder
collapses to the prior (KL 0) and its z carries nothing."""

BEST = {**ENCODER, **WARMUP, "inference.steps": 0}
"""The start whose comparisons carry a verdict (docs/RESULTS.md, "Where should a posterior start"): the
lowest bound at T <= 4 in the exploration."""
BEST_T4 = {**ENCODER, **GENTLE, **WARMUP, "inference.steps": 4}
"""The best start at T = 4, for the comparison with the paper's start at equal T."""


def _matched_tokens(point: dict, tokens: int) -> int:
    """Training tokens for which the same-window AR spends the exact training FLOPs of `point` at `tokens`."""
    cfg = run_preset("micro-rf").with_overrides({k: v for k, v in point.items()})
    inf = cfg.inference
    ltm = flops_per_token(cfg.model, inf.steps, start=inf.start, encoder_layers=inf.encoder_layers)
    ar = flops_per_token(dataclasses.replace(cfg.model, kind="ar"), 0)
    return int(round(tokens * ltm / ar, -5))


MATCHED = _matched_tokens(BEST, TOKENS)
AR_MATCHED = {**AR, "model.window": 8, "train.tokens": MATCHED, "train.eval_every": MATCHED // 4,
              "train.checkpoint_every": MATCHED // 4, "data.synthetic_tokens": max(2_000_000, MATCHED + 1_000_000)}

# Most expensive first, so the two CPUs stay busy to the end (a trial's cost grows with T).
MICRO = ([{**BUDGET, **PAPER, "inference.steps": t} for t in (64, 32, 16)]
         + [{**BUDGET, **PRIOR, "inference.steps": 64}]
         + [{**BUDGET, **PRIOR, "inference.steps": 16}, AR_MATCHED]
         + [{**BUDGET, **PAPER, "inference.steps": 4}]
         + [{**BUDGET, **PRIOR, "inference.steps": t} for t in (4, 1)]
         + [{**BUDGET, **LEARNED, "inference.steps": 4}, {**BUDGET, **LEARNED, "inference.init_logvar": 0.0,
                                                          "inference.steps": 4}]
         + [{**BUDGET, **ENCODER, "inference.steps": t} for t in (4, 1, 0)]
         + [{**BUDGET, **ENCODER, **GENTLE, "inference.steps": 4}, {**BUDGET, **BEST_T4}, {**BUDGET, **BEST}]
         + [{**BUDGET, **AR, "model.window": w} for w in (8, None)])

VERDICT = [{**BUDGET, **PRIOR, "inference.steps": 64}, {**BUDGET, **BEST}, {**BUDGET, **BEST_T4},
           {**BUDGET, **PAPER, "inference.steps": 4}, {**BUDGET, **AR, "model.window": 8}, AR_MATCHED]
"""The lowest bound of the micro preset (the logvar-0 start at T=64), the best start at T <= 4 (and at
T = 4 against the paper's), the same-window AR at equal tokens and at the best T <= 4 start's FLOPs."""

STUDY = Study(
    name="inference_cost",
    description="Posterior starts (fixed at logvar -5 or 0, learned, encoder) against the bound and its FLOPs.",
    presets={
        "smoke": Preset("smoke", [{"inference.steps": 2, **PAPER}, {"inference.steps": 2, **PRIOR},
                                  {"inference.steps": 1, **LEARNED}, {"inference.steps": 0, **ENCODER},
                                  {"model.kind": "ar", "inference.steps": 0}],
                        description="5 tiny runs: each start and the AR"),
        "micro": Preset("micro-rf", MICRO, description="micro-rf, 600k tokens: paper loop T=4..64, logvar-0 start "
                                                    "T=1..16, learned, encoder T=0..4, ARs"),
        "verdict": Preset("micro-rf", VERDICT, description="the verdict comparisons, for --seeds 0,1,2: logvar-0 start "
                                                        "T=64, best start (T=0, T=4), paper T=4, same-window AR"),
        "paper": Preset("ltm-s", [{"recipe": "ltm-m", "inference.steps": t, **start}
                                  for start in (PAPER, PRIOR, {**ENCODER, **GENTLE, **WARMUP}) for t in (4, 16, 64)]
                        + [{"recipe": "ltm-m", **BEST}, {"recipe": "ltm-m", **AR}],
                        description="LTM-M on OpenWebText: the paper's start, the logvar-0 start and the encoder at "
                                    "T=4, 16, 64, and the AR (GPUs)", cpus=8, gpus=1, profile="gpu"),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))

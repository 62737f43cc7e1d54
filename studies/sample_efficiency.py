"""Sample efficiency: LTMs at several T against the AR baseline over model sizes and token budgets.

Each (model, size, budget) is a separate run with its own learning-rate schedule, as a fit of
L(N, D) requires; every run logs its whole curve (eval_every = budget / 4), with `tokens`,
`flops` and `flops_paper` at each point, so token and FLOP efficiency come from the same runs.

The micro preset (the receptive-field-limited regime of docs/RESULTS.md) trains one run per model
to 1M tokens with 8 points on its curve: LTM at T = 16, 32, 64, the AR of the same window and the
full-context AR, plus a compute-matched AR of the same window trained for about the FLOPs of the
LTM at T = 32, so the two can be compared at equal training compute as well as at equal tokens.

    python studies/sample_efficiency.py                      # micro: this machine
    python studies/sample_efficiency.py --preset smoke       # about a minute, for tests
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

MODELS = {"ar": {"model.kind": "ar", "inference.steps": 0}}  # the baseline: the same decoder, no latents


def points(recipes: list[str], steps: list[int], budgets: list[int]) -> list[dict]:
    """AR and LTM-at-each-T, for every model size (run recipe) and token budget; curves at 4 points per run."""
    models = [MODELS["ar"]] + [{"model.kind": "ltm", "inference.steps": t} for t in steps]
    return [{"recipe": recipe, **model, "train.tokens": d, "train.eval_every": d // 4, "train.checkpoint_every": d // 4}
            for recipe in recipes for model in models for d in budgets]


def _compute_matched(tokens: int, steps: int) -> int:
    """Training tokens for which the same-window AR spends the exact FLOPs of a micro-rf LTM at
    `steps` trained on `tokens` (21.1x the tokens at T=32)."""
    model = run_preset("micro-rf").model
    ratio = flops_per_token(model, steps) / flops_per_token(dataclasses.replace(model, kind="ar"), 0)
    return int(round(tokens * ratio, -5))


MICRO_TOKENS = 1_000_000
MICRO_MATCHED = _compute_matched(MICRO_TOKENS, 32)


def curve(tokens: int, points: int = 8) -> dict:
    return {"train.tokens": tokens, "train.eval_every": tokens // points, "train.checkpoint_every": tokens // points}


# Most expensive first, so the two CPUs stay busy to the end.
MICRO = ([{**curve(MICRO_TOKENS), "model.kind": "ltm", "inference.steps": t} for t in (64, 32)]
         + [{**curve(MICRO_MATCHED), **MODELS["ar"], "model.window": 8,
             "data.synthetic_tokens": MICRO_MATCHED + 1_000_000}]
         + [{**curve(MICRO_TOKENS), "model.kind": "ltm", "inference.steps": 16}]
         + [{**curve(MICRO_TOKENS), **MODELS["ar"], "model.window": w} for w in (8, None)])

STUDY = Study(
    name="sample_efficiency",
    description="LTM (several T) against the AR baseline over model sizes and training-token budgets.",
    presets={
        "smoke": Preset("smoke", points(["smoke"], [2], [8_192, 16_384]), description="4 tiny runs"),
        "micro": Preset("micro-rf", MICRO, description="micro-rf: LTM T in 16,32,64, AR same window and full "
                                                    "context to 1M tokens, a compute-matched AR (2 CPUs: 26 min)"),
        "paper": Preset("ltm-s", points(["ltm-s", "ltm-m", "ltm-l"], [16, 64], [750_000_000, 1_500_000_000,
                                                                                3_000_000_000]),
                        description="AR and LTM T in 16,64; LTM-S/M/L; 0.75B-3B OpenWebText tokens (GPUs)",
                        cpus=8, gpus=1, profile="gpu"),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))

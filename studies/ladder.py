"""The model ladder: sizes x token budgets per arm, each budget a warmup-stable-decay branch of one trunk
per (size, arm, seed), for fits of L(N, D) that predict a held-out rung (issue 27).

Each trunk trains at the constant rate; a branch for budget D leaves it at (1 - f) D (f =
train.decay_fraction, 0.2) and decays to D. The study runs each trunk in segments, one per branch point
in ascending order, and each branch as soon as its segment is done (`studies.points.with_trunks`,
`studies.order`): 4 budgets at 5, 10, 20, 40 tokens per parameter cost 0.8 x 40 + 0.2 x 75 = 47 units of
N tokens instead of 75 (1.6x less; the dry run prints it). A rerun skips finished branches and the
segments no unfinished branch needs; a stopped ladder resumes its runs from their checkpoints.

Sizes: widths at a fixed depth, window and head width (16), so that the receptive field, and with it the
corpus's optimum for a model that sees it, is the same on every rung (micro-rf: 2 layers x window 8 = 15
tokens; the optima within the receptive field and with the whole block: docs/RESULTS.md). Budgets are
tokens per non-embedding parameter of the AR at that width, the same tokens for every arm of a size, so the
arms compare at equal data.

Arms: the AR of the same window (its asymptote is known: the receptive-field optimum); the LTM with the
fixed start at logvar 0 and T = 4; the full-context AR, the reference that shows the corpus's plan is
learnable. Why that start: docs/RESULTS.md section 7.4 finds it the start that keeps the most information
in its latents at a usable bound (info 0.107 nats/token at T = 4, 0.060 at T = 16; the paper's logvar -5
start is its own KL floor at small T, the encoder's z carries almost nothing), and T = 4 costs 3.7x an AR
token to train, where T = 16 costs 11x: the LTM arm is the one an LTM could win with.

The paper preset: LTM-S/M/L (3, 6, 12 layers at width 512) and their AR twins on OpenWebText at 20, 40, 80,
160 tokens per parameter, with a warmup of 200 updates (105M tokens) instead of the recipe's 1000, so that
the smallest budget (LTM-S at 20 tokens per parameter, 190M tokens) leaves its trunk after its warmup.

    python studies/ladder.py --dry-run                   # micro: 5 widths x 3 arms x 4 budgets; what it costs
    python studies/ladder.py                             # micro on this machine (README: "Ladder")
    python studies/ladder.py --preset paper --cluster slurm --dry-run   # LTM-S/M/L on OpenWebText: GPU-hours
"""

import math
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402
exit_on_signal(__name__)  # first: a signal while torch and Ray load exits 3 with a message
from ltm.config import ConfigError, RunConfig, run_preset  # noqa: E402
from studies.launcher import main  # noqa: E402
from studies.study import RECIPE, Preset, Study  # noqa: E402

MIN_SIZES = 3
"""Sizes an arm needs: L(N, D) fitted on at least 2 sizes (with the budgets) and 1 held out to predict."""
HEAD_WIDTH = 16
DECAY = {"train.schedule": "wsd", "train.decay_fraction": 0.2}
ARMS = {
    "ltm": {"model.kind": "ltm", "inference.steps": 4, "inference.start": "fixed", "inference.init_logvar": 0.0},
    "ar": {"model.kind": "ar", "inference.steps": 0},
    "ar-full": {"model.kind": "ar", "inference.steps": 0, "model.window": None},
}
"""Most expensive first (the LTM), so that the longest trunks start first and the CPUs stay busy to the end."""


def size(d_model: int) -> dict:
    """A rung: the width, with heads of HEAD_WIDTH (depth and window are the recipe's)."""
    return {"model.d_model": d_model, "model.n_heads": max(1, d_model // HEAD_WIDTH)}


def non_embedding_params(recipe: str, rung: dict) -> int:
    """Non-embedding parameters of the recipe's AR at this rung (the N of a budget's tokens per parameter)."""
    import torch

    from ltm.model import build_model

    cfg = run_preset(recipe).with_overrides({**rung, **ARMS["ar"]})
    with torch.device("meta"):  # shapes only
        return build_model(cfg.model).num_params(non_embedding=True)


def budget(recipe: str, rung: dict, tokens_per_param: float) -> int:
    """tokens_per_param x N in tokens, rounded up to whole updates of the recipe."""
    per_update = run_preset(recipe).tokens_per_update
    return math.ceil(tokens_per_param * non_embedding_params(recipe, rung) / per_update) * per_update


def points(rungs: list[tuple[str, dict]], tokens_per_param: list[float], common: dict | None = None,
           arms: tuple[str, ...] = tuple(ARMS)) -> list[dict]:
    """Every (rung, arm, budget) as a wsd branch, in the rungs' order; a rung is a run recipe and its overrides.
    The synthetic corpus is as long as the largest budget, so that no run sees a token twice."""
    budgets = [[budget(recipe, rung, t) for t in tokens_per_param] for recipe, rung in rungs]
    corpus = {"data.synthetic_tokens": max(max(b) for b in budgets) + 100_000}
    return [{RECIPE: recipe, **rung, **ARMS[arm], **DECAY, **corpus, **(common or {}), "train.tokens": tokens}
            for (recipe, rung), tokens_of in zip(rungs, budgets) for arm in arms for tokens in tokens_of]


def widths(recipe: str, d_models: list[int]) -> list[tuple[str, dict]]:
    """The recipe's rungs at these widths, largest first."""
    return [(recipe, size(d)) for d in sorted(d_models, reverse=True)]


def check_sizes(planned: list) -> None:
    """Each arm of the ladder needs MIN_SIZES sizes (a fit and a held-out rung); ConfigError otherwise."""
    sizes: dict[tuple, set] = {}
    for point in planned:
        cfg = RunConfig.from_dict(point.config)
        if point.stop is None:
            m = cfg.model
            sizes.setdefault((m.kind, m.window), set()).add((m.n_layers, m.d_model, m.n_latents))
    for (kind, window), found in sizes.items():
        if len(found) < MIN_SIZES:
            raise ConfigError(f"the ladder's {kind} arm (window {window}) has {len(found)} size(s); the L(N, D) fit "
                              f"with a held-out size needs at least {MIN_SIZES}: do not --set model.d_model, "
                              "model.n_layers or model.n_heads for every point, or use a preset with more widths")


MICRO_WIDTHS = [16, 24, 32, 48, 80]
"""Non-embedding parameters of the AR 8,272 to 159,120 (19.2x; the LTM's 10,352 to 210,480); the largest rung
is 8.2x the compute of the next at equal tokens per parameter (the held-out rung of issue 27's target)."""
TOKENS_PER_PARAM = [5, 10, 20, 40]
COMMON = {"train.eval_every": 0, "train.checkpoint_every": 0}
"""Evaluated once at the end (the branches' final bound is what a fit reads), checkpointed on exit."""

STUDY = Study(
    name="ladder",
    description="A model ladder: sizes x budgets per arm (LTM, same-window AR, full-context AR), each budget a "
                "wsd branch of one trunk per size, for scaling-law fits that predict a held-out rung.",
    presets={
        "smoke": Preset("smoke", points(widths("smoke", [8, 16, 24]), [1, 2], {**COMMON, "train.warmup_steps": 2},
                                        arms=("ar", "ltm")),
                        description="3 tiny widths x AR and LTM x 2 budgets (tests)"),
        "micro": Preset("micro-rf", points(widths("micro-rf", MICRO_WIDTHS), TOKENS_PER_PARAM, COMMON),
                        description="micro-rf widths 16-80 (19x in parameters) x 3 arms x 5,10,20,40 tokens/param "
                                    "(2 CPUs: about 1.5 h, estimate)"),
        "micro-ar": Preset("micro-rf", points(widths("micro-rf", MICRO_WIDTHS), TOKENS_PER_PARAM, COMMON, arms=("ar",)),
                           description="the micro ladder's same-window AR arm alone, whose asymptote is known: "
                                       "the held-out-rung check at a third of the cost"),
        "paper": Preset("ltm-s", points([(r, {}) for r in ("ltm-l", "ltm-m", "ltm-s")], [20, 40, 80, 160],
                                        {"train.warmup_steps": 200}),
                        description="LTM-S/M/L and AR twins (same window, full context) x 20-160 tokens/param, "
                                    "OpenWebText (GPUs)", cpus=8, gpus=1, profile="gpu"),
    },
    check=check_sizes,
)

if __name__ == "__main__":
    sys.exit(main(STUDY))

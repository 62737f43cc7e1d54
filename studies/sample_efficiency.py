"""Sample efficiency: LTMs at several T against the AR baseline over model sizes and token budgets.

Each (model, size, budget) is a separate run with its own learning-rate schedule, as a fit of
L(N, D) requires; every run logs its whole curve (eval_every = budget / 4), with `tokens`,
`flops` and `flops_paper` at each point, so token and FLOP efficiency come from the same runs.

    python studies/sample_efficiency.py                      # micro: this machine
    python studies/sample_efficiency.py --preset smoke       # about a minute, for tests
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.launcher import Preset, Study, main  # noqa: E402

MODELS = {"ar": {"model.kind": "ar", "inference.steps": 0}}  # the baseline: the same decoder, no latents


def points(sizes: dict[str, dict], steps: list[int], budgets: list[int]) -> list[dict]:
    """AR and LTM-at-each-T, for every model size and token budget; curves at 4 points per run."""
    models = [MODELS["ar"]] + [{"model.kind": "ltm", "inference.steps": t} for t in steps]
    return [{**size, **model, "train.tokens": d, "train.eval_every": d // 4, "train.checkpoint_every": d // 4}
            for size in sizes.values() for model in models for d in budgets]


STUDY = Study(
    name="sample_efficiency",
    description="LTM (several T) against the AR baseline over model sizes and training-token budgets.",
    presets={
        "smoke": Preset("smoke", points({"smoke": {}}, [2], [8_192, 16_384]), description="4 tiny runs"),
        "micro": Preset("micro", points({"micro-s": {"model.n_layers": 2}, "micro-m": {"model.n_layers": 4}},
                                        [4, 16], [51_200, 102_400, 204_800]),
                        description="AR and LTM T in 4,16; micro-s/m; 51k-205k tokens (2 CPUs)"),
        "paper": Preset("ltm-s", points({"ltm-s": {"model.n_layers": 3}, "ltm-m": {"model.n_layers": 6},
                                         "ltm-l": {"model.n_layers": 12}},
                                        [16, 64], [750_000_000, 1_500_000_000, 3_000_000_000]),
                        description="AR and LTM T in 16,64; LTM-S/M/L; 0.75B-3B OpenWebText tokens (GPUs)",
                        cpus=8, gpus=1, profile="gpu"),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))

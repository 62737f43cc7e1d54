"""Inference scaling: does a larger inference budget (steps T, latents N_z) lower the loss?

The micro preset works where the latents can pay (docs/RESULTS.md): a decoder of 2 layers with an
8-token window (receptive field 15) on a corpus whose per-document plan recurs every ~40 tokens
inside 128-token blocks, with T over the paper's range past the inner loop's KL floor, two latent
counts, one point with the released code's decoder gradient, and the two AR baselines (the same
window, and full context) at the same budget.

    python studies/inference_scaling.py                      # micro: 22 min on 2 CPU cores (measured)
    python studies/inference_scaling.py --preset smoke       # about a minute, for tests
    python studies/inference_scaling.py --preset paper --cluster slurm --profile gpu
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402
exit_on_signal(__name__)  # first: a signal while torch and Ray load exits 3 with a message
from studies.launcher import main  # noqa: E402
from studies.study import Preset, Study, grid  # noqa: E402

TOKENS = {"train.tokens": 600_000, "train.eval_every": 150_000, "train.checkpoint_every": 150_000}
# Most expensive first, so the two CPUs stay busy to the end (a trial's cost grows with T).
MICRO = [{**TOKENS, "inference.steps": t, "model.n_latents": nz}
         for t, nz in [(64, 16), (64, 4), (32, 4), (16, 16), (16, 4), (4, 16), (4, 4)]]
MICRO.insert(3, {**TOKENS, "inference.steps": 16, "model.n_latents": 4, "inference.decoder_grad": "trajectory"})
MICRO += [{**TOKENS, "model.kind": "ar", "inference.steps": 0, "model.window": w} for w in (8, None)]

STUDY = Study(
    name="inference_scaling",
    description="LTM loss against inference steps T x latent count N_z (x model size).",
    presets={
        "smoke": Preset("smoke", grid({"inference.steps": [1, 4]}, {"model.n_latents": [2, 4]}),
                        description="4 tiny runs, about a minute"),
        "micro": Preset("micro-rf", MICRO, description="micro-rf: T in 4..64 x N_z in 4,16, a trajectory point, "
                                                    "AR baselines; 600k tokens each (2 CPUs: 22 min)"),
        "paper": Preset("ltm-s", [{"recipe": size, **point} for size in ("ltm-s", "ltm-m", "ltm-l")
                                  for point in grid({"inference.steps": [16, 32, 64, 128]},
                                                    {"model.n_latents": [24, 48, 96, 192]})],
                        description="LTM-S/M/L, T in 16..128, N_z in 24..192, OpenWebText (GPUs)",
                        cpus=8, gpus=1, profile="gpu"),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))

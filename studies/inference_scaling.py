"""Inference scaling: does a larger inference budget (steps T, latents N_z) lower the loss?

    python studies/inference_scaling.py                      # micro: this machine, under 30 minutes
    python studies/inference_scaling.py --preset smoke       # about a minute, for tests
    python studies/inference_scaling.py --preset paper --cluster slurm --profile gpu
"""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from studies.launcher import Preset, Study, grid, main  # noqa: E402

STUDY = Study(
    name="inference_scaling",
    description="LTM loss against inference steps T x latent count N_z (x model size).",
    presets={
        "smoke": Preset("smoke", grid({"inference.steps": [1, 4]}, {"model.n_latents": [2, 4]}),
                        description="4 tiny runs, about a minute"),
        "micro": Preset("micro", grid({"model.n_layers": [2, 4]}, {"inference.steps": [1, 4, 16]},
                                      {"model.n_latents": [4, 16]},
                                      common={"train.tokens": 204_800, "train.eval_every": 51_200,
                                              "train.checkpoint_every": 51_200}),
                        description="micro-s/m, T in 1,4,16, N_z in 4,16 on the synthetic corpus (2 CPUs, ~20 min)"),
        "paper": Preset("ltm-s", [{"model.n_layers": n, **point} for n in (3, 6, 12)
                                  for point in grid({"inference.steps": [16, 32, 64, 128]},
                                                    {"model.n_latents": [24, 48, 96, 192]})],
                        description="LTM-S/M/L, T in 16..128, N_z in 24..192, OpenWebText (GPUs)",
                        cpus=8, gpus=1, profile="gpu"),
    },
)

if __name__ == "__main__":
    sys.exit(main(STUDY))

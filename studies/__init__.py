"""Studies: one script per study (a declarative grid with presets) and the shared launcher.

    python studies/inference_scaling.py                  # the micro preset on this machine (Ray Tune)
    python studies/inference_scaling.py --cluster slurm  # the same grid as a SLURM job array
"""

"""The README's main path, typed in order: the quick start, a study, then the analysis with its defaults."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(args: list[str], env: dict, timeout: float) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert proc.returncode == 0, (f"{' '.join(args)} exited {proc.returncode}\n"
                                  f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}")
    return proc


@pytest.mark.slow
def test_readme_main_path_plots_the_study_not_the_quick_start_run(tmp_path):
    runs = tmp_path / "runs"
    env = {**os.environ, "LTM_CACHE": str(tmp_path / "cache")}  # no token cache shared with other tests
    _run(["-m", "ltm.train", "--preset", "smoke", "--data", "synthetic", "--set", "inference.steps=16",
          "--runs-dir", str(runs)], env, timeout=600)
    _run(["studies/inference_scaling.py", "--preset", "smoke", "--runs-dir", str(runs)], env, timeout=900)
    analysis = _run(["analysis/plot_scaling.py", "--runs-dir", str(runs)], env, timeout=600)
    assert "analysing inference_scaling (experiment 'inference_scaling'" in analysis.stderr  # a note, on stderr
    assert " figure files and " in analysis.stdout  # the summary, on stdout
    figures = runs / "figures" / "inference_scaling"
    for name in ("inference_scaling", "bound_decomposition", "sample_efficiency", "compute_efficiency"):
        assert (figures / f"{name}.png").stat().st_size > 10_000 and (figures / f"{name}.pdf").exists()
    table = pd.read_csv(figures / "runs.csv")  # the smoke grid: T in 1, 4 x N_z in 2, 4; not the quick start's T=16
    assert sorted(zip(table["inference.steps"], table["model.n_latents"])) == [(1, 2), (1, 4), (4, 2), (4, 4)]
    assert not (runs / "figures" / "ltm").exists()

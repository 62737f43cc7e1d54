"""What a new user types first: every command's --help lists what it accepts from the registry it comes from,
answers at once (no torch, MLflow or Ray imported to print it or to refuse a mistyped option), and commands run
without warnings from Python itself."""

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from ltm.config import RUN_PRESETS, run_preset
from ltm.names import Exit

ROOT = Path(__file__).resolve().parents[1]
STUDIES = ("inference_scaling", "sample_efficiency", "inference_cost", "icl_gsm8k", "zero_shot", "generation",
           "ladder")
HEAVY = ("torch", "mlflow", "ray", "pandas")


def test_train_help_lists_every_run_preset_of_the_registry(monkeypatch):
    from ltm.train import build_parser

    monkeypatch.setenv("COLUMNS", "500")  # one line per option: argparse would wrap micro-rf at its hyphen
    monkeypatch.setitem(RUN_PRESETS, "added-later", run_preset("smoke"))
    text = build_parser().format_help()
    assert f"run preset: {', '.join(RUN_PRESETS)} (default micro)" in text and "micro-rf, " in text


@pytest.mark.parametrize("name", STUDIES)
def test_a_studys_help_lists_each_of_its_presets(monkeypatch, name):
    from studies.options import build_parser

    monkeypatch.setenv("COLUMNS", "500")
    study = importlib.import_module(f"studies.{name}").STUDY
    text = " ".join(build_parser(study).format_help().split())  # argparse wraps even at 500 columns
    assert f"one of {', '.join(study.presets)} (default {study.default_preset})" in text
    assert all(f"{preset}: {' '.join(p.description.split())}" in text for preset, p in study.presets.items())


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})


@pytest.mark.parametrize("argv", [["--help"], ["--no-such-option"]], ids=["help", "mistyped"])
@pytest.mark.parametrize("command", ["studies/inference_scaling.py", "studies/icl_gsm8k.py", "ltm.train"])
def test_help_and_a_mistyped_option_answer_without_importing_torch_mlflow_or_ray(command, argv):
    """They took 30 s and more on a busy machine, importing everything first."""
    run = (f"runpy.run_module({command!r}, run_name='__main__')" if not command.endswith(".py")
           else f"runpy.run_path({command!r}, run_name='__main__')")
    proc = _python(f"import runpy, sys; sys.argv = ['x', *{argv!r}]\n"
                   f"try:\n    {run}\nexcept SystemExit as e:\n    code = e.code\n"
                   f"print(code, [m for m in {HEAVY!r} if m in sys.modules])")
    code, loaded = proc.stdout.splitlines()[-1].split(" ", 1)
    assert code == str(0 if argv == ["--help"] else int(Exit.USAGE)) and loaded == "[]", proc.stderr[-2000:]
    assert "usage:" in proc.stdout + proc.stderr


def test_the_kl_floor_command_runs_without_a_warning():
    proc = subprocess.run([sys.executable, "-m", "ltm.kl_floor", "--steps", "1"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert proc.returncode == 0 and proc.stdout.splitlines()[2].startswith("| 1 | 1.881 |")
    assert proc.stderr == ""  # it printed runpy's RuntimeWarning: `import ltm` had imported ltm.kl_floor


def test_importing_ltm_loads_its_parts_on_first_use():
    proc = _python("import sys, ltm\nbefore = 'torch' in sys.modules\n"
                   "print(before, ltm.build_model(ltm.model_preset('smoke')).cfg.d_model, "
                   "all(callable(getattr(ltm, name)) for name in ltm.__all__))")
    assert proc.stdout.split() == ["False", "32", "True"], proc.stderr[-2000:]
    with pytest.raises(AttributeError, match="module 'ltm' has no attribute 'no_such_name'"):
        import ltm

        ltm.no_such_name  # noqa: B018

"""Every read of a checkpoint checks its sha256 (`ltm.checkpoint.verify_checksum`), whoever reads it: a
file, a folder, a run key or a run id given to `resolve`, `load_model`, the evaluation studies and
`analysis/compare.py`. A file that does not match is refused naming both hashes, --no-verify reads it
with a warning, a file without its .sha256 is read with a warning, and a truncated file is an error
that names it (exit 2), not torch's traceback."""

import hashlib
import logging
import shutil
from pathlib import Path

import pytest
import torch

from analysis import compare
from ltm import checkpoint, train
from ltm.checkpoint import CheckpointError
from ltm.cli import UNVERIFIED_RISK
from ltm.config import run_preset
from ltm.names import Exit, Status
from ltm.tracking import default_tracking_uri

OVERRIDES = ("train.tokens=4096", "train.checkpoint_every=2048", "train.eval_every=0")


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, str, str]:
    """A FINISHED smoke run with two checkpoints: (its runs folder, run key, MLflow run id). Copied, never changed."""
    root = tmp_path_factory.mktemp("trained")
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={root / 'cache'}", *OVERRIDES])
    result = train.run(cfg, runs_dir=root / "runs", experiment="trust", progress=False)
    assert result.status == Status.FINISHED and len(checkpoint.checkpoints(result.run_dir)) == 2
    return root / "runs", cfg.run_key(), result.run_id


@pytest.fixture
def runs(trained, tmp_path) -> Path:
    """This test's copy of the trained runs folder (its store and checkpoints)."""
    return Path(shutil.copytree(trained[0], tmp_path / "runs"))


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def tamper(file: Path) -> tuple[str, str]:
    """Change the model's floats in place, as a hand edit would; (the sha256 recorded beside it, the file's now)."""
    state = torch.load(file, weights_only=True)
    state["model"] = {k: v + 1 if v.is_floating_point() else v for k, v in state["model"].items()}
    torch.save(state, file)
    return file.with_suffix(".sha256").read_text().strip(), sha(file)


def final_and_previous(runs: Path, key: str) -> tuple[Path, Path]:
    previous, final = checkpoint.checkpoints(runs / "checkpoints" / key)
    return final, previous


def test_a_tampered_checkpoint_is_refused_naming_both_hashes_however_it_is_named(trained, runs):
    _, key, run_id = trained
    final, _ = final_and_previous(runs, key)
    expected, actual = tamper(final)
    both = f"expected sha256 {expected}, actual {actual}"
    uri = default_tracking_uri(runs)
    with pytest.raises(CheckpointError, match=f"checkpoint {final} does not match .*{both}.*--no-verify"):
        checkpoint.resolve(str(final), uri, runs)
    for ref in (str(final.parent), key, run_id):  # the folder stands for the final model: refused, saying why
        with pytest.warns(UserWarning, match=both), pytest.raises(
                checkpoint.ConfigError, match=f"FINISHED at 4,096 tokens.*holds 2,048.*{both}"):
            checkpoint.resolve(ref, uri, runs)
    with pytest.raises(CheckpointError, match=both):
        checkpoint.load_model(final)
    with pytest.warns(UserWarning, match=both):  # a folder given to load_model falls back past it
        checkpoint.load_model(final.parent)


def test_compare_refuses_a_tampered_file_and_reads_it_with_no_verify_and_a_warning(trained, runs, capsys):
    final, previous = final_and_previous(runs, trained[1])
    expected, actual = tamper(final)
    args = [str(final), str(previous), "--runs-dir", str(runs), "--blocks", "2", "--bootstrap", "10"]
    assert compare.main(args) == Exit.USAGE
    err = capsys.readouterr().err
    assert str(final) in err and f"expected sha256 {expected}, actual {actual}" in err and "Traceback" not in err
    assert compare.main([*args, "--no-verify"]) == Exit.OK
    out, err = capsys.readouterr()
    assert f"checkpoint {final} is read without checking its sha256 (--no-verify)" in err
    assert "gives wrong numbers" in err and "A - B, bound" in out
    assert "--no-verify" in (helped := " ".join(compare._parser().format_help().split())) and \
        "gives wrong numbers without any other sign" in helped  # the help says what it risks


def test_an_evaluation_study_refuses_a_tampered_checkpoint_unless_no_verify(trained, runs, capsys, caplog):
    from studies.generation import STUDY
    from studies.launcher import main
    from studies.messages import TrialContext
    from studies.plan import plan

    final, _ = final_and_previous(runs, trained[1])
    expected, actual = tamper(final)
    args = ["--preset", "smoke", "--runs-dir", str(runs), "--checkpoint", str(final), "--dry-run"]
    assert main(STUDY, args) == Exit.USAGE
    assert f"expected sha256 {expected}, actual {actual}" in capsys.readouterr().err
    assert main(STUDY, [*args, "--no-verify"]) == Exit.OK  # the plan is made before the study's logging is set up
    assert any(f"checkpoint {final} is read without checking its sha256 (--no-verify)" in r.getMessage()
               for r in caplog.records if r.levelno == logging.WARNING)
    context = plan(STUDY, [*args, "--no-verify"]).context()  # what the trials get: their loads skip the check too
    assert TrialContext.from_dict(context.to_dict()).verify is False
    assert plan(STUDY, [*args[:-3], "--dry-run"]).context().verify is True


def test_an_evaluation_point_loads_its_checkpoint_through_the_same_check(trained, runs, monkeypatch):
    import studies.tasks as tasks
    from studies.messages import CheckpointSource, Point, TrialContext
    from studies.study import GenerationTask

    final, _ = final_and_previous(runs, trained[1])
    expected, actual = tamper(final)
    monkeypatch.setitem(tasks.EVALUATORS, "generation", lambda model, cfg, task, verify: ({"probe/value": 1.0}, {}))
    point = Point(key="probe", config={}, label={}, task=GenerationTask(), source=CheckpointSource(str(final)))
    context = TrialContext(default_tracking_uri(runs), "e", str(runs), None)
    refused = tasks.run_task(point, context)
    assert refused.status == Status.FAILED and f"expected sha256 {expected}, actual {actual}" in refused.reason
    assert tasks.run_task(point, TrialContext(**{**context.to_dict(), "verify": False})).status == Status.FINISHED


def test_a_file_without_its_checksum_is_read_with_a_warning_that_says_so(trained, runs, tmp_path, caplog):
    final, _ = final_and_previous(runs, trained[1])
    alone = tmp_path / "copied" / final.name  # the .pt copied on its own
    alone.parent.mkdir()
    shutil.copy(final, alone)
    caplog.set_level(logging.WARNING)
    ref = checkpoint.resolve(str(alone), default_tracking_uri(runs), runs)
    model, cfg = checkpoint.load_model(alone)
    assert ref.config == cfg.to_dict()
    warned = [r.getMessage() for r in caplog.records if r.name == "ltm.checkpoint"]
    assert warned == [f"checkpoint {alone} is read unverified: it has no checksum file {final.stem}.sha256 beside it; "
                      f"{UNVERIFIED_RISK}"]  # once, though planned and loaded


@pytest.mark.parametrize("beside", [False, True], ids=["alone", "beside-its-config"])
def test_a_truncated_checkpoint_is_a_clear_error_not_a_traceback(trained, runs, tmp_path, capsys, beside):
    final, previous = final_and_previous(runs, trained[1])
    cut = tmp_path / "cut" / final.name
    cut.parent.mkdir()
    cut.write_bytes(final.read_bytes()[: final.stat().st_size // 2])  # a copy that stopped half way, no .sha256
    if beside:  # resolve then reads the config from config.json: the load is what fails
        shutil.copy(final.parent / checkpoint.CONFIG_FILE, cut.parent)
    with pytest.raises(CheckpointError, match=f"cannot read checkpoint {cut}: .*truncated"):
        checkpoint.load_model(cut)
    code = compare.main([str(cut), str(previous), "--runs-dir", str(runs), "--blocks", "2"])
    err = capsys.readouterr().err
    assert code == Exit.USAGE and f"error: cannot read checkpoint {cut}" in err and "Traceback" not in err
    assert "pass another checkpoint of the run" in err

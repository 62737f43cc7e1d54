"""Names are data, never paths; numbers and tracking URIs that cannot work are refused before anything exists.

A user's name (an experiment, a study, a task, a run key read from a store) only ever becomes one safe folder
inside the folder it belongs in (`ltm.paths.folder_name`); a bad value or URI is refused with exit 2 and
leaves no runs folder, store or RUNNING run behind."""

import json
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ltm.train as train
from ltm.checkpoint import key_folders, run_folder
from ltm.config import ConfigError, RunConfig, run_preset
from ltm.names import Exit, Status
from ltm.paths import MAX_BYTES, check_name, folder_name
from ltm.tracking import TrackingUnusable, check_tracking_uri, default_tracking_uri

HOSTILE = ["../../../escaped", "/tmp/absolute", "a/b", "..", ".hidden", "é" * 300, "x" * 400, "tab\there", "a b"]


# -- names -------------------------------------------------------------------------------------------

def test_a_plain_name_is_its_own_folder_as_before():
    for name in ("ltm", "inference_scaling", "sample_efficiency-smoke-0123456789ab", "a290236753ffbe1d",
                 "a290236753ffbe1d.fc26648bc55a466d9b65b84275db262b", "v1.2_x-y"):
        assert folder_name(name) == name


@pytest.mark.parametrize("name", HOSTILE)
def test_any_other_name_is_one_safe_folder_that_no_other_name_shares(tmp_path, name):
    folder = folder_name(name)
    assert len(folder.encode()) <= MAX_BYTES and not folder.startswith(".")
    assert set(folder) <= set("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789-_.")
    assert (tmp_path / folder).resolve().parent == tmp_path.resolve()
    slug = folder.rsplit("-", 1)[0]
    assert folder not in {folder_name(n) for n in HOSTILE if n != name} | {folder_name(slug)}  # "a b" is not "a_b"


@pytest.mark.parametrize("name, says", [("", "is empty"), ("   ", "is empty"), ("a\0b", "holds a NUL character"),
                                        ("x" * 501, "is 501 characters long; at most 500"),
                                        ("\udcff", "is not valid UTF-8")])
def test_a_name_that_cannot_name_anything_is_refused_with_the_option(name, says):
    with pytest.raises(ConfigError, match=f"--experiment .*{says}"):
        check_name(name, "--experiment")


def test_a_run_key_read_from_a_store_keeps_its_checkpoint_folder_inside_the_runs_folder(tmp_path):
    checkpoints = (tmp_path / "runs" / "checkpoints").resolve()
    for key in ("../../escaped", "/etc", ".."):
        assert run_folder(tmp_path / "runs", key, "../x").resolve().parent == checkpoints
        assert key_folders(tmp_path / "runs", key) == []


def smoke_argv(tmp_path, *args):
    return ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--no-progress", "-q",
            "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.tokens=2048", *args]


def test_experiment_names_with_dots_slashes_or_300_accents_write_only_inside_the_runs_folder(tmp_path):
    """`--experiment ../../../escaped` once wrote its artifacts two folders above the runs folder (and
    plot_scaling its figures), and 300 accents failed the run after creating it ("File name too long"),
    leaving it RUNNING."""
    from analysis import plot_scaling

    work = tmp_path / "a" / "b"
    names = ["../../../escaped", "é" * 300]
    for name in names:
        assert train.main(smoke_argv(work, "--experiment", name)) == Exit.OK
    assert plot_scaling.main(["--runs-dir", str(work / "runs"), "--experiment", names[0], "--bootstrap", "0"]) == 0
    assert (work / "runs" / "figures" / folder_name(names[0]) / "runs.csv").is_file()
    assert {p.name for p in tmp_path.rglob("*") if not p.is_relative_to(work)} == {"a"}
    assert {p.name for p in work.iterdir()} == {"runs", "cache"}
    client = MlflowClient(default_tracking_uri(work / "runs"))
    artifacts = (work / "runs" / "artifacts").resolve()
    for name in names:
        experiment = client.get_experiment_by_name(name)  # the name as given: data, kept whole
        assert Path(experiment.artifact_location.removeprefix("file://")) == artifacts / folder_name(name)
        runs = client.search_runs([experiment.experiment_id])  # the training run (and plot_scaling's)
        assert runs and {r.info.status for r in runs} == {Status.FINISHED.value}
        assert any((artifacts / folder_name(name) / r.info.run_id / "artifacts" / "config.json").is_file()
                   for r in runs)


@pytest.mark.parametrize("name, says", [("", "is empty"), ("a\0b", "holds a NUL character"),
                                        ("x" * 501, "at most 500")])
def test_ltm_train_refuses_an_unusable_experiment_name_before_anything_exists(tmp_path, capsys, name, says):
    assert train.main(smoke_argv(tmp_path, "--experiment", name)) == Exit.USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: --experiment ") and says in err
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("name", ["", "a\0b"])
def test_a_study_refuses_an_unusable_experiment_name_before_anything_exists(tmp_path, capsys, name):
    from studies.launcher import main
    from studies.inference_scaling import STUDY as INFERENCE_SCALING

    assert main(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"),
                                    "--experiment", name]) == Exit.USAGE
    assert capsys.readouterr().err.startswith("error: --experiment ")
    assert not (tmp_path / "runs").exists()


# -- values ------------------------------------------------------------------------------------------

@pytest.mark.parametrize("assignment, says", [
    ("inference.init_logvar=nan", "inference.init_logvar takes a finite number"),
    ("train.lr=inf", "train.lr takes a finite number"),
    ("train.tokens=1e400", "train.tokens takes a whole number"),
    ("inference.steps=1e400", "inference.steps takes a whole number"),
    ("inference.steps=2.5", "inference.steps takes a whole number"),
    ("inference.steps=2.5e0", "inference.steps takes a whole number"),
    ("inference.betas=0.9,nan", "inference.betas takes finite numbers"),
    ("train.tokens=1e19", "train.tokens must be a whole number below 2^63"),
    ("train.tokens=-5", "train.tokens must be >= 1"),
    ("seed=-1", "seed must be in [0, 10,000,000)"),
    ("seed=1e9", "seed must be in [0, 10,000,000)"),
    ("data.seed=-1", "data.seed must be >= 0"),
    ("inference.init_logvar_std=-0.1", "inference.init_logvar_std must be >= 0"),
    ("inference.eps=0", "inference.eps must be > 0"),
])
def test_a_number_that_cannot_work_is_refused_before_a_run_exists(tmp_path, capsys, assignment, says):
    """`inference.init_logvar=nan` once created a run that failed at update 0; `train.tokens=1e400` ended in
    an OverflowError traceback."""
    assert train.main(["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--set", assignment]) == Exit.USAGE
    err = capsys.readouterr().err
    assert err.startswith("error: ") and says in err and err.count("\n") == 1
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("field, value, says", [
    ("inference.init_logvar", float("nan"), "inference.init_logvar must be a finite number, got nan"),
    ("inference.steps", float("inf"), "inference.steps must be a whole number"),
    ("train.tokens", 2048.5, "train.tokens must be a whole number below 2^63 (an int64), got 2048.5"),
    ("inference.fixed_variance", "yes", "inference.fixed_variance must be true or false"),
    ("seed", 1.5, "seed must be a whole number"),
])
def test_a_config_file_is_held_to_the_same_kinds(tmp_path, capsys, field, value, says):
    config = run_preset("smoke").to_dict()
    section, _, name = field.rpartition(".")
    (config[section] if section else config)[name] = value
    path = tmp_path / "config.json"
    path.write_text(json.dumps(config))  # json writes nan and inf as NaN and Infinity, and reads them back
    assert train.main(["--config", str(path), "--runs-dir", str(tmp_path / "runs")]) == Exit.USAGE
    assert says in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


def test_a_whole_number_a_config_file_writes_as_a_float_is_the_count_it_means(tmp_path):
    config = run_preset("smoke").to_dict()
    config["train"]["tokens"] = 4096.0  # JSON's 4.096e3
    read = RunConfig.from_dict(json.loads(json.dumps(config)))
    assert type(read.train.tokens) is int  # the same run as --set train.tokens=4096, not a new run key
    assert read.run_key() == run_preset("smoke").with_overrides(["train.tokens=4096"]).run_key()


def test_every_preset_and_study_point_still_passes():
    from studies.points import build_points
    from studies.inference_scaling import STUDY as INFERENCE_SCALING

    for name in ("smoke", "micro", "micro-rf", "ltm-l"):
        assert RunConfig.from_dict(run_preset(name).to_dict()) == run_preset(name)
    for preset in INFERENCE_SCALING.presets:
        assert build_points(INFERENCE_SCALING, preset, [0, 1], None, [])


def test_a_study_refuses_an_overflowing_value_before_anything_exists(tmp_path, capsys):
    from studies.launcher import main
    from studies.inference_scaling import STUDY as INFERENCE_SCALING

    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--set", "inference.steps=1e400"]
    assert main(INFERENCE_SCALING, argv) == Exit.USAGE
    assert "inference.steps takes a whole number" in capsys.readouterr().err
    assert not (tmp_path / "runs").exists()


# -- tracking URIs -----------------------------------------------------------------------------------

def _rekey(tmp_path, uri):
    from studies import rekey

    (tmp_path / "runs").mkdir(exist_ok=True)
    return rekey.main(["--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri])


def _plot(tmp_path, uri):
    from analysis import plot_scaling

    return plot_scaling.main(["--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri, "--experiment", "e"])


def _compare(tmp_path, uri):
    from analysis import compare

    return compare.main(["a", "b", "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", uri])


@pytest.mark.parametrize("command", [_rekey, _plot, _compare], ids=["rekey", "plot_scaling", "compare"])
@pytest.mark.parametrize("uri, says", [("relative.db", "is a path, not a URI"),
                                       ("sqlite:///relative.db", "use an absolute SQLite path"),
                                       ("ftp://host/x", "unsupported tracking URI")])
def test_every_command_refuses_a_tracking_uri_that_cannot_work_the_same_way(tmp_path, capsys, monkeypatch,
                                                                            command, uri, says):
    """`studies.rekey --tracking-uri relative.db` once ended in MLflow's traceback while ltm.train refused it."""
    monkeypatch.chdir(tmp_path)
    assert command(tmp_path, uri) == Exit.USAGE
    err = capsys.readouterr().err
    assert "error: " in err and says in err
    assert not (tmp_path / "relative.db").exists() and not (tmp_path / "runs" / "mlflow.db").exists()


def test_checking_a_new_sqlite_store_creates_nothing(tmp_path):
    check_tracking_uri(f"sqlite:///{tmp_path / 'new' / 'deep' / 'mlflow.db'}")
    assert not (tmp_path / "new").exists()
    (tmp_path / "file").write_text("")
    with pytest.raises(TrackingUnusable, match=f"{tmp_path / 'file'} is not a folder"):
        check_tracking_uri(f"sqlite:///{tmp_path / 'file' / 'mlflow.db'}")


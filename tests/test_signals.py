"""Signals are honoured from the first second: a training run signalled at any moment after its MLflow
run exists ends KILLED with the reason (exit 3), one signalled before ends without creating anything,
and a study driver signalled during startup exits 3 with nothing launched."""

import os
import signal

import pytest
from mlflow.tracking import MlflowClient

import ltm.data
import ltm.train as train
from ltm.config import run_preset
from ltm.names import REASON_TAG, Exit
from ltm.tracking import Tracker, default_tracking_uri
from studies.inference_scaling import STUDY as INFERENCE_SCALING
from studies import launcher


def smoke(tmp_path, *overrides):
    return run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=2048",
                                               *overrides])


def runs_of(runs, experiment="ltm") -> list:
    client = MlflowClient(default_tracking_uri(runs))
    exp = client.get_experiment_by_name(experiment)
    return client.search_runs([exp.experiment_id]) if exp else []


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_right_after_the_run_is_created_marks_it_killed_with_the_reason(tmp_path, monkeypatch, sig):
    real = Tracker.create_run

    def create_then_signal(self, *args, **kwargs):
        run_id = real(self, *args, **kwargs)
        os.kill(os.getpid(), sig)  # the MLflow run exists, nothing is set up yet
        return run_id

    monkeypatch.setattr(Tracker, "create_run", create_then_signal)
    runs = tmp_path / "runs"
    code = train.main(["--preset", "smoke", "--runs-dir", str(runs), "--no-progress",
                       "--set", f"data.cache_dir={tmp_path / 'cache'}", "--set", "train.tokens=2048"])
    assert code == Exit.INTERRUPTED
    [run] = runs_of(runs)
    assert run.info.status == "KILLED"
    assert f"interrupted by {signal.Signals(sig).name} while the run was being set up" in run.data.tags[REASON_TAG]
    monkeypatch.setattr(Tracker, "create_run", real)
    again = train.run(smoke(tmp_path), runs_dir=runs, progress=False)  # and it resumes into the same run
    assert again.status == "FINISHED" and again.run_id == run.info.run_id


def test_a_signal_before_the_run_exists_ends_it_and_creates_nothing(tmp_path, monkeypatch):
    real = ltm.data.load_blocks

    def signal_then_load(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # while the data is being read (tokenising can take hours)
        return real(*args, **kwargs)

    monkeypatch.setattr(ltm.data, "load_blocks", signal_then_load)
    result = train.run(smoke(tmp_path), runs_dir=tmp_path / "runs", progress=False)
    assert result.status == "KILLED" and result.run_id is None
    assert "interrupted by SIGTERM before the run started; nothing was changed" in result.reason
    assert runs_of(tmp_path / "runs") == []


def study_main(tmp_path, *args):
    return launcher.main(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"),
                                             "--set", f"data.cache_dir={tmp_path / 'cache'}", *args])


def test_a_study_driver_signalled_while_planning_exits_3_and_launches_nothing(tmp_path, monkeypatch, capsys):
    real = launcher.plan

    def signal_then_plan(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "plan", signal_then_plan)
    assert study_main(tmp_path) == Exit.INTERRUPTED
    assert "interrupted by SIGTERM during startup: nothing was launched" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mlflow.db").exists() and not (tmp_path / "runs" / "checkpoints").exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_study_driver_signalled_after_its_parent_run_exists_marks_it_killed_and_runs_no_point(
        tmp_path, monkeypatch, sig):
    real = launcher.open_parent

    def open_then_signal(plan, tracker):
        parent = real(plan, tracker)
        os.kill(os.getpid(), sig)
        return parent

    monkeypatch.setattr(launcher, "open_parent", open_then_signal)
    assert study_main(tmp_path) == Exit.INTERRUPTED
    runs = runs_of(tmp_path / "runs", "inference_scaling")
    assert [r.data.tags.get("ltm.role") for r in runs] == ["study"]  # the parent, and no point ever started
    assert runs[0].info.status == "KILLED"
    assert not (tmp_path / "runs" / "checkpoints").exists()


def test_a_study_driver_signalled_while_it_waits_for_earlier_workers_stops_at_once(tmp_path, monkeypatch):
    def waiting(*args, **kwargs):  # the bounded wait for an earlier start's workers (up to 90 s)
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the signal should have ended the wait")

    monkeypatch.setattr(launcher, "wait_for_stragglers", waiting)
    assert study_main(tmp_path) == Exit.INTERRUPTED
    assert not (tmp_path / "runs" / "checkpoints").exists()


def test_a_running_study_driver_hands_a_signal_to_its_backend_and_restores_the_handlers_after():
    from studies.interrupt import Interruption

    before = signal.getsignal(signal.SIGTERM)
    seen = []
    with Interruption() as interruption:
        interruption.running(lambda: seen.append(interruption.name))  # what Ray's backend passes
        os.kill(os.getpid(), signal.SIGTERM)  # no Stopped: work is running, the backend stops it
        assert seen == ["SIGTERM"] and interruption.requested
    assert signal.getsignal(signal.SIGTERM) is before
    with Interruption() as interruption:
        interruption.running()
        interruption.request()  # a Ctrl-C the backend saw as KeyboardInterrupt
        assert interruption.requested and interruption.name == "SIGINT"

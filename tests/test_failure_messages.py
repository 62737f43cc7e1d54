"""Every failure names its cause and the file, and bad values are refused before anything is created:
undecodable text, a token cache over the file size limit, tracking URIs that are paths, read-only or
damaged stores, two studies creating one store at once, an LTM without inference steps, a negative
--max-failures, points held by other processes."""

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ltm.train as train
from ltm.config import ConfigError, DataConfig, run_preset
from ltm.data import DataError, load_blocks
from ltm.names import Exit, Status
from ltm.runlock import STUDY_DRIVER_ENV
from ltm.tracking import TrackingError, check_tracking_uri, default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]


# -- data ------------------------------------------------------------------------------------------

def test_an_undecodable_file_in_a_text_folder_is_named_with_its_byte_offset(tmp_path):
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "a.txt").write_text("fine text\n" * 50)
    (corpus / "b.txt").write_bytes("caf".encode() + b"\xe9 au lait\n")  # latin-1, not UTF-8
    with pytest.raises(DataError, match=rf"{corpus / 'b.txt'} is not UTF-8 text: byte 0xe9 at offset 3 .*iconv"):
        load_blocks(DataConfig(name=str(corpus), tokenizer="bpe", cache_dir=str(tmp_path / "cache")), 8, "train")


def test_an_undecodable_line_of_a_jsonl_file_is_named_with_its_byte_offset(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_bytes(b'{"text": "ok"}\n{"text": "caf\xe9"}\n')
    with pytest.raises(DataError, match=rf"{path} is not UTF-8 text: byte 0xe9 at offset 28"):
        load_blocks(DataConfig(name=str(path), tokenizer="bpe", cache_dir=str(tmp_path / "cache")), 8, "train")


def test_a_token_cache_over_the_file_size_limit_names_the_file_and_the_fix(tmp_path):
    code = ("import resource, signal; signal.signal(signal.SIGXFSZ, signal.SIG_IGN); "
            "resource.setrlimit(resource.RLIMIT_FSIZE, (4096, 4096)); "
            "from ltm.config import DataConfig; from ltm.data import load_blocks; "
            f"load_blocks(DataConfig(synthetic_tokens=100_000, cache_dir={str(tmp_path)!r}), 64, 'train')")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert "DataError: cannot write the token cache" in proc.stderr and str(tmp_path / "tokens") in proc.stderr
    assert "File too large" in proc.stderr and "ulimit -f" in proc.stderr
    assert not list((tmp_path / "tokens").glob("*.tmp"))


def test_an_ltm_without_inference_steps_is_refused():
    with pytest.raises(ConfigError, match="an LTM needs inference.steps >= 1 .*model.kind=ar"):
        run_preset("smoke").with_overrides(["inference.steps=0"])
    assert run_preset("smoke").with_overrides(["model.kind=ar", "inference.steps=0"]).model.kind == "ar"


def test_ltm_train_refuses_zero_steps_before_creating_anything(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert train.main(["--preset", "smoke", "--runs-dir", str(runs), "--set", "inference.steps=0"]) == Exit.USAGE
    assert "an LTM needs inference.steps >= 1" in capsys.readouterr().err
    assert not runs.exists()


# -- tracking stores -----------------------------------------------------------------------------------

def test_a_path_given_as_tracking_uri_is_refused_with_the_uri_to_use(tmp_path):
    with pytest.raises(TrackingError, match=rf"is a path, not a URI; pass sqlite:///{tmp_path}/mlflow.db"):
        check_tracking_uri(str(tmp_path / "mlflow.db"))


def test_a_damaged_sqlite_store_is_named_not_a_traceback(tmp_path, capsys):
    db = tmp_path / "mlflow.db"
    db.write_bytes(b"this was a database once, truncated")
    with pytest.raises(TrackingError, match=rf"{db} is not a SQLite database \(damaged or truncated"):
        check_tracking_uri(f"sqlite:///{db}")
    code = train.main(["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--tracking-uri", f"sqlite:///{db}",
                       "--set", f"data.cache_dir={tmp_path / 'cache'}"])
    assert code == Exit.USAGE and "is not a SQLite database" in capsys.readouterr().err


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder this process cannot write: a read-only tmpfs as root (root ignores permissions), else mode 555."""
    folder = tmp_path / "ro"
    folder.mkdir()
    if os.geteuid() == 0:
        if subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)]).returncode != 0:
            pytest.skip("root, but cannot mount a read-only tmpfs here to make a folder root cannot write")
        yield folder
        subprocess.run(["umount", str(folder)])
    else:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)


def test_a_store_in_a_read_only_folder_is_refused_at_once(read_only_folder):
    with pytest.raises(TrackingError, match=rf"the tracking database {read_only_folder}/mlflow.db is read-only here"):
        check_tracking_uri(f"sqlite:///{read_only_folder / 'mlflow.db'}")


def test_two_processes_creating_one_new_store_at_once_both_succeed(tmp_path):
    """MLflow's schema migration of a new SQLite file is serialised (`ltm.tracking.store_creation_lock`)."""
    for attempt in range(3):
        db, go = tmp_path / f"store{attempt}" / "mlflow.db", tmp_path / f"go{attempt}"
        code = ("import os, time, sys; from ltm.tracking import Tracker\n"
                f"while not os.path.exists({str(go)!r}): time.sleep(0.005)\n"
                f"Tracker('sqlite:///{db}', sys.argv[1])")
        procs = [subprocess.Popen([sys.executable, "-c", code, f"e{i}"], cwd=ROOT, stderr=subprocess.PIPE, text=True)
                 for i in range(3)]
        time.sleep(4)  # every process imported mlflow and waits at the start line
        go.touch()
        errors = [p.communicate(timeout=120)[1] for p in procs]
        assert [p.returncode for p in procs] == [0, 0, 0], errors
        assert {e.name for e in MlflowClient(f"sqlite:///{db}").search_experiments()} >= {"e0", "e1", "e2"}


# -- studies ------------------------------------------------------------------------------------------

def test_a_negative_max_failures_is_refused(tmp_path, capsys):
    from studies.inference_scaling import STUDY
    from studies.launcher import main

    assert main(STUDY, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--max-failures", "-1"]) == Exit.USAGE
    assert "--max-failures is how many times a crashed trial is retried: 0 or more, got -1" in capsys.readouterr().err


def test_a_study_outcome_with_busy_points_is_busy_not_failed():
    from studies.launcher import EXIT_OF, PARENT_STATUS, _outcome

    outcome, reason = _outcome({"FINISHED": 3, "BUSY": 1}, 4, stopped=False)
    assert outcome == Status.BUSY and EXIT_OF[outcome] == Exit.BUSY and PARENT_STATUS[outcome] == Status.KILLED
    assert reason.startswith("busy: 1 point(s) are held by other live processes") and "nothing failed" in reason
    assert _outcome({"FINISHED": 3, "BUSY": 1}, 4, stopped=True)[0] == Status.KILLED
    assert _outcome({"FINISHED": 2, "BUSY": 1, "FAILED": 1}, 4, stopped=False)[0] == Status.FAILED
    assert _outcome({"FINISHED": 4}, 4, stopped=False) == (Status.FINISHED, "")


def _hold(runs: Path, key: str, driver: str | None) -> subprocess.Popen:
    """A process that holds the run's lock, started by `driver` (None: a user's own process)."""
    env = {k: v for k, v in os.environ.items() if k != STUDY_DRIVER_ENV}
    if driver:
        env[STUDY_DRIVER_ENV] = driver
    proc = subprocess.Popen([sys.executable, "-c", "import time; from ltm.runlock import RunLock; "
                             f"l = RunLock({str(runs)!r}, {key!r}, 'trained'); "
                             "print('held', flush=True); time.sleep(120)"],
                            cwd=ROOT, stdout=subprocess.PIPE, text=True, env=env)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_driver_waits_for_and_signals_only_its_own_workers(tmp_path):
    from studies.interrupt import driver_id, stop_local_workers, wait_for_stragglers

    mine, earlier, theirs = driver_id("study"), "study:" + socket.gethostname() + ":1", None
    own, old, user = _hold(tmp_path, "a", mine), _hold(tmp_path, "b", earlier), _hold(tmp_path, "c", theirs)
    try:
        stop_local_workers(tmp_path, ["a", "b", "c"], mine, timeout=30)
        assert own.wait(timeout=30) is not None  # this driver's worker got SIGTERM
        assert old.poll() is None and user.poll() is None  # an earlier driver's and a user's process did not
        old.kill()
        old.wait()
        # and the wait for an earlier start's workers does not wait for a user's process
        wait_for_stragglers(tmp_path, ["b", "c"], "study", timeout=600)  # returns at once: nothing of this study
        assert user.poll() is None
    finally:
        for proc in (own, old, user):
            proc.kill()


@pytest.mark.slow
def test_a_study_meeting_a_point_held_by_another_process_reports_it_busy_and_leaves_it_alone(tmp_path):
    from studies.inference_scaling import STUDY
    from studies.points import build_points

    runs = tmp_path / "runs"
    overrides = [f"data.cache_dir={tmp_path / 'cache'}"]
    key = build_points(STUDY, "smoke", [0], None, overrides)[0].key
    user = _hold(runs, key, None)  # e.g. the same config trained by hand with `python -m ltm.train`
    try:
        proc = subprocess.run([sys.executable, str(ROOT / "studies" / "inference_scaling.py"), "--preset", "smoke",
                               "--runs-dir", str(runs), "--set", overrides[0]],
                              cwd=tmp_path, capture_output=True, text=True, timeout=900)
        assert proc.returncode == Exit.BUSY, proc.stdout[-3000:] + proc.stderr[-3000:]
        assert "waiting for" not in proc.stdout + proc.stderr  # nothing of this study to wait for
        assert "busy: 1 point(s) are held by other live processes" in proc.stdout
        assert user.poll() is None  # never signalled
        client = MlflowClient(default_tracking_uri(runs))
        exp = client.get_experiment_by_name("inference_scaling")
        [parent] = [r for r in client.search_runs([exp.experiment_id]) if r.data.tags.get("ltm.role") == "study"]
        assert parent.info.status == "KILLED" and parent.data.tags["ltm.count.BUSY"] == "1"
        assert parent.data.tags["ltm.status_reason"].startswith("busy:")
    finally:
        user.kill()


# -- exit status ---------------------------------------------------------------------------------------

def test_bad_options_exit_2_for_training_the_studies_and_the_analysis(tmp_path, capsys):
    from analysis import compare
    from studies.inference_scaling import STUDY
    from studies.launcher import main as study_main

    runs = tmp_path / "runs"
    assert train.main(["--preset", "smoke", "--runs-dir", str(runs), "--set", "no.such=1"]) == Exit.USAGE == 2
    assert "unknown config key" in capsys.readouterr().err
    assert study_main(STUDY, ["--runs-dir", str(runs), "--set", "no.such=1", "--dry-run"]) == Exit.USAGE
    assert "unknown config key" in capsys.readouterr().err
    assert compare.main(["no-such-run", "no-such-run-either", "--runs-dir", str(runs)]) == Exit.USAGE
    assert "no-such-run" in capsys.readouterr().err

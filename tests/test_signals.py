"""Signals are honoured from the first second: a training run signalled at any moment after its MLflow
run exists ends KILLED with the reason (exit 3), one signalled before ends without creating anything,
a study driver signalled during startup exits 3 with nothing launched, every wait (a lock, earlier
workers, Ray) ends on a signal and says what it waits for, and a command signalled while it imports
torch exits 3 with a message."""

import logging
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ltm.data
import ltm.train as train
from ltm.config import run_preset
from ltm.names import REASON_TAG, Exit
from ltm.signals import Stopped
from ltm.tracking import Tracker, default_tracking_uri
from studies.inference_scaling import STUDY as INFERENCE_SCALING
from studies import launcher
from studies.interrupt import Interruption


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
    real = launcher.plan_from_args

    def signal_then_plan(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(launcher, "plan_from_args", signal_then_plan)
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


# -- every wait ends on a signal, and says what it waits for -----------------------------------------

ROOT = Path(__file__).resolve().parents[1]


def hold_store_lock(runs: Path) -> subprocess.Popen:
    """A process that holds the tracking store's lock (`ltm.tracking.store_creation_lock`), then stops
    (SIGSTOP): a wait for it never ends by itself."""
    runs.mkdir(parents=True, exist_ok=True)
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; from ltm.tracking import store_creation_lock\n"
                               "with store_creation_lock(sys.argv[1]):\n print('held', flush=True); time.sleep(600)",
                               default_tracking_uri(runs)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    os.kill(holder.pid, signal.SIGSTOP)
    return holder


def end(proc: subprocess.Popen) -> None:
    proc.kill()  # SIGKILL ends a stopped process too, and releases its lock
    proc.wait()


def wait_for_text(path: Path, text: str, proc: subprocess.Popen, timeout: float = 180.0) -> bool:
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        if text in path.read_text():
            return True
        time.sleep(0.1)
    return False


def test_ltm_train_signalled_while_waiting_for_the_store_lock_exits_3_naming_the_wait(tmp_path):
    runs = tmp_path / "runs"
    holder = hold_store_lock(runs)
    err = tmp_path / "train.err"
    try:
        with open(err, "w") as stderr:
            proc = subprocess.Popen([sys.executable, "-m", "ltm.train", "--preset", "smoke", "--runs-dir", str(runs),
                                     "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}"],
                                    cwd=ROOT, stdout=subprocess.PIPE, stderr=stderr, text=True)
        said = wait_for_text(err, "waiting for the tracking store's lock", proc)
        proc.send_signal(signal.SIGTERM)
        sent = time.time()
        out, _ = proc.communicate(timeout=60)
        waited = time.time() - sent
    finally:
        end(holder)
    assert said, err.read_text()  # it says what it waits for, and who holds it
    assert f"held by process {holder.pid} [" in err.read_text() and f"kill -CONT {holder.pid}" in err.read_text()
    assert proc.returncode == Exit.INTERRUPTED, (out, err.read_text())
    assert "interrupted by SIGTERM while waiting for the tracking store's lock" in out
    assert "before the run started; nothing was changed" in out
    assert waited < 30  # the wait ends at once (the rest is the interpreter's exit on a busy machine)
    assert runs_of(runs) == []


def test_a_study_signalled_while_waiting_for_the_store_lock_exits_3_and_creates_no_parent(tmp_path, capsys):
    import fcntl

    runs = tmp_path / "runs"
    runs.mkdir()
    fd = os.open(runs / "mlflow.db.lock", os.O_RDWR | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)  # a lock held here: the driver waits for it like for another process's
    waiting, returned, sent = threading.Event(), threading.Event(), []

    class Seen(logging.Handler):
        def emit(self, record):
            if "waiting for the tracking store's lock" in record.getMessage():
                waiting.set()

    def signal_then_release():
        waiting.wait(timeout=120)
        sent.append(time.time())
        os.kill(os.getpid(), signal.SIGTERM)
        returned.wait(timeout=30)  # a driver that keeps waiting gets the lock after 30 s (and fails the test)
        os.close(fd)

    logging.getLogger("ltm.runlock").addHandler(seen := Seen())
    thread = threading.Thread(target=signal_then_release)
    thread.start()
    try:
        code = study_main(tmp_path)
        waited = time.time() - sent[0]
    finally:
        returned.set()
        thread.join()
        logging.getLogger("ltm.runlock").removeHandler(seen)
    assert waiting.is_set()
    assert code == Exit.INTERRUPTED and waited < 10
    assert "interrupted by SIGTERM while waiting for the tracking store's lock" in capsys.readouterr().err
    assert runs_of(runs, "inference_scaling") == []  # no parent run created after the signal


def test_a_lock_wait_gives_up_after_its_timeout_naming_the_holder(tmp_path, monkeypatch):
    from ltm.tracking import TrackingError, TrackingUnusable, open_store

    LOCK_TIMEOUT_ENV = "LTM_LOCK_TIMEOUT"

    holder = hold_store_lock(tmp_path)
    os.kill(holder.pid, signal.SIGCONT)  # a live holder that keeps the lock ...
    threading.Timer(15, holder.kill).start()  # ... for 15 s
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "1")
    started = time.time()
    try:
        with pytest.raises(TrackingError, match=f"gave up waiting for the tracking store's lock .* after 1 s: it is "
                                                 f"held by process {holder.pid} .*set {LOCK_TIMEOUT_ENV}"):
            open_store(default_tracking_uri(tmp_path))
    finally:
        end(holder)
    assert time.time() - started < 10
    monkeypatch.setenv(LOCK_TIMEOUT_ENV, "soon")
    with pytest.raises(TrackingUnusable, match=f"{LOCK_TIMEOUT_ENV}='soon' is not a number of seconds > 0"):
        open_store(default_tracking_uri(tmp_path))


def test_waiting_for_an_earlier_starts_workers_names_them_and_ends_on_a_signal(tmp_path, caplog):
    from ltm.runlock import STUDY_DRIVER_ENV
    from studies.interrupt import Interruption, wait_for_stragglers

    worker = subprocess.Popen([sys.executable, "-c", "import sys, time; from ltm.runlock import RunLock; "
                               f"l = RunLock({str(tmp_path)!r}, 'k', 'trained'); print('held', flush=True); "
                               "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True,
                              env={**os.environ, STUDY_DRIVER_ENV: "study:host:1"})
    try:
        assert worker.stdout.readline().strip() == "held"
        with caplog.at_level(logging.INFO, "studies.interrupt"):
            wait_for_stragglers(tmp_path, ["k"], "study", timeout=0.5)
        assert f"process {worker.pid} [" in caplog.text and "still run after 0 s" in caplog.text
        threading.Timer(1.0, os.kill, (os.getpid(), signal.SIGTERM)).start()
        started = time.time()
        with Interruption(), pytest.raises(Stopped, match=f"SIGTERM while waiting for 1 worker.*process {worker.pid}"):
            wait_for_stragglers(tmp_path, ["k"], "study", timeout=60)
        assert time.time() - started < 5
    finally:
        end(worker)


# -- a signal in a command's first seconds ---------------------------------------------------------

def _catches_sigterm(pid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    caught = int(next(line for line in status.splitlines() if line.startswith("SigCgt")).split()[1], 16)
    return bool(caught & (1 << (signal.SIGTERM - 1)))


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads /proc (Linux)")
@pytest.mark.parametrize("command", [["-m", "ltm.train", "--preset", "smoke", "--no-progress"],
                                     ["studies/sample_efficiency.py", "--preset", "smoke"],
                                     ["-m", "studies.worker", "--serve"], ["analysis/plot_scaling.py"],
                                     ["analysis/compare.py", "a.pt", "b.pt"]],
                         ids=["ltm.train", "study", "worker", "plot_scaling", "compare"])
def test_a_signal_while_a_command_imports_torch_exits_3_with_a_message(tmp_path, command):
    takes_runs_dir = "--preset" in command or command[0].startswith("analysis/")
    proc = subprocess.Popen([sys.executable, *command, *(["--runs-dir", str(tmp_path / "runs")] if takes_runs_dir
                                                         else [])],
                            cwd=ROOT, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while proc.poll() is None and not _catches_sigterm(proc.pid) and time.time() < deadline:
        time.sleep(0.002)
    torch_loaded = "libtorch" in Path(f"/proc/{proc.pid}/maps").read_text()
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert not torch_loaded  # the handler was there before the heavy imports: the signal came during them
    assert proc.returncode == Exit.INTERRUPTED, err
    assert "interrupted by SIGTERM" in err and "start the same command again" in err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


# -- after the backend returns ---------------------------------------------------------------------

@pytest.fixture
def fake_ray(monkeypatch):
    """Ray and Tune that start and run nothing: the driver's own steps around them, in seconds."""
    import ray
    from ray import tune

    class Tuner:
        def __init__(self, *args, **kwargs):
            pass

        can_restore = staticmethod(lambda path: False)

        def fit(self):
            pass

    monkeypatch.setattr(ray, "init", lambda **kwargs: None)
    monkeypatch.setattr(ray, "shutdown", lambda: None)
    monkeypatch.setattr(tune, "with_parameters", lambda trainable, **kwargs: trainable)
    monkeypatch.setattr(tune, "with_resources", lambda trainable, resources: trainable)
    monkeypatch.setattr(tune, "Tuner", Tuner)
    return ray


def test_a_signal_after_the_backend_returns_is_recorded_and_the_parent_ends_killed(tmp_path, monkeypatch, fake_ray):
    real = launcher.summary

    def signal_then_summarise(tracker, plan):
        os.kill(os.getpid(), signal.SIGTERM)  # the backend's trial handler must be detached by now
        return real(tracker, plan)

    monkeypatch.setattr(launcher, "summary", signal_then_summarise)
    try:
        code = study_main(tmp_path)
    except KeyboardInterrupt:
        pytest.fail("the backend's handler (checkpoint the trials, break out of Tune) ran after the backend returned")
    assert code == Exit.INTERRUPTED
    [parent] = runs_of(tmp_path / "runs", "inference_scaling")
    assert parent.info.status == "KILLED"
    with pytest.raises(AttributeError):
        Interruption().on_request = None  # a misspelt switch is an error, not a silent no-op


def test_a_sigterm_during_ray_init_ends_the_study_with_exit_3_and_its_parent_killed(tmp_path, monkeypatch, fake_ray,
                                                                                  capsys):
    def init_signalled(**kwargs):
        signal.signal(signal.SIGTERM, lambda signum, frame: sys.exit(signum))  # what ray.init installs first
        os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(fake_ray, "init", init_signalled)
    try:
        code = study_main(tmp_path)
    except SystemExit as exit_:
        pytest.fail(f"the driver exited {exit_.code} from Ray's SIGTERM handler")
    assert code == Exit.INTERRUPTED
    assert "interrupted by SIGTERM while waiting for Ray to start" in capsys.readouterr().err
    [parent] = runs_of(tmp_path / "runs", "inference_scaling")
    assert parent.info.status == "KILLED"


def test_a_ray_cluster_that_does_not_answer_ends_the_study_with_exit_2_and_its_parent_failed(tmp_path, monkeypatch,
                                                                                            fake_ray, capsys):
    def refused(**kwargs):
        raise ConnectionError("could not connect to 127.0.0.1:1")

    monkeypatch.setattr(fake_ray, "init", refused)
    assert study_main(tmp_path, "--cluster", "ray", "--address", "127.0.0.1:1") == Exit.USAGE
    assert "could not connect to 127.0.0.1:1" in capsys.readouterr().err
    [parent] = runs_of(tmp_path / "runs", "inference_scaling")
    assert parent.info.status == "FAILED"  # not left RUNNING until the study is started again
    assert "127.0.0.1:1" in parent.data.tags[REASON_TAG]


def test_a_signal_inside_a_library_that_wraps_the_stop_in_its_own_error_still_stops():
    """MLflow's store catches what a signal raises inside a query and raises its own error from it; the
    analysis must still see Stopped (exit 3), not a traceback."""
    from ltm.signals import Interrupt, Stopped

    class StoreError(Exception):
        pass

    def query() -> None:  # a library call that wraps every error in its own
        try:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(5)
        except Exception as err:
            raise StoreError("query failed") from err

    with Interrupt() as interrupt, pytest.raises(Stopped, match="SIGTERM"):
        with interrupt.stoppable():
            query()
    assert interrupt.name == "SIGTERM"
    with Interrupt() as interrupt, pytest.raises(StoreError):  # an error no signal caused stays itself
        with interrupt.stoppable():
            raise StoreError("a real failure")


def test_a_signal_whose_stop_python_swallows_still_stops_the_block_without_a_traceback(capsys):
    """A Stopped raised inside a weakref callback (the import system has them) is printed by Python as
    "Exception ignored" and lost; the block must still stop, and nothing is printed."""
    import gc
    import weakref

    from ltm.signals import Interrupt, Stopped

    class Thing:
        pass

    with Interrupt() as interrupt, pytest.raises(Stopped, match="SIGTERM"):
        with interrupt.stoppable():
            thing = Thing()
            ref = weakref.ref(thing, lambda _: os.kill(os.getpid(), signal.SIGTERM))  # noqa: F841
            del thing
            gc.collect()
            time.sleep(0.1)  # the block goes on: its Stopped was swallowed
    assert "Traceback" not in capsys.readouterr().err

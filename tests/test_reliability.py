"""What a run does when something goes wrong: a second writer, a tracking outage, a signal during an
evaluation, a full disk, a tracking server on the network, SLURM that does not answer."""

import errno
import io
import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ltm.checkpoint as checkpoint
import ltm.evaluate
import ltm.train as train
from ltm import lifecycle, loop
from ltm.config import RunConfig, run_preset
from ltm.names import REASON_TAG, RUN_KEY_TAG, Exit, Status
from ltm.runlock import RunBusy, RunLock, holder, lock_path
from ltm.tracking import Tracker, default_tracking_uri, redact

ROOT = Path(__file__).resolve().parents[1]


def smoke(tmp_path, *overrides):
    return run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", *overrides])


def cli(tmp_path, *args, runs="runs"):
    return [sys.executable, "-m", "ltm.train", "--preset", "smoke", "--runs-dir", str(tmp_path / runs),
            "--no-progress", "--set", f"data.cache_dir={tmp_path / 'cache'}", *args]


def wait_for(predicate, timeout=120.0, every=0.05):
    deadline = time.time() + timeout
    while time.time() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return False


def steps(uri, run_id, key):
    return [m.step for m in MlflowClient(uri).get_metric_history(run_id, key)]


# -- one writer per run ----------------------------------------------------------------------------

def test_a_second_launch_of_a_running_run_is_refused_and_one_run_finishes(tmp_path):
    args = ["--set", "train.tokens=65536", "--experiment", "twice"]
    first = subprocess.Popen(cli(tmp_path, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    key = smoke(tmp_path, "train.tokens=65536").run_key()
    runs = tmp_path / "runs"
    assert wait_for(lambda: holder(runs, key) or first.poll() is not None), first.communicate()
    assert first.poll() is None
    second = subprocess.run(cli(tmp_path, *args), cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert second.returncode == Exit.BUSY, second.stderr
    assert f"run {key} is already being trained by process {first.pid}" in second.stderr
    out, err = first.communicate(timeout=300)
    assert first.returncode == 0, err
    client = MlflowClient(default_tracking_uri(runs))
    found = client.search_runs([client.get_experiment_by_name("twice").experiment_id],
                               filter_string=f"tags.`{RUN_KEY_TAG}` = '{key}'")
    assert [r.info.status for r in found] == ["FINISHED"]
    assert holder(runs, key) is None  # released at the end
    assert not list((runs / "checkpoints" / key).glob("*.tmp"))


def test_a_lock_dies_with_its_holder_and_a_stale_pid_is_never_signalled(tmp_path):
    from studies.interrupt import stop_local_workers

    holder_proc = subprocess.Popen([sys.executable, "-c", "import sys, time; from ltm.runlock import RunLock; "
                                    f"l = RunLock({str(tmp_path)!r}, 'k', 'trained'); print('held', flush=True); "
                                    "time.sleep(60)"], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert holder_proc.stdout.readline().strip() == "held"
    assert holder(tmp_path, "k")["pid"] == holder_proc.pid
    with pytest.raises(RunBusy, match=f"process {holder_proc.pid}"):
        RunLock(tmp_path, "k", "trained")
    holder_proc.kill()
    holder_proc.wait()
    assert holder(tmp_path, "k") is None  # SIGKILL released it: no stale lock to clean up
    # The file still names a pid; give that pid to an innocent process: it must not be signalled.
    innocent = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
    lock_path(tmp_path, "k").write_text(json.dumps({"pid": innocent.pid, "host": socket.gethostname(), "driver": "d"}))
    stop_local_workers(tmp_path, ["k"], "d", timeout=1)
    time.sleep(0.5)
    assert innocent.poll() is None
    innocent.kill()
    with RunLock(tmp_path, "k", "trained"):  # and the next writer gets it
        pass


def test_an_evaluation_point_holds_its_own_lock(tmp_path):
    from studies.messages import CheckpointSource, Point, TrialContext
    from studies.point import run_point
    from studies.study import ZeroShotTask

    point = Point(key="evalkey", config={}, label={}, task=ZeroShotTask(), source=CheckpointSource("/nowhere"))
    with RunLock(tmp_path, "evalkey", "evaluated"):
        result = run_point(point, TrialContext(default_tracking_uri(tmp_path), "e", str(tmp_path), None))
    assert result.status == Status.BUSY and "already being evaluated" in result.reason


# -- files: config, temporaries, a full disk -------------------------------------------------------

def test_the_config_is_plain_json_beside_the_checkpoints_and_stale_temporaries_go(tmp_path, monkeypatch):
    cfg = smoke(tmp_path)
    run_dir = tmp_path / "runs" / "checkpoints" / cfg.run_key()
    run_dir.mkdir(parents=True)
    (run_dir / "ckpt-000000000008192.pt.4242.tmp").write_bytes(b"half a checkpoint of a dead writer")
    result = train.run(cfg, runs_dir=tmp_path / "runs", experiment="c", progress=False)
    assert not list(run_dir.glob("*.tmp"))
    saved = json.loads((run_dir / checkpoint.CONFIG_FILE).read_text())
    assert saved["run_key"] == cfg.run_key() and saved["run_id"] == result.run_id
    assert RunConfig.from_dict(saved["config"]) == cfg and saved["model_overrides"]["vocab_size"] > 0

    import torch

    def refuse(*a, **k):
        raise AssertionError("planning an evaluation must not load a checkpoint")

    monkeypatch.setattr(torch, "load", refuse)
    resolved = checkpoint.resolve(str(run_dir), default_tracking_uri(tmp_path / "runs"), tmp_path / "runs")
    assert RunConfig.from_dict(resolved.config) == cfg and resolved.run_id == result.run_id


@pytest.mark.parametrize("error, says", [
    (OSError(errno.ENOSPC, "No space left on device"), "No space left on device (errno ENOSPC)"),
    (OSError(errno.EFBIG, "File too large"), "File too large (errno EFBIG)"),
    # what torch.save raises when the disk fills under its zip writer
    (RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0"), "unexpected pos"),
], ids=["ENOSPC", "EFBIG", "torch-RuntimeError"])
def test_a_full_disk_fails_the_run_naming_the_file_and_leaves_no_temporary(tmp_path, monkeypatch, error, says):
    import torch

    def full(obj, f, *a, **k):
        f.write(b"partial")
        raise error

    monkeypatch.setattr(torch, "save", full)
    with pytest.raises(OSError, match="cannot write checkpoint .*ckpt-.*free on its disk.*run the same command again"):
        train.run(smoke(tmp_path), runs_dir=tmp_path / "runs", experiment="disk", progress=False)
    run_dir = tmp_path / "runs" / "checkpoints" / smoke(tmp_path).run_key()
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob("ckpt-*"))
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("disk").experiment_id])
    assert run.info.status == "FAILED"
    assert says in run.data.tags[REASON_TAG] and str(run_dir / "ckpt-") in run.data.tags[REASON_TAG]


class _FullDisk(io.FileIO):
    """A file on a disk with 4 KB left: the kernel refuses the write that goes past them. Unbuffered, so
    closing it has nothing left to flush, and torch.save then raises its own RuntimeError "unexpected pos"."""

    def write(self, data) -> int:
        if self.tell() + len(data) > 4096:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return super().write(data)


def _onto_a_full_disk(monkeypatch, which=lambda path: True):
    """The files ltm.files writes that `which` picks are on a full disk."""
    import ltm.files

    def full(file, mode="r", *args, **kwargs):
        return _FullDisk(file, "wb") if which(str(file)) else open(file, mode, *args, **kwargs)

    monkeypatch.setattr(ltm.files, "open", full, raising=False)


def test_a_full_disk_under_torch_save_is_named_as_one_with_the_free_space(tmp_path, monkeypatch):
    # torch.save's own error is "[enforce fail at inline_container.cc:672] . unexpected pos": the disk is named
    _onto_a_full_disk(monkeypatch, lambda path: ".pt." in path)
    with pytest.raises(OSError, match=r"cannot write checkpoint .*ckpt-.*: No space left on device \(errno ENOSPC\); "
                                      r"\d+\.\d\d GB free on its disk"):
        train.run(smoke(tmp_path), runs_dir=tmp_path / "runs", experiment="disk", progress=False)
    run_dir = tmp_path / "runs" / "checkpoints" / smoke(tmp_path).run_key()
    assert not list(run_dir.glob("*.tmp")) and not list(run_dir.glob("ckpt-*"))
    client = MlflowClient(default_tracking_uri(tmp_path / "runs"))
    (run,) = client.search_runs([client.get_experiment_by_name("disk").experiment_id])
    assert "No space left on device (errno ENOSPC)" in run.data.tags[REASON_TAG]
    assert "unexpected pos" not in run.data.tags[REASON_TAG]


def test_every_atomic_write_names_a_full_disk_and_its_free_space(tmp_path, monkeypatch):
    from ltm.files import atomic_write

    _onto_a_full_disk(monkeypatch)
    target = tmp_path / "config.json"
    with pytest.raises(OSError, match=rf"No space left on device writing {re.escape(str(target))}: \d+\.\d\d GB "
                                      "free on its filesystem") as raised:
        atomic_write(target, "{}" * 10_000)
    assert raised.value.errno == errno.ENOSPC and not list(tmp_path.iterdir())


# -- a signal during an evaluation -------------------------------------------------------------------

def test_a_signal_during_an_evaluation_stops_it_at_once_and_the_resume_redoes_it(tmp_path, monkeypatch):
    overrides = ("train.tokens=16384", "train.eval_every=4096")
    straight = train.run(smoke(tmp_path, *overrides), runs_dir=tmp_path / "straight", experiment="e", progress=False)

    real, calls = ltm.evaluate.evaluate_bounds, []

    def preempted_in_the_second_evaluation(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGUSR2)  # SLURM's warning, mid-evaluation
            raise AssertionError("the evaluation went on after the signal")
        return real(*args, **kwargs)

    monkeypatch.setattr(ltm.evaluate, "evaluate_bounds", preempted_in_the_second_evaluation)
    cfg = smoke(tmp_path, *overrides)
    stopped = train.run(cfg, runs_dir=tmp_path / "runs", experiment="e", progress=False)
    assert stopped.status == "KILLED" and "SIGUSR2 during the evaluation at 8,192 tokens" in stopped.reason
    state = checkpoint.load_latest_checkpoint(stopped.run_dir)
    assert state.tokens == 8192 and state.eval_pending
    monkeypatch.setattr(ltm.evaluate, "evaluate_bounds", real)
    resumed = train.run(cfg, runs_dir=tmp_path / "runs", experiment="e", progress=False)
    assert resumed.status == "FINISHED"
    uri_a, uri_b = default_tracking_uri(tmp_path / "straight"), default_tracking_uri(tmp_path / "runs")
    for key in ("val/ppl_bound", "tokens", "train/loss"):
        assert steps(uri_b, resumed.run_id, key) == steps(uri_a, straight.run_id, key), key  # each once
    a, b = MlflowClient(uri_a).get_run(straight.run_id), MlflowClient(uri_b).get_run(resumed.run_id)
    for key in ("val/ppl_bound", "val/ppl_iw", "train/loss"):
        assert b.data.metrics[key] == pytest.approx(a.data.metrics[key], rel=1e-4), key


def test_metrics_the_store_had_not_taken_when_the_process_died_are_sent_by_the_resume(tmp_path, monkeypatch):
    overrides = ("train.tokens=4096", "train.checkpoint_every=2048")
    straight = train.run(smoke(tmp_path, *overrides), runs_dir=tmp_path / "straight", experiment="e", progress=False)

    # The store is slow to take the metrics at the checkpoint's step, and the process dies right after
    # the checkpoint (SIGKILL: nothing runs after it, so the metrics still queued are gone with it).
    real_batch, real_save, slow = MlflowClient.log_batch, loop.save, [True]

    def slow_store(self, run_id, *args, metrics=(), **kwargs):
        if slow[0] and any(m.step >= 2048 for m in metrics):
            raise ConnectionError("no answer yet")
        return real_batch(self, run_id, *args, metrics=metrics, **kwargs)

    def killed_after_the_checkpoint(ctx, state, tokens, last=False):
        real_save(ctx, state, tokens, last)
        if tokens == 2048:
            ctx.tracker.spool(tmp_path / "gone-with-the-process.jsonl")  # the queue leaves the process
            raise KeyboardInterrupt

    monkeypatch.setattr(MlflowClient, "log_batch", slow_store)
    monkeypatch.setattr(loop, "save", killed_after_the_checkpoint)
    cfg = smoke(tmp_path, *overrides)
    with pytest.raises(KeyboardInterrupt):
        train.run(cfg, runs_dir=tmp_path / "runs", experiment="e", progress=False)
    uri_a, uri_b = default_tracking_uri(tmp_path / "straight"), default_tracking_uri(tmp_path / "runs")
    client = MlflowClient(uri_b)
    (killed,) = client.search_runs([client.get_experiment_by_name("e").experiment_id])
    assert 2048 not in steps(uri_b, killed.info.run_id, "tokens")  # the store never got them
    slow[0] = False
    monkeypatch.setattr(loop, "save", real_save)
    resumed = train.run(cfg, runs_dir=tmp_path / "runs", experiment="e", progress=False)
    assert resumed.status == "FINISHED"
    for key in ("tokens", "train/loss", "val/ppl_bound"):
        assert steps(uri_b, resumed.run_id, key) == steps(uri_a, straight.run_id, key), key  # none lost, none twice


# -- a tracking server that goes away ----------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Server:
    """A plain `mlflow server` on 127.0.0.1 that the test stops and starts again on the same port."""

    def __init__(self, tmp_path: Path) -> None:
        self.store = f"sqlite:///{tmp_path / 'served.db'}"
        self.port = _free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.log = open(tmp_path / "server.log", "ab")
        self.proc = None

    def start(self) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", self.store,
                                      "--host", "127.0.0.1", "--port", str(self.port), "--workers", "1"],
                                     stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True)
        assert wait_for(self.healthy, timeout=120, every=0.5), "mlflow server did not start"

    def healthy(self) -> bool:
        try:
            return urllib.request.urlopen(self.uri + "/health", timeout=1).status == 200
        except (urllib.error.URLError, OSError):
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()


@pytest.fixture
def server(tmp_path):
    s = _Server(tmp_path)
    s.start()
    yield s
    s.stop()


def _eval_steps(uri: str, experiment: str, key: str = "val/ppl_bound") -> tuple[object, list[int]]:
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])
    return run, steps(uri, run.info.run_id, key)


@pytest.mark.slow
def test_a_tracking_outage_of_20_s_loses_no_metric_and_the_run_finishes(tmp_path, server):
    args = ["--tracking-uri", server.uri, "--experiment", "outage", "--set", "train.tokens=49152",
            "--set", "train.eval_every=4096", "--set", "train.log_every=1024"]
    proc = subprocess.Popen(cli(tmp_path, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    client = MlflowClient(server.uri)

    def evaluated_once():
        exp = client.get_experiment_by_name("outage")
        runs = client.search_runs([exp.experiment_id]) if exp else []
        return bool(runs) and "val/ppl_bound" in runs[0].data.metrics

    assert wait_for(evaluated_once, every=0.5) and proc.poll() is None
    server.stop()
    time.sleep(20)
    assert proc.poll() is None, "training stopped while the tracking server was away"
    server.start()
    out, err = proc.communicate(timeout=600)
    assert proc.returncode == 0, err[-3000:]
    run, evals = _eval_steps(server.uri, "outage")
    assert run.info.status == "FINISHED"
    assert evals == list(range(4096, 49152 + 1, 4096))  # every evaluation, each once
    assert steps(server.uri, run.info.run_id, "tokens") == list(range(1024, 49152 + 1, 1024))


@pytest.mark.slow
def test_a_tracking_server_that_stays_away_gets_a_checkpoint_and_a_clear_exit(tmp_path, server):
    tokens, every = 262144, 32768
    args = ["--tracking-uri", server.uri, "--experiment", "gone", "--set", f"train.tokens={tokens}",
            "--set", f"train.eval_every={every}", "--tracking-patience", "3"]
    # A refused request fails at once (no HTTP retries), so the 3 s of patience run out long before the
    # run's end however fast this machine trains.
    env = {**os.environ, "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"}
    proc = subprocess.Popen(cli(tmp_path, *args), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=env)
    key = smoke(tmp_path, f"train.tokens={tokens}", f"train.eval_every={every}").run_key()
    run_dir = tmp_path / "runs" / "checkpoints" / key
    assert wait_for(lambda: (run_dir / checkpoint.CONFIG_FILE).exists() or proc.poll() is not None)
    server.stop()
    out, err = proc.communicate(timeout=300)
    assert proc.returncode == Exit.INTERRUPTED, err[-3000:]
    assert "did not answer for 3 s" in out and "run the same command again once the store answers" in out
    assert checkpoint.load_latest_checkpoint(run_dir).tokens < tokens  # stopped mid-run, not at the end
    assert (run_dir / lifecycle.UNSENT_FILE).exists()
    server.start()
    again = subprocess.run(cli(tmp_path, *args), cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0, again.stderr[-3000:]
    assert not (run_dir / lifecycle.UNSENT_FILE).exists()
    run, evals = _eval_steps(server.uri, "gone")
    assert run.info.status == "FINISHED" and evals == list(range(every, tokens + 1, every))
    assert steps(server.uri, run.info.run_id, "tokens") == list(range(256, tokens + 1, 256))  # none lost, none twice


def test_metrics_logged_while_the_store_is_down_are_sent_when_it_answers(tmp_path, monkeypatch):
    tracker = Tracker(default_tracking_uri(tmp_path), "buffer")
    run_id = tracker.create_run("k", "r", {}, {})
    real, answers = tracker.client.log_batch, iter([False, False, True, True, True])
    logged, waited_for = threading.Event(), []

    def flaky(*args, **kwargs):
        # The store answers its first call only once the loop has logged all three metrics: a
        # log_metrics that waited for the store would be stuck here until the timeout.
        waited_for.append(not logged.wait(timeout=30))
        if not next(answers, True):
            raise ConnectionError("server away")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_batch", flaky)
    for step in range(3):
        tracker.log_metrics(run_id, {"m": float(step)}, step=step)
    logged.set()
    assert wait_for(lambda: tracker.outage() > 0, timeout=5) and "server away" in tracker.last_error
    tracker.finish(run_id, Status.FINISHED, patience=30)
    assert steps(tracker.uri, run_id, "m") == [0, 1, 2] and tracker.outage() == 0
    assert not any(waited_for)  # logging never waited for the store


# -- the study's tracking server: bind address, Host check, basic auth, no password in files ---------

@pytest.mark.slow
def test_the_study_server_listens_locally_and_only_answers_the_study(tmp_path):
    from studies.mlflow_server import MlflowServer, node_address

    server = MlflowServer(f"sqlite:///{tmp_path / 'm.db'}", tmp_path, one_node=True)
    try:
        assert server.uri.startswith("http://127.0.0.1:")
        import psutil

        bound = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == "LISTEN" and c.laddr.port == server.port}
        assert bound == {"127.0.0.1"}  # not 0.0.0.0: nothing off this node reaches it
        creds = json.loads(server.credentials.read_text())
        assert stat.S_IMODE(server.credentials.stat().st_mode) == 0o600
        api = f"{server.uri}/api/2.0/mlflow/experiments/search?max_results=1"

        def status(headers):
            try:
                return urllib.request.urlopen(urllib.request.Request(api, headers=headers), timeout=10).status
            except urllib.error.HTTPError as err:
                return err.code

        import base64

        good = "Basic " + base64.b64encode(f"{creds['username']}:{creds['password']}".encode()).decode()
        bad = "Basic " + base64.b64encode(f"{creds['username']}:guess".encode()).decode()
        assert status({}) == 401 and status({"Authorization": bad}) == 401
        assert status({"Authorization": good}) == 200
        assert status({"Authorization": good, "Host": "attacker.example"}) == 403  # DNS rebinding
        from ltm.tracking import use_credentials

        use_credentials(server.credentials)  # what a job does with the file it is pointed to
        tracker = Tracker(server.uri, "authed")
        run_id = tracker.create_run("k", "r", {}, {})
        tracker.finish(run_id, Status.FINISHED)
    finally:
        server.stop()
        for var in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
            os.environ.pop(var, None)
    server = MlflowServer(f"sqlite:///{tmp_path / 'm.db'}", tmp_path, one_node=False)  # jobs on other nodes
    try:
        bound = {c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == "LISTEN" and c.laddr.port == server.port}
        assert bound == {node_address()} and server.uri == f"http://{node_address()}:{server.port}"
    finally:
        server.stop()


def test_passwords_in_a_tracking_uri_are_never_printed_or_stored(tmp_path, capsys):
    from studies.inference_scaling import STUDY
    from studies.launcher import main
    from studies.plan import plan

    uri = "http://alice:hunter2@127.0.0.1:9/"
    assert redact(uri) == "http://***@127.0.0.1:9/"
    assert main(STUDY, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--tracking-uri", uri]) == 2
    assert "hunter2" not in capsys.readouterr().err
    plan_ = plan(STUDY, ["--preset", "smoke", "--runs-dir", str(tmp_path),
                         "--tracking-uri", f"sqlite:///{tmp_path / 'm.db'}", "--dry-run"])
    plan_.tracking_uri = uri  # as if the server had answered
    context = plan_.context(credentials_file=plan_.write_credentials())
    assert "hunter2" not in json.dumps(context.to_dict()) and context.tracking_uri == "http://127.0.0.1:9/"
    saved = Path(context.credentials_file)
    assert json.loads(saved.read_text()) == {"username": "alice", "password": "hunter2"}
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600


# -- SLURM restarts ------------------------------------------------------------------------------

@pytest.mark.parametrize("answer, message",
                         [(None, "cannot tell whether the jobs"), ({"77_0"}, "still queued or running")],
                         ids=["squeue-unanswered", "jobs-alive"])
def test_a_slurm_restart_touches_no_run_while_earlier_jobs_may_live(tmp_path, monkeypatch, capsys, answer, message):
    import studies.plan
    import studies.slurm_backend as slurm
    from studies.inference_scaling import STUDY
    from studies.launcher import main

    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--cluster", "slurm"]
    monkeypatch.setattr(studies.plan.shutil, "which", lambda name: "/usr/bin/" + name)
    plan_ = studies.plan.plan(STUDY, argv)
    tracker = Tracker(plan_.tracking_uri, plan_.experiment)
    running = tracker.create_run(plan_.points[0].key, "alive in a job", {}, {})
    folder = slurm.slurm_folder(plan_)
    folder.mkdir(parents=True)
    (folder / "jobs.json").write_text(json.dumps(["77_0", "77_1"]))
    monkeypatch.setattr(slurm, "squeue_ids", lambda ids: answer)
    assert main(STUDY, argv) == Exit.USAGE
    assert message in capsys.readouterr().err
    assert tracker.client.get_run(running).info.status == "RUNNING"  # not marked KILLED under a live job


def test_a_tracking_patience_that_is_not_positive_is_refused_before_anything_starts(tmp_path, capsys):
    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), "--tracking-patience", "0"]
    assert train.main(argv) == Exit.USAGE
    assert "--tracking-patience must be > 0 seconds" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "mlflow.db").exists()


def test_a_dataset_row_raced_by_a_concurrent_run_is_linked_on_retry_and_never_fails_the_run(tmp_path, monkeypatch,
                                                                                          caplog):
    # Seen on SLURM: two runs on the same data started together; the store refused the second insert
    # of the dataset row (UNIQUE constraint) and that run died before training.
    monkeypatch.setattr(time, "sleep", lambda s: None)
    tracker = Tracker(default_tracking_uri(tmp_path), "e")
    run_id = tracker.create_run("k", "r", {}, {})
    real, calls = tracker.client.log_inputs, []

    def racing(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("UNIQUE constraint failed: datasets.experiment_id, datasets.name, datasets.digest")
        return real(*args, **kwargs)

    monkeypatch.setattr(tracker.client, "log_inputs", racing)
    tracker.log_dataset(run_id, "synthetic", {"seed": 0}, "synthetic", "synthetic")
    assert len(calls) == 2
    assert tracker.client.get_run(run_id).inputs.dataset_inputs[0].dataset.name == "synthetic"

    monkeypatch.setattr(tracker.client, "log_inputs", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("down")))
    tracker.log_dataset(run_id, "other", {"seed": 1}, "synthetic", "synthetic")  # lineage only: no raise
    assert "was not recorded as an MLflow dataset input: RuntimeError: down" in caplog.text  # a warning

"""MLflow: run identity, params, metrics keyed by tokens seen, artifacts, resuming the same run.

Everything goes through an explicit `MlflowClient` (no global "active run"), so one process can
track several runs and Ray or SLURM workers never depend on the fluent API's state. Metrics are
sent by a background thread that retries until the store answers, so a tracking server that goes
away for a while neither stops training nor loses a metric; `outage()` says how long it has been
unreachable and `spool` keeps what could not be sent for the next start.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path

from mlflow.entities import Metric, Param, RunTag
from mlflow.tracking import MlflowClient

from ltm.names import PARENT_TAG, REASON_TAG, RUN_KEY_TAG, Status
from ltm.runlock import LockTimeout, wait_for_lock
from ltm.signals import Stopped

log = logging.getLogger(__name__)


class TrackingError(RuntimeError):
    """The tracking store cannot be used; the message says what to change."""


class TrackingUnusable(TrackingError):
    """The store --tracking-uri names cannot be used (unreachable, not a URI, read-only, damaged):
    found before a run is created, so nothing was started (a bad option: exit 2)."""


def default_tracking_uri(runs_dir: str | Path) -> str:
    """sqlite:///<absolute runs dir>/mlflow.db (absolute, so workers in other folders find it)."""
    return f"sqlite:///{Path(runs_dir).resolve() / 'mlflow.db'}"


def tracking_uri_option(option: str | None, runs_dir: str | Path) -> str:
    """The store a command's --tracking-uri names (None: `default_tracking_uri(runs_dir)`), checked by
    `check_tracking_uri`: every command that takes --tracking-uri calls this before it opens the store, so a
    URI that cannot work is refused the same way everywhere (TrackingUnusable: exit 2), creating nothing."""
    uri = option or default_tracking_uri(runs_dir)
    check_tracking_uri(uri)
    return uri


def redact(uri: str) -> str:
    """The URI with any user:password replaced by ***, for messages and files others can read."""
    parts = urllib.parse.urlsplit(uri)
    if parts.password is None and parts.username is None:
        return uri
    return urllib.parse.urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2]))


def split_credentials(uri: str) -> tuple[str, tuple[str, str] | None]:
    """(the URI without user:password, (user, password) or None)."""
    parts = urllib.parse.urlsplit(uri)
    if parts.username is None:
        return uri, None
    bare = urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))
    return bare, (urllib.parse.unquote(parts.username), urllib.parse.unquote(parts.password or ""))


def write_credentials(path: Path, user: str, password: str) -> Path:
    """A credentials file readable only by this user (mode 600), for the jobs of a study."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"username": user, "password": password}, f)
    os.chmod(path, 0o600)
    return path


def use_credentials(path: str | Path | None) -> None:
    """Authenticate this process's MLflow requests with the credentials file (basic auth)."""
    if not path:
        return
    creds = json.loads(Path(path).read_text())
    os.environ["MLFLOW_TRACKING_USERNAME"] = creds["username"]
    os.environ["MLFLOW_TRACKING_PASSWORD"] = creds["password"]


def configure_mlflow(uri: str | None = None, credentials_file: str | Path | None = None) -> None:
    """Set this process's MLflow client up, once, where the process starts (a study's driver, a point's
    worker, a command line): MLflow reads these settings from the environment only.

    A dead tracking server fails a request in seconds, not after MLflow's default minutes of retries
    (the metric sender retries for as long as a run is willing to wait); basic-auth credentials come
    from a user:password in `uri` or from a credentials file (`write_credentials`), never from the URI
    that MLflow is given.
    """
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")
    os.environ.setdefault("MLFLOW_HTTP_REQUEST_TIMEOUT", "30")
    # a bar per downloaded config.json buried the analysis's own lines (one per run; 25 for a small ladder)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")
    creds = split_credentials(uri)[1] if uri else None
    if creds:
        os.environ["MLFLOW_TRACKING_USERNAME"], os.environ["MLFLOW_TRACKING_PASSWORD"] = creds
    use_credentials(credentials_file)


def check_tracking_uri(uri: str, timeout: float = 5.0) -> None:
    """Fail early, with a fix, when the tracking store is unreachable or unusable."""
    if uri.startswith(("http://", "https://")):
        try:
            urllib.request.urlopen(split_credentials(uri)[0].rstrip("/") + "/health", timeout=timeout).read()
        except (urllib.error.URLError, OSError) as err:
            raise TrackingUnusable(
                f"cannot reach the MLflow tracking server at {redact(uri)} ({err}); start one with "
                f"`mlflow server --backend-store-uri sqlite:///$PWD/runs/mlflow.db --port 5000`, or pass "
                f"--tracking-uri sqlite:///<absolute path>/mlflow.db to track in a local file") from None
    elif uri.startswith("sqlite:///"):
        _check_sqlite(Path(uri[len("sqlite:///"):]), uri)
    elif "://" not in uri:
        where = Path(uri).expanduser().resolve()
        raise TrackingUnusable(f"--tracking-uri {uri!r} is a path, not a URI; pass sqlite:///{where} for a SQLite "
                               f"store (or file://{where} for MLflow's folder store)")
    elif not uri.startswith(("file://", "databricks")):
        raise TrackingUnusable(f"unsupported tracking URI {redact(uri)!r}; use sqlite:////abs/path/mlflow.db or http://host:port")


_SQLITE_HEADER = b"SQLite format 3\x00"


def _check_sqlite(path: Path, uri: str) -> None:
    """A SQLite store the suite can write: absolute, in a writable folder (or one it can create: the check
    creates nothing), and a SQLite file if it exists."""
    if not path.is_absolute():
        raise TrackingUnusable(f"use an absolute SQLite path (sqlite:////abs/path/mlflow.db), got {uri}: "
                            "Ray and SLURM workers run in other folders")
    folder = next(p for p in path.parents if p.exists())  # its folder, or the nearest one that exists
    if not folder.is_dir():
        raise TrackingUnusable(f"cannot create the folder for the tracking database {path}: {folder} is not a folder")
    # SQLite writes a journal beside the file, so the folder must be writable as well as the file.
    for target in (folder, path) if path.exists() else (folder,):
        if not os.access(target, os.W_OK):
            raise TrackingUnusable(f"the tracking database {path} is read-only here ({target} is not writable); "
                                "pass --tracking-uri sqlite:////<a writable folder>/mlflow.db, or fix its permissions")
    if path.exists():
        try:
            with open(path, "rb") as f:
                header = f.read(len(_SQLITE_HEADER))
        except OSError as err:
            raise TrackingUnusable(f"cannot read the tracking database {path}: {err}") from None
        if path.stat().st_size and header != _SQLITE_HEADER:
            raise TrackingUnusable(f"{path} is not a SQLite database (damaged or truncated: it does not start with the "
                                "SQLite header); restore it from a backup, or move it away to start a new store")


LOCK_TIMEOUT_ENV = "LTM_LOCK_TIMEOUT"
"""How long (seconds) a process waits for the tracking store's lock (`store_creation_lock`) before it gives up."""
DEFAULT_LOCK_TIMEOUT = 600.0
"""Opening a store holds its lock for seconds (minutes to migrate a large store to a new MLflow)."""


def lock_timeout() -> float:
    """The wait for the store's lock: $LTM_LOCK_TIMEOUT seconds, else DEFAULT_LOCK_TIMEOUT."""
    text = os.environ.get(LOCK_TIMEOUT_ENV, "")
    try:
        seconds = float(text) if text else DEFAULT_LOCK_TIMEOUT
    except ValueError:
        seconds = float("nan")
    if not 0 < seconds < float("inf"):
        raise TrackingUnusable(f"{LOCK_TIMEOUT_ENV}={text!r} is not a number of seconds > 0; unset it to wait at "
                               f"most {DEFAULT_LOCK_TIMEOUT:.0f} s for the tracking store's lock")
    return seconds


@contextlib.contextmanager
def store_creation_lock(uri: str):
    """Serialise creating (and migrating) a SQLite store: MLflow's schema migration is not safe when two
    processes run it on a new file at once. A no-op for other stores.

    The lock is `<store>.lock`; its holder writes its pid into it. The wait says who holds it, ends on a
    signal (`ltm.runlock.wait_for_lock`) and gives up after `lock_timeout()` s (TrackingError)."""
    if not uri.startswith("sqlite:///"):
        yield
        return
    timeout = lock_timeout()
    lock = Path(uri[len("sqlite:///"):] + ".lock")
    lock.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            wait_for_lock(fd, lock, "the tracking store's lock", "opening the tracking store", timeout)
        except LockTimeout as err:
            raise TrackingError(f"{err} (or set {LOCK_TIMEOUT_ENV} to wait longer)") from None
        yield
    finally:
        os.close(fd)


def open_store(uri: str) -> MlflowClient:
    """A client of the store, created (and its schema migrated) first if need be, one process at a time;
    a store that cannot be opened raises TrackingError naming it. A signal while it waits for the
    store's lock raises Stopped (`ltm.signals`), naming the wait."""
    try:
        with store_creation_lock(uri):
            client = MlflowClient(uri)
            client.search_experiments(max_results=1)  # creates and migrates a new SQLite file
    except (Stopped, TrackingError):
        raise
    except Exception as err:
        raise TrackingUnusable(f"cannot open the tracking store {redact(uri)}: {type(err).__name__}: "
                            f"{str(err).splitlines()[0][:300] if str(err) else ''}") from None
    return client


class _MetricSender(threading.Thread):
    """Sends logged metrics in order, retrying (with backoff) until the store takes them.

    A metric carries the time it was logged, so a batch sent twice (the server took it but the
    answer was lost) is stored once: MLflow drops exact duplicates.
    """

    def __init__(self, client: MlflowClient) -> None:
        super().__init__(name="mlflow-metric-sender", daemon=True)
        self.client = client
        self.pending: list[tuple[str, Metric]] = []
        self.down_since: float | None = None
        self.last_error = ""
        self._cv = threading.Condition()
        self._sending = 0
        self.start()

    def put(self, run_id: str, metrics: list[Metric]) -> None:
        with self._cv:
            self.pending.extend((run_id, m) for m in metrics)
            self._cv.notify_all()

    def run(self) -> None:
        backoff = 0.5
        while True:
            with self._cv:
                while not self.pending:
                    self._cv.wait()
                run_id = self.pending[0][0]
                batch = []
                for rid, m in self.pending:
                    if rid != run_id or len(batch) == 1000:  # MLflow takes 1000 metrics per batch
                        break
                    batch.append(m)
                self._sending = len(batch)
            try:
                self.client.log_batch(run_id, metrics=batch)
            except Exception as err:  # unreachable, or a store busy: keep the batch and try again
                with self._cv:
                    self.down_since = self.down_since or time.time()
                    self.last_error = f"{type(err).__name__}: {str(err)[:300]}"
                    self._sending = 0
                time.sleep(backoff)
                backoff = min(2 * backoff, 10.0)
                continue
            with self._cv:
                del self.pending[:len(batch)]
                self._sending, self.down_since, backoff = 0, None, 0.5
                self._cv.notify_all()

    def wait_sent(self, timeout: float) -> bool:
        """Whether everything logged so far was sent within `timeout` seconds."""
        deadline = time.time() + timeout
        with self._cv:
            while self.pending and time.time() < deadline:
                self._cv.wait(timeout=min(1.0, max(0.0, deadline - time.time())))
            return not self.pending

    def snapshot(self) -> list[tuple[str, Metric]]:
        with self._cv:
            return list(self.pending)

    def take_unsent(self) -> list[tuple[str, Metric]]:
        with self._cv:
            unsent, self.pending = self.pending, []
            return unsent


class Tracker:
    """One experiment in one MLflow store."""

    def __init__(self, uri: str, experiment: str, artifact_root: str | Path | None = None) -> None:
        from ltm.paths import folder_name

        check_tracking_uri(uri)
        folder = folder_name(experiment, "the experiment name")  # refused (empty, NUL) before the store is opened
        uri = split_credentials(uri)[0]  # the password reaches MLflow from the environment (`configure_mlflow`)
        self.uri = uri
        self.client = open_store(uri)
        self._sender: _MetricSender | None = None
        found = self.client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if artifact_root is not None:
                location = (Path(artifact_root).resolve() / folder).as_uri()
            try:
                self.experiment_id = self.client.create_experiment(experiment, artifact_location=location)
            except Exception:  # created concurrently by another worker: use theirs
                found = self.client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                self.experiment_id = found.experiment_id
        else:
            self.experiment_id = found.experiment_id

    def find_run(self, run_key: str):
        """The newest run of this experiment with this run key, or None."""
        runs = self.client.search_runs([self.experiment_id], filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       order_by=["attributes.start_time DESC"], max_results=1)
        return runs[0] if runs else None

    def find_runs_anywhere(self, run_key: str) -> list:
        """Every run with this run key in any experiment of the store, newest first."""
        experiments = [e.experiment_id for e in self.client.search_experiments()]
        return self.client.search_runs(experiments, filter_string=f"tags.`{RUN_KEY_TAG}` = '{run_key}'",
                                       order_by=["attributes.start_time DESC"], max_results=1000)

    def experiment_name(self, experiment_id: str) -> str:
        return self.client.get_experiment(experiment_id).name

    def create_run(self, run_key: str, run_name: str, params: dict, tags: dict,
                   parent_run_id: str | None = None) -> str:
        """A new RUNNING run with its params and tags; returns its id."""
        tags = {RUN_KEY_TAG: run_key, **tags}
        if parent_run_id:
            tags[PARENT_TAG] = parent_run_id
        run = self.client.create_run(self.experiment_id, run_name=run_name, tags={k: str(v) for k, v in tags.items()})
        items = [Param(k, str(v)[:6000]) for k, v in sorted(params.items())]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
            self.client.log_batch(run.info.run_id, params=items[i:i + 100])
        return run.info.run_id

    def reopen(self, run_id: str) -> None:
        """Mark an interrupted run RUNNING again (it resumes from its checkpoint)."""
        self.client.update_run(run_id, status=Status.RUNNING.value)
        if REASON_TAG in self.client.get_run(run_id).data.tags:
            self.client.delete_tag(run_id, REASON_TAG)

    def log_metrics(self, run_id: str, metrics: dict[str, float], step: int, timestamp_ms: int | None = None) -> None:
        """Queue the metrics for the sender thread; returns at once, whether or not the store answers."""
        now = timestamp_ms or int(time.time() * 1000)
        if self._sender is None:
            self._sender = _MetricSender(self.client)
        self._sender.put(run_id, [Metric(k, float(v), now, int(step)) for k, v in metrics.items()])

    def outage(self) -> float:
        """Seconds the store has refused the oldest unsent metrics (0 when everything goes through)."""
        since = self._sender.down_since if self._sender is not None else None
        return time.time() - since if since else 0.0

    @property
    def last_error(self) -> str:
        """Why the store last refused metrics ("" if it never did)."""
        return self._sender.last_error if self._sender is not None else ""

    def flush(self, timeout: float) -> bool:
        """Wait up to `timeout` s until every logged metric is stored; whether they all were."""
        return self._sender is None or self._sender.wait_sent(timeout)

    def unsent(self) -> list[list]:
        """The metrics logged but not yet confirmed stored, as [run_id, key, value, timestamp_ms, step]
        records: a checkpoint keeps them, so a process killed before they went out loses none."""
        pending = self._sender.snapshot() if self._sender is not None else []
        return [[run_id, m.key, m.value, m.timestamp, m.step] for run_id, m in pending]

    def relog(self, records: list[list], after_step: int = -1) -> int:
        """Queue `unsent()` records again, those past `after_step` (the store has the rest), with their
        original timestamps, so one the store already took is not stored twice; how many."""
        by_step: dict[tuple, dict] = {}
        for run_id, key, value, ts, step in records:
            if step > after_step:
                by_step.setdefault((run_id, step, ts), {})[key] = value
        for (run_id, step, ts), metrics in by_step.items():
            self.log_metrics(run_id, metrics, step, timestamp_ms=ts)
        return sum(map(len, by_step.values()))

    def spool(self, path: Path) -> int:
        """Write the metrics not yet stored to `path` (JSON lines) for the next start; how many."""
        unsent = self._sender.take_unsent() if self._sender is not None else []
        if unsent:
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                for run_id, m in unsent:
                    f.write(json.dumps([run_id, m.key, m.value, m.timestamp, m.step]) + "\n")
        return len(unsent)

    def send_spooled(self, path: Path, timeout: float) -> None:
        """Log the metrics a previous start spooled to `path`, then remove it."""
        if not path.exists():
            return
        self.relog([json.loads(line) for line in path.read_text().splitlines() if line.strip()])
        if not self.flush(timeout):
            raise TrackingError(f"could not send the metrics spooled in {path} to {redact(self.uri)}: "
                                f"{self.last_error}")
        path.unlink()

    def log_dataset(self, run_id: str, name: str, identity: dict, source_type: str, source: str) -> None:
        """The run's data as an MLflow dataset input (lineage: the UI's Dataset column); runs whose
        data `identity` is the same share its digest."""
        from mlflow.entities import Dataset, DatasetInput, InputTag
        from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

        digest = hashlib.sha256(json.dumps(identity, sort_keys=True, default=str).encode()).hexdigest()[:16]
        dataset = Dataset(name=name, digest=digest, source_type=source_type, source=json.dumps({"uri": source}))
        inputs = [DatasetInput(dataset, tags=[InputTag(MLFLOW_DATASET_CONTEXT, "training")])]
        for wait in (0.5, 2.0, None):
            try:
                self.client.log_inputs(run_id, datasets=inputs)
                return
            except Exception as err:
                # Runs that start together on the same data race to insert its dataset row (the store
                # refuses the second with a UNIQUE constraint); once one is in, the retry links to it.
                if wait is None:  # lineage only: the run goes on without it, and says so
                    log.warning("the data of run %s was not recorded as an MLflow dataset input: %s: %s", run_id,
                                type(err).__name__, str(err)[:300])
                    return
                time.sleep(wait)

    def set_tags(self, run_id: str, tags: dict) -> None:
        self.client.log_batch(run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_dict(self, run_id: str, data: dict, name: str) -> None:
        self.client.log_dict(run_id, data, name)

    def max_logged_step(self, run_id: str, key: str = "tokens") -> int:
        """The largest step already logged for `key` (-1 if none): replays below it are not logged again."""
        history = self.client.get_metric_history(run_id, key)
        return max((m.step for m in history), default=-1)

    def finish(self, run_id: str, status: Status, reason: str | None = None, patience: float = 600.0) -> None:
        """Send what is queued, then end the run as FINISHED, FAILED or KILLED with the reason as a tag.

        Waits up to `patience` s for an unreachable store; raises TrackingError if it never answers
        (the queued metrics stay in the sender: `spool` them).
        """
        deadline = time.time() + patience
        if not self.flush(patience):
            raise TrackingError(f"the tracking store {redact(self.uri)} did not answer for {patience:.0f} s "
                                f"({self.last_error}); run {run_id} could not be marked {status.value}")
        while True:
            try:
                if reason:
                    self.set_tags(run_id, {REASON_TAG: reason[:5000]})
                self.client.set_terminated(run_id, status=status.value)
                return
            except Exception as err:
                if time.time() > deadline:
                    raise TrackingError(f"the tracking store {redact(self.uri)} did not answer for {patience:.0f} s "
                                        f"({type(err).__name__}: {err}); run {run_id} could not be marked "
                                        f"{status.value}") from None
                time.sleep(2.0)

"""The `mlflow server` a SLURM study's driver runs on its node so that jobs never share a SQLite file."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from studies.interrupt import die_with_parent


def _own_group_dying_with_parent() -> None:
    os.setsid()  # its own process group, so stop() ends the server and its uvicorn worker together
    die_with_parent()  # and it does not outlive a driver killed with SIGKILL


def node_address() -> str:
    """This node's address on the network its jobs use (the interface of the default route)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("10.255.255.255", 1))  # no packet is sent: this only picks the outgoing interface
            return s.getsockname()[0]
        except OSError:
            return socket.gethostbyname(socket.gethostname())


class MlflowServer:
    """`mlflow server` for a sqlite store, on this node, for the duration of a SLURM study.

    It listens on 127.0.0.1 when every job runs on this node (profile `one_node: true`), else on
    the node's own address; it accepts only that Host, and only requests with the study's
    credentials (MLflow's basic-auth app; a fresh password per start, in a file only this user
    can read, which the jobs are pointed to: the password is never in a URI, a spec or a log).
    """

    USER = "ltm-study"

    def __init__(self, sqlite_uri: str, folder: Path, one_node: bool) -> None:
        import secrets

        from ltm.tracking import TrackingError, check_tracking_uri, write_credentials

        self.host = "127.0.0.1" if one_node else node_address()
        with socket.socket() as s:
            s.bind((self.host, 0))
            self.port = s.getsockname()[1]
        self.uri = f"http://{self.host}:{self.port}"
        password = secrets.token_urlsafe(24)
        self.credentials = write_credentials(folder / "mlflow-credentials.json", self.USER, password)
        auth_db = folder / "mlflow-auth.db"
        auth_db.unlink(missing_ok=True)  # it keeps the first admin password: start from the new one
        ini = folder / "mlflow-auth.ini"
        ini.write_text(f"[mlflow]\ndefault_permission = NO_PERMISSIONS\ndatabase_uri = sqlite:///{auth_db}\n"
                       f"admin_username = {self.USER}\n"
                       "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\n")
        env = {**os.environ, "MLFLOW_AUTH_CONFIG_PATH": str(ini), "MLFLOW_AUTH_ADMIN_PASSWORD": password,
               "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16)}
        log = folder / "mlflow-server.log"
        self._log = open(log, "ab")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--app-name", "basic-auth", "--backend-store-uri", sqlite_uri,
             "--host", self.host, "--port", str(self.port), "--workers", "1",
             "--allowed-hosts", f"{self.host}:{self.port},{self.host}"],
            stdout=self._log, stderr=subprocess.STDOUT, env=env, preexec_fn=_own_group_dying_with_parent)

        deadline = time.time() + 120
        while True:
            try:
                check_tracking_uri(self.uri, timeout=2)
                return
            except TrackingError:
                if self.proc.poll() is not None or time.time() > deadline:
                    self.stop()
                    raise TrackingError(f"the mlflow server for {sqlite_uri} did not start; see {log} (the basic-auth "
                                        "app needs `pip install mlflow[auth]`)") from None
                time.sleep(0.5)

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
        self._log.close()

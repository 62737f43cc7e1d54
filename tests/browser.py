"""A headless Chromium driven over the DevTools protocol on a pipe (no extra package, no network port):
open a page, wait for text on it, read its text, set its local storage, take a screenshot.

MLflow's UI is a React app: what a page shows exists only once its scripts have run and its requests
have come back, so a page is read by waiting for a text it should show, not after a fixed delay.
"""

from __future__ import annotations

import base64
import json
import os
import select
import shutil
import subprocess
import time
from pathlib import Path

CHROMIUM_APT = "apt-get update && apt-get install -y chromium"
"""How a Debian machine gets the browser (`.ci/run` does this)."""


def chromium_path() -> str | None:
    """Debian's chromium (or another Chromium/Chrome on the PATH); None when there is none."""
    return next((p for name in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(name))), None)


class Browser:
    """One headless Chromium with one page; use as a context manager (the browser is always stopped)."""

    def __init__(self, profile: Path, width: int = 1800, height: int = 1000) -> None:
        binary = chromium_path()
        if binary is None:
            raise FileNotFoundError(f"no chromium on the PATH; install it with `{CHROMIUM_APT}`")
        to_chrome, self._out = os.pipe()  # the browser reads commands on its fd 3 ...
        self._in, from_chrome = os.pipe()  # ... and answers on its fd 4
        flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync",
                 "--disable-dev-shm-usage", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 f"--window-size={width},{height}", "about:blank"]
        self._proc = subprocess.Popen(["bash", "-c", f'exec "$0" "$@" 3<&{to_chrome} 4>&{from_chrome}', binary, *flags],
                                      pass_fds=(to_chrome, from_chrome), stdout=subprocess.DEVNULL,
                                      stderr=subprocess.DEVNULL)
        os.close(to_chrome)
        os.close(from_chrome)
        self._buffer, self._next_id = b"", 0
        target = self._call("Target.createTarget", url="about:blank")["targetId"]
        self._session = self._call("Target.attachToTarget", targetId=target, flatten=True)["sessionId"]
        self._call("Emulation.setDeviceMetricsOverride", width=width, height=height, deviceScaleFactor=1,
                   mobile=False, session=True)

    def __enter__(self) -> Browser:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        """Stop the browser (killed if it does not exit within 10 s)."""
        try:
            self._send("Browser.close", {}, None)
            self._proc.wait(timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            for fd in (self._out, self._in):
                try:
                    os.close(fd)
                except OSError:
                    pass

    def _send(self, method: str, params: dict, session: str | None) -> int:
        self._next_id += 1
        message = {"id": self._next_id, "method": method, "params": params}
        if session:
            message["sessionId"] = session
        os.write(self._out, json.dumps(message).encode() + b"\0")
        return self._next_id

    def _call(self, method: str, timeout: float = 60.0, session: bool = False, **params) -> dict:
        """Send one command and wait for its answer (events in between are dropped)."""
        wanted = self._send(method, params, self._session if session else None)
        deadline = time.monotonic() + timeout
        while True:
            while b"\0" not in self._buffer:
                left = deadline - time.monotonic()
                if left <= 0 or not select.select([self._in], [], [], left)[0]:
                    raise TimeoutError(f"chromium did not answer {method} within {timeout:.0f} s")
                chunk = os.read(self._in, 1 << 20)
                if not chunk:
                    raise RuntimeError(f"chromium exited while answering {method}")
                self._buffer += chunk
            raw, _, self._buffer = self._buffer.partition(b"\0")
            message = json.loads(raw)
            if message.get("id") == wanted:
                if "error" in message:
                    raise RuntimeError(f"chromium refused {method}: {message['error']}")
                return message.get("result", {})

    def open(self, url: str) -> None:
        """Load `url` afresh (a hash route of the page already shown is loaded again, not just routed to)."""
        self._call("Page.navigate", url="about:blank", session=True)
        self._call("Page.navigate", url=url, session=True)

    def evaluate(self, expression: str):
        """The value of a JavaScript expression in the page."""
        result = self._call("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True,
                            session=True)
        return result.get("result", {}).get("value")

    def text(self) -> str:
        """What the page shows, as text."""
        return self.evaluate("document.body ? document.body.innerText : ''") or ""

    def wait_for(self, *texts: str, timeout: float = 90.0) -> str:
        """The page's text once it shows every one of `texts`; AssertionError with what it shows after `timeout` s."""
        deadline, shown = time.monotonic() + timeout, ""
        while time.monotonic() < deadline:
            shown = self.text()
            if all(t in shown for t in texts):
                return shown
            time.sleep(1.0)
        missing = [t for t in texts if t not in shown]
        raise AssertionError(f"after {timeout:.0f} s the page does not show {missing}; it shows:\n{shown[:3000]}")

    def screenshot(self, path: Path) -> Path:
        """The page as a PNG at `path`."""
        data = self._call("Page.captureScreenshot", format="png", session=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

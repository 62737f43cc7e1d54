"""The MLflow UI as the place to look: a run says what it is and shows its bound in nats/token and its size;
a study's parent run carries its result as a table, a figure and metrics; and a real browser (headless
Chromium, `tests/browser.py`) finds them on MLflow's own pages."""

import math
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pandas as pd
import pytest
from mlflow.tracking import MlflowClient

from ltm.config import describe, run_preset
from ltm.names import NOTE_TAG, VAL_BOUND, metric
from ltm.tracking import Tracker, default_tracking_uri
from studies.launcher import ui_route
from studies.report import SUMMARY_FILES, chart, headline, log_summary, parent_metrics
from browser import CHROMIUM_APT, Browser, chromium_path


def test_a_run_says_in_one_line_what_it_is():
    rf = run_preset("micro-rf")
    assert describe(rf) == "LTM micro-rf L2 d64 window 8 T=16 N_z=4 logvar=-5 start, 600k tokens"
    assert describe(rf.with_overrides({"inference.init_logvar": 0.0, "inference.steps": 64})) == \
        "LTM micro-rf L2 d64 window 8 T=64 N_z=4 logvar=0 start, 600k tokens"
    assert describe(rf.with_overrides({"model.kind": "ar", "model.window": None, "seed": 2})) == \
        "AR micro-rf L2 d64 full context, 600k tokens, seed 2"
    assert describe(rf.with_overrides({"inference.start": "encoder", "inference.steps": 0, "model.n_layers": 4})) == \
        "LTM L4 d64 window 8 T=0 N_z=4 1-layer encoder start, 600k tokens"  # no recipe has 4 such layers
    assert describe(run_preset("ltm-m")).endswith("3B tokens of openwebtext")


def _grid() -> pd.DataFrame:
    """A summary table as `studies.parent.summary` makes it: T x N_z, two seeds of one point, an AR, a MISSING point."""
    rows = [(4, 4, 0, "ltm", 2.0), (4, 4, 1, "ltm", 2.2), (16, 4, 0, "ltm", 1.5), (4, 16, 0, "ltm", 1.9),
            (16, 16, 0, "ltm", 1.4), (0, 4, 0, "ar", 1.8), (64, 16, 0, "ltm", None)]
    table = pd.DataFrame(rows, columns=["steps", "n_latents", "seed", "kind", VAL_BOUND])
    return table.assign(key=[f"k{i}" for i in range(len(rows))], status="FINISHED", tokens=1000, mlflow_run="")


def test_a_studys_summary_draws_its_headline_against_its_axis():
    table, axes = _grid(), ["steps", "n_latents", "seed", "kind"]
    assert headline(table, axes) == VAL_BOUND
    c = chart(table, axes, VAL_BOUND)
    assert c.x == "steps"  # the numeric axis with the most values
    assert c.lines == {"n_latents:4 kind:ltm": [(4.0, pytest.approx(2.1)), (16.0, 1.5)],  # seeds: their mean
                       "n_latents:16 kind:ltm": [(4.0, 1.9), (16.0, 1.4)],  # the MISSING point left out
                       "n_latents:4 kind:ar": [(0.0, 1.8)]}
    logged = parent_metrics(c)
    assert logged[metric(VAL_BOUND, "n_latents:16 kind:ltm")] == [(4, 1.9), (16, 1.4)]  # step: the axis value
    assert headline(table.assign(**{VAL_BOUND: None}), axes) is None  # no point finished: nothing to draw


@pytest.mark.slow  # a new SQLite store: tens of seconds on a busy machine
def test_the_summary_lands_on_the_parent_run_once(tmp_path):
    tracker = Tracker(default_tracking_uri(tmp_path), "study", artifact_root=tmp_path / "artifacts")
    parent = tracker.client.create_run(tracker.experiment_id).info.run_id
    table, axes = _grid(), ["steps", "n_latents", "seed", "kind"]
    assert log_summary(tracker, parent, table, axes, "study / smoke") == sorted(SUMMARY_FILES)
    assert log_summary(tracker, parent, table, axes, "study / smoke") == sorted(SUMMARY_FILES)  # started again
    client = tracker.client
    assert {a.path for a in client.list_artifacts(parent)} == set(SUMMARY_FILES)
    history = client.get_metric_history(parent, metric(VAL_BOUND, "n_latents:4 kind:ltm"))
    assert sorted((m.step, m.value) for m in history) == [(4, pytest.approx(2.1)), (16, 1.5)]  # no duplicates
    csv = pd.read_csv(client.download_artifacts(parent, "summary.csv", str(tmp_path)))
    assert list(csv[VAL_BOUND].fillna(-1)) == list(table[VAL_BOUND].fillna(-1))
    png = Path(client.download_artifacts(parent, "summary.png", str(tmp_path)))
    assert png.read_bytes()[:4] == b"\x89PNG"


# -- in a real browser -------------------------------------------------------------------------------

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _serve(uri: str, port: int, log: Path) -> subprocess.Popen:
    """`mlflow server` on 127.0.0.1:`port` for the store `uri`, once it answers /health."""
    with open(log, "w") as out:
        server = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri, "--host",
                                   "127.0.0.1", "--port", str(port), "--workers", "1"], stdout=out,
                                  stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2).read()
            return server
        except OSError:
            if server.poll() is not None:
                break
            time.sleep(1)
    server.terminate()
    server.wait(30)
    raise AssertionError(f"mlflow server did not start within 120 s:\n{log.read_text()[-3000:]}")


def _show_columns(browser: Browser, experiment_id: str, columns: list[str], expand: str) -> None:
    """What a user does with the runs table's Columns chooser and the parent run `expand`'s expander: MLflow
    3.18 keeps both in the page's local storage (its ExperimentPage state), shown once the page loads again."""
    import json

    key = json.dumps(f'MLflowLocalStorage-1.1-ExperimentPage-["{experiment_id}"]-ReactComponentState')
    state = json.loads(browser.evaluate(f"localStorage.getItem({key})") or "{}")
    state["selectedColumns"] = state.get("selectedColumns", []) + [f"metrics.`{c}`" for c in columns]
    state["runsExpanded"] = {expand: True}
    browser.evaluate(f"localStorage.setItem({key}, {json.dumps(json.dumps(state))}); "
                     "localStorage.setItem('mlflow.assistant.panelOpen_v1', 'false')")


@pytest.mark.slow
@pytest.mark.skipif(chromium_path() is None, reason=f"needs Chromium: {CHROMIUM_APT}")
def test_mlflow_ui_shows_the_bound_of_a_run_and_a_studys_summary(tmp_path):
    import ltm.train as train

    runs, shots = tmp_path / "runs", tmp_path / "screenshots"
    shots.mkdir()
    uri = default_tracking_uri(runs)
    tracker = Tracker(uri, "ui", artifact_root=runs / "artifacts")
    parent = tracker.client.create_run(tracker.experiment_id, run_name="study-smoke").info.run_id
    cfg = run_preset("smoke").with_overrides({"train.tokens": 1024, "train.eval_every": 0, "train.eval_blocks": 8,
                                              "data.cache_dir": str(tmp_path / "cache")})
    result = train.run(cfg, runs_dir=runs, experiment="ui", parent_run_id=parent, progress=False)
    assert result.status == "FINISHED"
    bound = result.metrics[VAL_BOUND]
    table = pd.DataFrame({"key": [cfg.run_key()], "steps": [cfg.inference.steps], "status": ["FINISHED"],
                          VAL_BOUND: [bound]})
    log_summary(tracker, parent, table, ["steps"], "ui / smoke")
    tracker.client.set_terminated(parent)
    exp = tracker.experiment_id

    server = _serve(uri, port := _free_port(), tmp_path / "server.log")
    base = f"http://127.0.0.1:{port}/"
    try:
        with Browser(tmp_path / "profile") as browser:
            browser.open(base + ui_route(exp))  # the training runs, not the GenAI pages
            browser.wait_for("Model training", "study-smoke")
            _show_columns(browser, exp, [VAL_BOUND, "n_params", "flops_per_token"], parent)
            browser.open(base + ui_route(exp))
            n_params = str(int(MlflowClient(uri).get_run(result.run_id).data.metrics["n_params"]))
            table_text = browser.wait_for(VAL_BOUND, "study-smoke", n_params)  # the child, under its parent
            browser.screenshot(shots / "runs_table.png")
            run_text = _run_page(browser, base, exp, result.run_id, bound, shots)
            parent_text = _parent_page(browser, base, exp, parent, shots)
    finally:
        server.terminate()
        server.wait(30)
    assert f"{bound:.4f}"[:5] in table_text.replace(",", "")  # the headline's value, a column of the table
    assert describe(cfg) in run_text and MlflowClient(uri).get_run(result.run_id).data.tags[NOTE_TAG] == describe(cfg)
    assert "summary.png" in parent_text
    for name in ("runs_table.png", "run.png", "parent.png", "parent_charts.png"):
        assert (shots / name).stat().st_size > 10_000, name


def _run_page(browser: Browser, base: str, exp: str, run_id: str, bound: float, shots: Path) -> str:
    """A run's overview: its description and its metrics, the headline with its value."""
    browser.open(f"{base}#/experiments/{exp}/runs/{run_id}?workflowType=machine_learning")
    shown = browser.wait_for("Description", VAL_BOUND, "val/kl_above_floor", "n_params")
    browser.screenshot(shots / "run.png")
    value = shown.split(VAL_BOUND + "\n", 1)[1].split("\n", 1)[0]
    assert math.isclose(float(value), bound, rel_tol=1e-6), value
    return shown


def _parent_page(browser: Browser, base: str, exp: str, parent: str, shots: Path) -> str:
    """A study parent's artifacts, the summary's figure shown, and its charts."""
    browser.open(f"{base}#/experiments/{exp}/runs/{parent}/artifacts?workflowType=machine_learning")
    shown = browser.wait_for("summary.csv", "summary.md", "summary.png")
    browser.evaluate("[...document.querySelectorAll('span, div')].filter(e => e.textContent === 'summary.png')"
                     ".pop().click()")
    time.sleep(3)  # the preview loads the image
    browser.screenshot(shots / "parent.png")
    browser.open(f"{base}#/experiments/{exp}/runs/{parent}/model-metrics?workflowType=machine_learning")
    browser.wait_for(f"study-smoke ({VAL_BOUND})")  # a chart of the summary's metric
    browser.screenshot(shots / "parent_charts.png")
    return shown

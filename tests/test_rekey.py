"""`python -m studies.rekey`: runs stored under the earlier run-key definition (a hash of the whole
config) are found again under the current one, with nothing retrained and nothing lost."""

import hashlib
import json
import multiprocessing
import subprocess
import sys
import time

from mlflow.tracking import MlflowClient

from ltm import train
from ltm.config import run_preset
from ltm.names import RUN_KEY_TAG, STUDY_KEY_TAG, ROLE_EVAL, ROLE_STUDY, ROLE_TAG, SOURCE_RUN_TAG
from ltm.runlock import RunLock
from ltm.tracking import Tracker, default_tracking_uri
from studies import rekey
from studies.points import study_key_of
from studies.tasks import evaluation_key

TASK = {"name": "zero_shot", "corpora": ["wikitext"], "blocks": 4, "batch_size": 2}


def legacy_key(cfg) -> str:
    """The run key before `RunConfig.identity`: every field but the token cache's folder."""
    d = cfg.to_dict()
    d["data"].pop("cache_dir")
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]


def age(runs, uri, cfg, run_id) -> str:
    """Make a trained run look as the earlier code stored it: folder, config.json and tag under the old key."""
    old = legacy_key(cfg)
    folder = runs / "checkpoints" / cfg.run_key()
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "run_key": old}))
    folder.rename(runs / "checkpoints" / old)
    MlflowClient(uri).set_tag(run_id, RUN_KEY_TAG, old)
    return old


def _hold(runs, key, ready):
    with RunLock(runs, key, "trained"):
        ready.set()
        time.sleep(60)


def test_an_old_store_is_found_again_under_the_current_keys(tmp_path):
    runs = tmp_path / "runs"
    uri = default_tracking_uri(runs)
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}"])
    ar = cfg.with_overrides(["model.kind=ar", "inference.steps=0"])
    trained = {c.run_key(): train.run(c, runs_dir=runs, experiment="s", progress=False) for c in (cfg, ar)}
    old = {c.run_key(): age(runs, uri, c, trained[c.run_key()].run_id) for c in (cfg, ar)}
    assert set(old.values()).isdisjoint(old)  # the definitions differ for both runs

    # an evaluation of the LTM (as a study logs it) and the study's parent run, under the old keys
    tracker = Tracker(uri, "s")
    eval_old = evaluation_key(old[cfg.run_key()], TASK)
    eval_id = tracker.create_run(eval_old, "eval", {f"task.{k}": v for k, v in TASK.items()},
                                 {ROLE_TAG: ROLE_EVAL, SOURCE_RUN_TAG: trained[cfg.run_key()].run_id})
    parent = tracker.client.create_run(tracker.experiment_id, tags={
        ROLE_TAG: ROLE_STUDY, STUDY_KEY_TAG: study_key_of("demo", "smoke", [*old.values(), eval_old])}).info.run_id
    tracker.client.log_dict(parent, {"study": "demo", "preset": "smoke", "points": [
        {"key": k} for k in [*old.values(), eval_old]]}, "grid.json")

    # a dry run says what it would do and touches nothing
    assert rekey.main(["--runs-dir", str(runs), "--dry-run"]) == 0
    assert {p.name for p in (runs / "checkpoints").iterdir()} == set(old.values())

    # a run being trained right now is left alone, and said so
    ready = multiprocessing.get_context("fork").Event()
    holder = multiprocessing.get_context("fork").Process(target=_hold, args=(runs, old[ar.run_key()], ready))
    holder.start()
    try:
        assert ready.wait(30)
        out = subprocess.run([sys.executable, "-m", "studies.rekey", "--runs-dir", str(runs)],
                             capture_output=True, text=True, check=True).stdout
    finally:
        holder.kill()
        holder.join()
    assert f"left: {old[ar.run_key()]}: run {old[ar.run_key()]} is already being trained" in out
    assert (runs / "checkpoints" / old[ar.run_key()]).is_dir()

    # once it is free, the rest moves
    assert rekey.main(["--runs-dir", str(runs)]) == 0
    client = MlflowClient(uri)
    for key, result in trained.items():
        folder = runs / "checkpoints" / key
        assert json.loads((folder / "config.json").read_text())["run_key"] == key
        tags = client.get_run(result.run_id).data.tags
        assert (tags[RUN_KEY_TAG], tags[rekey.PREVIOUS_KEY_TAG]) == (key, old[key])
    assert client.get_run(eval_id).data.tags[RUN_KEY_TAG] == evaluation_key(cfg.run_key(), TASK)
    assert client.get_run(parent).data.tags[STUDY_KEY_TAG] == study_key_of(
        "demo", "smoke", [*trained, evaluation_key(cfg.run_key(), TASK)])

    # what matters: the same commands find their runs and train nothing
    for c in (cfg, ar.with_overrides(["inference.steps=16"])):  # T does not matter to an AR run
        again = train.run(c, runs_dir=runs, experiment="s", progress=False)
        assert (again.status, again.run_id) == ("SKIPPED", trained[c.run_key()].run_id)

    # and a second pass has nothing left to do
    out = subprocess.run([sys.executable, "-m", "studies.rekey", "--runs-dir", str(runs)],
                         capture_output=True, text=True, check=True).stdout
    assert "re-keyed 0 run key(s); nothing to do" in out


def test_a_missing_runs_folder_is_a_usage_error(tmp_path, capsys):
    assert rekey.main(["--runs-dir", str(tmp_path / "nowhere")]) == 2
    assert "no runs folder" in capsys.readouterr().err

"""A checkpoint folder belongs to exactly one MLflow run: two experiments (or stores, or a --force
rerun) that share a runs folder never remove, resume from or replace each other's checkpoints.

Each test replays a sequence that, before ownership, handed one run another's checkpoints, and ends
by checking that every FINISHED run's folder still holds that run's own final step.
"""

import json
import os
import signal

import pytest
import torch
from mlflow.tracking import MlflowClient

import ltm.checkpoint as checkpoint
import ltm.train as train
from ltm.config import ConfigError, RunConfig, run_preset
from ltm.lifecycle import RunResult
from ltm.names import RUN_KEY_TAG, TOKENS, VAL_PPL_BOUND
from ltm.tracking import default_tracking_uri


def smoke(tmp_path, *overrides) -> RunConfig:
    return run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=4096",
                                               "train.checkpoint_every=1024", "train.log_every=512", *overrides])


def stop_at(tokens: int):
    """An on_log callback that sends this process SIGTERM once `tokens` are logged: the run stops there."""
    def on_log(metrics: dict) -> None:
        if metrics.get(TOKENS, 0) >= tokens:
            os.kill(os.getpid(), signal.SIGTERM)
    return on_log


def train_in(runs, experiment: str, cfg: RunConfig, **kwargs) -> RunResult:
    return train.run(cfg, runs_dir=runs, experiment=experiment, progress=False, **kwargs)


def assert_every_finished_run_holds_its_final_step(runs) -> None:
    client = MlflowClient(default_tracking_uri(runs))
    experiments = [e.experiment_id for e in client.search_experiments()]
    finished = client.search_runs(experiments, filter_string="attributes.status = 'FINISHED'")
    assert finished
    for run in finished:
        run_id, key = run.info.run_id, run.data.tags[RUN_KEY_TAG]
        folder = checkpoint.run_folder(runs, key, run_id)
        state = checkpoint.load_latest_checkpoint(folder)
        assert checkpoint.owner(folder) == run_id and state.run_id == run_id
        assert state.tokens == run.data.metrics[TOKENS], (run_id, folder)
        assert VAL_PPL_BOUND in run.data.metrics


def test_a_study_never_takes_or_removes_a_hand_trained_runs_checkpoints(tmp_path):
    runs, cfg = tmp_path / "runs", smoke(tmp_path)
    key = cfg.run_key()
    by_hand = train_in(runs, "ltm", cfg, on_log=stop_at(1024))
    assert by_hand.status == "KILLED" and by_hand.run_dir == runs / "checkpoints" / key
    assert checkpoint.load_latest_checkpoint(by_hand.run_dir).tokens == 1024

    # A study point with the same config in another experiment: a new run in a folder of its own.
    point = train_in(runs, "inference_scaling", cfg)
    assert point.status == "FINISHED" and point.run_id != by_hand.run_id
    assert point.run_dir == runs / "checkpoints" / f"{key}.{point.run_id}"
    assert checkpoint.load_latest_checkpoint(by_hand.run_dir).tokens == 1024  # untouched
    assert checkpoint.owner(by_hand.run_dir) == by_hand.run_id

    # The hand-trained command again: resumes its own 1,024-token checkpoint, not the study's 4,096.
    resumed = train_in(runs, "ltm", cfg)
    assert resumed.status == "FINISHED" and resumed.run_id == by_hand.run_id
    client = MlflowClient(default_tracking_uri(runs))
    tokens = [m.step for m in client.get_metric_history(by_hand.run_id, TOKENS)]
    assert tokens == sorted(set(tokens)) and tokens[-1] == 4096 and 1536 in tokens  # trained 1,024 -> 4,096 itself
    assert_every_finished_run_holds_its_final_step(runs)


def test_a_config_trained_by_hand_never_replaces_a_finished_study_points_checkpoints(tmp_path):
    runs, cfg = tmp_path / "runs", smoke(tmp_path)
    point = train_in(runs, "inference_scaling", cfg)
    assert point.status == "FINISHED"
    before = checkpoint.resolve(str(point.run_dir), default_tracking_uri(runs), runs)
    config = json.loads((point.run_dir / checkpoint.CONFIG_FILE).read_text())["config"]
    by_hand = train_in(runs, "ltm", RunConfig.from_dict(config), on_log=stop_at(1024))  # `--config config.json`
    assert by_hand.status == "KILLED" and by_hand.run_dir != point.run_dir
    after = checkpoint.resolve(str(point.run_dir), default_tracking_uri(runs), runs)
    assert after == before and after.run_id == point.run_id
    assert checkpoint.load_latest_checkpoint(point.run_dir).tokens == 4096
    # both runs' folders are found by the study run's id; the bare key is ambiguous and says so
    assert checkpoint.resolve(point.run_id, default_tracking_uri(runs), runs).checkpoint == str(point.run_dir)
    with pytest.raises(ConfigError, match="has checkpoints of 2 MLflow runs"):
        checkpoint.resolve(cfg.run_key(), default_tracking_uri(runs), runs)
    assert_every_finished_run_holds_its_final_step(runs)


def test_force_trains_a_new_run_and_the_earlier_run_keeps_its_checkpoint(tmp_path):
    runs, cfg = tmp_path / "runs", smoke(tmp_path)
    first = train_in(runs, "ltm", cfg)
    again = train_in(runs, "ltm", cfg, force=True)
    assert again.status == "FINISHED" and again.run_id != first.run_id and again.run_dir != first.run_dir
    assert checkpoint.owner(first.run_dir) == first.run_id
    assert_every_finished_run_holds_its_final_step(runs)


def test_a_folder_whose_finished_run_lost_its_final_checkpoint_is_refused(tmp_path):
    runs, cfg = tmp_path / "runs", smoke(tmp_path)
    done = train_in(runs, "ltm", cfg)
    final = checkpoint.checkpoints(done.run_dir)[-1]
    final.unlink()
    with pytest.raises(ConfigError, match="FINISHED at 4,096 tokens, but its newest usable checkpoint holds 3,072"):
        checkpoint.resolve(str(done.run_dir), default_tracking_uri(runs), runs)
    earlier = checkpoint.checkpoints(done.run_dir)[-1]  # a file names exactly what it holds: allowed
    assert checkpoint.resolve(str(earlier), default_tracking_uri(runs), runs).run_id == done.run_id


def test_a_checkpoint_another_run_wrote_is_never_resumed_from(tmp_path, stub_checkpoint):
    checkpoint.write_run_config(tmp_path, run_preset("smoke"), run_preset("smoke").model, "mine")
    checkpoint.save_checkpoint(tmp_path, stub_checkpoint(100, run_id="mine"))
    checkpoint.save_checkpoint(tmp_path, stub_checkpoint(200, run_id="theirs"))
    with pytest.warns(UserWarning, match="written by MLflow run theirs, not by run mine"):
        assert checkpoint.load_latest_checkpoint(tmp_path, run_id="mine").tokens == 100


def test_run_folder_gives_each_run_its_own(tmp_path, stub_checkpoint):
    runs = tmp_path
    base = runs / "checkpoints" / "k"
    assert checkpoint.run_folder(runs, "k", "a") == base  # nobody owns it yet
    checkpoint.write_run_config(base, run_preset("smoke"), run_preset("smoke").model, "a")
    checkpoint.save_checkpoint(base, stub_checkpoint(1, run_id="a"))
    assert checkpoint.run_folder(runs, "k", "a") == base
    assert checkpoint.run_folder(runs, "k", "b") == runs / "checkpoints" / "k.b"
    # config.json missing: the newest readable checkpoint names the owner
    (base / checkpoint.CONFIG_FILE).unlink()
    assert checkpoint.owner(base) == "a"
    assert checkpoint.owner(runs / "checkpoints" / "none") is None


def test_a_missing_checksum_file_is_called_missing_and_a_restart_from_zero_says_so(tmp_path, caplog):
    runs, cfg = tmp_path / "runs", smoke(tmp_path)
    killed = train_in(runs, "ltm", cfg, on_log=stop_at(2048))
    assert killed.status == "KILLED"
    for sidecar in killed.run_dir.glob("*.sha256"):
        sidecar.unlink()
    with pytest.warns(UserWarning, match=r"checksum file ckpt-\d+\.sha256 is missing"):
        resumed = train_in(runs, "ltm", cfg)
    assert resumed.status == "FINISHED" and resumed.run_id == killed.run_id
    err = "\n".join(r.getMessage() for r in caplog.records if r.levelname == "WARNING")
    assert f"no usable checkpoint of run {cfg.run_key()} (MLflow {killed.run_id}) in {killed.run_dir}" in err
    assert "it starts again from zero tokens" in err
    state = checkpoint.load_latest_checkpoint(resumed.run_dir)
    assert state.tokens == 4096 and torch.isfinite(next(iter(state.model.values()))).all()

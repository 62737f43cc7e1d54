"""Learning-rate schedules: cosine (the default), warmup-stable-decay (wsd) and the constant-rate trunk its
branches leave at their branch points; run keys, bad options, and a branch trained from its trunk's snapshot."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

import ltm.checkpoint as checkpoint
import ltm.train as train
from ltm import objective
from ltm.checkpoint import CheckpointError
from ltm.config import RUN_PRESETS, ConfigError, describe, run_preset
from ltm.names import (BRANCH_POINT_TAG, FLOPS, RUN_KEY_TAG, TOKENS, TRAIN_LOSS, TRAIN_LR, TRUNK_KEY_TAG,
                       TRUNK_RUN_TAG, VAL_KL, VAL_NLL, Exit)
from ltm.tracking import default_tracking_uri

ROOT = Path(__file__).resolve().parents[1]

# Computed on main before the schedule options existed: a cosine run keeps its key.
KEYS_BEFORE_SCHEDULES = {"smoke": "9d0d60a1d9fa21c4", "micro": "758ddcf56bc3d2fa", "micro-rf": "6e9da349cadacd1c",
                         "ltm-s": "e44313e0318d59c0", "ltm-m": "54cf6a87e40be32c", "ltm-l": "ad6ccd21d9820a96"}
MICRO_RF_AR_KEY_BEFORE = "2173298c07899d5d"


def wsd(*overrides: str):
    return run_preset("smoke").with_overrides(["train.schedule=wsd", *overrides])


def curve(cfg) -> list[float]:
    return [objective.lr_at(step, cfg.updates, cfg.train) for step in range(cfg.updates)]


def test_existing_run_keys_are_unchanged():
    assert {name: RUN_PRESETS[name].run_key() for name in KEYS_BEFORE_SCHEDULES} == KEYS_BEFORE_SCHEDULES
    assert run_preset("micro-rf").with_overrides(["model.kind=ar"]).run_key() == MICRO_RF_AR_KEY_BEFORE
    # the decay options do not touch a cosine run's key
    assert run_preset("smoke").with_overrides(["train.decay_fraction=0.5"]).run_key() == KEYS_BEFORE_SCHEDULES["smoke"]


def test_branch_trunk_and_cosine_keys_differ_and_the_trunk_key_ignores_its_tokens():
    branch = wsd()
    trunk = branch.trunk()
    assert len({branch.run_key(), trunk.run_key(), run_preset("smoke").run_key()}) == 3
    assert trunk.train.schedule == "constant" and trunk.train.tokens == branch.branch_point()
    assert trunk.with_overrides(["train.tokens=99999"]).run_key() == trunk.run_key()
    # every budget (and decay) of one trunk shares it; the branches are distinct runs
    longer = wsd("train.tokens=32768", "train.decay_shape=linear")
    assert longer.trunk().run_key() == trunk.run_key() and longer.run_key() != branch.run_key()
    assert wsd("train.decay_fraction=0.3").run_key() != branch.run_key()


def test_the_branch_point_is_whole_updates_of_the_budget_before_its_decay():
    cfg = wsd("train.tokens=16384", "train.decay_fraction=0.3")  # 64 updates of 256 tokens
    assert cfg.branch_point() == math.floor(64 * 0.7) * 256 == 44 * 256
    with pytest.raises(ConfigError, match="train.schedule=wsd"):
        run_preset("smoke").branch_point()


def test_lr_curves_of_the_three_schedules():
    cosine, branch = run_preset("smoke"), wsd("train.decay_fraction=0.25")
    tc, n = branch.train, branch.updates
    warm = curve(branch)[:tc.warmup_steps]
    assert warm == curve(cosine)[:tc.warmup_steps] == pytest.approx([tc.lr * (s + 1) / 8 for s in range(8)])
    stable = curve(branch)[tc.warmup_steps:branch.decay_start]
    assert stable == [tc.lr] * (branch.decay_start - tc.warmup_steps) and branch.decay_start == 48
    decay = curve(branch)[branch.decay_start:]
    assert decay[0] == tc.lr and all(a > b for a, b in zip(decay, decay[1:])) and decay[-1] > tc.min_lr
    assert objective.lr_at(n, n, tc) == pytest.approx(tc.min_lr)  # the decay ends at min_lr
    # 1-sqrt: half way through the decay, 1 - sqrt(1/2) of the way from min_lr to lr
    assert decay[8] == pytest.approx(tc.min_lr + (1 - math.sqrt(0.5)) * (tc.lr - tc.min_lr))
    linear = wsd("train.decay_fraction=0.25", "train.decay_shape=linear")
    assert curve(linear)[48 + 8] == pytest.approx(tc.min_lr + 0.5 * (tc.lr - tc.min_lr))
    trunk = branch.trunk()
    assert curve(trunk)[tc.warmup_steps:] == [tc.lr] * (trunk.updates - tc.warmup_steps)
    assert objective.lr_at(10**6, trunk.updates, trunk.train) == tc.lr  # a trunk never decays
    assert curve(cosine)[-1] < curve(cosine)[40] < tc.lr  # the cosine decays from the warmup on


def test_a_branch_follows_the_wsd_curve_of_any_budget_from_its_branch_point():
    """The trunk's curve up to the branch point is the wsd run's: a branch started there is the wsd run."""
    for tokens in (16384, 32768, 65536):
        cfg = wsd(f"train.tokens={tokens}")
        points = cfg.decay_start
        assert curve(cfg.trunk())[:points] == curve(cfg)[:points]


@pytest.mark.parametrize("fraction", ["0", "1", "-0.1", "1.5"])
def test_a_decay_fraction_outside_zero_one_is_refused_naming_it(fraction):
    with pytest.raises(ConfigError, match=r"train\.decay_fraction.*\(0, 1\)"):
        wsd(f"train.decay_fraction={fraction}")


@pytest.mark.parametrize("key,value", [("train.decay_shape", "cosine"), ("train.schedule", "step")])
def test_an_unknown_shape_or_schedule_is_refused_naming_it(key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        wsd(f"{key}={value}")


def test_a_budget_that_branches_inside_the_warmup_is_refused():
    # 16 updates of 256 tokens with 20% decay: the branch point is update 12, inside a 16-update warmup
    with pytest.raises(ConfigError, match=r"inside its train\.warmup_steps=16.*train\.tokens to at least 5,632"):
        wsd("train.tokens=4096", "train.warmup_steps=16")
    with pytest.raises(ConfigError, match="warmup"):  # 21 updates: update 16, the warmup's last
        wsd("train.tokens=5376", "train.warmup_steps=16")
    assert wsd("train.tokens=5632", "train.warmup_steps=16").decay_start == 17  # 22 updates: the least budget


def test_a_trained_starts_kl_warmup_needs_the_cosine_schedule():
    with pytest.raises(ConfigError, match=r"inference\.start_kl_warmup=0\.5 needs train\.schedule=cosine"):
        wsd("inference.start=learned", "inference.start_kl_warmup=0.5")
    assert wsd("inference.start=learned").trunk().train.schedule == "constant"


# -- a branch trained from its trunk ---------------------------------------------------------------

def tiny(tmp_path, *overrides: str):
    """16 updates of 256 tokens, 2 of warmup, the last quarter decaying: a branch point at 12 updates (3,072)."""
    return wsd(f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=4096", "train.warmup_steps=2",
               "train.decay_fraction=0.25", "train.eval_every=0", "train.iw_samples=0", "train.compile=off",
               *overrides)


def history(runs, run_id, key):
    client = MlflowClient(default_tracking_uri(runs))
    return [(m.step, m.value) for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)]


def runs_of(runs, key):
    client = MlflowClient(default_tracking_uri(runs))
    return client.search_runs([e.experiment_id for e in client.search_experiments()], f"tags.`{RUN_KEY_TAG}` = '{key}'")


@pytest.fixture(scope="module")
def branched(tmp_path_factory):
    """One tiny wsd run twice: from zero tokens (no trunk), and as a branch whose trunk is missing."""
    tmp = tmp_path_factory.mktemp("wsd")
    cfg = tiny(tmp)
    alone = train.run(cfg, runs_dir=tmp / "alone", experiment="t", progress=False, from_trunk=False)
    branch = train.run(cfg, runs_dir=tmp / "runs", experiment="t", progress=False)
    return tmp, cfg, alone, branch


def test_a_missing_trunk_is_trained_first_and_the_branch_is_tagged_with_it(branched):
    tmp, cfg, _, branch = branched
    runs = tmp / "runs"
    assert branch.status == "FINISHED"
    (trunk_run,) = runs_of(runs, cfg.trunk().run_key())
    assert trunk_run.info.status == "FINISHED" and trunk_run.data.metrics[TOKENS] == cfg.branch_point() == 3072
    snapshot = checkpoint.trunk_snapshot(runs, cfg)
    assert snapshot == runs / "checkpoints" / cfg.trunk().run_key() / "at-000000000003072.pt" and snapshot.is_file()
    tags = MlflowClient(default_tracking_uri(runs)).get_run(branch.run_id).data.tags
    assert tags[TRUNK_RUN_TAG] == trunk_run.info.run_id and tags[TRUNK_KEY_TAG] == cfg.trunk().run_key()
    assert tags[BRANCH_POINT_TAG] == "3072"
    # each run its own folder: the branch wrote nothing into the trunk's
    assert branch.run_dir == runs / "checkpoints" / cfg.run_key()
    assert sorted(p.name for p in snapshot.parent.iterdir()) == [
        "at-000000000003072.pt", "at-000000000003072.sha256", "ckpt-000000000003072.pt", "ckpt-000000000003072.sha256",
        "config.json"]


def test_a_branch_computes_what_the_wsd_run_from_zero_computes(branched):
    tmp, cfg, alone, branch = branched
    assert alone.status == "FINISHED"
    for key in (VAL_NLL, VAL_KL, TOKENS):
        assert branch.metrics[key] == pytest.approx(alone.metrics[key], rel=1e-5, abs=1e-6), key
    for key in (TRAIN_LR, TRAIN_LOSS):  # the branch logs from its branch point on, the wsd run's curve there
        mine = history(tmp / "runs", branch.run_id, key)
        theirs = [(s, v) for s, v in history(tmp / "alone", alone.run_id, key) if s > cfg.branch_point()]
        assert [s for s, _ in mine] == [s for s, _ in theirs] == list(range(3328, 4097, 256))
        assert [v for _, v in mine] == pytest.approx([v for _, v in theirs], rel=1e-5)
    # its FLOPs are its own 1,024 tokens'; with its trunk's, the wsd run's
    per_token = branch.metrics[FLOPS] / 1024
    assert branch.metrics[FLOPS] + 3072 * per_token == pytest.approx(alone.metrics[FLOPS])


def test_a_finished_branch_is_skipped_and_its_trunk_left_alone(branched):
    tmp, cfg, _, branch = branched
    again = train.run(cfg, runs_dir=tmp / "runs", experiment="t", progress=False)
    assert again.status == "SKIPPED" and again.run_id == branch.run_id
    assert len(runs_of(tmp / "runs", cfg.trunk().run_key())) == len(runs_of(tmp / "runs", cfg.run_key())) == 1


def test_a_trunk_goes_on_in_its_own_run_and_keeps_each_stop(branched):
    tmp, cfg, _, _ = branched
    first = runs_of(tmp / "runs", cfg.trunk().run_key())[0].info.run_id
    longer = train.run(cfg.trunk().with_overrides(["train.tokens=3584"]), runs_dir=tmp / "runs", experiment="t",
                       progress=False)
    assert longer.status == "FINISHED" and longer.run_id == first and longer.metrics[TOKENS] == 3584
    folder = tmp / "runs" / "checkpoints" / cfg.trunk().run_key()
    assert (folder / "at-000000000003072.pt").is_file() and (folder / "at-000000000003584.pt").is_file()
    # a budget whose branch point the trunk passed without stopping is refused before its run exists
    past = tiny(tmp, "train.tokens=4352", "train.decay_fraction=0.2")  # 17 updates x 0.8: a branch point at 13
    with pytest.raises(FileNotFoundError, match=r"no snapshot there .*at-000000000003328\.pt"):
        train.run(past, runs_dir=tmp / "runs", experiment="t", progress=False)
    assert not runs_of(tmp / "runs", past.run_key())


def test_a_corrupt_snapshot_is_refused_naming_the_file(branched):
    tmp, cfg, _, _ = branched
    snapshot = checkpoint.trunk_snapshot(tmp / "runs", cfg)
    linear = tiny(tmp, "train.decay_shape=linear")  # another branch at the same point
    data = bytearray(snapshot.read_bytes())
    data[len(data) // 2] ^= 0xFF
    snapshot.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match=rf"{snapshot.name} does not match its checksum"):
        train.run(linear, runs_dir=tmp / "runs", experiment="t", progress=False)


def test_the_command_line_trains_a_wsd_run(tmp_path):
    args = [sys.executable, "-m", "ltm.train", "--preset", "smoke", "--runs-dir", str(tmp_path / "runs"),
            "--no-progress", *[a for kv in ("train.schedule=wsd", "train.tokens=2048", "train.warmup_steps=1",
                                            "train.eval_every=0", "train.iw_samples=0",
                                            f"data.cache_dir={tmp_path / 'cache'}") for a in ("--set", kv)]]
    done = subprocess.run(args, capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert done.returncode == 0, done.stderr
    assert "FINISHED: run" in done.stdout and "training the trunk first" in done.stderr
    bad = subprocess.run([*args, "--set", "train.decay_fraction=1.5"], capture_output=True, text=True, cwd=ROOT,
                         timeout=600)
    assert bad.returncode == Exit.USAGE and "train.decay_fraction" in bad.stderr


def test_a_runs_description_says_its_schedule():
    assert describe(wsd()).endswith("16.4k tokens (wsd, 1-sqrt decay over the last 20%)")
    assert describe(wsd().trunk()).endswith("13.1k tokens (constant-lr trunk)")
    assert describe(run_preset("smoke")).endswith("16.4k tokens")


def test_a_trunk_that_stops_before_the_branch_point_stops_the_branch_before_it_exists(tmp_path, monkeypatch):
    real = objective.decoder_loss
    calls = {"n": 0}

    def poisoned(*args, **kwargs):  # the trunk's 4th update goes non-finite
        calls["n"] += 1
        loss, kl = real(*args, **kwargs)
        return (loss * float("nan"), kl) if calls["n"] > 3 else (loss, kl)

    monkeypatch.setattr(objective, "decoder_loss", poisoned)
    cfg = tiny(tmp_path)
    result = train.run(cfg, runs_dir=tmp_path / "runs", experiment="t", progress=False)
    assert result.status == "FAILED" and result.run_id is None
    assert f"its trunk {cfg.trunk().run_key()}" in result.reason and "non-finite training loss" in result.reason
    (trunk,) = runs_of(tmp_path / "runs", cfg.trunk().run_key())
    assert trunk.info.status == "FAILED" and not runs_of(tmp_path / "runs", cfg.run_key())

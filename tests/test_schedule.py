"""Learning-rate schedules: cosine (the default), warmup-stable-decay (wsd) and the constant-rate trunk its
branches leave at their branch points; run keys, bad options, and a branch trained from its trunk's snapshot."""

import math

import pytest

from ltm import objective
from ltm.config import RUN_PRESETS, ConfigError, run_preset

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

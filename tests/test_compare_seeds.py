"""analysis/compare.py with several training seeds per arm: the statistics on synthetic per-block
frames, and the command end to end on tiny smoke runs."""

import numpy as np
import pandas as pd
import pytest

import ltm.train as train
from analysis import compare
from ltm.config import run_preset


def _arm(base: np.ndarray, offsets: list[float], tokens: int = 32, seed0: int = 0) -> list[pd.DataFrame]:
    """One frame per seed: per-block bounds (nats summed over `tokens` tokens) = base + the seed's offset."""
    return [pd.DataFrame({"bound": (base + off) * tokens, "nll": (base + off) * tokens * 0.9,
                          "kl": (base + off) * tokens * 0.1, "tokens": tokens, "seed": seed0 + i})
            for i, off in enumerate(offsets)]


def _width(row: dict, which: str, column: str = "bound") -> float:
    infix = {"blocks": "", "seeds": "_seed", "both": "_both"}[which]
    return row[f"{column}{infix}_ci_high"] - row[f"{column}{infix}_ci_low"]


def test_t_quantiles_match_the_table():
    for df, q in ((1, 12.706), (2, 4.303), (4, 2.776), (30, 2.042), (1e6, 1.960)):
        assert compare.t_quantile(0.975, df) == pytest.approx(q, abs=1e-3)


def test_welch_interval_covers_the_true_difference_95_percent_of_the_time_with_3_seeds():
    rng = np.random.default_rng(0)
    hits = [lo <= 0.1 <= hi for lo, hi, _ in (compare.welch_interval(rng.normal(0.1, 0.3, 3), rng.normal(0, 0.1, 3))
                                              for _ in range(2000))]
    assert 0.93 <= np.mean(hits) <= 0.97


def test_welch_interval_needs_two_seeds_per_arm_and_is_a_point_without_spread():
    with pytest.raises(ValueError, match="at least 2 values per arm"):
        compare.welch_interval([1.0], [0.5, 0.6])
    lo, hi, df = compare.welch_interval([1.0, 1.0, 1.0], [0.25, 0.25])
    assert lo == hi == 0.75 and np.isnan(df)


def test_a_seed_spread_widens_the_seed_interval_not_the_block_interval():
    base = 3.0 + np.random.default_rng(1).normal(0, 0.01, 200)  # blocks barely differ
    a, b = _arm(base + 0.1, [-0.2, 0.0, 0.25]), _arm(base, [0.15, -0.1, -0.05])  # true A - B: 0.1
    row = compare.compare_seeds(a, b, bootstrap=500)
    assert row["A_bound"] == pytest.approx(np.mean(base) + 0.1 + 0.05 / 3)
    assert row["bound_A_minus_B"] == pytest.approx(row["A_bound"] - row["B_bound"])
    assert row["bound_seed_ci_low"] <= 0.1 <= row["bound_seed_ci_high"]
    assert _width(row, "seeds") > 20 * _width(row, "blocks")
    assert _width(row, "both") > 5 * _width(row, "blocks")
    assert row["A_seeds"] == row["B_seeds"] == 3 and row["A_seed_bounds"].startswith("0=2.8")
    assert len(row["B_seed_bounds"].split(";")) == 3


def test_identical_seeds_give_a_zero_width_seed_interval_and_the_block_interval():
    base = 3.0 + np.random.default_rng(2).normal(0, 0.2, 100)
    a, b = _arm(base + 0.05, [0.0, 0.0]), _arm(base + np.random.default_rng(3).normal(0, 0.05, 100), [0.0, 0.0, 0.0])
    row = compare.compare_seeds(a, b, bootstrap=2000)
    assert row["bound_seed_ci_low"] == row["bound_seed_ci_high"] == pytest.approx(row["bound_A_minus_B"])
    single = compare.compare(a[0], b[0], bootstrap=2000)  # the seed-averaged blocks are any one seed's
    assert {k: row[k] for k in single} == pytest.approx(single)
    assert _width(row, "both") == pytest.approx(_width(row, "blocks"), rel=0.15)  # other draws, same spread


def test_runs_scored_on_other_blocks_are_refused():
    base = np.full(10, 3.0)
    with pytest.raises(ValueError, match="not scored on the same blocks"):
        compare.compare_seeds(_arm(base, [0, 0.1]), _arm(base, [0, 0.1], tokens=31), bootstrap=10)


def test_a_side_must_be_one_config_with_distinct_seeds():
    cfg = run_preset("smoke")
    seeds = [cfg.with_overrides({"seed": s}) for s in (0, 1, 2)]
    assert compare.side_problem("A", ["a0", "a1", "a2"], seeds) is None
    other = compare.side_problem("A", ["a0", "a1"], [seeds[0], seeds[1].with_overrides(["inference.steps=2"])])
    assert "A's runs differ in more than the seed: a1 has inference.steps=2 where a0 has 4" in other
    again = compare.side_problem("B", ["b0", "b1", "b2"], [seeds[0], seeds[1], seeds[0]])
    assert "b0 and b2 both have seed 0" in again
    # what a run ignores (where tokens are cached) is not a difference
    assert compare.side_problem("A", ["a0", "a1"], [seeds[0], seeds[1].with_overrides(["data.cache_dir=/x"])]) is None


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    """Smoke LTM (T=2) and AR runs with seeds 0 and 1, and an LTM T=1 with seed 2; their run keys."""
    tmp = tmp_path_factory.mktemp("seeds")
    base = run_preset("smoke").with_overrides([f"data.cache_dir={tmp / 'cache'}", "train.tokens=2048",
                                               "train.eval_every=2048"])
    keys = {}
    for name, overrides in (("ltm0", ["inference.steps=2", "seed=0"]), ("ltm1", ["inference.steps=2", "seed=1"]),
                            ("ar0", ["model.kind=ar", "seed=0"]), ("ar1", ["model.kind=ar", "seed=1"]),
                            ("ltm_t1", ["inference.steps=1", "seed=2"])):
        cfg = base.with_overrides(overrides)
        assert train.run(cfg, runs_dir=tmp / "runs", experiment="s", progress=False).status == "FINISHED"
        keys[name] = cfg.run_key()
    return tmp / "runs", keys


def test_compare_reports_three_intervals_for_seeded_arms(seeded, tmp_path, capsys):
    runs_dir, k = seeded
    out = tmp_path / "seeds.csv"
    assert compare.main([f"{k['ltm0']},{k['ltm1']}", f"{k['ar0']},{k['ar1']}", "--runs-dir", str(runs_dir),
                         "--blocks", "8", "--bootstrap", "200", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "A: ltm T=2 N_z=" in printed and "mean of 2 seeds" in printed and "seed 1: " in printed
    assert "over seeds [" in printed and "(Welch t, df " in printed and "both [" in printed
    row = pd.read_csv(out).iloc[0]
    assert row["A_seeds"] == row["B_seeds"] == 2 and row["blocks"] == 8 and row["B_kl"] == 0
    assert [p.split("=")[0] for p in row["A_seed_bounds"].split(";")] == ["0", "1"]
    for c in ("bound", "nll"):
        for which in ("", "_seed", "_both"):
            assert row[f"{c}{which}_ci_low"] <= row[f"{c}_A_minus_B"] <= row[f"{c}{which}_ci_high"]


def test_compare_refuses_mixed_configs_on_a_side_and_a_lone_run_against_seeds(seeded, capsys):
    runs_dir, k = seeded
    assert compare.main([f"{k['ltm0']},{k['ltm_t1']}", f"{k['ar0']},{k['ar1']}", "--runs-dir", str(runs_dir),
                         "--blocks", "4"]) == 2
    err = capsys.readouterr().err
    assert f"A's runs differ in more than the seed: {k['ltm_t1']} has inference.steps=1 where {k['ltm0']} has 2" in err
    assert compare.main([k["ltm0"], f"{k['ar0']},{k['ar1']}", "--runs-dir", str(runs_dir), "--blocks", "4"]) == 2
    assert "at least 2 seeds on each side; give A its other seeds" in capsys.readouterr().err

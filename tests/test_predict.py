"""Fits that predict (analysis/predict.py): on data drawn from a known law with noise, each fit recovers
the law, its held-out predictions fall inside their intervals, and a wrong held-out value falls outside."""

import re

import numpy as np
import pytest

from analysis.fit import compute_optimal, fit_chinchilla, fit_steps_law
from analysis.predict import (TrainingCost, crossover, frontier, held_out_rung, held_out_steps,
                              rollout)

# Two arms on the micro corpus' scale: an AR whose floor is its receptive field's optimum (6.22 nats/token)
# and an LTM that costs twice as much per token, starts worse, and can reach the full-context optimum (4.20).
AR = {"E": 6.22, "A": 30.0, "B": 60.0, "alpha": 0.3, "beta": 0.3}
LTM = {"E": 4.20, "A": 80.0, "B": 120.0, "alpha": 0.25, "beta": 0.3}
AR_COST, LTM_COST = TrainingCost(6.0, 1.0), TrainingCost(12.0, 1.0)
SIZES = np.geomspace(1e5, 2e6, 5)  # 20x in parameters
TOKENS_PER_PARAM = (5, 10, 20, 40)
NOISE = 0.002  # the spread of a log loss about the law (seeds, evaluation)
BOOTSTRAP = 60


def law(p, N, D):
    return p["E"] + p["A"] * N ** -p["alpha"] + p["B"] * D ** -p["beta"]


def ladder(p, seed=0):
    """A ladder's points: each size at each multiple of tokens per parameter, with multiplicative noise."""
    N, r = (a.ravel() for a in np.meshgrid(SIZES, TOKENS_PER_PARAM))
    D = r * N
    rng = np.random.default_rng(seed)
    return N, D, law(p, N, D) * np.exp(NOISE * rng.standard_normal(N.size))


@pytest.fixture(scope="module")
def ar_fit():
    return fit_chinchilla(*ladder(AR), bootstrap=BOOTSTRAP, seed=0)


@pytest.fixture(scope="module")
def ltm_fit():
    return fit_chinchilla(*ladder(LTM, seed=1), bootstrap=BOOTSTRAP, seed=1)


def test_free_E_covers_the_known_optimum_and_fixed_E_recovers_the_exponents(ar_fit):
    low, high = ar_fit.intervals["E"]
    assert low <= AR["E"] <= high and high - low < 0.5
    fixed = fit_chinchilla(*ladder(AR), E=AR["E"], bootstrap=BOOTSTRAP, seed=0)
    assert fixed.E == AR["E"] and "E" not in fixed.intervals and "E fixed at 6.22 (not fitted)" in fixed.method
    for name in ("alpha", "beta"):
        assert fixed.intervals[name][0] <= AR[name] <= fixed.intervals[name][1], name
    # knowing E narrows the exponents: the free fit trades E against them
    width = {f: f.intervals["alpha"][1] - f.intervals["alpha"][0] for f in (ar_fit, fixed)}
    assert width[fixed] < width[ar_fit]


@pytest.mark.parametrize("by", ["size", "compute"])
def test_the_held_out_rung_is_predicted_inside_its_interval(by):
    N, D, loss = ladder(AR)
    pred = held_out_rung(N, D, loss, by=by, bootstrap=BOOTSTRAP, seed=0)
    truth = law(AR, N[pred.held_out], D[pred.held_out])
    assert pred.held_out.sum() == (4 if by == "size" else 1) and not (pred.held_out & pred.trained).any()
    assert ((pred.low <= truth) & (truth <= pred.high)).all()  # the law's value: inside at every held-out point
    assert pred.inside.sum() >= pred.held_out.sum() - 1  # the noisy observations: a 90% interval may miss one
    assert np.abs(pred.error / pred.observed).max() < 0.01 and pred.compute_ratio > 1
    assert "prediction interval: 90%" in pred.method and "Huber" in pred.method


def test_a_held_out_rung_off_the_law_falls_outside_its_interval():
    N, D, loss = ladder(AR)
    loss = np.where(N == N.max(), loss + 0.1, loss)  # the largest size does worse than the law says
    pred = held_out_rung(N, D, loss, bootstrap=BOOTSTRAP, seed=0)
    assert not pred.inside.any() and (pred.error < -0.05).all()


def test_rollout_predicts_each_next_size_from_the_smaller_ones():
    N, D, loss = ladder(AR)
    steps = rollout(N, D, loss, bootstrap=30, seed=0)
    assert len(steps) == 2  # 5 sizes: fit on 3 predict the 4th, fit on 4 predict the 5th
    for k, step in zip((3, 4), steps):
        assert np.unique(N[step.trained]).size == k and set(N[step.held_out]) == {SIZES[k]}
        truth = law(AR, N[step.held_out], D[step.held_out])
        assert ((step.low <= truth) & (truth <= step.high)).all() and np.abs(step.error).max() < 0.03


def test_too_few_sizes_for_a_held_out_fit_say_how_many_are_needed():
    N, D, loss = ladder(AR)
    small = N <= SIZES[2]
    with pytest.raises(ValueError, match=r"needs at least 3 model sizes and 2 token budgets.*2 size\(s\)"):
        held_out_rung(N[small], D[small], loss[small], bootstrap=0)
    with pytest.raises(ValueError, match=r"rollout needs at least 4 model sizes \(3 to fit, 1 to predict\); got 3"):
        rollout(N[small], D[small], loss[small], bootstrap=0)
    with pytest.raises(ValueError, match="by must be 'size' or 'compute'"):
        held_out_rung(N, D, loss, by="tokens")


def test_the_frontier_is_the_minimum_over_sizes_and_its_band_covers_the_truth(ar_fit):
    C = np.geomspace(1e12, 1e16, 5)
    f = frontier(ar_fit, AR_COST, C)
    assert np.allclose(f.N_opt, compute_optimal(ar_fit, C)[0])  # C = 6 N D: fit.py's closed form
    grid = np.geomspace(1e3, 1e12, 20001)[:, None]
    brute = ar_fit.predict(grid, C / (6 * grid)).min(axis=0)
    assert np.allclose(f.loss, brute, rtol=1e-6)
    truth = law(AR, grid, C / (6 * grid)).min(axis=0)
    # a percentile band from 20 points under-covers a little: the truth inside at 4 of 5 budgets (here it
    # misses one by 3e-5), and the point frontier within 1% everywhere, 10x beyond the largest run
    assert ((f.low <= truth) & (truth <= f.high)).sum() >= 4 and np.allclose(f.loss, truth, rtol=1e-2)


def test_the_crossover_interval_covers_the_true_crossing(ar_fit, ltm_fit):
    C = np.geomspace(1e12, 1e22, 4001)
    N = np.geomspace(1e3, 1e14, 4001)[:, None]
    gap = law(LTM, N, C / (12 * N)).min(axis=0) - law(AR, N, C / (6 * N)).min(axis=0)
    true_C = C[np.argmax(gap <= 0)]
    assert gap[0] > 0 and gap[-1] < 0  # the LTM starts worse and ends better
    x = crossover(ltm_fit, LTM_COST, ar_fit, AR_COST, C_min=1e12, C_max=1e22)
    assert x.low <= true_C <= x.high and x.p_no_cross < 0.05
    assert x.low <= x.C <= x.high
    never = crossover(ar_fit, AR_COST, ltm_fit, LTM_COST, C_min=1e16, C_max=1e22)  # the AR never catches up again
    assert np.isnan(never.C) and never.p_no_cross == 1.0 and np.isnan(never.low)
    with pytest.raises(ValueError, match=re.escape("need 0 < C_min < C_max, got C_min=1e+22, C_max=1e+12")):
        crossover(ltm_fit, LTM_COST, ar_fit, AR_COST, C_min=1e22, C_max=1e12)
    with pytest.raises(ValueError, match="needs both fits with the same number of bootstrap refits"):
        crossover(fit_chinchilla(*ladder(LTM)), LTM_COST, ar_fit, AR_COST, C_min=1e12, C_max=1e22)


def test_the_cost_per_token_law_is_fitted_from_the_runs():
    N = np.array([1e5, 4e5, 2e6])
    cost = TrainingCost.fitted(N, 12 * N ** 1.1)
    assert cost.p == pytest.approx(1.1) and cost.k == pytest.approx(12)


def test_inference_steps_as_effective_size_are_checked_on_a_held_out_T():
    g = 0.4
    N, r, T = (a.ravel() for a in np.meshgrid(SIZES, TOKENS_PER_PARAM, [1, 2, 4, 8]))
    D = r * N
    truth = law(LTM, N * T ** g, D)
    loss = truth * np.exp(NOISE * np.random.default_rng(2).standard_normal(N.size))
    pred = held_out_steps(N, D, T, loss, bootstrap=40, seed=0)
    assert set(T[pred.held_out]) == {8} and pred.compute_ratio == 2
    assert pred.fit.intervals["g"][0] <= g <= pred.fit.intervals["g"][1]
    truth = truth[pred.held_out]
    assert ((pred.low <= truth) & (truth <= pred.high)).all() and pred.inside.mean() >= 0.75
    assert np.abs(pred.error / pred.observed).max() < 0.01
    three = T < 8
    with pytest.raises(ValueError, match=r"at least 4 values of T \(3 to fit, 1 to predict\); got 3"):
        held_out_steps(N[three], D[three], T[three], loss[three], bootstrap=0)
    with pytest.raises(ValueError, match=r"held_out T=3 is not among the values of T: \[1.0, 2.0, 4.0, 8.0\]"):
        held_out_steps(N, D, T, loss, held_out=3)
    one = T == 1
    with pytest.raises(ValueError, match="the steps law needs at least 2 values of T to fit g; got 1"):
        fit_steps_law(N[one], D[one], T[one], loss[one])

"""Scaling-law fits: recovery of known laws, the Chinchilla replication, and input checks."""

import itertools

import numpy as np
import pytest

from analysis.fit import (HOFFMANN_GRID, ChinchillaFit, _LogSumExpModel, _lbfgs,
                          _single_threaded_blas, compute_frontier, compute_optimal,
                          compute_optimal_intervals, fit_chinchilla, fit_inference_law, fit_inference_law_joint,
                          fit_power_law, isoflop_minima)

TRUTH = {"E": 1.7, "A": 400.0, "B": 410.0, "alpha": 0.34, "beta": 0.28}
# Besiroglu et al. 2024, Table 1: their fit of the Figure 4 points.
EPOCH = {"E": 1.82, "A": 482.01, "B": 2085.43, "alpha": 0.3478, "beta": 0.3658}


def chinchilla_law(N, D, p=TRUTH):
    return p["E"] + p["A"] * N ** -p["alpha"] + p["B"] * D ** -p["beta"]


@pytest.fixture(scope="module")
def synthetic_grid():
    """60 (N, D) points with 1% multiplicative noise on the Chinchilla paper's law."""
    N, D = (a.ravel() for a in np.meshgrid(np.geomspace(1e7, 1e10, 6), np.geomspace(1e9, 1e12, 10)))
    rng = np.random.default_rng(0)
    return N, D, chinchilla_law(N, D) * (1 + 0.01 * rng.standard_normal(N.size))


@pytest.fixture(scope="module")
def synthetic_fit(synthetic_grid):
    return fit_chinchilla(*synthetic_grid, bootstrap=100, seed=0)


@pytest.fixture(scope="module")
def chinchilla_points(local_data):
    """Epoch's points read off Hoffmann et al.'s Figure 4, five highest losses dropped, as (N, D, loss)."""
    import pandas as pd

    df = pd.read_csv(local_data("chinchilla/svg_extracted_data.csv")).sort_values("loss").iloc[:-5]
    N, flop = df["Model Size"].to_numpy(), df["Training FLOP"].to_numpy()
    return N, flop / (6 * N), df["loss"].to_numpy()


def given_fit(**p) -> ChinchillaFit:
    return ChinchillaFit(**p, loss=0.0, n_points=0, method="given")


# --------------------------------------------------------------------------- Chinchilla law


def test_chinchilla_fit_recovers_known_law_within_bootstrap_intervals(synthetic_fit, synthetic_grid):
    fit = synthetic_fit
    for name, true in TRUTH.items():
        lo, hi = fit.intervals[name]
        assert lo <= true <= hi, f"{name}: truth {true} outside 95% interval ({lo:.4g}, {hi:.4g})"
    assert fit.E == pytest.approx(TRUTH["E"], abs=0.1)
    assert fit.alpha == pytest.approx(TRUTH["alpha"], abs=0.03)
    assert fit.beta == pytest.approx(TRUTH["beta"], abs=0.03)
    # A and B trade off against E and the exponents; the law itself must be close everywhere.
    assert 1 / 1.5 < fit.A / TRUTH["A"] < 1.5 and 1 / 1.5 < fit.B / TRUTH["B"] < 1.5
    N, D, _ = synthetic_grid
    np.testing.assert_allclose(fit.predict(N, D), chinchilla_law(N, D), rtol=0.015)  # the noise is 1%
    assert fit.samples.shape == (100, 5) and fit.n_points == 60


def test_fit_states_loss_parameterisation_optimiser_grid_and_uncertainty(synthetic_fit):
    for words in ("Huber (delta=0.001)", "logsumexp", "L-BFGS-B", "5400-point grid", "100 bootstrap", "95%"):
        assert words in synthetic_fit.method


def test_objective_gradient_matches_finite_differences(synthetic_grid):
    N, D, loss = synthetic_grid
    X = np.zeros((3, N.size, 5))
    X[0, :, 0], X[1, :, 1], X[1, :, 3], X[2, :, 2], X[2, :, 4] = 1, 1, -np.log(N), 1, -np.log(D)
    model = _LogSumExpModel(X, np.log(loss), 1e-3)
    weights = np.random.default_rng(1).integers(0, 3, N.size).astype(float)
    theta = np.array([0.5, 6.0, 6.1, 0.33, 0.29])
    _, grad = model.value_and_grad(theta, weights)
    h = 1e-7
    f = lambda t: model.value_and_grad(t, weights)[0]  # noqa: E731
    numeric = [(f(theta + h * e) - f(theta - h * e)) / (2 * h) for e in np.eye(5)]
    np.testing.assert_allclose(grad, numeric, rtol=1e-5, atol=1e-6)


def test_chinchilla_data_reproduces_epoch_replication(chinchilla_points):
    fit = fit_chinchilla(*chinchilla_points, bootstrap=40, seed=0)
    assert fit.n_points == 240
    assert fit.E == pytest.approx(EPOCH["E"], abs=0.01)
    assert fit.alpha == pytest.approx(EPOCH["alpha"], abs=0.005)
    assert fit.beta == pytest.approx(EPOCH["beta"], abs=0.005)
    # A and B sit on a flat ridge of the Huber surface: Epoch's values differ from the converged
    # optimum (A 477.8, B 2143) by 1% and 3%.
    assert fit.A == pytest.approx(EPOCH["A"], rel=0.03)
    assert fit.B == pytest.approx(EPOCH["B"], rel=0.05)
    for name, value in EPOCH.items():
        lo, hi = fit.intervals[name]
        assert lo <= value <= hi, f"Epoch's {name} = {value} outside our interval ({lo:.4g}, {hi:.4g})"


def test_best_grid_starts_reach_the_optimum_of_many_random_starts(chinchilla_points):
    N, D, loss = chinchilla_points
    fit = fit_chinchilla(N, D, loss)
    X = np.zeros((3, N.size, 5))
    X[0, :, 0], X[1, :, 1], X[1, :, 3], X[2, :, 2], X[2, :, 4] = 1, 1, -np.log(N), 1, -np.log(D)
    grid = np.array(list(itertools.product(*HOFFMANN_GRID.values())))
    random_starts = grid[np.random.default_rng(0).choice(len(grid), 150, replace=False)]
    with _single_threaded_blas():
        _, objective = _lbfgs(_LogSumExpModel(X, np.log(loss), 1e-3), random_starts, np.ones(N.size))
    assert fit.loss <= objective * (1 + 1e-9)


# --------------------------------------------------------------------------- compute-optimal allocation


def test_compute_optimal_spends_the_budget_and_minimises_loss_along_it():
    fit = given_fit(E=1.82, A=482.0, B=2085.0, alpha=0.348, beta=0.366)
    C = np.array([1e18, 1e21, 5.76e23])
    N_opt, D_opt = compute_optimal(fit, C)
    np.testing.assert_allclose(6 * N_opt * D_opt, C, rtol=1e-12)
    for c, n_opt in zip(C, N_opt):
        N = n_opt * np.geomspace(0.5, 2, 2001)
        best = N[np.argmin(fit.predict(N, c / (6 * N)))]
        assert best == pytest.approx(n_opt, rel=1e-3)


def test_compute_optimal_keeps_the_shape_of_C():
    N_opt, D_opt = compute_optimal(given_fit(**TRUTH), 1e21)
    assert np.shape(N_opt) == () and np.shape(D_opt) == ()


def test_compute_optimal_intervals_bracket_the_point_allocation(synthetic_fit):
    C = np.array([1e19, 1e22])
    N_opt, D_opt = compute_optimal(synthetic_fit, C)
    bands = compute_optimal_intervals(synthetic_fit, C)
    assert np.all(bands["N"][0] <= N_opt) and np.all(N_opt <= bands["N"][1])
    assert np.all(bands["D"][0] <= D_opt) and np.all(D_opt <= bands["D"][1])
    with pytest.raises(ValueError, match="no bootstrap samples"):
        compute_optimal_intervals(given_fit(**TRUTH), C)


# --------------------------------------------------------------------------- one-variable laws


def test_inference_law_recovers_known_E_A_gamma():
    rng = np.random.default_rng(2)
    T = np.geomspace(1, 256, 30)
    loss = (2.0 + 1.5 * T ** -0.5) * (1 + 0.005 * rng.standard_normal(T.size))
    fit = fit_inference_law(T, loss, bootstrap=60, seed=0)
    for name, true, tol in (("E", 2.0, 0.03), ("A", 1.5, 0.05), ("gamma", 0.5, 0.03)):
        assert getattr(fit, name) == pytest.approx(true, abs=tol)
        lo, hi = fit.intervals[name]
        assert lo <= true <= hi, f"{name}: truth {true} outside ({lo:.4g}, {hi:.4g})"


def test_joint_inference_law_shares_gamma_across_groups():
    rng = np.random.default_rng(3)
    T = np.concatenate([np.geomspace(1, 64, 15), np.geomspace(2, 256, 15), np.geomspace(4, 1024, 15)])
    group = np.repeat(["4 latents", "8 latents", "16 latents"], 15)
    E = {"4 latents": 2.2, "8 latents": 2.0, "16 latents": 1.9}
    A = {"4 latents": 1.0, "8 latents": 0.8, "16 latents": 0.6}
    loss = np.array([E[g] + A[g] * t ** -0.4 for g, t in zip(group, T)]) * (1 + 0.003 * rng.standard_normal(T.size))
    fit = fit_inference_law_joint(T, loss, group, bootstrap=30, seed=0)
    assert fit.gamma == pytest.approx(0.4, abs=0.03)
    assert fit.intervals["gamma"][0] <= 0.4 <= fit.intervals["gamma"][1]
    for g in E:
        assert fit.E[g] == pytest.approx(E[g], abs=0.04) and fit.A[g] == pytest.approx(A[g], abs=0.06)
    assert fit.samples.shape == (30, 7)
    np.testing.assert_allclose(fit.predict(T, group), loss, rtol=0.02)


def test_joint_gamma_lies_between_the_groups_own_gammas():
    T = np.geomspace(1, 128, 15)
    loss_a, loss_b = 2.0 + 1.0 * T ** -0.3, 1.8 + 1.0 * T ** -0.6
    joint = fit_inference_law_joint(np.r_[T, T], np.r_[loss_a, loss_b], np.repeat([0, 1], 15))
    own = sorted(fit_inference_law(T, y).gamma for y in (loss_a, loss_b))
    assert own[0] == pytest.approx(0.3, abs=1e-3) and own[1] == pytest.approx(0.6, abs=1e-3)
    assert own[0] < joint.gamma < own[1]


def test_power_law_recovers_offset_law_on_flops_scale():
    rng = np.random.default_rng(4)
    x = np.geomspace(1e18, 1e23, 25)
    loss = (1.8 + 3e4 * x ** -0.25) * (1 + 0.002 * rng.standard_normal(x.size))
    fit = fit_power_law(x, loss, bootstrap=40, seed=0)
    assert fit.E == pytest.approx(1.8, abs=0.03) and fit.alpha == pytest.approx(0.25, abs=0.02)
    assert set(fit.intervals) == {"E", "A", "alpha"}
    np.testing.assert_allclose(fit.predict(x), 1.8 + 3e4 * x ** -0.25, rtol=5e-3)


def test_power_law_without_offset_is_exact_on_a_pure_power_law():
    x = np.geomspace(1e6, 1e12, 12)
    fit = fit_power_law(x, 5e3 * x ** -0.2, with_offset=False, bootstrap=10)
    assert fit.E == 0.0 and "E" not in fit.intervals
    assert fit.A == pytest.approx(5e3, rel=1e-5) and fit.alpha == pytest.approx(0.2, abs=1e-6)


# --------------------------------------------------------------------------- non-parametric diagnostics


def test_frontier_is_the_monotone_lower_envelope():
    rng = np.random.default_rng(5)
    flops = rng.choice(np.geomspace(1e17, 1e21, 40), 200)  # repeated budgets exercise ties
    loss = 2 + 10 * flops ** -0.1 + rng.exponential(0.2, flops.size)
    idx = compute_frontier(flops, loss)
    assert np.all(np.diff(flops[idx]) > 0) and np.all(np.diff(loss[idx]) < 0)
    for f, loss_f in zip(flops, loss):  # no point beats the envelope at its own compute
        assert loss[idx][flops[idx] <= f].min() <= loss_f


def test_frontier_of_a_small_example():
    # The last point only ties the best loss so far, so it is not on the frontier.
    assert compute_frontier([4, 1, 2, 3, 2, 5], [1.0, 3.0, 3.5, 2.0, 2.5, 1.0]).tolist() == [1, 4, 3, 0]


def test_isoflop_minima_recover_a_parabolas_vertex():
    budgets = np.array([1e18, 1e19, 1e20, 1e21])
    N_star = 0.1 * budgets ** 0.5
    N, C, loss = [], [], []
    for c, n_star in zip(budgets, N_star):
        sizes = n_star * np.geomspace(0.2, 3.0, 7)
        N += list(sizes)
        C += [c * 1.01] * 7  # budgets in a bin are close, not equal
        loss += list(2 + 0.3 * np.log(sizes / n_star) ** 2 + 0.1 * np.log10(1e22 / c))
    N += [1e9, 2e9]  # a fifth bin with only two sizes is skipped
    C += [1e23, 1e23]
    loss += [2.0, 2.1]
    out = isoflop_minima(N, C, loss, bins=np.geomspace(3e17, 3e23, 7))
    np.testing.assert_allclose(out.N_opt, N_star, rtol=1e-8)
    np.testing.assert_allclose(out.C, budgets * 1.01, rtol=1e-12)
    np.testing.assert_allclose(out.loss_opt, 2 + 0.1 * np.log10(1e22 / budgets), rtol=1e-10)
    assert out.n_points.tolist() == [7, 7, 7, 7]


# --------------------------------------------------------------------------- several runs (seeds) per point


def _seeded_curve(offsets):
    """L(T) = E + 3 T^-0.5 at 8 T values, one run per (T, seed): seed s shifts E by offsets[s]."""
    T = np.repeat(2.0 ** np.arange(8), len(offsets))
    E = 2.0 + np.tile(offsets, 8)
    return T, E + 3 * T ** -0.5


def test_one_run_per_point_fits_as_without_points():
    T, loss = _seeded_curve([0.0])
    loss = loss * (1 + np.random.default_rng(0).normal(0, 0.01, loss.size))
    plain, labelled = (fit_inference_law(T, loss, bootstrap=20, points=p) for p in (None, T.astype(str)))
    assert plain.intervals == labelled.intervals and plain.method == labelled.method and plain.E == labelled.E


def test_a_bootstrap_draw_resamples_the_seeds_of_each_point():
    T, loss = _seeded_curve([-0.2, 0.0, 0.2])  # the seeds' mean lies on the law: no spread between T values
    means = fit_inference_law(T[::3], 2 + 3 * T[::3] ** -0.5, bootstrap=50)
    seeded = fit_inference_law(T, loss, bootstrap=50, points=T)
    assert seeded.n_points == 8 and "then within each drawn point its runs (seeds)" in seeded.method
    assert "8 points of 24 runs, each run weighted 1/(runs at its point)" in seeded.method
    assert seeded.E == pytest.approx(2.0, abs=0.02)
    width = lambda f: f.intervals["E"][1] - f.intervals["E"][0]  # noqa: E731
    assert width(means) < 1e-3 and width(seeded) > 0.05  # only resampling seeds shows how far E could move
    assert seeded.intervals["E"][0] < 2.0 < seeded.intervals["E"][1]


def test_the_runs_of_a_point_stay_in_its_group():
    T, loss = _seeded_curve([-0.1, 0.1])
    group = np.tile(["a", "b"], 8)  # each T's two seeds put in different groups
    with pytest.raises(ValueError, match="one point must be in one group"):
        fit_inference_law_joint(np.r_[T, T], np.r_[loss, loss + 1], np.r_[group, group], points=np.r_[T, T])


# --------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize("call, message", [
    (lambda: fit_chinchilla([1e8] * 6, [1e9] * 5, [3.0] * 6), r"same length.*'N': 6, 'D': 5"),
    (lambda: fit_chinchilla([1e8, 0, 1e9, 1e9, 1e9, 1e9], [1e9] * 6, [3.0] * 6),
     r"N must be finite and > 0; N\[1\] = 0"),
    (lambda: fit_chinchilla([1e8] * 6, [1e9] * 6, [3.0, -1, 3, 3, 3, 3]), r"loss must be .* > 0; loss\[1\]"),
    (lambda: fit_chinchilla([1e8] * 4, [1e9] * 4, [3.0] * 4), r"5 parameters but only 4 points"),
    (lambda: fit_chinchilla([1e8] * 6, [1e9] * 6, [3.0] * 6, bootstrap=-1), r"bootstrap must be >= 0"),
    (lambda: fit_chinchilla([1e8] * 6, [1e9] * 6, [3.0] * 6, huber_delta=0), r"huber_delta must be > 0"),
    (lambda: fit_inference_law([0, 1, 2, 4], [3, 2, 1.5, 1.4]), r"T must be finite and > 0; T\[0\] = 0"),
    (lambda: fit_inference_law([1, 2], [3, 2]), r"3 parameters but only 2 points"),
    (lambda: fit_power_law([1, 2, np.nan], [3, 2, 1]), r"x must be finite"),
    (lambda: fit_inference_law_joint([1, 2, 4, 8, 1], [3, 2, 1.5, 1.4, 2], [0, 0, 0, 0, 1]),
     r"group 1 has 1"),
    (lambda: compute_frontier([1, 2], [1.0]), r"same length"),
    (lambda: isoflop_minima([1, 2, 3], [1, 1, 1], [1, 1, 1], bins=[1, 1]), r"bin edges must increase"),
    (lambda: compute_optimal(given_fit(**TRUTH), [1e20, -1.0]), r"C must be finite and > 0"),
])
def test_bad_inputs_raise_clear_errors(call, message):
    with pytest.raises(ValueError, match=message):
        call()

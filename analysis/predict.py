"""Fits that predict, and are checked: a held-out rung, rollout cross-validation over sizes (as OLMo's
ScalingLawRollout), the compute-optimal frontier L*(C) of an arm, the compute at which two arms'
frontiers cross, and inference steps T checked on a held-out T.

Every law is fitted by `analysis.fit` (Huber on log loss, L-BFGS-B from the best grid starts, percentile
bootstrap over points; each fit's `method` says so). What this module adds:

* prediction intervals (90%): the bootstrap refits' predictions at the held-out points, each multiplied
  by exp(r), r drawn with replacement from the point fit's log residuals on its own points (the scatter
  of a single run about the law: seeds, evaluation noise), then the 5th and 95th percentiles;
* frontiers: training compute C = k N^p D, with flops_per_token = k N^p fitted to the arm's runs by least
  squares in log-log (6 N for a plain transformer: k = 6, p = 1); L*(C) = min over N of L(N, C / (k N^p)),
  in closed form, for the point fit and for each bootstrap refit (the band: 2.5th to 97.5th percentiles);
* crossover: the smallest C on a log grid up to C_max at which arm A's frontier is at or below arm B's,
  linearly interpolated in log C, for the point fits and for each pair of bootstrap refits (A's b-th with
  B's b-th: the arms' runs are independent, so are their resamples).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from numpy.typing import ArrayLike

from analysis.fit import ChinchillaFit, StepsLawFit, fit_chinchilla, fit_steps_law

PREDICTION_LEVEL = 90.0
"""Coverage of the held-out prediction intervals, in percent."""
BAND_LEVEL = 95.0
"""Coverage of the frontier bands and the crossover interval (the level of analysis.fit's intervals)."""
MIN_FIT_SIZES = 3
"""Model sizes a fit of L(N, D) needs before it predicts another (5 parameters; alpha needs sizes to spare)."""
MIN_FIT_STEPS = 3
"""Values of T a fit of the steps law needs before it predicts another."""


@dataclass(frozen=True, eq=False)
class Prediction:
    """Points a law was not fitted on, predicted by it."""

    held_out: np.ndarray
    """Boolean mask over the input points: the predicted ones."""
    trained: np.ndarray
    """Boolean mask over the input points: those the law was fitted on."""
    observed: np.ndarray
    predicted: np.ndarray
    """The point fit's prediction at each held-out point."""
    low: np.ndarray
    high: np.ndarray
    """The PREDICTION_LEVEL% prediction interval at each held-out point."""
    compute_ratio: float
    """The held-out points' largest compute over the fitted points' largest: how far the prediction reaches."""
    fit: ChinchillaFit | StepsLawFit
    method: str

    @property
    def error(self) -> np.ndarray:
        """Predicted minus observed loss at each held-out point."""
        return self.predicted - self.observed

    @property
    def inside(self) -> np.ndarray:
        """Whether each observed loss lies in its prediction interval."""
        return (self.low <= self.observed) & (self.observed <= self.high)


def _law_values(samples: np.ndarray, N: np.ndarray, D: np.ndarray, T: np.ndarray | None = None) -> np.ndarray:
    """Loss at (N, D[, T]) for each row (E, A, B, alpha, beta[, g]) of `samples`: shape (rows, points)."""
    E, A, B, alpha, beta = (col[:, None] for col in samples.T[:5])
    size = N if T is None else N * T ** samples[:, 5:6]
    return E + A * size ** -alpha + B * D ** -beta


def _interval(fit, predictions: np.ndarray, residuals: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """The prediction interval from bootstrap predictions (rows) times exp(a resampled log residual)."""
    # A fit's residuals on its own points are smaller than a new point's scatter (the parameters absorb
    # some of it): scaled by sqrt(n / (n - parameters)), as the unbiased variance of least squares is.
    n, k = residuals.size, len(fit.intervals)  # the fitted parameters (a fixed E has no interval)
    residuals = residuals * np.sqrt(n / max(n - k, 1))
    rng = np.random.default_rng(seed)
    noisy = predictions * np.exp(rng.choice(residuals, size=predictions.shape, replace=True))
    tail = (100.0 - PREDICTION_LEVEL) / 2
    return np.percentile(noisy, tail, axis=0), np.percentile(noisy, 100 - tail, axis=0)


def _method(fit, what: str) -> str:
    return (f"{what}; prediction interval: {PREDICTION_LEVEL:g}%, the bootstrap refits' predictions each times "
            f"exp(a log residual of the point fit, drawn with replacement); the law: {fit.method}")


def _arrays(**named: ArrayLike) -> dict[str, np.ndarray]:
    """The inputs as float arrays of one length, or a ValueError listing the lengths."""
    out = {k: np.asarray(v, dtype=float).ravel() for k, v in named.items()}
    lengths = {k: v.size for k, v in out.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return out


def _predict_sizes(x: dict[str, np.ndarray], train: np.ndarray, test: np.ndarray, *, E: float | None,
                   bootstrap: int, seed: int, points: np.ndarray | None, what: str) -> Prediction:
    """Fit L(N, D) on `train`, predict `test` with its interval."""
    N, D, loss, C = x["N"], x["D"], x["loss"], x["C"]
    fit = fit_chinchilla(N[train], D[train], loss[train], E=E, bootstrap=bootstrap, seed=seed,
                         points=None if points is None else points[train])
    residuals = np.log(loss[train]) - np.log(fit.predict(N[train], D[train]))
    low, high = (np.full(test.sum(), np.nan),) * 2 if fit.samples is None else _interval(
        fit, _law_values(fit.samples, N[test], D[test]), residuals, seed)
    return Prediction(test, train, loss[test], fit.predict(N[test], D[test]), low, high,
                      float(C[test].max() / C[train].max()), fit, _method(fit, what))


def _check_sizes(N: np.ndarray, D: np.ndarray, train: np.ndarray, what: str, total: str) -> None:
    """ValueError when the fitted points have too few sizes or budgets, saying how many are needed."""
    sizes, budgets = np.unique(N[train]).size, np.unique(D[train]).size
    if sizes < MIN_FIT_SIZES or budgets < 2:
        raise ValueError(f"{what} needs at least {MIN_FIT_SIZES} model sizes and 2 token budgets to fit L(N, D) "
                         f"before the points it predicts ({total}); the points left to fit have {sizes} size(s) and "
                         f"{budgets} budget(s): add sizes or budgets to the ladder")


def held_out_rung(N: ArrayLike, D: ArrayLike, loss: ArrayLike, *, by: str = "size", C: ArrayLike | None = None,
                  E: float | None = None, bootstrap: int = 200, seed: int = 0,
                  points: ArrayLike | None = None) -> Prediction:
    """Fit L(N, D) = E + A/N^alpha + B/D^beta (analysis.fit.fit_chinchilla; `E` fixed if given) without the
    largest rung and predict it with a PREDICTION_LEVEL% interval. `by="size"`: the rung is every point of the
    largest N; `by="compute"`: the points of the largest compute C (default 6 N D; pass the runs' FLOPs).
    `points`: a label per observation, equal for the seeds of one point."""
    if by not in ("size", "compute"):
        raise ValueError(f"by must be 'size' or 'compute', got {by!r}")
    x = _arrays(N=N, D=D, loss=loss, C=6 * np.asarray(N, float) * np.asarray(D, float) if C is None else C)
    key = x["N"] if by == "size" else x["C"]
    test = np.isclose(key, key.max(), rtol=1e-9)
    _check_sizes(x["N"], x["D"], ~test, f"a held-out rung by {by}", f"{MIN_FIT_SIZES + 1} sizes in all by size")
    labels = None if points is None else np.asarray(points)
    return _predict_sizes(x, ~test, test, E=E, bootstrap=bootstrap, seed=seed, points=labels,
                          what=f"held out: the points of the largest {'N' if by == 'size' else 'compute'}")


def rollout(N: ArrayLike, D: ArrayLike, loss: ArrayLike, *, C: ArrayLike | None = None, E: float | None = None,
            bootstrap: int = 200, seed: int = 0, points: ArrayLike | None = None) -> list[Prediction]:
    """Rollout cross-validation over sizes (OLMo's ScalingLawRollout): for each k from MIN_FIT_SIZES on, fit on
    the k smallest sizes and predict the (k+1)-th; one Prediction per k, smallest first."""
    x = _arrays(N=N, D=D, loss=loss, C=6 * np.asarray(N, float) * np.asarray(D, float) if C is None else C)
    sizes = np.unique(x["N"])
    if sizes.size < MIN_FIT_SIZES + 1:
        raise ValueError(f"a rollout needs at least {MIN_FIT_SIZES + 1} model sizes ({MIN_FIT_SIZES} to fit, 1 to "
                         f"predict); got {sizes.size}: add sizes to the ladder")
    labels = None if points is None else np.asarray(points)
    out = []
    for k in range(MIN_FIT_SIZES, sizes.size):
        train, test = x["N"] <= sizes[k - 1], x["N"] == sizes[k]
        _check_sizes(x["N"], x["D"], train, "a rollout step", f"fit on {k} sizes")
        out.append(_predict_sizes(x, train, test, E=E, bootstrap=bootstrap, seed=seed + k, points=labels,
                                  what=f"rollout: fitted on the {k} smallest sizes, predicting size {k + 1}"))
    return out


def held_out_steps(N: ArrayLike, D: ArrayLike, T: ArrayLike, loss: ArrayLike, *, held_out: float | None = None,
                   bootstrap: int = 200, seed: int = 0, points: ArrayLike | None = None) -> Prediction:
    """Fit L = E + A/(N T^g)^alpha + B/D^beta (analysis.fit.fit_steps_law) without one value of T (default the
    largest) and predict its points with a PREDICTION_LEVEL% interval."""
    x = _arrays(N=N, D=D, T=T, loss=loss)
    values = np.unique(x["T"])
    t = values.max() if held_out is None else float(held_out)
    if t not in values:
        raise ValueError(f"held_out T={t:g} is not among the values of T: {values.tolist()}")
    if values.size < MIN_FIT_STEPS + 1:
        raise ValueError(f"checking the steps law on a held-out T needs at least {MIN_FIT_STEPS + 1} values of T "
                         f"({MIN_FIT_STEPS} to fit, 1 to predict); got {values.size}: {values.tolist()}")
    test = x["T"] == t
    train = ~test
    fit = fit_steps_law(x["N"][train], x["D"][train], x["T"][train], x["loss"][train], bootstrap=bootstrap, seed=seed,
                        points=None if points is None else np.asarray(points)[train])
    at = [x[k][train] for k in ("N", "D", "T")]
    residuals = np.log(x["loss"][train]) - np.log(fit.predict(*at))
    low, high = (np.full(test.sum(), np.nan),) * 2 if fit.samples is None else _interval(
        fit, _law_values(fit.samples, x["N"][test], x["D"][test], x["T"][test]), residuals, seed)
    return Prediction(test, train, x["loss"][test], fit.predict(x["N"][test], x["D"][test], x["T"][test]), low, high,
                      float(t / x["T"][train].max()), fit, _method(fit, f"held out: the points at T={t:g}"))


@dataclass(frozen=True)
class TrainingCost:
    """Training FLOPs per token as k N^p: C = k N^p D."""

    k: float
    p: float

    @classmethod
    def fitted(cls, N: ArrayLike, flops_per_token: ArrayLike) -> "TrainingCost":
        """Least squares of log flops_per_token on log N (with one size, p = 1 through its points)."""
        x = _arrays(N=N, flops_per_token=flops_per_token)
        logN, logF = np.log(x["N"]), np.log(x["flops_per_token"])
        if not np.isfinite(logN).all() or not np.isfinite(logF).all():
            raise ValueError("N and flops_per_token must be > 0")
        p = np.polyfit(logN, logF, 1)[0] if np.unique(logN).size > 1 else 1.0
        return cls(float(np.exp(np.mean(logF - p * logN))), float(p))


@dataclass(frozen=True, eq=False)
class Frontier:
    """The compute-optimal loss L*(C) = min over N of L(N, C / (k N^p)) of one fitted law."""

    C: np.ndarray
    loss: np.ndarray
    """L*(C) of the point fit."""
    low: np.ndarray
    high: np.ndarray
    """The BAND_LEVEL% band over the bootstrap refits (NaN without them)."""
    N_opt: np.ndarray
    samples: np.ndarray | None
    """L*(C) of each bootstrap refit, shape (refits, len(C))."""


def _optimal_loss(rows: np.ndarray, cost: TrainingCost, C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """L*(C) and N*(C) for each law row (E, A, B, alpha, beta): shape (rows, len(C)); from setting dL/dN = 0 in
    E + A N^-alpha + B (C / (k N^p))^-beta: N^(alpha + p beta) = alpha A C^beta / (p beta B k^beta)."""
    E, A, B, alpha, beta = (col[:, None] for col in rows.T[:5])
    with np.errstate(over="ignore", divide="ignore", invalid="ignore"):
        N = (alpha * A * C ** beta / (cost.p * beta * B * cost.k ** beta)) ** (1 / (alpha + cost.p * beta))
        loss = E + A * N ** -alpha + B * (C / (cost.k * N ** cost.p)) ** -beta
    return loss, N


def frontier(fit: ChinchillaFit, cost: TrainingCost, C: ArrayLike) -> Frontier:
    """The compute-optimal frontier of `fit` at the budgets C, with its bootstrap band."""
    C = np.asarray(C, dtype=float).ravel()
    if (C <= 0).any() or not np.isfinite(C).all():
        raise ValueError("compute budgets C must be finite and > 0")
    point = np.array([[fit.E, fit.A, fit.B, fit.alpha, fit.beta]])
    loss, N = _optimal_loss(point, cost, C)
    if fit.samples is None:
        return Frontier(C, loss[0], np.full(C.size, np.nan), np.full(C.size, np.nan), N[0], None)
    samples = _optimal_loss(fit.samples, cost, C)[0]
    tail = (100.0 - BAND_LEVEL) / 2
    return Frontier(C, loss[0], np.nanpercentile(samples, tail, axis=0), np.nanpercentile(samples, 100 - tail, axis=0),
                    N[0], samples)


@dataclass(frozen=True)
class Crossover:
    """Where arm A's frontier reaches arm B's, searched on C_min..C_max."""

    C: float
    """The point fits' crossover (C_min when A is at or below B there already); NaN when they do not cross."""
    low: float
    high: float
    """BAND_LEVEL% interval of the crossover over the pairs of refits that cross (NaN when none does)."""
    p_no_cross: float
    """The share of refit pairs in which A stays above B up to C_max."""
    C_min: float
    C_max: float
    method: str


def _first_crossing(delta: np.ndarray, logC: np.ndarray) -> np.ndarray:
    """Per row, the log C where delta (A minus B) first reaches 0, interpolated linearly; NaN if it never does."""
    below = delta <= 0
    first = np.argmax(below, axis=1)
    rows = np.arange(len(delta))
    prev = np.maximum(first - 1, 0)
    d0, d1 = delta[rows, prev], delta[rows, first]
    with np.errstate(divide="ignore", invalid="ignore"):
        share = np.where(first > 0, d0 / (d0 - d1), 0.0)
    out = logC[prev] + share * (logC[first] - logC[prev])
    return np.where(below.any(axis=1), out, np.nan)


def crossover(a: ChinchillaFit, cost_a: TrainingCost, b: ChinchillaFit, cost_b: TrainingCost, *, C_min: float,
              C_max: float, grid: int = 400) -> Crossover:
    """The compute at which arm A's frontier L*_A(C) first gets to or below arm B's, for the point fits and each
    pair of bootstrap refits, on `grid` log-spaced budgets from C_min to C_max; and the probability (share of
    refit pairs) that A stays above B up to C_max (e.g. the compute of the paper preset)."""
    if not 0 < C_min < C_max:
        raise ValueError(f"need 0 < C_min < C_max, got C_min={C_min:g}, C_max={C_max:g}")
    if a.samples is None or b.samples is None or len(a.samples) != len(b.samples):
        raise ValueError("a crossover interval needs both fits with the same number of bootstrap refits (> 0)")
    C = np.geomspace(C_min, C_max, grid)
    fa, fb = frontier(a, cost_a, C), frontier(b, cost_b, C)
    point = _first_crossing((fa.loss - fb.loss)[None], np.log(C))[0]
    pairs = _first_crossing(fa.samples - fb.samples, np.log(C))
    crossed = pairs[np.isfinite(pairs)]
    tail = (100.0 - BAND_LEVEL) / 2
    low, high = (np.exp(np.percentile(crossed, [tail, 100 - tail])) if crossed.size else (np.nan, np.nan))
    method = (f"first C in {grid} log-spaced budgets from {C_min:.3g} to {C_max:.3g} FLOPs where A's L*(C) <= B's, "
              f"interpolated in log C; interval: percentile {BAND_LEVEL:g}% over the {crossed.size} of "
              f"{len(pairs)} refit pairs (A's b-th with B's b-th) that cross; p_no_cross: the share that do not")
    return Crossover(float(np.exp(point)), float(low), float(high), float(1 - crossed.size / len(pairs)),
                     float(C_min), float(C_max), method)

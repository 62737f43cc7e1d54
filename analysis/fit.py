"""Scaling-law fits with percentile-bootstrap intervals.

Every law here is a sum of positive terms, each the exponential of something linear in the
parameters (E = e^e, A N^-alpha = e^(a - alpha log N), ...). So each is fitted the same way,
following Hoffmann et al. (2022) and Epoch AI's replication (Besiroglu et al. 2024):

* loss: Huber (delta 1e-3 by default) between log predicted and log observed loss, summed
  over points;
* parameterisation: log L = logsumexp over terms of (intercept - exponent * log x), so the
  fitted scale constants are positive by construction and nothing overflows;
* optimiser: L-BFGS-B with the analytic gradient, started from the best few points of a grid
  (the whole grid is scored in one vectorised pass first); the best end point is kept;
* uncertainty: resample points with replacement (as multinomial weights), refit from the
  full-data optimum and the best few grid starts, report 2.5th and 97.5th percentiles.

Several observations of one point (`points=`: e.g. the same config trained with several seeds)
are fitted as they are, each weighted 1/(observations at its point) so that every point weighs
as one, and a bootstrap draw resamples the points and then, within each drawn point, its
observations: whole seeds are resampled together with the points, so the interval includes the
spread between seeds. With one observation per point both reduce to the above.

Each result carries a `method` string saying all of this for that fit.
"""

from __future__ import annotations

import contextlib
import itertools
from collections.abc import Hashable
from dataclasses import dataclass, field

import numpy as np
from numpy.typing import ArrayLike
from scipy.optimize import minimize

try:
    from threadpoolctl import threadpool_limits
except ImportError:  # optional: without it fits are only slower on a busy machine
    threadpool_limits = None

HOFFMANN_GRID: dict[str, tuple[float, ...]] = {
    "e": (-1.0, -0.5, 0.0, 0.5, 1.0, 1.5),
    "a": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "b": (0.0, 5.0, 10.0, 15.0, 20.0, 25.0),
    "alpha": (0.0, 0.5, 1.0, 1.5, 2.0),
    "beta": (0.0, 0.5, 1.0, 1.5, 2.0),
}
"""Starting grid of Hoffmann et al. / Epoch AI for (e, a, b, alpha, beta): 5400 starts."""

# Why not run L-BFGS from all 5400 Hoffmann starts: that takes over half a minute per fit on one
# core, too slow to repeat for every bootstrap resample. On the Chinchilla data (five highest
# losses dropped) a run from every start finds one optimum (objective 1.0182740e-3, reached
# from about 2000 starts, every other end point at least twice as bad); the 8 best-scoring
# grid points all reach it too, so the 32 best leave a wide margin.
_TOP_STARTS = 32
# A bootstrap refit starts from the full-data optimum (a resample's optimum is nearby) and
# from the best few grid points, in case the resample moves the optimum to another basin.
_BOOTSTRAP_GRID_STARTS = 4
# The objective is divided by delta inside the optimiser so that it is O(sum |residual|), and
# the tolerances are tight: the Huber surface is nearly flat along (E, A, alpha) and loose
# tolerances stop at points that differ in the third digit of A and B.
_LBFGS_OPTIONS = {"gtol": 1e-9, "ftol": 1e-14, "maxiter": 2000, "maxfun": 5000}
_LEVEL = 95.0


# --------------------------------------------------------------------------- core machinery


@dataclass(frozen=True)
class _LogSumExpModel:
    """log L_i = logsumexp_k(X[k, i] @ theta), fitted by Huber loss on log L."""

    X: np.ndarray
    """Design, shape (terms, points, params): term k at point i has log value X[k, i] @ theta."""
    log_y: np.ndarray
    delta: float
    offset: np.ndarray | float = 0.0
    """Added to every term's log value, shape (terms, points): a term with a zero design row and offset log E
    is the constant E, held fixed (`fit_chinchilla(E=...)`)."""

    def predict_log(self, thetas: np.ndarray) -> np.ndarray:
        """Log predictions, shape (starts, points), for parameter rows `thetas` (starts, params)."""
        z = np.einsum("kip,sp->ski", self.X, thetas) + self.offset
        return np.logaddexp.reduce(z, axis=1)

    def objectives(self, thetas: np.ndarray, weights: np.ndarray) -> np.ndarray:
        """Weighted Huber objective for many parameter rows at once (scores a grid in one pass)."""
        return _huber(self.predict_log(thetas) - self.log_y, self.delta) @ weights

    def value_and_grad(self, theta: np.ndarray, weights: np.ndarray) -> tuple[float, np.ndarray]:
        """Objective / delta and its gradient at one parameter vector (what L-BFGS sees)."""
        z = np.einsum("kip,p->ki", self.X, theta) + self.offset  # (terms, points)
        zmax = z.max(axis=0)
        ez = np.exp(z - zmax)
        total = ez.sum(axis=0)
        r = zmax + np.log(total) - self.log_y
        # d log L / d theta = softmax over terms of the term gradients; Huber's derivative is
        # the residual clipped to [-delta, delta], continuous, so L-BFGS sees a C1 objective.
        psi = weights * np.clip(r, -self.delta, self.delta)
        grad = np.einsum("ki,kip->p", ez / total * psi, self.X)
        return float(_huber(r, self.delta) @ weights) / self.delta, grad / self.delta


# Every power term is fitted as intercept - exponent * (log x - mean log x) and converted back
# (A = exp(intercept + exponent * mean log x)) for reporting. This is the same law, but it
# decorrelates intercept and exponent (log N ~ 20, log FLOPs ~ 45): on the Chinchilla data
# bootstrap refits need 75 rather than 98 L-BFGS iterations (median), 160 rather than 233 (max).
def _centred_log(x: np.ndarray) -> tuple[np.ndarray, float]:
    """log x minus its mean, and that mean."""
    u = np.log(x)
    return u - u.mean(), float(u.mean())


def _huber(r: np.ndarray, delta: float) -> np.ndarray:
    """Huber's function: r^2/2 within delta, linear (slope delta) outside."""
    a = np.abs(r)
    return np.where(a <= delta, 0.5 * r * r, delta * (a - 0.5 * delta))


def _lbfgs(model: _LogSumExpModel, starts: np.ndarray, weights: np.ndarray) -> tuple[np.ndarray, float]:
    """Run L-BFGS-B from every start; return the best end point and its (unscaled) objective."""
    best_theta, best_f = starts[0], np.inf
    for start in starts:
        res = minimize(model.value_and_grad, start, args=(weights,), jac=True, method="L-BFGS-B",
                       options=_LBFGS_OPTIONS)
        if res.fun < best_f:
            best_theta, best_f = res.x, res.fun
    return best_theta, best_f * model.delta


def _best_starts(model: _LogSumExpModel, grid: np.ndarray, k: int, weights: np.ndarray) -> np.ndarray:
    """The k grid rows with the lowest full-data objective."""
    scores = model.objectives(grid, weights)
    return grid[np.argsort(scores, kind="stable")[:k]]


def _bootstrap_weights(rng: np.random.Generator, strata: np.ndarray) -> np.ndarray:
    """Multinomial counts of a with-replacement resample, drawn within each stratum."""
    w = np.zeros(strata.size)
    for s in np.unique(strata):
        idx = np.flatnonzero(strata == s)
        w[idx] = rng.multinomial(idx.size, np.full(idx.size, 1.0 / idx.size))
    return w


@dataclass(frozen=True)
class _Points:
    """Which point each observation belongs to; a point may have several (e.g. one run per seed)."""

    codes: np.ndarray
    """Per observation, its point's index."""
    sizes: np.ndarray
    """Per point, its number of observations."""

    @classmethod
    def of(cls, labels: ArrayLike | None, n: int) -> "_Points":
        """From one label per observation; None: every observation its own point."""
        if labels is None:
            return cls(np.arange(n), np.ones(n, dtype=int))
        labels = np.asarray(labels)
        if labels.shape != (n,):
            raise ValueError(f"points must have one label per observation ({n}), got shape {labels.shape}")
        codes = np.unique(labels, return_inverse=True)[1].ravel()
        return cls(codes, np.bincount(codes))

    @property
    def replicated(self) -> bool:
        """Whether some point has more than one observation."""
        return bool((self.sizes > 1).any())

    def base_weights(self) -> np.ndarray:
        """Each observation weighted 1/(observations at its point): every point weighs as one."""
        return 1.0 / self.sizes[self.codes]

    def point_strata(self, strata: np.ndarray) -> np.ndarray:
        """Each point's stratum, or a ValueError when a point's observations are in several strata."""
        out = np.zeros(self.sizes.size)
        out[self.codes] = strata
        if not np.array_equal(out[self.codes], strata):
            raise ValueError("the observations of one point must be in one group (stratum)")
        return out

    def draw(self, rng: np.random.Generator, strata: np.ndarray) -> np.ndarray:
        """One bootstrap draw's weights: points resampled within their strata, then each drawn point's
        observations resampled within it (one stratum per point)."""
        if not self.replicated:  # one observation per point: the plain resample (same random draws as ever)
            return _bootstrap_weights(rng, strata)
        per_point = _bootstrap_weights(rng, self.point_strata(strata))
        within = _bootstrap_weights(rng, self.codes)
        return per_point[self.codes] * within / self.sizes[self.codes]


@dataclass(frozen=True)
class _Solution:
    """A multi-start fit and, when asked for, its bootstrap refits."""

    theta: np.ndarray
    objective: float
    samples: np.ndarray | None
    """Bootstrap parameter vectors, shape (bootstrap, params); None without a bootstrap."""


def _single_threaded_blas() -> contextlib.AbstractContextManager:
    """Limit BLAS to one thread where threadpoolctl is installed."""
    # L-BFGS-B calls BLAS on vectors of a few elements; OpenBLAS threads for them gain nothing
    # and, when other processes hold the cores, made a fit 45 times slower (7 s against 0.16 s).
    return contextlib.nullcontext() if threadpool_limits is None else threadpool_limits(1, user_api="blas")


def _solve(model: _LogSumExpModel, grid: np.ndarray, *, top_k: int, bootstrap: int, seed: int,
           strata: np.ndarray | None = None, points: _Points | None = None) -> _Solution:
    """Shared driver: multi-start L-BFGS on all points, then `bootstrap` resampled refits."""
    points = points or _Points.of(None, model.log_y.size)
    with _single_threaded_blas():
        starts = _best_starts(model, grid, top_k, points.base_weights())
        theta, objective = _lbfgs(model, starts, points.base_weights())
        if bootstrap == 0:
            return _Solution(theta, objective, None)
        strata = np.zeros(model.log_y.size) if strata is None else strata
        refit_starts = np.vstack([theta, starts[:_BOOTSTRAP_GRID_STARTS]])
        rng = np.random.default_rng(seed)
        samples = np.array([_lbfgs(model, refit_starts, points.draw(rng, strata))[0]
                            for _ in range(bootstrap)])
    return _Solution(theta, objective, samples)


def _intervals(samples: dict[str, np.ndarray]) -> dict[str, tuple[float, float]]:
    """Percentile 95% intervals of each named bootstrap sample."""
    tail = (100.0 - _LEVEL) / 2
    return {k: (float(np.percentile(v, tail)), float(np.percentile(v, 100 - tail))) for k, v in samples.items()}


def _describe(law: str, grid: str, n_starts: int, delta: float, bootstrap: int, resample: str = "points",
              points: _Points | None = None) -> str:
    """The `method` string every result carries."""
    replicated = points is not None and points.replicated
    drawn = f"{resample} (with replacement)" + (", then within each drawn point its runs (seeds), also with "
                                                "replacement" if replicated else "")
    uncertainty = (f"percentile {_LEVEL:g}% intervals from {bootstrap} bootstrap resamples of {drawn}, each refit "
                   f"from the full-data optimum and the {_BOOTSTRAP_GRID_STARTS} best grid starts"
                   if bootstrap else "no bootstrap")
    summed = (f"summed over {points.sizes.size} points of {points.codes.size} runs, each run weighted "
              "1/(runs at its point)" if replicated else "summed over points")
    return (f"{law}; loss: Huber (delta={delta:g}) between log predicted and log observed loss, "
            f"{summed}; optimiser: L-BFGS-B with analytic gradient from the {n_starts} best "
            f"of {grid}; uncertainty: {uncertainty}")


# --------------------------------------------------------------------------- input checks


def _positive(name: str, x: ArrayLike) -> np.ndarray:
    """`x` as a 1-D float array, or a ValueError naming what is wrong with it."""
    arr = np.asarray(x, dtype=float)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    bad = ~np.isfinite(arr) | (arr <= 0)
    if bad.any():
        i = int(np.flatnonzero(bad)[0])
        raise ValueError(f"{name} must be finite and > 0; {name}[{i}] = {arr[i]:g} ({int(bad.sum())} bad values)")
    return arr


def _same_length(**arrays: np.ndarray) -> int:
    """The common length of the arrays, or a ValueError listing every length."""
    lengths = {k: len(v) for k, v in arrays.items()}
    if len(set(lengths.values())) != 1:
        raise ValueError(f"inputs must have the same length, got {lengths}")
    return next(iter(lengths.values()))


def _check_fit_args(n_points: int, n_params: int, bootstrap: int, delta: float, what: str) -> None:
    """ValueError when there are too few points or a bad bootstrap count or Huber delta."""
    if n_points < n_params:
        raise ValueError(f"{what} has {n_params} parameters but only {n_points} points; need at least {n_params}")
    if bootstrap < 0:
        raise ValueError(f"bootstrap must be >= 0, got {bootstrap}")
    if not delta > 0:
        raise ValueError(f"huber_delta must be > 0, got {delta}")


# --------------------------------------------------------------------------- Chinchilla law


# Results are frozen; eq=False because they hold arrays, whose == is elementwise.
@dataclass(frozen=True, eq=False)
class ChinchillaFit:
    """L(N, D) = E + A / N^alpha + B / D^beta, as fitted by `fit_chinchilla`."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    loss: float
    """Huber objective at the optimum, summed over points."""
    n_points: int
    method: str
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Percentile 95% bootstrap interval per parameter name; empty without a bootstrap."""
    samples: np.ndarray | None = None
    """Bootstrap fits, shape (bootstrap, 5), columns E, A, B, alpha, beta."""

    def predict(self, N: ArrayLike, D: ArrayLike) -> np.ndarray:
        """Predicted loss at parameters N and training tokens D."""
        N, D = np.asarray(N, dtype=float), np.asarray(D, dtype=float)
        return self.E + self.A * N ** -self.alpha + self.B * D ** -self.beta


_CHINCHILLA_NAMES = ("E", "A", "B", "alpha", "beta")


def fit_chinchilla(N: ArrayLike, D: ArrayLike, loss: ArrayLike, *, bootstrap: int = 0, seed: int = 0,
                   huber_delta: float = 1e-3, points: ArrayLike | None = None, E: float | None = None) -> ChinchillaFit:
    """Fit L = E + A/N^alpha + B/D^beta by Hoffmann et al.'s method (Huber on log L, L-BFGS, grid).

    `points`: a label per observation, equal for the runs of one point (e.g. its seeds); see the module notes.
    `E`: hold the irreducible loss at this value (a corpus's known optimum) and fit A, B, alpha and beta from
    Hoffmann's grid without its e axis; E then has no interval and the method says it was fixed."""
    N, D, loss = _positive("N", N), _positive("D", D), _positive("loss", loss)
    n = _same_length(N=N, D=D, loss=loss)
    pts = _Points.of(points, n)
    _check_fit_args(pts.sizes.size, 5 - (E is not None), bootstrap, huber_delta, "the Chinchilla law")
    design = _SizeDataDesign.of(N, D, None, E)
    sol = _solve(_LogSumExpModel(design.X, np.log(loss), huber_delta, design.offset), design.grid,
                 top_k=_TOP_STARTS, bootstrap=bootstrap, seed=seed, points=pts)
    point = design.natural(sol.theta[None])[0]
    samples = None if sol.samples is None else design.natural(sol.samples)
    fitted = _CHINCHILLA_NAMES if E is None else _CHINCHILLA_NAMES[1:]
    law = "L = exp(logsumexp(a - alpha log N, b - beta log D, e)), A = e^a, B = e^b, E = e^e"
    method = _describe(law + ("" if E is None else f", E fixed at {E:g} (not fitted)"),
                       f"Hoffmann et al.'s {len(design.grid)}-point grid of ({design.grid_axes})",
                       _TOP_STARTS, huber_delta, bootstrap, points=pts)
    return ChinchillaFit(*map(float, point), loss=sol.objective, n_points=pts.sizes.size, method=method,
                         intervals={} if samples is None else _intervals(
                             {k: v for k, v in zip(_CHINCHILLA_NAMES, samples.T) if k in fitted}),
                         samples=samples)


_STEPS_GRID = (0.0, 0.1, 0.25, 0.5)
"""Starting values of c = alpha g (the exponent of T in the size term) for the steps law."""


@dataclass(frozen=True)
class _SizeDataDesign:
    """The Chinchilla law (optionally with T in the size term, optionally E fixed) as a `_LogSumExpModel` design.

    theta = ([e,] a_c, b_c, alpha, beta[, c]); the terms are e, a_c - alpha (log N - cN) [- c (log T - cT)] and
    b_c - beta (log D - cD), i.e. a = a_c + alpha cN [+ c cT] and b = b_c + beta cD (see the note on centring)."""

    X: np.ndarray
    offset: np.ndarray | float
    grid: np.ndarray
    grid_axes: str
    centres: tuple[float, float, float]
    E: float | None

    @classmethod
    def of(cls, N: np.ndarray, D: np.ndarray, T: np.ndarray | None, E: float | None) -> "_SizeDataDesign":
        (uN, cN), (uD, cD) = _centred_log(N), _centred_log(D)
        uT, cT = _centred_log(T) if T is not None else (None, 0.0)
        X = np.zeros((3, len(N), 5 + (T is not None)))
        X[0, :, 0] = 1.0
        X[1, :, 1], X[1, :, 3] = 1.0, -uN
        X[2, :, 2], X[2, :, 4] = 1.0, -uD
        axes = [HOFFMANN_GRID[k] for k in ("e", "a", "b", "alpha", "beta")]
        if T is not None:
            X[1, :, 5] = -uT
            axes.append(_STEPS_GRID)
        grid = np.array(list(itertools.product(*axes)))
        grid[:, 1] -= grid[:, 3] * cN + (grid[:, 5] * cT if T is not None else 0.0)
        grid[:, 2] -= grid[:, 4] * cD
        names = "e, a, b, alpha, beta" + (", c = alpha g" if T is not None else "")
        if E is None:
            return cls(X, 0.0, grid, names, (cN, cD, cT), None)
        offset = np.zeros(X.shape[:2])
        offset[0] = np.log(_positive("E", [E])[0])  # the constant term: a zero design row, its log in the offset
        return cls(X[:, :, 1:], offset, np.unique(grid[:, 1:], axis=0), names[3:], (cN, cD, cT), float(E))

    def natural(self, theta: np.ndarray) -> np.ndarray:
        """Rows (E, A, B, alpha, beta[, g]) from fitted rows theta."""
        if self.E is not None:
            theta = np.column_stack([np.full(len(theta), np.log(self.E)), theta])
        cN, cD, cT = self.centres
        c = theta[:, 5] if theta.shape[1] > 5 else 0.0
        out = [np.exp(theta[:, 0]), np.exp(theta[:, 1] + theta[:, 3] * cN + c * cT),
               np.exp(theta[:, 2] + theta[:, 4] * cD), theta[:, 3], theta[:, 4]]
        return np.column_stack(out + ([c / theta[:, 3]] if theta.shape[1] > 5 else []))


def _allocation(A: ArrayLike, B: ArrayLike, alpha: ArrayLike, beta: ArrayLike,
                C: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Closed-form argmin of A/N^alpha + B/D^beta subject to 6 N D = C (broadcasts)."""
    s = alpha + beta
    G = (alpha * A / (beta * B)) ** (1 / s)
    return G * (C / 6) ** (beta / s), (C / 6) ** (alpha / s) / G


def compute_optimal(fit: ChinchillaFit, C: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Compute-optimal (N, D) for budgets C (any shape) under C = 6 N D, from the closed form."""
    C = np.asarray(C, dtype=float)
    _positive("C", C.ravel())
    return _allocation(fit.A, fit.B, fit.alpha, fit.beta, C)


def compute_optimal_intervals(fit: ChinchillaFit, C: ArrayLike) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Percentile 95% bootstrap intervals of N_opt and D_opt over flattened C: {"N": (lo, hi), "D": (lo, hi)}."""
    if fit.samples is None:
        raise ValueError("this fit has no bootstrap samples; refit with bootstrap > 0")
    C = _positive("C", np.atleast_1d(C).ravel())
    _, A, B, alpha, beta = (col[:, None] for col in fit.samples.T)
    N, D = _allocation(A, B, alpha, beta, C[None, :])
    tail = (100.0 - _LEVEL) / 2
    return {name: (np.percentile(v, tail, axis=0), np.percentile(v, 100 - tail, axis=0))
            for name, v in (("N", N), ("D", D))}


# --------------------------------------------------------------------------- inference steps as a size multiplier


@dataclass(frozen=True, eq=False)
class StepsLawFit:
    """L(N, D, T) = E + A / (N T^g)^alpha + B / D^beta: T inference steps act as an effective size N T^g (the
    form recurrent-depth studies use), as fitted by `fit_steps_law`."""

    E: float
    A: float
    B: float
    alpha: float
    beta: float
    g: float
    loss: float
    """Huber objective at the optimum, summed over points."""
    n_points: int
    method: str
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Percentile 95% bootstrap interval per parameter name; empty without a bootstrap."""
    samples: np.ndarray | None = None
    """Bootstrap fits, shape (bootstrap, 6), columns E, A, B, alpha, beta, g."""

    def predict(self, N: ArrayLike, D: ArrayLike, T: ArrayLike) -> np.ndarray:
        """Predicted loss at parameters N, training tokens D and inference steps T."""
        N, D, T = (np.asarray(x, dtype=float) for x in (N, D, T))
        return self.E + self.A * (N * T ** self.g) ** -self.alpha + self.B * D ** -self.beta


STEPS_NAMES = ("E", "A", "B", "alpha", "beta", "g")


def fit_steps_law(N: ArrayLike, D: ArrayLike, T: ArrayLike, loss: ArrayLike, *, bootstrap: int = 0, seed: int = 0,
                  huber_delta: float = 1e-3, points: ArrayLike | None = None) -> StepsLawFit:
    """Fit L = E + A/(N T^g)^alpha + B/D^beta as `fit_chinchilla` fits its law (Huber on log L, L-BFGS from the
    best of Hoffmann's grid times starting c = alpha g in _STEPS_GRID, bootstrap over points); g = c / alpha.

    Needs at least 2 values of T (one fixes nothing about g). `points`: as in `fit_chinchilla`."""
    N, D, T, loss = _positive("N", N), _positive("D", D), _positive("T", T), _positive("loss", loss)
    n = _same_length(N=N, D=D, T=T, loss=loss)
    pts = _Points.of(points, n)
    _check_fit_args(pts.sizes.size, 6, bootstrap, huber_delta, "the steps law")
    if np.unique(T).size < 2:
        raise ValueError(f"the steps law needs at least 2 values of T to fit g; got {np.unique(T).size}")
    design = _SizeDataDesign.of(N, D, T, None)
    sol = _solve(_LogSumExpModel(design.X, np.log(loss), huber_delta), design.grid, top_k=_TOP_STARTS,
                 bootstrap=bootstrap, seed=seed, points=pts)
    point = design.natural(sol.theta[None])[0]
    samples = None if sol.samples is None else design.natural(sol.samples)
    method = _describe("L = exp(logsumexp(a - alpha log N - c log T, b - beta log D, e)), A = e^a, B = e^b, E = e^e, "
                       "g = c / alpha", f"a {len(design.grid)}-point grid of ({design.grid_axes}): Hoffmann et al.'s "
                       f"times c in {_STEPS_GRID}", _TOP_STARTS, huber_delta, bootstrap, points=pts)
    return StepsLawFit(*map(float, point), loss=sol.objective, n_points=pts.sizes.size, method=method,
                       intervals={} if samples is None else _intervals(dict(zip(STEPS_NAMES, samples.T))),
                       samples=samples)


# --------------------------------------------------------------------------- one-variable power laws

# In one-variable laws the centred intercept is the log of the reducible loss at the
# geometric-mean x, so one data-relative grid serves tokens, FLOPs and inference steps.
_E_FRACTIONS = (0.01, 0.25, 0.5, 0.75, 0.95)
"""Starting E as fractions of the smallest observed loss."""
_A_FRACTIONS = (0.01, 0.03, 0.1, 0.3, 1.0)
"""Starting reducible loss at the geometric-mean x, as fractions of the mean observed loss."""
_EXPONENTS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.0)
_ONE_VAR_TOP_STARTS = 8


def _one_var_grid(loss: np.ndarray, with_offset: bool) -> np.ndarray:
    """Starting grid over (e, a_centred, exponent), or (a_centred, exponent) without offset."""
    a = np.log(np.mean(loss) * np.array(_A_FRACTIONS))
    if not with_offset:
        return np.array(list(itertools.product(a, _EXPONENTS)))
    e = np.log(np.min(loss) * np.array(_E_FRACTIONS))
    return np.array(list(itertools.product(e, a, _EXPONENTS)))


def _one_var_grid_text(with_offset: bool) -> str:
    """How `_one_var_grid` is built, for `method` strings."""
    offset = f"E in {_E_FRACTIONS} x min(loss), " if with_offset else ""
    n_starts = (len(_E_FRACTIONS) if with_offset else 1) * len(_A_FRACTIONS) * len(_EXPONENTS)
    return (f"a {n_starts}-point grid: "
            f"{offset}reducible loss at the geometric-mean x in {_A_FRACTIONS} x mean(loss), "
            f"exponent in {_EXPONENTS}")


def _one_var_design(x: np.ndarray, with_offset: bool) -> tuple[np.ndarray, float]:
    """Design for [E +] A x^-k in centred log x; theta = ([e,] a_centred, k); also returns the centre."""
    u, centre = _centred_log(x)
    power = np.zeros((len(x), 2 + with_offset))
    power[:, -2], power[:, -1] = 1.0, -u
    if not with_offset:
        return power[None], centre
    const = np.zeros_like(power)
    const[:, 0] = 1.0
    return np.stack([const, power]), centre


def _fit_one_var(x: np.ndarray, loss: np.ndarray, *, with_offset: bool, bootstrap: int, seed: int, huber_delta: float,
                 what: str, points: ArrayLike | None) -> tuple[np.ndarray, np.ndarray | None, float, _Points]:
    """Fit [E +] A x^-k; return (E, A, k) point, bootstrap samples (rows E, A, k), objective and the points."""
    pts = _Points.of(points, _same_length(x=x, loss=loss))
    _check_fit_args(pts.sizes.size, 2 + with_offset, bootstrap, huber_delta, what)
    X, centre = _one_var_design(x, with_offset)
    sol = _solve(_LogSumExpModel(X, np.log(loss), huber_delta), _one_var_grid(loss, with_offset),
                 top_k=_ONE_VAR_TOP_STARTS, bootstrap=bootstrap, seed=seed, points=pts)

    def natural(theta: np.ndarray) -> np.ndarray:
        E = np.exp(theta[:, 0]) if with_offset else np.zeros(len(theta))
        a, k = theta[:, -2], theta[:, -1]
        return np.column_stack([E, np.exp(a + k * centre), k])

    samples = None if sol.samples is None else natural(sol.samples)
    return natural(sol.theta[None])[0], samples, sol.objective, pts


@dataclass(frozen=True, eq=False)
class PowerLawFit:
    """L(x) = E + A x^-alpha (E = 0 when fitted without offset), as fitted by `fit_power_law`, or
    L(T) = E + A T^-gamma in inference compute T by `fit_inference_law` (the same law, its exponent
    named gamma: `exponent`)."""

    E: float
    A: float
    alpha: float
    """The exponent, whatever its name (`gamma` reads it too)."""
    loss: float
    """Huber objective at the optimum, summed over points."""
    n_points: int
    method: str
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Percentile 95% bootstrap interval per parameter, the exponent under its name (E only with an
    offset); empty without a bootstrap."""
    samples: np.ndarray | None = None
    """Bootstrap fits, shape (bootstrap, 3), columns E, A and the exponent."""
    exponent: str = "alpha"
    """The exponent's name: "alpha" (`fit_power_law`) or "gamma" (`fit_inference_law`)."""

    @property
    def gamma(self) -> float:
        """The exponent, as the inference law names it."""
        return self.alpha

    def predict(self, x: ArrayLike) -> np.ndarray:
        """Predicted loss at x."""
        return self.E + self.A * np.asarray(x, dtype=float) ** -self.alpha


def fit_power_law(x: ArrayLike, loss: ArrayLike, *, with_offset: bool = True, bootstrap: int = 0, seed: int = 0,
                  huber_delta: float = 1e-3, points: ArrayLike | None = None) -> PowerLawFit:
    """Fit L = E + A x^-alpha (or A x^-alpha) to one curve, e.g. loss vs tokens or FLOPs.

    `points`: a label per observation, equal for the runs of one point (e.g. its seeds); see the module notes."""
    return _fit_power_law(x, loss, with_offset=with_offset, bootstrap=bootstrap, seed=seed, huber_delta=huber_delta,
                          points=points, variable="x", exponent="alpha", what="the power law")


def _fit_power_law(x: ArrayLike, loss: ArrayLike, *, with_offset: bool, bootstrap: int, seed: int,
                   huber_delta: float, points: ArrayLike | None, variable: str, exponent: str,
                   what: str) -> PowerLawFit:
    x, loss = _positive(variable, x), _positive("loss", loss)
    point, samples, objective, pts = _fit_one_var(x, loss, with_offset=with_offset, bootstrap=bootstrap, seed=seed,
                                                  huber_delta=huber_delta, what=what, points=points)
    law = (f"L = exp(logsumexp(e, a - {exponent} log {variable})), E = e^e, A = e^a" if with_offset
           else f"L = exp(a - {exponent} log {variable}), A = e^a (no offset)")
    # Without an offset E is fixed at 0, not estimated, so it gets no interval.
    fitted = dict(zip(("E", "A", exponent), samples.T)) if samples is not None else {}
    intervals = _intervals({k: v for k, v in fitted.items() if with_offset or k != "E"})
    method = _describe(law, _one_var_grid_text(with_offset), _ONE_VAR_TOP_STARTS, huber_delta, bootstrap,
                       points=pts)
    return PowerLawFit(*map(float, point), loss=objective, n_points=pts.sizes.size, method=method,
                       intervals=intervals, samples=samples, exponent=exponent)


# --------------------------------------------------------------------------- inference-time laws

def fit_inference_law(T: ArrayLike, loss: ArrayLike, *, bootstrap: int = 0, seed: int = 0,
                      huber_delta: float = 1e-3, points: ArrayLike | None = None) -> PowerLawFit:
    """Fit L(T) = E + A T^-gamma (T: inference steps or FLOPs) by Huber on log L, multi-start L-BFGS.

    `points`: a label per observation, equal for the runs of one point (e.g. its seeds); see the module notes."""
    return _fit_power_law(T, loss, with_offset=True, bootstrap=bootstrap, seed=seed, huber_delta=huber_delta,
                          points=points, variable="T", exponent="gamma", what="the inference law")


@dataclass(frozen=True, eq=False)
class JointInferenceLawFit:
    """L_g(T) = E_g + A_g T^-gamma: groups share the exponent gamma, each has its own E_g and A_g."""

    gamma: float
    E: dict[Hashable, float]
    A: dict[Hashable, float]
    loss: float
    """Huber objective at the optimum, summed over all points."""
    n_points: int
    method: str
    intervals: dict[str, tuple[float, float]] = field(default_factory=dict)
    """Percentile 95% bootstrap intervals keyed "gamma", "E[g]", "A[g]"; empty without a bootstrap."""
    samples: np.ndarray | None = None
    """Bootstrap fits, shape (bootstrap, 1 + 2 G), columns gamma, then E_g, A_g for each group in order."""

    def predict(self, T: ArrayLike, group: ArrayLike) -> np.ndarray:
        """Predicted loss at inference compute T for the given group labels."""
        T = np.asarray(T, dtype=float)
        E = np.array([self.E[g] for g in np.asarray(group).tolist()])
        A = np.array([self.A[g] for g in np.asarray(group).tolist()])
        return E + A * T ** -self.gamma


def _joint_starts(T: np.ndarray, loss: np.ndarray, codes: np.ndarray, n_groups: int, centre: float) -> np.ndarray:
    """Starts over (gamma, e_1, a_1, ..., e_G, a_G): for each grid gamma, each group's best grid (e, a)."""
    # Given gamma the objective separates over groups, so each group's (e, a) is chosen on its own
    # 2-D grid; a full product grid would grow as 25^G.
    starts = np.zeros((len(_EXPONENTS), 1 + 2 * n_groups))
    starts[:, 0] = _EXPONENTS
    for g in range(n_groups):
        m = codes == g
        X, own_centre = _one_var_design(T[m], with_offset=True)
        grid = _one_var_grid(loss[m], with_offset=True)
        scores = _LogSumExpModel(X, np.log(loss[m]), 1.0).objectives(grid, np.ones(m.sum()))
        # The group's grid is centred on its own mean log T; move its intercepts to the joint centre.
        grid[:, 1] += grid[:, 2] * (own_centre - centre)
        for i, gamma in enumerate(_EXPONENTS):
            rows = np.flatnonzero(grid[:, 2] == gamma)
            starts[i, 1 + 2 * g: 3 + 2 * g] = grid[rows[np.argmin(scores[rows])], :2]
    return starts


def fit_inference_law_joint(T: ArrayLike, loss: ArrayLike, group: ArrayLike, *, bootstrap: int = 0, seed: int = 0,
                            huber_delta: float = 1e-3, points: ArrayLike | None = None) -> JointInferenceLawFit:
    """Fit L_g(T) = E_g + A_g T^-gamma with one gamma shared by all groups (e.g. model sizes).

    `points`: a label per observation, equal for the runs of one point (e.g. its seeds), each point in one
    group; see the module notes."""
    T, loss = _positive("T", T), _positive("loss", loss)
    group = np.asarray(group)
    n = _same_length(T=T, loss=loss, group=group)
    labels, codes = np.unique(group, return_inverse=True)
    G = len(labels)
    pts = _Points.of(points, n)
    _check_fit_args(pts.sizes.size, 1 + 2 * G, bootstrap, huber_delta, f"the joint inference law over {G} groups")
    counts = np.bincount(pts.point_strata(codes).astype(int), minlength=G)
    if counts.min() < 2:
        raise ValueError(f"each group needs at least 2 points to fix its E and A; group "
                         f"{labels[np.argmin(counts)].item()!r} has {counts.min()}")
    # One centre for all groups, so every group's intercept converts back the same way.
    u, centre = _centred_log(T)
    X = np.zeros((2, n, 1 + 2 * G))
    X[0, np.arange(n), 1 + 2 * codes] = 1.0
    X[1, np.arange(n), 2 + 2 * codes] = 1.0
    X[1, :, 0] = -u
    sol = _solve(_LogSumExpModel(X, np.log(loss), huber_delta), _joint_starts(T, loss, codes, G, centre),
                 top_k=len(_EXPONENTS), bootstrap=bootstrap, seed=seed, strata=codes, points=pts)

    def natural(theta: np.ndarray) -> np.ndarray:
        out = np.exp(theta)
        out[:, 0] = theta[:, 0]
        out[:, 2::2] *= np.exp(theta[:, [0]] * centre)
        return out

    point = natural(sol.theta[None])[0]
    keys = [lab.item() if hasattr(lab, "item") else lab for lab in labels]
    names = ["gamma"] + [f"{p}[{g}]" for g in keys for p in ("E", "A")]
    samples = None if sol.samples is None else natural(sol.samples)
    method = _describe("L_g = exp(logsumexp(e_g, a_g - gamma log T)), E_g = e^e_g, A_g = e^a_g, gamma shared by "
                       f"{G} groups (pool the groups in fit_inference_law to share E and A too)",
                       f"{len(_EXPONENTS)} starts, one per gamma in {_EXPONENTS}, each group's (e, a) "
                       "the best of its own grid at that gamma (the objective separates given gamma)",
                       len(_EXPONENTS), huber_delta, bootstrap, resample="points within each group", points=pts)
    return JointInferenceLawFit(
        gamma=float(point[0]), E={g: float(point[1 + 2 * i]) for i, g in enumerate(keys)},
        A={g: float(point[2 + 2 * i]) for i, g in enumerate(keys)}, loss=sol.objective, n_points=pts.sizes.size,
        method=method,
        intervals={} if samples is None else _intervals(dict(zip(names, samples.T))), samples=samples)


# --------------------------------------------------------------------------- non-parametric diagnostics


def compute_frontier(flops: ArrayLike, loss: ArrayLike) -> np.ndarray:
    """Indices of the lower envelope: points that beat every point of no greater compute, by increasing compute."""
    flops, loss = _positive("flops", flops), _positive("loss", loss)
    _same_length(flops=flops, loss=loss)
    # Sort by compute, ties by loss, so a tied point is kept only if it is the lowest of its tie.
    order = np.lexsort((loss, flops))
    sorted_loss = loss[order]
    best_before = np.concatenate([[np.inf], np.minimum.accumulate(sorted_loss)[:-1]])
    return order[sorted_loss < best_before]


@dataclass(frozen=True, eq=False)
class IsoflopMinima:
    """Per compute bin, the vertex of a parabola of loss in log N (Chinchilla's approach 2)."""

    C: np.ndarray
    """Geometric-mean compute of each bin kept."""
    N_opt: np.ndarray
    loss_opt: np.ndarray
    """Parabola's value at its vertex."""
    n_points: np.ndarray


def isoflop_minima(N: ArrayLike, C: ArrayLike, loss: ArrayLike, *, bins: int | ArrayLike) -> IsoflopMinima:
    """Fit loss = p(log N), p quadratic, per compute bin; return each bin's optimal N and its C."""
    N, C, loss = _positive("N", N), _positive("C", C), _positive("loss", loss)
    _same_length(N=N, C=C, loss=loss)
    if np.ndim(bins) == 0:
        if int(bins) < 1:
            raise ValueError(f"bins must be >= 1, got {bins}")
        # Log-spaced, widened slightly so the extreme points fall inside.
        edges = np.geomspace(C.min() / (1 + 1e-9), C.max() * (1 + 1e-9), int(bins) + 1)
    else:
        edges = _positive("bins", bins)
        if np.any(np.diff(edges) <= 0):
            raise ValueError(f"bin edges must increase strictly, got {edges}")
    which = np.digitize(C, edges) - 1
    rows = []
    for b in range(len(edges) - 1):
        m = which == b
        # Fewer than 3 distinct sizes do not fix a parabola; a concave one has no minimum.
        if np.unique(N[m]).size < 3:
            continue
        c2, c1, c0 = np.polyfit(np.log(N[m]), loss[m], 2)
        if c2 <= 0:
            continue
        x = -c1 / (2 * c2)
        rows.append((np.exp(np.log(C[m]).mean()), np.exp(x), c0 - c1 * c1 / (4 * c2), m.sum()))
    C_b, N_b, L_b, n_b = (np.array(col) for col in zip(*rows)) if rows else (np.array([]),) * 4
    return IsoflopMinima(C=C_b, N_opt=N_b, loss_opt=L_b, n_points=n_b.astype(int))

"""A ladder's fits that predict (analysis/predict.py), as one figure and one table: per series (an arm, and
for the LTM its T), L(N, D) fitted with E free and with E fixed at the corpus's known optimum for what the arm
sees, the largest size held out and predicted, rollout over sizes, the compute-optimal frontier L*(C) with
its band; each LTM series' crossover with each same-window AR; and per LTM arm, T as an effective size
(N T^g) checked on its largest T.

Only post-decay points are fitted: runs whose `train.schedule` is wsd (a branch after its decay) or cosine
(runs without the param are cosine, the default); `constant` runs are trunks, never points. The loss is
the final validation bound in nats/token (`val/bound`; for an AR its NLL). N is the non-embedding parameter
count, D the run's token budget, and C = flops_per_token * D.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd

from analysis import predict
from analysis.fit import ChinchillaFit, fit_chinchilla
from analysis.inference_cost import start_label
from analysis.runs import FULL_CONTEXT
from ltm.names import FINAL, FLOPS_PER_TOKEN, N_PARAMS_NONEMBEDDING, VAL_BOUND, VAL_PPL_BOUND, metric

POST_DECAY = ("wsd", "cosine")
"""Schedules whose final point is a finished decay: the points a law is fitted to."""
COMPUTE_REACH = 1e3
"""Without a given compute for the crossover, it is searched up to this multiple of the largest run's."""


def arm_of(row: pd.Series) -> str:
    """The arm: the model kind, its window (or full context), and for the LTM its posterior start."""
    window = row.get("model.window")
    if row["model.kind"] == "ar":
        return "AR, full context" if window in (None, FULL_CONTEXT) or pd.isna(window) else f"AR, window {window}"
    return f"LTM, {start_label(row)}"


def ladder_points(runs: pd.DataFrame, optimum: Callable[[pd.Series], float | None]) -> pd.DataFrame:
    """The post-decay runs as points: arm, series, N, D, T, C, loss (nats/token), point (equal for seeds of one
    point) and the arm's known optimum (nats/token; NaN off the synthetic corpus)."""
    schedule = runs.get("train.schedule", pd.Series("cosine", index=runs.index)).fillna("cosine")
    kept = runs[schedule.isin(POST_DECAY)]
    if kept.empty:
        return pd.DataFrame()
    loss = kept.get(metric(FINAL, VAL_BOUND), pd.Series(np.nan, index=kept.index))
    loss = loss.fillna(np.log(kept.get(metric(FINAL, VAL_PPL_BOUND), pd.Series(np.nan, index=kept.index))))
    n = kept.get(metric(FINAL, N_PARAMS_NONEMBEDDING), kept.get(N_PARAMS_NONEMBEDDING))
    out = pd.DataFrame({"arm": kept.apply(arm_of, axis=1), "kind": kept["model.kind"], "N": n,
                        "D": kept["train.tokens"].astype(float), "T": kept["inference.steps"].astype(float),
                        "fpt": kept.get(metric(FINAL, FLOPS_PER_TOKEN)), "loss": loss,
                        "optimum": [optimum(row) for _, row in kept.iterrows()]}, index=kept.index)
    out["series"] = out["arm"] + np.where(out["kind"] == "ltm", ", T=" + out["T"].astype(int).astype(str), "")
    out["C"] = out["fpt"] * out["D"]
    out["point"] = out["N"].astype(str) + " " + out["D"].astype(str) + " " + out["T"].astype(str)
    return out.dropna(subset=["N", "D", "loss", "fpt"])


@dataclass
class SeriesFits:
    """Everything fitted to one series."""

    label: str
    points: pd.DataFrame
    cost: predict.TrainingCost
    free: ChinchillaFit
    fixed: ChinchillaFit | None = None
    held_out: predict.Prediction | None = None
    rollout: list[predict.Prediction] = field(default_factory=list)
    """Fitted on the k smallest sizes, predicting the next, for k = MIN_FIT_SIZES...; the last is `held_out`."""
    notes: list[str] = field(default_factory=list)


def fits_series(label: str, g: pd.DataFrame, bootstrap: int, seed: int) -> SeriesFits | None:
    """L(N, D) free and with E fixed, the held-out largest size and the rollout, for one series; None when it
    has too few sizes or budgets for L(N, D) (`analyse_ladder` then says why)."""
    if g["N"].nunique() < predict.MIN_FIT_SIZES or g["D"].nunique() < 2 or g["point"].nunique() < 5:
        return None
    args = dict(bootstrap=bootstrap, points=g["point"].to_numpy())
    fits = SeriesFits(label, g, predict.TrainingCost.fitted(g["N"], g["fpt"]),
                      fit_chinchilla(g["N"], g["D"], g["loss"], seed=seed, **args))
    known = g["optimum"].dropna().unique()
    if known.size == 1:
        fits.fixed = fit_chinchilla(g["N"], g["D"], g["loss"], E=float(known[0]), seed=seed, **args)
    elif known.size > 1:
        fits.notes.append(f"{label}: its sizes see different optima {sorted(known)}, so E is not fixed")
    try:  # the rollout's last step is the held-out rung by size: fitted on every size but the largest
        fits.rollout = predict.rollout(g["N"], g["D"], g["loss"], C=g["C"], seed=seed, **args)
        fits.held_out = fits.rollout[-1]
    except ValueError as err:  # too few sizes to hold one out: the fits above stand, the check is noted
        fits.notes.append(f"{label}: {err}")
    return fits


def _row(series: str, quantity: str, value: float, low: float = np.nan, high: float = np.nan,
         reference: float = np.nan, note: str = "") -> dict:
    return {"series": series, "quantity": quantity, "value": value, "low": low, "high": high, "reference": reference,
            "note": note}


def _law_rows(f: SeriesFits) -> list[dict]:
    """E (free) against the known optimum, the exponents, and the same with E fixed."""
    known = f.fixed.E if f.fixed is not None else np.nan
    low, high = f.free.intervals.get("E", (np.nan, np.nan))
    verdict = "" if np.isnan(known) or np.isnan(low) else (
        f"known optimum {'inside' if low <= known <= high else 'outside'} the 95% interval")
    rows = [_row(f.label, "E (free)", f.free.E, low, high, known, verdict)]
    rows += [_row(f.label, f"{p} (E free)", getattr(f.free, p), *f.free.intervals.get(p, (np.nan, np.nan)))
             for p in ("alpha", "beta")]
    if f.fixed is not None:
        rows += [_row(f.label, f"{p} (E fixed at the optimum)", getattr(f.fixed, p),
                      *f.fixed.intervals.get(p, (np.nan, np.nan))) for p in ("alpha", "beta")]
        rows.append(_row(f.label, "Huber objective, E free / E fixed", f.free.loss, reference=f.fixed.loss,
                         note="reference: E fixed; a much larger objective says the optimum does not fit"))
    return rows


def prediction_rows(label: str, what: str, p: predict.Prediction, points: pd.DataFrame) -> list[dict]:
    """One row per held-out point: predicted with its 90% interval, the observation, the error."""
    held, steps = points[p.held_out], what.endswith(" T")
    return [_row(label, f"{what}: N={n:.3g}, D={d:.3g}" + (f", T={t:g}" if steps else ""), pred, lo, hi, obs,
                 f"error {pred - obs:+.4f} nats/token, {'inside' if lo <= obs <= hi else 'OUTSIDE'} the 90% "
                 f"interval; {p.compute_ratio:.1f}x beyond the fit's largest {'T' if steps else 'compute'}")
            for n, d, t, pred, lo, hi, obs in zip(held["N"], held["D"], held["T"], p.predicted, p.low, p.high,
                                                   p.observed)]


def crossover_rows(series: list[SeriesFits], C_min: float, C_max: float) -> tuple[list[dict], list]:
    """Each LTM series against each same-window AR series: table rows and (ltm label, ar label, Crossover)."""
    rows, found = [], []
    ltm = [f for f in series if f.points["kind"].iloc[0] == "ltm"]
    ars = [f for f in series if f.label.startswith("AR, window")]
    for a in ltm:
        for b in ars:
            if a.free.samples is None or b.free.samples is None:
                continue
            x = predict.crossover(a.free, a.cost, b.free, b.cost, C_min=C_min, C_max=C_max)
            found.append((a.label, b.label, x))
            rows.append(_row(f"{a.label} vs {b.label}", "crossover compute C (FLOPs)", x.C, x.low, x.high, C_max,
                             f"P(no crossing below {C_max:.3g} FLOPs) = {x.p_no_cross:.2f}; {x.method}"))
    return rows, found


def steps_rows(points: pd.DataFrame, bootstrap: int) -> tuple[list[dict], list[str]]:
    """Per LTM arm with enough values of T: the steps law's g and its held-out T."""
    rows, notes = [], []
    for arm, g in points[points["kind"] == "ltm"].groupby("arm"):
        try:
            p = predict.held_out_steps(g["N"], g["D"], g["T"], g["loss"], bootstrap=bootstrap,
                                       points=g["point"].to_numpy())
        except ValueError as err:
            notes.append(f"{arm}: {err}")
            continue
        rows.append(_row(arm, "g (N_eff = N T^g)", p.fit.g, *p.fit.intervals.get("g", (np.nan, np.nan)),
                         note=p.method))
        rows += prediction_rows(arm, "held-out T", p, g)
    return rows, notes


def _optimum_lines(points: pd.DataFrame) -> dict[str, float]:
    """Each known optimum once, named by the arms it bounds."""
    known = points.dropna(subset=["optimum"]).groupby("optimum")["arm"].unique()
    return {f"known optimum ({' / '.join(sorted(arms))})": float(value) for value, arms in known.items()}


def _draw_series(ax, f: SeriesFits, colour, C: np.ndarray) -> None:
    """One series: its points, its frontier with band, its fitted E with band, its held-out points."""
    pts = f.points.groupby("point")[["C", "loss"]].mean()
    ax.plot(pts["C"], pts["loss"], "o", ms=3.5, color=colour, label=f.label)
    fr = predict.frontier(f.free, f.cost, C)
    ax.plot(C, fr.loss, "-", lw=1.4, color=colour)
    if fr.samples is not None:
        ax.fill_between(C, fr.low, fr.high, color=colour, alpha=0.18, lw=0)
    low, high = f.free.intervals.get("E", (np.nan, np.nan))
    ax.axhline(f.free.E, color=colour, ls="--", lw=0.8,
               label=f"{f.label}: fitted E {f.free.E:.2f} [{low:.2f}, {high:.2f}]")
    if np.isfinite(low):
        ax.axhspan(low, high, color=colour, alpha=0.07, lw=0)
    if f.held_out is not None:
        p, held = f.held_out, f.points[f.held_out.held_out]
        if np.isfinite(p.low).all():
            # beside the star (x 1.25 on the log axis), so that the star does not hide it
            ax.errorbar(held["C"] * 1.25, p.predicted, yerr=[p.predicted - p.low, p.high - p.predicted], fmt="_",
                        ms=9, color=colour, capsize=3, lw=1.2)
        ax.plot(held["C"], p.observed, "*", ms=10, mec="black", mew=0.6, color=colour,
                label="held-out run (star), its prediction and 90% interval (bar)")


def plot_ladder(series: list[SeriesFits], crossings: list, C_max: float, out: Path, save) -> list[Path]:
    """The figure: every series' points and frontier L*(C) with its 95% band up to C_max, fitted E with its
    band, held-out points with their 90% prediction intervals, the known optima, and the crossovers."""
    points = pd.concat([f.points for f in series])
    C = np.geomspace(points["C"].min(), C_max, 200)
    fig, ax = plt.subplots(figsize=(7.5, 4.8))
    for f, colour in zip(series, plt.get_cmap("tab10").colors):
        _draw_series(ax, f, colour, C)
    for (name, value), ls in zip(_optimum_lines(points).items(), (":", "-.", (0, (1, 3)), (0, (5, 2)))):
        ax.axhline(value, color="0.15", ls=ls, lw=1.3, label=f"{name}: {value:.2f}")
    for a, b, x in crossings:
        if np.isfinite(x.C):
            ax.axvline(x.C, color="0.4", ls=":", lw=1, label=f"crossover {a} / {b}: {x.C:.2g} FLOPs "
                                                             f"[{x.low:.2g}, {x.high:.2g}]")
            if np.isfinite(x.low):
                ax.axvspan(x.low, x.high, color="0.5", alpha=0.08, lw=0)
    ax.set(xscale="log", xlabel="training compute C = flops_per_token x D (FLOPs)",
           ylabel="validation bound (nats/token)",
           title="Ladder: compute-optimal frontiers L*(C) (95% bands), post-decay points")
    return save(fig, out, "ladder", [f"no crossover below {C_max:.3g} FLOPs: {a} / {b}, P(no crossing) = "
                                     f"{x.p_no_cross:.2f}" for a, b, x in crossings if not np.isfinite(x.C)])


def analyse_ladder(runs: pd.DataFrame, optimum: Callable[[pd.Series], float | None], out: Path, *, save,
                   markdown: Callable[[pd.DataFrame], str], bootstrap: int,
                   compute: float | None = None) -> tuple[list[Path], list[Path], list[str]]:
    """The ladder figure and ladder.csv|md of `runs` written to `out`: (figures, tables, what was not fitted and
    why). `compute`: the largest compute the crossover is searched to (default COMPUTE_REACH x the largest run's)."""
    points = ladder_points(runs, optimum)
    if points.empty:
        return [], [], []
    series, reasons = [], []
    for seed, (label, g) in enumerate(points.groupby("series")):
        fits = fits_series(label, g, bootstrap, seed)
        if fits is None:
            reasons.append(f"{label}: L(N, D) on the ladder needs {predict.MIN_FIT_SIZES} or more sizes, 2 or more "
                           f"budgets and 5 points; it has {g['N'].nunique()}, {g['D'].nunique()} and "
                           f"{g['point'].nunique()}")
            continue
        series.append(fits)
        reasons += fits.notes
    if not series:
        return [], [], reasons
    C_max = compute or COMPUTE_REACH * points["C"].max()
    rows = [r for f in series for r in _law_rows(f)]
    rows += [r for f in series if f.held_out is not None for r in prediction_rows(f.label, "held-out size", f.held_out,
                                                                                  f.points)]
    rows += [r for f in series for k, p in enumerate(f.rollout[:-1], predict.MIN_FIT_SIZES)  # the last: held out
             for r in prediction_rows(f.label, f"rollout, fitted on {k} sizes", p, f.points)]
    crossing_rows, crossings = crossover_rows(series, points["C"].min(), C_max)
    steps, notes = steps_rows(points, bootstrap)
    table = pd.DataFrame(rows + crossing_rows + steps)
    tables = [out / "ladder.csv", out / "ladder.md"]
    table.to_csv(tables[0], index=False)
    methods = "".join(f"\n* {f.label}: {f.free.method}\n" for f in series)
    tables[1].write_text(markdown(table.drop(columns="note")) + "\n" + markdown(table[["series", "quantity", "note"]])
                         + methods + "".join(f"\nNot fitted: {r}\n" for r in reasons + notes))
    return plot_ladder(series, crossings, C_max, out, save), tables, reasons + notes

"""Regenerate the scaling figures and fitted laws from the tracked runs.

    python analysis/plot_scaling.py [--runs-dir DIR] [--tracking-uri URI]
                                    [--study NAME | --parent-run ID | --experiment NAME]
                                    [--out DIR] [--flops-convention exact|paper] [--bootstrap N]

The runs: by default those of the most recent study invocation in the store (a study's parent run
and its children; printed); --study NAME the most recent invocation of that study, --parent-run ID
one invocation, --experiment NAME every run of an experiment (`ltm`: python -m ltm.train's).

Figures (PNG and PDF): inference_scaling (bound vs T, fitted L(T), the corpus optimum),
bound_decomposition (each bound split into NLL given z, KL above the inner loop's floor, the floor),
sample_efficiency (bound vs training tokens), compute_efficiency (bound vs training FLOPs, with
the frontier), model_size (final loss vs parameters and the fitted L(N, D), with several sizes),
ladder (post-decay points' compute-optimal frontiers with bands, the held-out size with its 90%
prediction interval, fitted asymptotes against the corpus's known optima, crossovers; with
ladder.csv|md: analysis/ladder.py).
Where a point has several runs that differ only in seed, it is plotted as their mean with a min-max
bar, the laws' bootstrap resamples its runs with it (analysis/fit.py), and seeds.csv|md gives each
such config's mean, min and max over seeds.
Tables (CSV and markdown): every run's final numbers, every fit with 95% bootstrap intervals, and
one table per evaluation task (eval_gsm8k, eval_zero_shot, eval_generation) of the studies in
studies/icl_gsm8k.py, zero_shot.py and generation.py.
All written to --out (default <runs-dir>/figures/<study>, or /<experiment>) and logged to an MLflow
run named "analysis" in the runs' experiment.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import re
import sys
import textwrap
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402

exit_on_signal(__name__)  # first: a signal while matplotlib, pandas and torch load exits 3 with a message
import matplotlib  # noqa: E402

matplotlib.use("Agg")
import matplotlib.ticker  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import seaborn as sns  # noqa: E402

from analysis import fit  # noqa: E402
from analysis.figures import add_notes, legend_beside, merge_references, readable_ticks  # noqa: E402
from analysis.inference_cost import cost_table, plot_inference_cost, start_label  # noqa: E402
from analysis.ladder import analyse_ladder  # noqa: E402
from analysis.runs import (FULL_CONTEXT, NoRunsError, find_study, load_evaluations, load_histories,  # noqa: E402
                           load_runs, missing_store, parent_run)
from analysis.staging import move_into_place, staging_folder  # noqa: E402
from ltm.cli import add_verbosity, configure_logging, log_level  # noqa: E402
from ltm.names import (ANALYSIS_TAG, FINAL, FLOPS, FLOPS_PAPER, N_RUNS_TAG, VAL_PPL_BOUND, VAL_PPL_IW,  # noqa: E402
                       VAL_PPL_REUSE, Z_INFO_CAP, Z_INFO_LB, Z_INFO_LB_CI, Exit, Status, exit_help, metric)
from ltm.paths import folder_name  # noqa: E402
from ltm.signals import Interrupt, Stopped  # noqa: E402

log = logging.getLogger("analysis.plot_scaling")  # by name: run as a command, __name__ is "__main__"

METRIC = VAL_PPL_BOUND
FINAL_BOUND, FINAL_FLOPS = metric(FINAL, METRIC), metric(FINAL, FLOPS)  # their columns in the runs table

# What each law needs before it is fitted (three or more parameters need data with room to spare).
MIN_T_VALUES = 4
"""L(T) = E + A T^-gamma: values of T on one (size, N_z) line."""
MIN_CURVE_POINTS = 5
"""E + A x^-alpha along a run's validation curve: evaluations on the curve."""
MIN_SIZES, MIN_BUDGETS, MIN_SIZE_POINTS = 3, 2, 6
"""L(N, D): model sizes, token budgets and (size, budget) points in one series."""


def _size_label(row) -> str:
    """The architecture's size (LTM and its AR twin share it; their parameter counts differ)."""
    return f"{row['model.n_layers']} layers, d={row['model.d_model']}"


def _label(row) -> str:
    if row["model.kind"] == "ar":
        return _ar_label(row)
    start = start_label(row)
    return f"LTM T={row['inference.steps']}" + ("" if start.startswith("paper") else f", {start}")


def _style() -> None:
    sns.set_theme(style="whitegrid", context="paper", font_scale=1.1)
    plt.rcParams.update({"figure.dpi": 150, "savefig.bbox": "tight", "legend.frameon": False})


def _save(fig, out: Path, name: str, notes: list[str] | tuple = ()) -> list[Path]:
    """The figure as PNG and PDF, made readable first: its legends merged into one beside the panels,
    labelled ticks on every axis, and `notes` (what the runs cannot show) written under it."""
    legend_beside(fig)
    readable_ticks(fig)
    add_notes(fig, list(notes))
    paths = [out / f"{name}.png", out / f"{name}.pdf"]
    for p in paths:
        fig.savefig(p)
    plt.close(fig)
    return paths


def _over_seeds(g: pd.DataFrame, by: str | list[str], column: str = FINAL_BOUND) -> pd.DataFrame:
    """Per plotted point (`by`): the mean of `column` over its runs (seeds), their min and max, and how many."""
    return g.groupby(by)[column].agg(mean="mean", low="min", high="max", runs="size").reset_index()


def _plot_points(ax, points: pd.DataFrame, x: str, fmt: str, **kwargs) -> None:
    """Markers at the points' means; where a point has several runs (seeds), a bar from their min to max."""
    if points["runs"].max() > 1:
        ax.errorbar(points[x], points["mean"], yerr=[points["mean"] - points["low"], points["high"] - points["mean"]],
                    fmt=fmt, capsize=2, elinewidth=0.8, **kwargs)
    else:
        ax.plot(points[x], points["mean"], fmt, **kwargs)


def _fit_rows(law: str, group: str, result, params: list[str]) -> list[dict]:
    return [{"law": law, "group": group, "parameter": p, "value": getattr(result, p) if not isinstance(
        getattr(result, p), dict) else np.nan, "ci_low": result.intervals.get(p, (np.nan, np.nan))[0],
        "ci_high": result.intervals.get(p, (np.nan, np.nan))[1], "n_points": result.n_points,
        "method": result.method} for p in params]


def optimal_reference(runs: pd.DataFrame, tracking_uri: str) -> dict[str, float]:
    """Bayes-optimal perplexities of the synthetic corpus on the validation blocks the runs evaluated:
    with the whole block as context, and for a predictor limited to each receptive field
    n_layers * (window - 1) + 1 among the runs (what a decoder without latents can at best reach)."""
    synthetic = runs[runs["data.name"] == "synthetic"]
    if synthetic.empty:
        return {}
    from ltm.config import RunConfig
    from ltm.data import load_blocks, optimal_ppl

    cfg = RunConfig.from_dict(_config_of(tracking_uri, synthetic.iloc[0]["run_id"]))
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    n = min(cfg.train.eval_blocks, len(blocks))
    refs = {"optimum, full context": optimal_ppl(blocks, n_blocks=n)}
    fields = {_receptive_field(cfg.model, row) for _, row in synthetic.iterrows()} - {cfg.model.ctx}
    for field in sorted(fields):
        refs[f"optimum, {field}-token receptive field"] = optimal_ppl(blocks, window=field, n_blocks=n)
    return refs


def known_optimum(runs: pd.DataFrame, tracking_uri: str):
    """A function of a run (a row of `runs`) to the Bayes-optimal loss, in nats/token, of what its arm can see on
    the synthetic corpus's validation blocks: an AR its receptive field (the whole block once that covers the
    context), an LTM the whole block (its latents may carry what the window does not); None off that corpus."""
    import functools
    import math

    synthetic = runs[runs["data.name"] == "synthetic"] if "data.name" in runs else runs.iloc[:0]
    if synthetic.empty:
        return lambda row: None
    from ltm.config import RunConfig
    from ltm.data import load_blocks, optimal_ppl

    cfg = RunConfig.from_dict(_config_of(tracking_uri, synthetic.iloc[0]["run_id"]))
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    n = min(cfg.train.eval_blocks, len(blocks))

    @functools.cache
    def nats(window: int | None) -> float:
        return math.log(optimal_ppl(blocks, window=window, n_blocks=n))

    def optimum(row) -> float | None:
        if row.get("data.name") != "synthetic":
            return None
        field = _receptive_field(cfg.model, row)
        return nats(None) if row["model.kind"] == "ltm" or field >= cfg.model.ctx else nats(field)

    return optimum


def _receptive_field(model, row) -> int:
    """The run's receptive field: the model config with the run's layers and window."""
    window = row.get("model.window", model.window)
    window = None if window in (None, FULL_CONTEXT) or pd.isna(window) else int(window)
    return dataclasses.replace(model, kind="ar", n_layers=int(row["model.n_layers"]), window=window).receptive_field


def _config_of(tracking_uri: str, run_id: str) -> dict:
    """The run's config.json artifact."""
    import json
    import tempfile

    from mlflow.tracking import MlflowClient

    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(MlflowClient(tracking_uri).download_artifacts(run_id, "config.json", tmp)).read_text())


def _markdown(df: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the optional tabulate package)."""
    def cell(v):
        return f"{v:.4g}" if isinstance(v, float) else str(v)
    lines = ["| " + " | ".join(df.columns) + " |", "|" + "---|" * len(df.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def plot_inference_scaling(runs: pd.DataFrame, refs: dict, out: Path, bootstrap: int) -> tuple[list, list]:
    """Final bound vs inference steps, a line per (size, N_z): colour by N_z, marker by size; fitted
    L(T) = E + A T^-gamma where a line has 4 or more T values. Runs with the released code's decoder
    gradient are crosses beside the lines, not part of them; runs from another posterior start than the
    paper's are left to the inference_cost figure."""
    ltm_runs, released = _scaling_lines(runs)
    rows: list[dict] = []
    if ltm_runs.empty and released.empty:
        return [], rows
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    palette = dict(zip(sorted(ltm_runs["N_z"].unique(), key=int),
                       sns.color_palette("viridis", ltm_runs["N_z"].nunique())))
    markers = dict(zip(sorted(ltm_runs["size"].unique()), "osD^v<>"))
    for (size, nz), g in ltm_runs.groupby(["size", "N_z"]):
        g = g.sort_values("inference.steps", kind="stable")
        points = _over_seeds(g, "inference.steps")
        _plot_points(ax, points, "inference.steps", markers.get(size, "o"), color=palette[nz],
                     label=f"{size}, N_z={nz}" if ltm_runs["size"].nunique() > 1 else f"N_z={nz}")
        if len(points) >= MIN_T_VALUES:  # fitted to every run; a bootstrap draw resamples the Ts, then each one's seeds
            law = fit.fit_inference_law(g["inference.steps"], np.log(g[FINAL_BOUND]), bootstrap=bootstrap,
                                        points=g["inference.steps"])
            t = np.geomspace(g["inference.steps"].min(), g["inference.steps"].max(), 100)
            ax.plot(t, np.exp(law.predict(t)), "-", color=palette[nz], lw=1.2)
            rows += _fit_rows("log ppl = E + A T^-gamma", f"{size} N_z={nz}", law, ["E", "A", "gamma"])
        else:
            ax.plot(points["inference.steps"], points["mean"], "--", color=palette[nz], lw=0.8)
    rows += _joint_fit(ltm_runs, bootstrap)
    for nz, g in released.groupby(released["model.n_latents"].astype(str)):
        g = g.groupby("inference.steps")[FINAL_BOUND].mean()
        ax.plot(g.index, g.to_numpy(), "X", ms=8, mec="black", color=palette.get(nz, "tab:red"),
                label=f"N_z={nz}, decoder_grad=trajectory")
    for (name, value), ls in zip(refs.items(), (":", "-.", "--", (0, (1, 3)))):
        ax.axhline(value, color="0.3", ls=ls, lw=1, label=f"{name}: {value:.2f}")
    ar = runs[runs["model.kind"] == "ar"]
    for (label, a), colour in zip(ar.assign(label=ar.apply(_ar_label, axis=1)).groupby("label") if not ar.empty else [],
                                  ("black", "#8c564b", "#2ca02c")):
        ax.axhline(a[FINAL_BOUND].min(), color=colour, lw=1, label=f"best {label}")
    seeds = ltm_runs.groupby(["size", "N_z", "inference.steps"]).size().max() > 1
    ax.set(xscale="log", yscale="log", xlabel="inference steps T", ylabel="validation perplexity bound (ELBO)",
           title="Inference-time scaling" + ("\n(mean over seeds, bars: min to max)" if seeds else ""))
    steps = sorted(ltm_runs["inference.steps"].unique())
    ax.set_xticks(steps, [str(t) for t in steps])  # T is an integer axis: label the steps that were run
    ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    return _save(fig, out, "inference_scaling", figure_notes(runs, "inference_scaling")), rows


def _scaling_lines(runs: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """The inference_scaling figure's runs: LTM runs of the paper's posterior start with T > 0, as (the
    lines' runs, with `size` and `N_z` columns; the released code's decoder-gradient runs, drawn apart)."""
    ltm_runs = runs[(runs["model.kind"] == "ltm") & (runs["inference.steps"] > 0)].copy()
    if not ltm_runs.empty:
        ltm_runs = ltm_runs[ltm_runs.apply(start_label, axis=1).str.startswith("paper")]
    trajectory = ltm_runs.get("inference.decoder_grad", pd.Series("final", index=ltm_runs.index)) == "trajectory"
    ltm_runs, released = ltm_runs[~trajectory].copy(), ltm_runs[trajectory]
    ltm_runs["size"] = ltm_runs.apply(_size_label, axis=1) if not ltm_runs.empty else pd.Series(dtype=str)
    ltm_runs["N_z"] = ltm_runs["model.n_latents"].astype(str)
    return ltm_runs, released


def _joint_fit(ltm_runs: pd.DataFrame, bootstrap: int) -> list[dict]:
    """L_g(T) with one gamma shared by the (size, N_z) lines, where every line has 2 or more T values."""
    if not _joint_fits(ltm_runs):
        return []
    runs = ltm_runs.sort_values(["size", "N_z", "inference.steps"], kind="stable")
    group = runs["size"] + " N_z=" + runs["N_z"]
    joint = fit.fit_inference_law_joint(runs["inference.steps"], np.log(runs[FINAL_BOUND]), group,
                                        bootstrap=bootstrap, points=group + " T=" + runs["inference.steps"].astype(str))
    return _fit_rows("log ppl = E_g + A_g T^-gamma (shared gamma)", "all groups", joint, ["gamma"])


def _t_values(lines: pd.DataFrame) -> pd.Series:
    """How many values of T each (size, N_z) line of `_scaling_lines` has."""
    return lines.groupby(["size", "N_z"])["inference.steps"].nunique() if not lines.empty else pd.Series(dtype=int)


def _joint_fits(lines: pd.DataFrame) -> bool:
    """Whether L_g(T) with a shared gamma is fitted: 2 or more lines, each with 2 or more T values, and
    2 points more than the 2 parameters per line."""
    t_values = _t_values(lines)
    return len(t_values) >= 2 and bool((t_values >= 2).all()) and t_values.sum() >= 2 * len(t_values) + 2


def _variant(row) -> str:
    """What sets an LTM run apart beyond size and T: its N_z, its posterior start when not the paper's,
    and the released code's decoder gradient."""
    parts = [f"N_z={row['model.n_latents']}"]
    if not start_label(row).startswith("paper"):
        parts.append(start_label(row))
    if row.get("inference.decoder_grad") == "trajectory":
        parts.append("decoder_grad=trajectory")
    return ", ".join(parts)


def _ar_label(row) -> str:
    window = row.get("model.window")
    if not isinstance(window, str):
        return "AR"
    return "AR, full context" if window == FULL_CONTEXT else f"AR, window {window}"


def plot_bound_decomposition(runs: pd.DataFrame, refs: dict, out: Path) -> list:
    """The final bound of each LTM run against T, split (stacked, nats/token) into NLL given z, KL
    above the floor and the KL floor; a panel per (size, N_z, variant), at the largest training
    budget of the panel, seeds averaged; AR NLL and the Bayes-optimal NLL as lines."""
    ltm_runs = runs[(runs["model.kind"] == "ltm") & runs["kl_floor"].notna()].copy()
    if ltm_runs.empty:
        return []
    ltm_runs["size"] = ltm_runs.apply(_size_label, axis=1)
    ltm_runs["variant"] = ltm_runs.apply(_variant, axis=1)
    panels = sorted(ltm_runs.groupby(["size", "variant"]).groups)
    ncols = min(3, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.6 * ncols, 3.8 * nrows), sharey=True, squeeze=False)
    colours = {"NLL given z": "#4c72b0", "KL above the floor": "#dd8452", "KL floor": "#c7c7c7"}
    ar = runs[runs["model.kind"] == "ar"].copy()
    if not ar.empty:
        ar["size"] = ar.apply(_size_label, axis=1)
        ar["label"] = ar.apply(_ar_label, axis=1)
    for ax, (size, variant) in zip(axes.flat, panels):
        g = ltm_runs[(ltm_runs["size"] == size) & (ltm_runs["variant"] == variant)]
        g = g[g["train.tokens"] == g["train.tokens"].max()]
        parts = g.groupby("inference.steps")[["nll", "kl_above_floor", "kl_floor"]].mean().sort_index()
        t = parts.index.to_numpy(dtype=float)
        half = min(1.25, np.sqrt(np.min(t[1:] / t[:-1])) ** 0.8) if len(t) > 1 else 1.25
        left, right = t / half, t * half  # bars of equal width on the log axis, never overlapping
        bottom = np.zeros(len(t))
        for column, name in zip(parts.columns, colours):
            height = parts[column].clip(lower=0).to_numpy()  # a KL a hair under its floor draws as 0
            ax.bar(left, height, width=right - left, bottom=bottom, align="edge",
                   color=colours[name], edgecolor="white", lw=0.5, label=name)
            bottom += height
        for (name, value), ls in zip(refs.items(), (":", "-.", "--", (0, (1, 3)))):
            ax.axhline(np.log(value), color="0.2", ls=ls, lw=1, label=f"{name}: {np.log(value):.2f}")
        same = ar[(ar["size"] == size) & (ar["train.tokens"] == g["train.tokens"].max())] if not ar.empty else None
        for (label, a), colour in zip([] if same is None else same.groupby("label"),  # None: LTM runs only
                                      ("black", "#8c564b", "#2ca02c")):
            ax.axhline(a["nll"].mean(), color=colour, lw=1.3, label=f"{label} NLL: {a['nll'].mean():.2f}")
        ax.set(xscale="log", title=f"{size}, {variant}\n({g['train.tokens'].max():,} tokens)",
               xlabel="inference steps T")
        ax.set_xticks(t, [str(int(x)) for x in t])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)
    for ax in axes[:, 0]:
        ax.set_ylabel("validation bound (nats/token)")
    fig.tight_layout()
    fig.suptitle("What the LTM bound is made of", y=1.02)
    return _save(fig, out, "bound_decomposition", figure_notes(runs, "bound_decomposition"))


def _curves(hist: pd.DataFrame, runs: pd.DataFrame, x: str) -> pd.DataFrame:
    cols = ["run_id", "model.kind", "inference.steps", "model.n_layers", "model.d_model", "model.n_latents",
            "model.window", "inference.start", "inference.init_logvar", "inference.encoder_layers", "inference.lr_max",
            "inference.start_kl_warmup"]
    h = hist.dropna(subset=[METRIC, x]).merge(runs[[c for c in cols if c in runs]], on="run_id")
    h["label"] = h.apply(_label, axis=1)
    h["size"] = h.apply(_size_label, axis=1)
    return h


def _steps_of(label: str) -> int:
    found = re.search(r"T=(\d+)", label)
    return int(found.group(1)) if found else 0


def plot_efficiency(hist: pd.DataFrame, runs: pd.DataFrame, out: Path, x: str, name: str, xlabel: str,
                    frontier: bool, refs: dict[str, float] | None = None) -> list:
    """Validation bound against training tokens or FLOPs: a curve per run, coloured by T (AR in dark
    colours, one per window), with a line style per latent count N_z when the LTM runs differ in it,
    and the corpus optima `refs` as horizontal lines."""
    h = _curves(hist, runs, x)
    if h.empty:
        return []
    labels = sorted(h["label"].unique(), key=lambda s: (not s.startswith("AR"), _steps_of(s), s))
    colours = dict(zip([lab for lab in labels if not lab.startswith("AR")], sns.color_palette("flare", len(labels))))
    colours.update(zip([lab for lab in labels if lab.startswith("AR")], ["black", "#8c564b", "#2ca02c", "0.4"]))
    latents = sorted(h.loc[h["model.kind"] == "ltm", "model.n_latents"].unique()) if "model.n_latents" in h else []
    styles = dict(zip(latents, ["-", "--", ":", "-."] * 4))
    sizes = sorted(h["size"].unique())
    fig, axes = plt.subplots(1, len(sizes), figsize=(5.2 * len(sizes), 4.0), sharey=True, squeeze=False)
    for ax, size in zip(axes[0], sizes):
        hs = h[h["size"] == size]
        for (label, run_id), g in hs.groupby(["label", "run_id"]):
            g = g.sort_values(x)
            nz = g["model.n_latents"].iloc[0] if latents else None
            is_ar = label.startswith("AR")
            style = "-" if is_ar else styles.get(nz, "-")
            legend = f"{label}, N_z={nz}" if not is_ar and len(latents) > 1 else label
            ax.plot(g[x], g[METRIC], style, marker="o", ms=2.5, lw=1.2, color=colours[label], label=legend)
        if frontier:
            idx = fit.compute_frontier(hs[x].to_numpy(), hs[METRIC].to_numpy())
            ax.plot(hs[x].to_numpy()[idx], hs[METRIC].to_numpy()[idx], color="0.5", lw=3, alpha=0.4,
                    label="compute frontier", zorder=0)
        for (ref, value), ls in zip((refs or {}).items(), (":", "--", "-.", (0, (1, 3)))):
            ax.axhline(value, color="0.3", ls=ls, lw=1, label=f"{ref}: {value:.2f}")
        ax.set(xscale="log", yscale="log", xlabel=xlabel, title=size)
    axes[0][0].set_ylabel("validation perplexity bound")
    fig.suptitle("Sample efficiency" if x == "tokens" else "Compute efficiency")
    return _save(fig, out, name, figure_notes(runs, name))


def curve_power_laws(hist: pd.DataFrame, runs: pd.DataFrame, flops_key: str, bootstrap: int = 0) -> list[dict]:
    """log ppl = E + A x^-alpha along each run's validation curve, x = tokens and x = FLOPs, with
    bootstrap intervals over the curve's points (wide for a short curve: that is the honest answer)."""
    rows: list[dict] = []
    for x in ("tokens", flops_key):
        for run_id, g in _curves(hist, runs, x).groupby("run_id"):
            if g[x].nunique() < MIN_CURVE_POINTS:
                continue
            law = fit.fit_power_law(g[x], np.log(g[METRIC]), bootstrap=bootstrap)
            rows += _fit_rows(f"log ppl = E + A {x}^-alpha",
                              f"{g['label'].iloc[0]}, {g['size'].iloc[0]}, run {run_id[:8]}", law, ["E", "A", "alpha"])
    return rows


def plot_model_size(runs: pd.DataFrame, out: Path, bootstrap: int) -> tuple[list, list]:
    """Final loss against parameters per token budget, and L(N, D) fitted where the grid allows."""
    rows: list[dict] = []
    paths: list = []
    seeds = False
    for label, g in runs.assign(label=runs.apply(_label, axis=1)).groupby("label"):
        if g["n_params"].nunique() < 2:
            continue
        if not paths:
            fig, ax = plt.subplots(figsize=(6.4, 4.2))
        loss = np.log(g[FINAL_BOUND])
        points = _over_seeds(g, ["n_params", "train.tokens"])
        _plot_points(ax, points, "n_params", "o", label=label)
        seeds |= bool(points["runs"].max() > 1)
        if _size_law_fits(g):
            law = fit.fit_chinchilla(g["n_params"], g["train.tokens"], loss, bootstrap=bootstrap,
                                     points=g["n_params"].astype(str) + " " + g["train.tokens"].astype(str))
            rows += _fit_rows("log ppl = E + A N^-alpha + B D^-beta", label, law, ["E", "A", "B", "alpha", "beta"])
            n = np.geomspace(g["n_params"].min(), g["n_params"].max(), 50)
            for d in sorted(g["train.tokens"].unique()):
                ax.plot(n, np.exp(law.predict(n, np.full_like(n, d))), lw=0.8, alpha=0.7)
            # Chinchilla's approach 2, as a diagnostic: the loss-optimal N within each band of compute.
            iso = fit.isoflop_minima(g["n_params"], g[FINAL_FLOPS], loss, bins=max(2, g["train.tokens"].nunique()))
            rows += [{"law": "IsoFLOP minimum (approach 2)", "group": f"{label}, C={c:.3g}", "parameter": "N_opt",
                      "value": n_opt, "ci_low": np.nan, "ci_high": np.nan, "n_points": int(k),
                      "method": "parabola of log ppl in log N per compute bin"}
                     for c, n_opt, k in zip(iso.C, iso.N_opt, iso.n_points)]
        paths = [True]
    if not paths:
        return [], rows
    ax.set(xscale="log", yscale="log", xlabel="parameters N", ylabel="final validation perplexity bound",
           title="Model-size scaling" + ("\n(mean over seeds, bars: min to max)" if seeds else ""))
    return _save(fig, out, "model_size", figure_notes(runs, "model_size")), rows


def _size_law_fits(series: pd.DataFrame) -> bool:
    """Whether L(N, D) is fitted to one series (label) of runs: enough sizes, budgets and points."""
    return (series["n_params"].nunique() >= MIN_SIZES and series["train.tokens"].nunique() >= MIN_BUDGETS
            and len(series.groupby(["n_params", "train.tokens"])) >= MIN_SIZE_POINTS)


NO_AR = ("no AR baseline among these runs, so nothing here compares the LTM with an AR (the studies' micro "
         "presets train AR baselines)")


def figure_notes(runs: pd.DataFrame, figure: str) -> list[str]:
    """What the figure `figure` of `runs` cannot show, to be said on it: a missing AR baseline (or LTM),
    and a law it does not draw for want of points."""
    kinds = set(runs["model.kind"])
    notes = [] if "ar" in kinds else [NO_AR]
    if "ltm" not in kinds:
        notes.append("no LTM run among these runs: only the AR baselines are drawn")
    if figure == "inference_scaling":
        t_values = _t_values(_scaling_lines(runs)[0])
        if len(t_values) and t_values.min() < MIN_T_VALUES:
            notes.append(f"L(T) = E + A T^-gamma is fitted to a (size, N_z) line with {MIN_T_VALUES} or more values "
                         f"of T; {'these lines have' if t_values.max() < MIN_T_VALUES else 'some lines have'} only "
                         f"{t_values.min()}, so their dashed lines join the points and are not fits")
    if figure == "model_size" and not any(_size_law_fits(g) for _, g in runs.groupby(runs.apply(_label, axis=1))):
        notes.append(_size_law_reason(runs))
    return notes


def _size_law_reason(runs: pd.DataFrame) -> str:
    series = runs.groupby(runs.apply(_label, axis=1))
    return (f"L(N, D) is fitted to a series (one model kind, T and start) with {MIN_SIZES} or more parameter counts "
            f"and {MIN_BUDGETS} or more token budgets ({MIN_SIZE_POINTS} or more points); the most in one series here "
            f"are {series['n_params'].nunique().max()} and {series['train.tokens'].nunique().max()}")


def fit_reasons(runs: pd.DataFrame, hist: pd.DataFrame, flops_key: str) -> list[str]:
    """Why each law that fits.md could hold was not fitted to `runs` (empty when every law was)."""
    lines = _scaling_lines(runs)[0]
    t_values = _t_values(lines)
    reasons = []
    if t_values.empty or t_values.max() < MIN_T_VALUES:
        reasons.append(f"log ppl = E + A T^-gamma: needs a (size, N_z) line of paper-start LTM runs with "
                       f"{MIN_T_VALUES} or more values of T; the most here is {t_values.max() if len(t_values) else 0}")
    if not _joint_fits(lines):
        reasons.append(f"log ppl = E_g + A_g T^-gamma (shared gamma): needs 2 or more (size, N_z) lines, each with 2 "
                       f"or more values of T, and 2 points more than twice the lines; here {len(t_values)} line(s), "
                       f"{t_values.sum() if len(t_values) else 0} point(s)")
    if not any(_size_law_fits(g) for _, g in runs.groupby(runs.apply(_label, axis=1))):
        reasons.append("log ppl = E + A N^-alpha + B D^-beta: " + _size_law_reason(runs))
    curves = {x: _curves(hist, runs, x) for x in ("tokens", flops_key)}
    longest = max((int(h.groupby("run_id")[x].nunique().max()) for x, h in curves.items() if not h.empty), default=0)
    if longest < MIN_CURVE_POINTS:
        reasons.append(f"log ppl = E + A x^-alpha along a run's validation curve: needs {MIN_CURVE_POINTS} or more "
                       f"evaluations on a curve; the longest here has {longest} (train.eval_every sets how often a "
                       "run evaluates)")
    return reasons


def seed_table(runs: pd.DataFrame) -> pd.DataFrame:
    """One row per config trained with several seeds (runs of one `config_key`): the seeds, and the final
    bound, NLL and KL as the mean over seeds with the min and max; empty when every config has one run."""
    if "config_key" not in runs:
        return pd.DataFrame()
    ident = ["config_key", "model.kind", "n_params", "model.window", "model.n_latents", "inference.steps",
             "inference.decoder_grad", "train.tokens"]
    rows = []
    for key, g in runs.groupby("config_key", sort=False):
        if len(g) < 2:
            continue
        row = {c: g[c].iloc[0] for c in ident if c in g}
        row.update(n_seeds=len(g), seeds=" ".join(str(s) for s in sorted(g["seed"])) if "seed" in g else "")
        for column in (FINAL_BOUND, "nll", "kl"):
            row.update({f"{column} mean": g[column].mean(), f"{column} min": g[column].min(),
                        f"{column} max": g[column].max()})
        rows.append(row)
    return pd.DataFrame(rows)


def write_tables(runs: pd.DataFrame, fits: list[dict], out: Path, reasons: list[str]) -> list[Path]:
    """runs.csv|md, fits.csv|md (fits.md saying why each law it lacks was not fitted: `reasons`) and, for
    configs trained with several seeds, seeds.csv|md."""
    cols = ["run_id", "run_key", "model.kind", "n_params", "model.window", "model.n_latents", "inference.steps",
            "inference.decoder_grad", "train.tokens", "seed", FINAL_BOUND, metric(FINAL, VAL_PPL_IW),
            metric(FINAL, VAL_PPL_REUSE), "nll", "kl", "kl_floor", "kl_above_floor", "nll_other_z", "z_reliance",
            Z_INFO_LB, Z_INFO_LB_CI, Z_INFO_CAP, "nll_prior", "amortisation_gap", "inference.start",
            "inference.init_logvar", "reuse_gap", FINAL_FLOPS]
    table = runs[[c for c in cols if c in runs]].sort_values(["model.kind", "n_params", "inference.steps"])
    paths = [out / "runs.csv", out / "runs.md", out / "fits.csv", out / "fits.md"]
    table.to_csv(paths[0], index=False)
    paths[1].write_text(_markdown(table))
    fits_df = pd.DataFrame(fits, columns=["law", "group", "parameter", "value", "ci_low", "ci_high", "n_points",
                                          "method"])
    fits_df.to_csv(paths[2], index=False)
    paths[3].write_text(_fits_markdown(fits_df, reasons, len(runs)))
    seeds = seed_table(runs)
    if not seeds.empty:  # configs trained with several seeds: their spread (min to max over seeds)
        paths += [out / "seeds.csv", out / "seeds.md"]
        seeds.to_csv(paths[-2], index=False)
        paths[-1].write_text(_markdown(seeds))
    return paths


def _fits_markdown(fits: pd.DataFrame, reasons: list[str], n_runs: int) -> str:
    """The fitted laws' table and methods, then why the others were not fitted; without a fit, only why."""
    text = "" if fits.empty else (_markdown(fits.drop(columns="method"))
                                  + "".join(f"\n{m}\n" for m in fits["method"].unique()))
    if reasons:
        head = "Not fitted" if not fits.empty else f"No law was fitted to these {n_runs} runs"
        text += ("\n" if text else "") + f"{head}:\n\n" + "".join(f"* {r}\n" for r in reasons)
    return text


def write_evaluation_tables(evals: pd.DataFrame, out: Path) -> list[Path]:
    """One table per evaluation task (eval_<task>.csv / .md): the evaluated model and its metrics."""
    paths = []
    ident = ["run_id", "source_run_id", "model.kind", "model.n_layers", "model.n_latents", "inference.steps",
             "train.tokens", "data.name", "seed"]
    for task, group in evals.groupby("task"):
        metrics = sorted(c for c in group.columns if "/" in c and group[c].notna().any())
        table = group[[c for c in ident if c in group] + metrics].sort_values(
            [c for c in ("model.kind", "model.n_layers", "inference.steps") if c in group])
        table = table.assign(run_id=table["run_id"].str[:8], source_run_id=table["source_run_id"].str[:8])
        csv, md = (out / f"eval_{folder_name(task, 'task')}.{ext}" for ext in ("csv", "md"))
        table.to_csv(csv, index=False)
        # markdown: one row per model, metrics as rows would be too wide; transpose when there are many
        md.write_text(_markdown(table.set_index("run_id").T.reset_index().rename(columns={"index": "run"}))
                      if len(metrics) > 6 else _markdown(table))
        paths += [csv, md]
    return paths


def select(uri: str, study: str | None, experiment: str | None, parent: str | None) -> tuple[str, str | None, str]:
    """(experiment, parent run or None for the whole experiment, output folder name) the options choose."""
    if experiment and not (study or parent):
        return experiment, None, experiment
    chosen = parent_run(uri, parent) if parent else find_study(uri, study, experiment)
    if not parent:  # chosen for the user: say which, and how to choose otherwise
        which = "invocation of that study" if study else "study in the store"
        log.info("analysing %s, parent run %s: the most recent %s (others: --study, --parent-run, --experiment)",
                 chosen, chosen.parent_run_id, which)
    return chosen.experiment, chosen.parent_run_id, chosen.name or chosen.experiment


def _positive_flops(text: str) -> float:
    """--ladder-compute's value: a number of FLOPs > 0 (argparse exits 2 with the message otherwise)."""
    try:
        value = float(text)
    except ValueError:
        value = float("nan")
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a finite number of FLOPs > 0, e.g. 1e21; got {text!r}")
    return value


def _parser() -> argparse.ArgumentParser:
    epilog = ("Nothing half-written: the files are made in a folder beside --out and moved into it together at the "
              "end, so an interrupted analysis leaves --out as it was. "
              + exit_help("figures and tables written", "an error (its message says why)",
                          "never (the analysis takes no lock)"))
    parser = argparse.ArgumentParser(prog="python analysis/plot_scaling.py", description=__doc__,
                                     epilog=textwrap.fill(epilog, 100),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs-dir", default="runs", help="the studies' runs folder (default: runs)")
    parser.add_argument("--tracking-uri", help="default sqlite:///<runs-dir>/mlflow.db")
    parser.add_argument("--study", help="the most recent invocation of this study (default: of any study)")
    parser.add_argument("--parent-run", help="the child runs of this study invocation (its parent run's id)")
    parser.add_argument("--experiment", help="every run of this experiment (with --study: that study's runs in it)")
    parser.add_argument("--out", help="default <runs-dir>/figures/<study>, or /<experiment> without a study")
    parser.add_argument("--flops-convention", choices=["exact", "paper"], default="exact")
    parser.add_argument("--bootstrap", type=int, default=200, help="bootstrap refits per law (0 for none)")
    parser.add_argument("--ladder-compute", type=_positive_flops, metavar="FLOPS",
                        help="the ladder figure's frontiers and crossover search reach this training compute, e.g. "
                             "the paper preset's (default 1000x the largest run's)")
    add_verbosity(parser)
    return parser


def _select_runs(uri: str, args: argparse.Namespace) -> tuple[str, str, pd.DataFrame, pd.DataFrame]:
    """(experiment, output folder name, training runs, evaluations) the options choose; NoRunsError when
    there is nothing to analyse."""
    experiment, parent, name = select(uri, args.study, args.experiment, args.parent_run)
    evals = load_evaluations(uri, experiment, parent_run_id=parent)
    try:
        runs = load_runs(uri, experiment, parent_run_id=parent)
    except NoRunsError:
        if evals.empty:
            raise
        runs = pd.DataFrame()  # only evaluations of checkpoints trained elsewhere: their tables
    return experiment, name, runs, evals


def _analyse(args: argparse.Namespace, uri: str, runs: pd.DataFrame, evals: pd.DataFrame,
             out: Path) -> tuple[list[Path], list[Path]]:
    """Every figure and table of the runs and evaluations, written to `out`: (figure files, table files)."""
    tables = write_evaluation_tables(evals, out) if not evals.empty else []
    if runs.empty:
        return [], tables
    hist = load_histories(uri, runs, cache_dir=Path(args.runs_dir).resolve() / "cache" / "histories")
    _style()
    flops_key = FLOPS if args.flops_convention == "exact" else FLOPS_PAPER
    refs = merge_references(optimal_reference(runs, uri))
    figures, fits = plot_inference_scaling(runs, refs, out, args.bootstrap)
    figures += plot_bound_decomposition(runs, refs, out)
    figures += plot_efficiency(hist, runs, out, "tokens", "sample_efficiency", "training tokens", False, refs)
    figures += plot_efficiency(hist, runs, out, flops_key, "compute_efficiency",
                               f"training FLOPs ({args.flops_convention} convention)", True, refs)
    costs = cost_table(runs, lambda run_id: _config_of(uri, run_id), METRIC)
    figures += plot_inference_cost(costs, refs, out, _save, figure_notes(runs, "inference_cost"))
    if not costs.empty:
        tables += [out / "inference_cost.csv", out / "inference_cost.md"]
        costs.to_csv(tables[-2], index=False)
        tables[-1].write_text(_markdown(costs))
    size_figure, size_fits = plot_model_size(runs, out, args.bootstrap)
    fits += size_fits + curve_power_laws(hist, runs, flops_key, args.bootstrap)
    ladder_figure, ladder_tables, ladder_reasons = analyse_ladder(
        runs, known_optimum(runs, uri), out, save=_save, markdown=_markdown, bootstrap=args.bootstrap,
        compute=args.ladder_compute)
    reasons = fit_reasons(runs, hist, flops_key)
    is_ladder = "train.schedule" in runs and bool((runs["train.schedule"] == "wsd").any())
    if is_ladder and not ladder_figure:  # a ladder that drew nothing: fits.md says why
        reasons += [f"ladder: {r}" for r in ladder_reasons]
    return (figures + size_figure + ladder_figure,
            tables + ladder_tables + write_tables(runs, fits, out, reasons))


def _log_analysis(uri: str, experiment: str, n_runs: int, paths: list[Path], interrupt: Interrupt) -> str:
    """`paths` logged to a new MLflow run named "analysis" in `experiment`; its id. A signal while they
    are logged ends the run KILLED and raises Stopped; creating or ending the run is never cut in half."""
    from ltm.tracking import Tracker

    tracker = Tracker(uri, experiment)
    run_id = tracker.client.create_run(tracker.experiment_id, run_name="analysis",
                                       tags={ANALYSIS_TAG: "plot_scaling", N_RUNS_TAG: str(n_runs)}).info.run_id
    try:
        with interrupt.stoppable():
            for path in paths:
                tracker.client.log_artifact(run_id, str(path))
    except Stopped:
        tracker.finish(run_id, Status.KILLED, f"interrupted ({interrupt.name}) while logging the analysis's files; "
                                              "they are complete in its output folder")
        raise
    tracker.finish(run_id, Status.FINISHED)
    return run_id


def _interrupted(interrupt: Interrupt, what: str) -> int:
    print(f"interrupted ({interrupt.name}): {what}; run the same command again to make them", file=sys.stderr)
    return Exit.INTERRUPTED


def _run(args: argparse.Namespace, uri: str, interrupt: Interrupt) -> int:
    """Select, analyse into a staging folder, move the files into --out together, log them: a signal at
    any point exits INTERRUPTED with --out either as it was or complete (`analysis.staging`)."""
    try:
        with interrupt.stoppable():
            experiment, name, runs, evals = _select_runs(uri, args)
    except Stopped:
        return _interrupted(interrupt, "no figure or table was written")
    out = Path(args.out or Path(args.runs_dir) / "figures" / folder_name(name, "--experiment")).resolve()
    with staging_folder(out) as staged:
        try:
            with interrupt.stoppable():
                figures, tables = _analyse(args, uri, runs, evals, staged)
        except Stopped:
            return _interrupted(interrupt, f"no figure or table was written ({out} is as it was)")
        figures, tables = move_into_place(figures, out), move_into_place(tables, out)  # signals wait: renames only
    try:
        run_id = _log_analysis(uri, experiment, len(runs), figures + tables, interrupt)
    except Stopped:
        return _interrupted(interrupt, f"the figures and tables are complete in {out}, but their MLflow run "
                                       "'analysis' ended KILLED without all of them")
    print(f"{len(runs)} training runs and {len(evals)} evaluations -> {len(figures)} figure files and "
          f"{len(tables)} tables in {out}")
    print(f"logged to MLflow run {run_id} ('analysis') in experiment {experiment!r}")
    return Exit.OK


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    configure_logging(log_level(args))

    from ltm.tracking import TrackingUnusable, configure_mlflow, tracking_uri_option

    try:
        uri = tracking_uri_option(args.tracking_uri, Path(args.runs_dir).resolve())
    except TrackingUnusable as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    problem = missing_store(uri)  # a read-only command never creates a store
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return Exit.USAGE
    configure_mlflow(uri)  # this process's MLflow client: fail fast, authenticate
    with Interrupt() as interrupt:
        try:
            return _run(args, uri, interrupt)
        except NoRunsError as err:
            print(f"error: {err}", file=sys.stderr)
            return Exit.USAGE


if __name__ == "__main__":
    sys.exit(main())

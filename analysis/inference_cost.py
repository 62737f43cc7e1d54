"""What a bound costs: each posterior start's final bound against the training FLOPs spent and
against the inference FLOPs an evaluated token needs (`ltm.flops`, exact convention), with the
paper's loop at every T, the AR baselines, and the same-window AR's ceiling (the Bayes-optimal
predictor limited to its receptive field). Drawn by analysis/plot_scaling.py as `inference_cost`,
with its numbers in inference_cost.csv|md.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
import seaborn as sns

from ltm import names
from ltm.config import InferenceConfig, RunConfig
from ltm.flops import flops_per_token

PAPER_LR = InferenceConfig().lr_max
PAPER_LOGVAR = InferenceConfig().init_logvar


def _value(row, key: str, default):
    value = row.get(key, default)
    return default if value is None or (isinstance(value, float) and math.isnan(value)) else value


def start_label(row) -> str:
    """The posterior start a run used, in words ("paper start" for the paper's loop)."""
    start = _value(row, "inference.start", "fixed")
    logvar = float(_value(row, "inference.init_logvar", PAPER_LOGVAR))
    if start == "fixed":
        label = "paper start (logvar -5)" if logvar == PAPER_LOGVAR else f"fixed start, logvar {logvar:g}"
    elif start == "learned":
        label = "learned start" + ("" if logvar == PAPER_LOGVAR else f" from logvar {logvar:g}")
    else:
        layers = int(_value(row, "inference.encoder_layers", 1))
        label = f"encoder, {layers} layer" + ("s" if layers > 1 else "")
    lr = float(_value(row, "inference.lr_max", PAPER_LR))
    warmup = float(_value(row, "inference.start_kl_warmup", 0.0))
    return (label + ("" if lr == PAPER_LR else f", inner lr {lr:g}")
            + (f", KL warm-up {warmup:g}" if warmup and start != "fixed" else ""))


def cost_table(runs: pd.DataFrame, config_of: Callable[[str], dict], metric: str) -> pd.DataFrame:
    """One row per (model, start, T): the final bound (mean, min, max over seeds), training FLOPs
    and inference FLOPs per evaluated token."""
    rows = []
    for _, run in runs.iterrows():
        cfg = RunConfig.from_dict(config_of(run["run_id"]))
        inf = cfg.inference
        eval_flops = flops_per_token(cfg.model, inf.steps, phase="eval", start=inf.start,
                                     encoder_layers=inf.encoder_layers)
        is_ar = cfg.model.kind == "ar"
        label = (f"AR, window {cfg.model.window}" if cfg.model.window else "AR, full context") if is_ar \
            else start_label(run)
        rows.append({"label": label, "T": 0 if is_ar else inf.steps, "seed": cfg.seed,
                     "train_tokens": cfg.train.tokens, "bound_ppl": run[names.metric(names.FINAL, metric)],
                     "train_flops": run.get(names.metric(names.FINAL, names.FLOPS), np.nan),
                     "eval_flops_per_token": eval_flops})
    table = pd.DataFrame(rows)
    if table.empty:
        return table
    keys = ["label", "T", "train_tokens"]
    return table.groupby(keys).agg(bound_ppl=("bound_ppl", "mean"), low=("bound_ppl", "min"),
                                   high=("bound_ppl", "max"), seeds=("seed", "nunique"),
                                   train_flops=("train_flops", "mean"),
                                   eval_flops_per_token=("eval_flops_per_token", "first")).reset_index()


CLIP = 3.0
"""The figure's top, in multiples of the best AR's bound: larger bounds are drawn as arrows at the top,
labelled with their value, so the region where the starts and the ARs compete stays readable."""


def _tokens_text(tokens: float) -> str:
    """An AR point's budget: 16k tokens, 1.5M tokens."""
    return f"{tokens / 1e6:g}M tokens" if tokens >= 1e6 else f"{tokens / 1e3:g}k tokens"


def _draw(ax, g: pd.DataFrame, x: str, colour, label: str, is_ar: bool, top: float) -> None:
    shown = g["bound_ppl"].clip(upper=top * 0.97)
    err = [shown - g["low"].clip(upper=top * 0.97), g["high"].clip(upper=top * 0.97) - shown]
    ax.errorbar(g[x], shown, yerr=err if g["seeds"].max() > 1 else None, fmt="s" if is_ar else "o-",
                color=colour, ms=5, lw=1.2, capsize=2, label=label)
    for (_, r), y in zip(g.iterrows(), shown):
        clipped = r["bound_ppl"] > top * 0.97
        if clipped:
            ax.plot(r[x], y, "^", color=colour, ms=7)
        text = (f"T={r['T']}" if not is_ar else _tokens_text(r["train_tokens"])) + \
            (f": {r['bound_ppl']:.0f}" if clipped else "")
        ax.annotate(text, (r[x], y), fontsize=6, xytext=(3, 3), textcoords="offset points", color=colour)


def plot_inference_cost(table: pd.DataFrame, refs: dict[str, float], out: Path, save,
                        notes: list[str] | tuple = ()) -> list[Path]:
    """Two panels, bound against training FLOPs and against inference FLOPs per evaluated token: a
    line per start through its T values (labelled), the ARs as squares at each budget, the corpus optima
    as lines; bounds above CLIP x the best AR's as labelled arrows at the top. `save(fig, out, name, notes)`
    writes it with `notes` (what the runs cannot show) under it."""
    starts = sorted({label for label in table["label"] if not label.startswith("AR")} if not table.empty else [],
                    key=lambda s: (not s.startswith("paper"), s))
    if not starts:
        return []
    fig, axes = plt.subplots(1, 2, figsize=(12.5, 4.8), sharey=True)
    colours = dict(zip(starts, sns.color_palette("tab10", len(starts))))
    ar_colours = iter(["black", "#8c564b", "#2ca02c", "0.4"])
    top = CLIP * table.loc[table["label"].str.startswith("AR"), "bound_ppl"].min() if \
        table["label"].str.startswith("AR").any() else table["bound_ppl"].max() * 1.1
    for label, g in table.groupby("label"):
        is_ar = label.startswith("AR")
        if not is_ar:  # a start's line through its T values at one budget; an AR's points at every budget
            g = g[g["train_tokens"] == g["train_tokens"].min()]
        g = g.sort_values(["T", "train_tokens"])
        colour = next(ar_colours) if is_ar else colours[label]
        for ax, x in zip(axes, ("train_flops", "eval_flops_per_token")):
            _draw(ax, g, x, colour, label, is_ar, top)
    for (name, value), ls in zip(refs.items(), (":", "--", "-.", (0, (1, 3)))):
        for ax in axes:
            ceiling = " (the same-window AR's ceiling)" if "receptive" in name else ""
            ax.axhline(value, color="0.3", ls=ls, lw=1, label=f"{name}: {value:.2f}" + ceiling)
    axes[0].set(xscale="log", yscale="log", xlabel="training FLOPs (exact)", ylabel="validation perplexity bound",
                ylim=(None, top))
    axes[1].set(xscale="log", xlabel="inference FLOPs per evaluated token (exact)")
    seeds = table["seeds"].max() > 1
    fig.suptitle("Where the posterior starts: bound against cost" + (" (mean over seeds, bars min to max)" if seeds
                                                                      else ""))
    return save(fig, out, "inference_cost", notes)

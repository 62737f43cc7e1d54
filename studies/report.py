"""What a study's MLflow parent run shows once the study ends: its summary table (`summary.csv`,
`summary.md`), a figure of the points' final headline metric against the study's axis (`summary.png`),
and that metric as the parent's own metrics, one per line of the figure with the axis as its step, so
the parent's chart view has the study's result in it.
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from ltm.names import BOUND, metric

log = logging.getLogger(__name__)

SUMMARY_FILES = ("summary.csv", "summary.md", "summary.png")
_NOT_METRICS = {"key", "status", "tokens", "mlflow_run"}


@dataclass
class Chart:
    """The points' final `y` against the axis `x` (None: no numeric axis), one line per value of the
    other axes (mean over seeds)."""

    x: str | None
    y: str
    lines: dict[str, list[tuple[float, float]]]


def headline(table: pd.DataFrame, axes: list[str]) -> str | None:
    """The first metric column of the summary that any point has (the study's summary metrics come in order)."""
    metrics = [c for c in table.columns if c not in _NOT_METRICS and c not in axes]
    return next((c for c in metrics if table[c].notna().any()), None)


def _numeric(values: pd.Series) -> bool:
    return (pd.api.types.is_numeric_dtype(values) and not pd.api.types.is_bool_dtype(values)
            and bool(values.notna().all()))


def chart(table: pd.DataFrame, axes: list[str], y: str) -> Chart:
    """The x axis is the numeric grid axis with the most values (the first on a tie); the lines are named by
    the other axes, leaving out any that another already determines (a budget's eval_every)."""
    scored = table[table[y].notna()]
    numeric = [a for a in axes if a != "seed" and _numeric(table[a])]
    x = max(numeric, key=lambda a: table[a].nunique(), default=None)
    named: list[str] = []
    for a in (a for a in axes if a not in (x, "seed")):
        if not any(table.astype(str).groupby(b)[a].nunique().max() <= 1 for b in named):
            named.append(a)
    lines: dict[str, list[tuple[float, float]]] = {}
    keys = scored[named].astype(str) if named else pd.DataFrame(index=scored.index)
    for i, (_, row) in enumerate(scored.iterrows()):
        label = " ".join(f"{a}:{keys.at[row.name, a]}" for a in named) or "points"
        lines.setdefault(label, []).append((float(row[x]) if x else float(i), float(row[y])))
    for label, points in lines.items():  # seeds of one point: their mean
        lines[label] = sorted(pd.DataFrame(points).groupby(0)[1].mean().items())
    return Chart(x, y, lines)


def figure(c: Chart, title: str, path: Path) -> Path:
    """A line per multi-point line of `c`, a dashed level per single point beside them (a baseline; points
    only when no line has several); the legend outside the axes, so it never covers a point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    levels = c.x is not None and any(len(points) > 1 for points in c.lines.values())  # else every line is a point
    for i, (label, points) in enumerate(c.lines.items()):
        xs, ys = zip(*points)
        colour = f"C{i % 10}"
        if len(points) > 1 or not levels:
            ax.plot(xs, ys, "o-", color=colour, label=label)
        else:
            ax.axhline(ys[0], color=colour, ls="--", label=f"{label} ({c.x}={xs[0]:g})")
    xs = [x for points in c.lines.values() for x, _ in points]
    if c.x and min(xs) > 0 and max(xs) / min(xs) >= 8:
        ax.set_xscale("log", base=2)
        ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_xlabel(c.x or "point (summary.csv's row)")
    ax.set_ylabel(f"final {c.y}" + (" (nats/token)" if c.y.endswith("/" + BOUND) else ""))
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small", frameon=False)
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)
    return path


def markdown(table: pd.DataFrame) -> str:
    """A pipe table (pandas' to_markdown needs the optional tabulate package)."""
    def cell(v) -> str:
        return "" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.4g}" if isinstance(v, float) \
            else str(v)
    lines = ["| " + " | ".join(map(str, table.columns)) + " |", "|" + "---|" * len(table.columns)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in table.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def parent_metrics(c: Chart) -> dict[str, list[tuple[int, float]]]:
    """The chart as MLflow metrics: a key per line (the headline's, then the line's name), its values at
    the x axis as the step (the rank of the value where the axis is not integer)."""
    xs = sorted({x for points in c.lines.values() for x, _ in points})
    integer = all(float(x).is_integer() for x in xs)
    out = {}
    for label, points in c.lines.items():
        key = c.y if len(c.lines) == 1 else metric(c.y, re.sub(r"[^\w.:/ -]", "_", label))
        out[key] = [(int(x) if integer else xs.index(x), y) for x, y in points]
    return out


def _log_new(client, run_id: str, metrics: dict[str, list[tuple[int, float]]]) -> None:
    """Log the values the run does not have yet at their step (a study started again adds no duplicates)."""
    import time

    from mlflow.entities import Metric

    now = int(time.time() * 1000)
    new = [Metric(key, value, now, step) for key, values in metrics.items()
           for have in [{(m.step, m.value) for m in client.get_metric_history(run_id, key)}]
           for step, value in values if (step, value) not in have]
    for i in range(0, len(new), 1000):  # MLflow takes 1000 metrics per batch
        client.log_batch(run_id, metrics=new[i:i + 1000])


def log_summary(tracker, parent_run_id: str, table: pd.DataFrame, axes: list[str], title: str) -> list[str]:
    """Log the summary to the parent run (files, figure, metrics); the files logged."""
    y = headline(table, axes)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp)
        table.to_csv(out / SUMMARY_FILES[0], index=False)
        (out / SUMMARY_FILES[1]).write_text(f"# {title}\n\n" + markdown(table))
        if y is not None:
            c = chart(table, axes, y)
            figure(c, title, out / SUMMARY_FILES[2])
            _log_new(tracker.client, parent_run_id, parent_metrics(c))
        files = sorted(p.name for p in out.iterdir())
        tracker.client.log_artifacts(parent_run_id, str(out))
    return files

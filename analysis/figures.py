"""What keeps a figure readable at any study size: legends beside the data, one legend entry for
reference lines that coincide, ticks labelled across every axis's range, and a note on the figure
for a comparison the runs cannot make (no AR baseline, too few points for a fit)."""

from __future__ import annotations

import math
import textwrap

import matplotlib.ticker
import numpy as np

COINCIDE = 5e-3
"""Reference lines whose values differ by less than this fraction are one line on the figure."""


def merge_references(refs: dict[str, float]) -> dict[str, float]:
    """`refs` with the lines that coincide (within COINCIDE) merged into one entry: their names joined,
    "optimum, full context = 31-token receptive field", at the first one's value; drawn apart they would
    lie on top of each other and the legend would show a line the figure does not."""
    merged: dict[str, float] = {}
    for name, value in refs.items():
        same = next((key for key, kept in merged.items() if math.isclose(kept, value, rel_tol=COINCIDE)), None)
        if same is None:
            merged[name] = value
            continue
        prefix = _common_prefix(same, name)
        merged[f"{same} = {name[len(prefix):]}"] = merged.pop(same)
    return merged


def _common_prefix(a: str, b: str) -> str:
    """The words, up to and including a ", ", that both names start with ("optimum, ")."""
    cut = a.find(", ") + 2
    return a[:cut] if cut > 1 and b.startswith(a[:cut]) else ""


def legend_beside(fig, fontsize: float = 8) -> None:
    """One legend for the whole figure, outside the top-right panel, so it never covers data: each label
    once (the panels of a figure repeat theirs)."""
    visible = [ax for ax in fig.axes if ax.get_visible()]
    entries: dict = {}
    for ax in visible:
        for handle, label in zip(*ax.get_legend_handles_labels()):
            entries.setdefault(label, handle)
    if not entries:
        return
    top_right = max(visible, key=lambda ax: (ax.get_position().y1, ax.get_position().x1))
    top_right.legend(list(entries.values()), list(entries), loc="upper left", bbox_to_anchor=(1.02, 1),
                     borderaxespad=0, fontsize=fontsize)


def _nice_ticks(low: float, high: float) -> list[float]:
    """2 to 6 round values in [low, high]: 1, 2, 5 x 10^k where 3 of them fall inside, else finer mantissas."""
    ticks: list[float] = []
    for mantissas in ((1, 2, 5), (1, 1.5, 2, 3, 4, 5, 6, 8), tuple(np.arange(10, 100) / 10)):
        ticks = [m * 10.0 ** k for k in range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
                 for m in mantissas if low <= m * 10.0 ** k <= high]
        if len(ticks) >= 3:
            break
    if len(ticks) < 2:
        return [low, high]
    return [ticks[round(i)] for i in np.linspace(0, len(ticks) - 1, min(len(ticks), 6))]


def tick_text(value: float, powers: bool) -> str:
    """A tick label: plain (8000, 0.5), or with `powers` as a power of ten (10^6, 2x10^9) in mathtext."""
    if not powers:
        return f"{value:.0f}" if value >= 10 else f"{value:.3g}"
    exponent = math.floor(math.log10(value))
    mantissa = round(value / 10.0 ** exponent, 2)
    return f"$10^{{{exponent}}}$" if mantissa == 1 else f"${mantissa:g}\\times10^{{{exponent}}}$"


def readable_ticks(fig) -> None:
    """Every log axis of `fig` spanning less than two decades gets round, labelled ticks across its range
    (matplotlib labels only the powers of ten there, so such an axis shows one label, or none, or a
    cluster of minor ones at one end). Axes whose ticks were set explicitly (T values) are left alone."""
    for ax in fig.axes:
        for axis, limits in ((ax.xaxis, ax.get_xlim()), (ax.yaxis, ax.get_ylim())):
            low, high = sorted(limits)
            if axis.get_scale() != "log" or low <= 0 or high / low >= 100:
                continue
            if isinstance(axis.get_major_locator(), matplotlib.ticker.FixedLocator):
                continue
            ticks = _nice_ticks(low, high)
            powers = not 1e-2 <= min(ticks) <= max(ticks) < 1e5  # one style along an axis
            axis.set_major_locator(matplotlib.ticker.FixedLocator(ticks))
            axis.set_major_formatter(matplotlib.ticker.FuncFormatter(lambda v, _, p=powers: tick_text(v, p)))
            axis.set_minor_formatter(matplotlib.ticker.NullFormatter())


def add_notes(fig, notes: list[str]) -> None:
    """The notes as text under the figure (below its tick labels and axis labels)."""
    if not notes:
        return
    fig.canvas.draw()
    bottom = fig.get_tightbbox(fig.canvas.get_renderer()).y0 / fig.get_figheight()
    width = max(60, int(fig.get_figwidth() * 14))  # characters at 8 pt across the figure
    text = "\n".join(textwrap.fill("Note: " + note, width) for note in notes)
    fig.text(0.02, bottom - 0.02, text, ha="left", va="top", fontsize=8, color="0.25", style="italic")

"""Declaring a study: named presets, each a base run recipe and a grid of override dicts.

A study script is a `Study` and a call to `studies.launcher.main`; nothing here runs anything.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Callable

from ltm.names import VAL_PPL_BOUND, VAL_PPL_IW

RECIPE = "recipe"
"""A grid point's key naming its run recipe (`ltm.config.run_preset`) instead of the preset's base."""


@dataclass(frozen=True)
class Preset:
    """One size of a study: a base run preset, the grid as override dicts, resources per trial."""

    base: str
    """A run preset of `ltm.config.run_preset` (smoke, micro, micro-rf, ltm-s, ltm-m, ltm-l)."""
    points: list[dict]
    """One dict of dotted-key overrides per grid point (see `grid`); "recipe": NAME takes that run
    recipe for the point instead of `base` (LTM-S/M/L are the recipes ltm-s, ltm-m, ltm-l)."""
    description: str = ""
    cpus: float = 1
    """CPUs per trial (Ray resources; SLURM cpus_per_task when the profile does not say)."""
    gpus: float = 0
    """GPUs per trial; fractional values share a GPU between Ray trials."""
    profile: str = "local"
    """Default SLURM profile (slurm/profiles/<name>.yaml)."""
    task: dict | None = None
    """An evaluation (`studies.tasks`: name plus arguments) run on each point's checkpoint, or on
    the checkpoints given with --checkpoint; None: the points are training runs."""


@dataclass(frozen=True)
class Study:
    """A named study: presets of grids over the paper's axes."""

    name: str
    description: str
    presets: dict[str, Preset]
    default_preset: str = "micro"
    summary_metrics: tuple[str, ...] = (VAL_PPL_BOUND, VAL_PPL_IW)
    """Final metrics shown in the summary table (shell-style patterns, e.g. "gsm8k/*/pass*")."""
    data_option: Callable[[str], tuple[dict, dict]] | None = None
    """How --data applies: (config overrides, task overrides); None: it sets data.name."""


def grid(*axes: dict[str, list], common: dict | None = None) -> list[dict]:
    """The product of axes; each axis maps dotted keys to equally long value lists (zipped).

    grid({"inference.steps": [1, 4]}, {"model.n_latents": [4, 16]}) -> 4 points;
    grid({"model.kind": ["ar", "ltm"], "inference.steps": [0, 16]}) -> 2 points (zipped).
    """
    options = []
    for axis in axes:
        lengths = {len(v) for v in axis.values()}
        if len(lengths) != 1:
            raise ValueError(f"the lists of one axis must have equal lengths, got {axis}")
        options.append([dict(zip(axis, values)) for values in zip(*axis.values())])
    return [{**(common or {}), **{k: v for part in combo for k, v in part.items()}}
            for combo in itertools.product(*options)]

"""A study's grid as run specs: one validated `Point` per (grid entry, seed), the study's identity,
and the table that shows them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

from studies.messages import Point
from studies.study import RECIPE, Study


def build_points(study: Study, preset: str, seeds: list[int], data: str | None, extra: list[str]) -> list[Point]:
    """Every grid point of the preset, one per seed; raises ConfigError on a bad point."""
    from ltm.config import ConfigError, run_preset

    if preset not in study.presets:
        raise ConfigError(f"unknown preset {preset!r} for study {study.name}; known: {', '.join(study.presets)}")
    points, seen = [], set()
    for entry in study.presets[preset].points:
        # A point may name its own run recipe ("recipe": "ltm-m"); the preset's base otherwise.
        overrides = {k: v for k, v in entry.items() if k != RECIPE}
        base = run_preset(entry.get(RECIPE, study.presets[preset].base))
        for seed in seeds:
            cfg = base.with_overrides({**overrides, "seed": seed})
            if data:
                cfg = cfg.with_overrides(study.data_option(data)[0] if study.data_option else {"data.name": data})
            if extra:
                cfg = cfg.with_overrides(extra)
            cfg = _absolute_paths(cfg)
            key = cfg.run_key()
            if key in seen:
                continue
            seen.add(key)
            points.append(Point(key=key, config=cfg.to_dict(), label={**entry, "seed": seed}))
    return with_trunks(points)


def with_trunks(points: list[Point]) -> list[Point]:
    """Each wsd point (train.schedule=wsd) as a branch of its trunk: the trunk's segments, one per branch
    point of its branches in ascending order (each after the one before), then the branches (each after its
    segment), trunk by trunk in the order the grid first names them; other points as they are (a branch point
    inside the warmup is refused when its config is made)."""
    from ltm.config import RunConfig

    trunks: dict[str, list[tuple[RunConfig, Point]]] = {}
    out: list[Point | str] = []
    for point in points:
        cfg = RunConfig.from_dict(point.config)
        if cfg.train.schedule != "wsd":
            out.append(point)
            continue
        trunk_key = cfg.trunk().run_key()
        if trunk_key not in trunks:
            out.append(trunk_key)  # where this trunk's points go
        trunks.setdefault(trunk_key, []).append((cfg, point))
    return [q for item in out for q in ([item] if isinstance(item, Point) else _ladder(trunks[item]))]


def _ladder(branches: list) -> list[Point]:
    """One trunk's segments and branches (`with_trunks`)."""
    stops = sorted({cfg.branch_point() for cfg, _ in branches})
    trunk = branches[0][0].trunk()
    segments = []
    for i, stop in enumerate(stops):
        cfg = trunk.with_overrides({"train.tokens": stop})
        label = {k: v for k, v in branches[0][1].label.items() if not k.startswith("train.")}
        segments.append(Point(key=cfg.run_key(), config=cfg.to_dict(), label={**label, "segment": stop}, stop=stop,
                              after=(segments[-1].id,) if segments else (), resumes=stops[i - 1] if i else 0))
    by_stop = {s.stop: s for s in segments}
    ordered = sorted(branches, key=lambda b: b[0].branch_point())
    return segments + [dataclasses.replace(p, after=(by_stop[cfg.branch_point()].id,), resumes=cfg.branch_point())
                       for cfg, p in ordered]


def _absolute_paths(cfg):
    """Local data paths made absolute: trials run in other working directories."""
    data = cfg.data
    fix = {f"data.{k}": str(Path(v).resolve()) for k in ("name", "val_name", "cache_dir")
           if isinstance(v := getattr(data, k), str) and v != "synthetic" and (k == "cache_dir" or Path(v).exists())}
    return cfg.with_overrides(fix) if fix else cfg


def study_key(study: Study, preset: str, points: list[Point]) -> str:
    """The identity of a study invocation: its name, preset and the run keys of its points."""
    return study_key_of(study.name, preset, [p.key for p in points])


def study_key_of(name: str, preset: str, keys: list[str]) -> str:
    blob = json.dumps([name, preset, sorted(keys)]).encode()
    return hashlib.sha256(blob).hexdigest()[:12]


def varying_columns(points: list[Point]) -> list[str]:
    """Dotted config keys whose values differ between points (the grid's axes), plus seed."""
    from ltm.config import RunConfig

    flats = [RunConfig.from_dict(p.config).flat() for p in points]
    keys = [k for k in flats[0] if len({json.dumps(f[k], default=str) for f in flats}) > 1]
    return keys or ["seed"]


def column(key: str) -> str:
    """A config key as a column of the grid's tables: "steps" for inference.steps (data.* keep their prefix)."""
    return key.replace("model.", "").replace("inference.", "").replace("train.", "")


def axes(points: list[Point]) -> list[str]:
    """The grid's axes as `grid_table` names its columns."""
    return [column(c) for c in varying_columns(points)]


def grid_table(points: list[Point], extra_columns: dict[str, list] | None = None):
    """A DataFrame with one row per point: run key and the varying config values."""
    import pandas as pd
    from ltm.config import RunConfig

    cols = varying_columns(points)
    rows = []
    for i, p in enumerate(points):
        flat = RunConfig.from_dict(p.config).flat()
        row = {"key": p.key, **{column(c): flat[c] for c in cols}}
        for name, values in (extra_columns or {}).items():
            row[name] = values[i]
        rows.append(row)
    return pd.DataFrame(rows)

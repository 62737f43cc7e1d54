"""The command-line options every run-starting command shares (`ltm.train`, the studies), declared once."""

from __future__ import annotations

import argparse


def add_run_options(parser: argparse.ArgumentParser, *, experiment_default: str | None,
                    experiment_shown: str | None = None, every_point: bool = False) -> None:
    """--data, --set, --tracking-uri, --experiment and --runs-dir on `parser`. `experiment_default` is
    --experiment's default (None: the command picks it, shown in --help as `experiment_shown`); with
    `every_point` the help says that --data and --set apply to every point of a study."""
    scope = " for every point" if every_point else ""
    parser.add_argument("--data", help=f"data.name{scope}: 'synthetic', a hub name (e.g. openwebtext) or a local path")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help=f"override a config value by its dotted key{scope}, e.g. inference.steps=32, "
                             "model.n_latents=8, train.tokens=1e6, seed=1 (repeatable)")
    parser.add_argument("--tracking-uri", help="MLflow tracking URI (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--experiment", default=experiment_default,
                        help=f"MLflow experiment name (default {experiment_shown or experiment_default})")
    parser.add_argument("--runs-dir", default="runs",
                        help="folder for checkpoints, the default MLflow store and artifacts (and a study's Ray and "
                             "SLURM folders) (default runs)")

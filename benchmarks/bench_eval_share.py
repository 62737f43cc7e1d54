"""What evaluating costs a run (issue 21): each run preset trained whole, its evaluations' wall time
(`eval/seconds`, logged per evaluation) against the run's wall time.

    python benchmarks/bench_eval_share.py [--presets smoke,micro,micro-rf]

Prints a markdown table; paste it into benchmarks/RESULTS.md with the machine (`lscpu`) and command.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
from mlflow.tracking import MlflowClient

from ltm.config import run_preset
from ltm.names import EVAL_SECONDS, TOKENS_PER_S
from ltm.tracking import default_tracking_uri
from ltm.train import run


def measure(preset: str, runs: Path) -> dict:
    cfg = run_preset(preset)
    started = time.perf_counter()
    result = run(cfg, runs_dir=runs, experiment=f"eval_share_{preset}", progress=False)
    wall = time.perf_counter() - started
    client = MlflowClient(default_tracking_uri(runs))
    evals = [m.value for m in client.get_metric_history(result.run_id, EVAL_SECONDS)]
    speeds = [m.value for m in client.get_metric_history(result.run_id, TOKENS_PER_S)]
    return {"preset": preset, "tokens": cfg.train.tokens, "eval_blocks": cfg.train.eval_blocks,
            "evaluations": len(evals), "eval_s": sum(evals), "wall_s": wall,
            "train_tokens_per_s": sorted(speeds)[len(speeds) // 2]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--presets", default="smoke,micro,micro-rf")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for preset in args.presets.split(","):
            rows.append(measure(preset, Path(tmp) / preset))
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| preset | tokens | eval blocks | evaluations | evaluating (s) | run wall (s) | share "
          "| train tok/s (median) |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['preset']} | {r['tokens']:,} | {r['eval_blocks']} | {r['evaluations']} | {r['eval_s']:.2f} | "
              f"{r['wall_s']:.1f} | {100 * r['eval_s'] / r['wall_s']:.1f}% | {r['train_tokens_per_s']:,.0f} |")


if __name__ == "__main__":
    main()

"""Re-score a checkpoint's likelihood bound at several importance-sample counts K: does it still move?

    python -m ltm.rescore REF [--k 8,64,512] [--blocks 64] [--runs-dir runs] [--out FILE.csv]

REF is a checkpoint file, a run's folder, a run key or a training run's MLflow id (`ltm.checkpoint.resolve`).
The first --blocks validation blocks get one posterior each (T steps, as in training, seeds as in
`analysis/compare.py`) and one stream of importance draws: the bound at K is made of the first K draws
(`ltm.evaluate.iw_bounds`), so successive K differ only by the samples added, and each step's change
gets a 95 % interval over blocks. The draws are scored --chunk at a time: memory does not grow with K.
Printed and (--out) written as one CSV row, by the metric names `val/ppl_iw_k<K>` (perplexity) and
`val/bound`, the ELBO for reference. An AR's bound is its exact NLL at every K.
"""

# ruff: noqa: E402 (the signal handler goes in before the imports, which load torch)
from __future__ import annotations

from ltm.signals import exit_on_signal

exit_on_signal(__name__)  # run as a command: Ctrl-C exits 3 with a message, not a traceback
import argparse
import logging
import math
import sys
from pathlib import Path

import torch

from ltm.checkpoint import load_model, resolve
from ltm.cli import add_verbosity, add_verify_option, configure_logging, log_level
from ltm.config import ConfigError
from ltm.data import load_blocks
from ltm.evaluate import block_interval, iw_bounds, sequence_bounds
from ltm.files import atomic_write
from ltm.names import BOUND, VAL, Exit, exit_help, iw_metric, metric
from ltm.objective import EVAL_SEED
from ltm.tracking import TrackingUnusable, tracking_uri_option

log = logging.getLogger("ltm.rescore")


def rescore(model, cfg, n_blocks: int, ks: list[int], batch_size: int = 8,
            chunk: int = 8) -> tuple[dict[int, torch.Tensor], torch.Tensor, torch.Tensor]:
    """Per validation block: the IW bound at each K (nats), the ELBO, and the tokens scored."""
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    tokens = blocks.batch(range(min(n_blocks, len(blocks))))
    per_k: dict[int, list[torch.Tensor]] = {k: [] for k in ks}
    elbo, counts = [], []
    for i in range(0, len(tokens), batch_size):
        part = tokens[i:i + batch_size]
        seeds = [EVAL_SEED + i + j for j in range(len(part))]
        for k, bound in iw_bounds(model, part, cfg.inference, seeds=seeds, ks=ks, chunk=chunk).items():
            per_k[k].append(bound.double())
        bounds = sequence_bounds(model, part, cfg.inference, seeds=seeds, reuse_score=False)
        elbo.append(bounds.elbo.double())
        counts.append(bounds.n_tokens.double())
        log.info("%d/%d blocks", i + len(part), len(tokens))
    return {k: torch.cat(v) for k, v in per_k.items()}, torch.cat(elbo), torch.cat(counts)


def report(per_k: dict[int, torch.Tensor], elbo: torch.Tensor, counts: torch.Tensor) -> tuple[dict, list[str]]:
    """The metrics by name (`val/ppl_iw_k<K>` and the ELBO's `val/bound`) and the printed lines."""
    tokens = counts.sum().item()
    metrics = {metric(VAL, BOUND): elbo.sum().item() / tokens}
    lines = [f"ELBO bound {metrics[metric(VAL, BOUND)]:.4f} nats/token ({len(counts)} blocks)"]
    previous = None
    for k, bound in sorted(per_k.items()):
        nats = bound.sum().item() / tokens
        metrics[iw_metric(VAL, k)] = math.exp(nats)
        line = f"{iw_metric(VAL, k)}: {math.exp(nats):.4f} (IW bound {nats:.4f} nats/token)"
        if previous is not None:
            change, half = block_interval(bound - per_k[previous], tokens)
            line += f"; from K={previous}: {change:+.4f} [{change - half:+.4f}, {change + half:+.4f}]"
        lines.append(line)
        previous = k
    return metrics, lines


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m ltm.rescore", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=exit_help("scored", "an error (its message says why)",
                                                      "never (it takes no lock)"))
    parser.add_argument("ref", help="checkpoint file or folder, run key, or training run's MLflow id")
    parser.add_argument("--k", default="8,64,512", help="importance samples K, comma-separated (default 8,64,512)")
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks scored (default 64)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--chunk", type=int, default=8, help="importance draws scored at once (memory)")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--tracking-uri", help="the store that knows the runs (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--out", help="also write the metrics as a one-row CSV")
    add_verify_option(parser, "score")
    add_verbosity(parser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(log_level(args))
    try:
        ks = sorted({int(k) for k in args.k.split(",")})
    except ValueError:
        parser.error(f"--k takes integers separated by commas, e.g. 8,64,512; got {args.k!r}")
    if ks[0] < 1 or args.blocks < 2 or args.chunk < 1 or args.batch_size < 1:
        parser.error("every K must be >= 1, --blocks >= 2, --chunk and --batch-size >= 1")
    runs_dir, verify = Path(args.runs_dir).resolve(), not args.no_verify
    try:
        source = resolve(args.ref, tracking_uri_option(args.tracking_uri, runs_dir), runs_dir, verify)
        model, cfg = load_model(source.checkpoint, verify=verify)
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnusable) as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    model.eval()
    metrics, lines = report(*rescore(model, cfg, args.blocks, ks, args.batch_size, args.chunk))
    print(f"{args.ref}: {cfg.model.kind}, T={cfg.inference.steps}, {cfg.train.tokens:,} tokens"
          + (" (an AR: every K is its exact NLL)" if cfg.model.kind == "ar" else ""))
    print("\n".join(lines))
    if args.out:
        atomic_write(args.out, ",".join(metrics) + "\n" + ",".join(f"{v:.6f}" for v in metrics.values()) + "\n")
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())

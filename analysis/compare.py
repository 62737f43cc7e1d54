"""Two trained runs on the same validation blocks: each one's bound and their paired difference.

    python analysis/compare.py A B [--runs-dir runs] [--blocks 64] [--bootstrap 2000] [--out FILE.csv]

A and B are checkpoint paths, run keys (their checkpoints under <runs-dir>/checkpoints) or training
runs' MLflow ids. Each is read from its own run's checkpoint folder, and a folder whose run FINISHED
at more tokens than its newest usable checkpoint holds is refused (`ltm.checkpoint.resolve`).
Each validation block gets each run's bound in nats per token: for an LTM the fresh-noise ELBO,
with the posterior inferred in T steps as in training (and its NLL given z and KL), for an AR its
exact NLL. The differences A - B of the bound and of the NLL are averaged over blocks (token-weighted), each
with a 95 % interval from
a paired percentile bootstrap over blocks: the uncertainty from which validation text was scored,
not from training seeds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.checkpoint import load_model, resolve  # noqa: E402
from ltm.config import ConfigError  # noqa: E402
from ltm.data import load_blocks  # noqa: E402
from ltm.evaluate import sequence_bounds  # noqa: E402
from ltm.tracking import default_tracking_uri  # noqa: E402
from ltm.train import EVAL_SEED  # noqa: E402


def block_bounds(ref: str, runs_dir: Path, n_blocks: int, batch_size: int = 16,
                 tracking_uri: str | None = None) -> tuple[pd.DataFrame, torch.Tensor]:
    """Per validation block: bound, nll and kl (nats, summed over the block) and tokens; and the blocks."""
    source = resolve(ref, tracking_uri or default_tracking_uri(runs_dir), runs_dir)
    print(f"{ref}: {source['identity'].rsplit(':', 1)[0]}" + (f" (MLflow run {source['run_id']})" if source["run_id"]
                                                              else ""))
    model, cfg = load_model(source["checkpoint"])
    model.eval()
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    n = min(n_blocks, len(blocks))
    tokens = blocks.batch(range(n))
    rows = []
    for i in range(0, n, batch_size):
        part = tokens[i:i + batch_size]
        b = sequence_bounds(model, part, cfg.inference, seeds=[EVAL_SEED + i + j for j in range(len(part))],
                            reuse_score=False)
        rows += [{"bound": e, "nll": nl, "kl": k, "tokens": t} for e, nl, k, t in
                 zip(b.elbo.tolist(), b.nll.tolist(), b.kl.tolist(), b.n_tokens.tolist())]
    latents = f" T={cfg.inference.steps} N_z={cfg.model.n_latents}" if cfg.model.kind == "ltm" else ""
    label = f"{cfg.model.kind}{latents}, window {cfg.model.window}, {cfg.train.tokens:,} tokens"
    return pd.DataFrame(rows).assign(run=label), tokens


def compare(a: pd.DataFrame, b: pd.DataFrame, bootstrap: int, seed: int = 0) -> dict[str, float]:
    """Token-weighted means (nats/token) of each run's bound, NLL and KL, and the differences A - B of
    the bound and of the NLL, each with a paired percentile-bootstrap 95 % interval over blocks."""
    tokens = a["tokens"].to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(tokens), size=(bootstrap, len(tokens)))
    out: dict[str, float] = {"blocks": len(tokens)}
    for name, frame in (("A", a), ("B", b)):
        for column in ("bound", "nll", "kl"):
            out[f"{name}_{column}"] = float(frame[column].sum() / tokens.sum())
    for column in ("bound", "nll"):
        diff = a[column].to_numpy() - b[column].to_numpy()
        resampled = diff[idx].sum(1) / tokens[idx].sum(1)
        lo, hi = np.percentile(resampled, [2.5, 97.5])
        out.update({f"{column}_A_minus_B": float(diff.sum() / tokens.sum()), f"{column}_ci_low": float(lo),
                    f"{column}_ci_high": float(hi)})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("a", help="run key or checkpoint path")
    parser.add_argument("b", help="run key or checkpoint path")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--tracking-uri", help="the store that knows the runs (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks scored (default 64)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--out", help="also write the result as a one-row CSV")
    args = parser.parse_args(argv)
    if args.blocks < 2 or args.bootstrap < 1:
        parser.error("--blocks must be >= 2 and --bootstrap >= 1")
    runs_dir = Path(args.runs_dir).resolve()
    try:
        a, tokens_a = block_bounds(args.a, runs_dir, args.blocks, tracking_uri=args.tracking_uri)
        b, tokens_b = block_bounds(args.b, runs_dir, args.blocks, tracking_uri=args.tracking_uri)
    except (ConfigError, FileNotFoundError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if tokens_a.shape != tokens_b.shape or not torch.equal(tokens_a, tokens_b):
        print("error: the two runs' validation blocks differ (another corpus, context or val_blocks); "
              "a paired comparison needs the same blocks", file=sys.stderr)
        return 2
    result = {"A_run": a["run"].iloc[0], "B_run": b["run"].iloc[0], **compare(a, b, args.bootstrap)}
    for name in ("A", "B"):
        print(f"{name}: {result[name + '_run']}: bound {result[name + '_bound']:.4f} nats/token = "
              f"NLL {result[name + '_nll']:.4f} + KL {result[name + '_kl']:.4f}")
    for column in ("bound", "nll"):
        print(f"A - B, {column}: {result[column + '_A_minus_B']:+.4f} nats/token, 95% interval "
              f"[{result[column + '_ci_low']:+.4f}, {result[column + '_ci_high']:+.4f}]")
    print(f"(paired bootstrap over {result['blocks']} validation blocks)")
    if args.out:
        pd.DataFrame([result]).to_csv(args.out, index=False)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Two arms of trained runs on the same validation blocks: each arm's bound and their difference A - B.

    python analysis/compare.py A B [--runs-dir runs] [--blocks 64] [--bootstrap 2000] [--out FILE.csv]
    python analysis/compare.py A1,A2,A3 B1,B2,B3 [...]    # one config per side, trained with several seeds
    python analysis/compare.py LTM AR --measure iw --iw-samples 512   # the LTM's likelihood bound against the AR's NLL

Each of A and B is a checkpoint path, run key (its checkpoints under <runs-dir>/checkpoints) or
training run's MLflow id, or several of them separated by commas. Each is read from its own run's
checkpoint folder, and a folder whose run FINISHED at more tokens than its newest usable checkpoint
holds is refused (`ltm.checkpoint.resolve`). A checkpoint file that does not match the sha256 beside it
(.sha256) is refused naming both hashes, and a truncated or unreadable one is named (exit 2);
--no-verify reads them anyway. Each validation block gets each run's measure in nats per token,
chosen by --measure (the output says which it used):

* bound (default): for an LTM the fresh-noise negative ELBO, with the posterior inferred in T steps
  as in training (and its NLL given z and KL), the training objective's number;
* iw: for an LTM the importance-weighted bound at --iw-samples K (default 64), -log (1/K) sum_k
  p(x | z_k) p(z_k) / q(z_k), which tightens towards -log p(x) as K grows: the likelihood estimate
  that is fair to set against an AR's exact NLL (see `python -m ltm.rescore` for whether it still
  moves with K);
* nll: the exact NLL, which only an AR has; an LTM side is refused (its `nll` is the NLL given one
  sample of z, not a likelihood), naming --measure iw.

For an AR all three are the same number, its exact NLL.

One run per side: the differences A - B of the bound and of the NLL are averaged over blocks
(token-weighted), each with a 95 % interval from a paired percentile bootstrap over blocks: the
uncertainty from which validation text was scored, not from training seeds.

Several runs per side (at least 2 on each; the runs of one side may differ only in the top-level
`seed`, and each seed once): each arm's bound, NLL and KL are token-weighted over blocks for each
seed, then averaged over its seeds, and A - B gets three 95 % intervals:

* blocks: the paired percentile bootstrap over blocks as above, of the seed-averaged per-block
  bounds (which text was scored; the trained models held fixed);
* seeds: Welch's t interval for the difference of the arms' means of per-seed bounds (which seeds
  were trained; the blocks held fixed). The seeds of the two arms are independent training runs,
  so they are not paired even when both arms use the same seed values. With 3 seeds per arm the t
  quantile has few degrees of freedom and the interval is wide: a percentile bootstrap over 3
  seeds (10 distinct resamples per arm) would be too coarse to say anything;
* both: a two-level percentile bootstrap; each draw resamples each arm's seeds (with replacement,
  within the arm) and the blocks (the same blocks for both arms) together. Its seed level
  understates the seed spread by the plug-in factor (k - 1) / k, so with few seeds read it beside
  the seed interval rather than instead of it.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from ltm.signals import exit_on_signal  # noqa: E402

exit_on_signal(__name__)  # first: Ctrl-C while torch loads or while scoring exits 3 with a message
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
import torch  # noqa: E402

from ltm.checkpoint import load_model, resolve  # noqa: E402
from ltm.cli import add_verbosity, add_verify_option, configure_logging, log_level  # noqa: E402
from ltm.config import ConfigError, RunConfig  # noqa: E402
from ltm.names import Exit, exit_help  # noqa: E402
from ltm.data import load_blocks  # noqa: E402
from ltm.evaluate import sequence_bounds  # noqa: E402
from ltm.files import atomic_write  # noqa: E402
from ltm.tracking import TrackingUnusable, default_tracking_uri, tracking_uri_option  # noqa: E402
from ltm.objective import EVAL_SEED  # noqa: E402

log = logging.getLogger("analysis.compare")  # by name: run as a command, __name__ is "__main__"

_LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Scored:
    """One run scored on the validation blocks."""

    frame: pd.DataFrame
    """Per block: bound, nll, kl, iw (nats, summed over the block; iw NaN for an LTM scored without
    importance samples, an AR's exact NLL for an AR), tokens; run (its label) and seed."""
    blocks: torch.Tensor
    """The validation blocks scored, (blocks, ctx + 1) token ids."""
    config: RunConfig


def score_run(ref: str, runs_dir: Path, n_blocks: int, batch_size: int = 16,
              tracking_uri: str | None = None, verify: bool = True, iw_samples: int = 0) -> Scored:
    """Each of the first `n_blocks` validation blocks' bound, NLL, KL and (`iw_samples` > 0) IW bound under
    the run `ref` names (its checkpoint's sha256 checked unless `verify` is False)."""
    source = resolve(ref, tracking_uri or default_tracking_uri(runs_dir), runs_dir, verify)
    log.info("%s: %s%s", ref, source.identity.rsplit(":", 1)[0],
             f" (MLflow run {source.run_id})" if source.run_id else "")
    model, cfg = load_model(source.checkpoint, verify=verify)
    model.eval()
    blocks = load_blocks(cfg.data, cfg.model.ctx, "validation")
    n = min(n_blocks, len(blocks))
    tokens = blocks.batch(range(n))
    rows = []
    for i in range(0, n, batch_size):
        part = tokens[i:i + batch_size]
        b = sequence_bounds(model, part, cfg.inference, seeds=[EVAL_SEED + i + j for j in range(len(part))],
                            reuse_score=False, iw_samples=iw_samples)
        iw = b.iw.tolist() if b.iw is not None else ([float("nan")] * len(part) if cfg.model.kind == "ltm" else b.nll)
        rows += [{"bound": e, "nll": nl, "kl": k, "iw": w, "tokens": t} for e, nl, k, w, t in
                 zip(b.elbo.tolist(), b.nll.tolist(), b.kl.tolist(), list(map(float, iw)), b.n_tokens.tolist())]
    latents = f" T={cfg.inference.steps} N_z={cfg.model.n_latents}" if cfg.model.kind == "ltm" else ""
    label = f"{cfg.model.kind}{latents}, window {cfg.model.window}, {cfg.train.tokens:,} tokens"
    return Scored(pd.DataFrame(rows).assign(run=label, seed=cfg.seed), tokens, cfg)


# --------------------------------------------------------------------------- statistics


def compared(measure: str) -> tuple[str, ...]:
    """The columns whose A - B a comparison by `measure` reports: the measure's, then the NLL's."""
    return tuple(dict.fromkeys((measure, "nll")))


def compare(a: pd.DataFrame, b: pd.DataFrame, bootstrap: int, seed: int = 0, measure: str = "bound") -> dict:
    """Token-weighted means (nats/token) of each run's bound, NLL, KL (and `measure`), and the differences
    A - B of `measure` and of the NLL, each with a paired percentile-bootstrap 95 % interval over blocks."""
    tokens = a["tokens"].to_numpy()
    idx = np.random.default_rng(seed).integers(0, len(tokens), size=(bootstrap, len(tokens)))
    out: dict = {"blocks": len(tokens), "measure": measure}
    for name, frame in (("A", a), ("B", b)):
        for column in dict.fromkeys(("bound", "nll", "kl", measure)):
            out[f"{name}_{column}"] = float(frame[column].sum() / tokens.sum())
    for column in compared(measure):
        diff = a[column].to_numpy() - b[column].to_numpy()
        resampled = diff[idx].sum(1) / tokens[idx].sum(1)
        lo, hi = np.percentile(resampled, [2.5, 97.5])
        out.update({f"{column}_A_minus_B": float(diff.sum() / tokens.sum()), f"{column}_ci_low": float(lo),
                    f"{column}_ci_high": float(hi)})
    return out


def t_quantile(p: float, df: float) -> float:
    """The p-quantile of Student's t with `df` (possibly fractional) degrees of freedom."""
    from scipy.stats import t  # scipy is already a dependency (analysis/fit.py's optimiser)

    return float(t.ppf(p, df))


def welch_interval(x: Sequence[float], y: Sequence[float], level: float = _LEVEL) -> tuple[float, float, float]:
    """Welch's t interval for mean(x) - mean(y) from independent samples (>= 2 each): (low, high, df).

    When neither sample varies the interval is the difference itself, and df is NaN."""
    x, y = np.asarray(x, dtype=float), np.asarray(y, dtype=float)
    if len(x) < 2 or len(y) < 2:
        raise ValueError(f"a Welch interval needs at least 2 values per arm, got {len(x)} and {len(y)}")
    diff = float(x.mean() - y.mean())
    va, vb = x.var(ddof=1) / len(x), y.var(ddof=1) / len(y)
    if va + vb == 0:
        return diff, diff, float("nan")
    df = (va + vb) ** 2 / (va ** 2 / (len(x) - 1) + vb ** 2 / (len(y) - 1))  # Welch-Satterthwaite
    half = t_quantile(0.5 + level / 2, df) * np.sqrt(va + vb)
    return diff - half, diff + half, float(df)


def two_level_interval(a: np.ndarray, b: np.ndarray, tokens: np.ndarray, bootstrap: int,
                       rng: np.random.Generator, level: float = _LEVEL) -> tuple[float, float]:
    """Percentile interval of the token-weighted A - B when each draw resamples each arm's seeds (rows of
    `a`, `b`: seeds x blocks, nats per block) within the arm and the blocks, paired across arms."""
    (ka, n), kb = a.shape, len(b)
    wa = rng.multinomial(ka, np.full(ka, 1 / ka), size=bootstrap) / ka  # (draws, seeds): resampled seed weights
    wb = rng.multinomial(kb, np.full(kb, 1 / kb), size=bootstrap) / kb
    blocks = rng.integers(0, n, size=(bootstrap, n))
    diff = wa @ a - wb @ b  # (draws, blocks): each draw's seed-averaged per-block difference
    resampled = np.take_along_axis(diff, blocks, 1).sum(1) / tokens[blocks].sum(1)
    lo, hi = np.percentile(resampled, [50 - 50 * level, 50 + 50 * level])
    return float(lo), float(hi)


def _seed_average(frames: Sequence[pd.DataFrame]) -> pd.DataFrame:
    """Per block: the bound, NLL, KL and IW bound averaged over the runs, and the (common) token counts."""
    columns = [c for c in ("bound", "nll", "kl", "iw") if c in frames[0]]
    mean = sum(f[columns].to_numpy() for f in frames) / len(frames)
    return pd.DataFrame(mean, columns=columns).assign(tokens=frames[0]["tokens"].to_numpy())


def _per_seed(frames: Sequence[pd.DataFrame], column: str) -> np.ndarray:
    """Each run's token-weighted mean of `column` (nats/token)."""
    return np.array([f[column].sum() / f["tokens"].sum() for f in frames])


def compare_seeds(a: Sequence[pd.DataFrame], b: Sequence[pd.DataFrame], bootstrap: int,
                  seed: int = 0, measure: str = "bound") -> dict[str, float | int | str]:
    """`compare` for arms of several training seeds each (per-block frames as `score_run` makes): each
    arm's means over its seeds, A - B with block, seed (Welch t) and two-level bootstrap 95 % intervals."""
    tokens = a[0]["tokens"].to_numpy()
    if any(not np.array_equal(f["tokens"].to_numpy(), tokens) for f in [*a, *b]):
        raise ValueError("the runs were not scored on the same blocks (their token counts differ)")
    out: dict = compare(_seed_average(a), _seed_average(b), bootstrap, seed, measure)
    for name, frames in (("A", a), ("B", b)):
        labels = [f["seed"].iloc[0] if "seed" in f else i for i, f in enumerate(frames)]
        out[f"{name}_seeds"] = len(frames)
        out[f"{name}_seed_bounds"] = ";".join(f"{s}={v:.6f}" for s, v in zip(labels, _per_seed(frames, measure)))
    rng = np.random.default_rng([seed, 1])
    for column in compared(measure):
        lo, hi, df = welch_interval(_per_seed(a, column), _per_seed(b, column))
        out.update({f"{column}_seed_ci_low": lo, f"{column}_seed_ci_high": hi, f"{column}_seed_df": df})
        stacked = [np.stack([f[column].to_numpy() for f in frames]) for frames in (a, b)]
        lo, hi = two_level_interval(*stacked, tokens, bootstrap, rng)
        out.update({f"{column}_both_ci_low": lo, f"{column}_both_ci_high": hi})
    return out


# --------------------------------------------------------------------------- command line


def _refs(text: str) -> list[str]:
    """A side's refs: comma-separated, unless the whole text names an existing path."""
    return [text] if Path(text).expanduser().exists() else [r.strip() for r in text.split(",") if r.strip()]


def _seedless(cfg: RunConfig) -> dict[str, object]:
    """The run's identity (`RunConfig.identity`) as dotted keys, without the seed."""
    flat: dict[str, object] = {}
    for section, values in cfg.identity().items():
        if isinstance(values, dict):
            flat.update({f"{section}.{k}": v for k, v in values.items()})
        elif section != "seed":
            flat[section] = values
    return flat


def side_problem(name: str, refs: Sequence[str], configs: Sequence[RunConfig]) -> str | None:
    """Why the runs of one side are not one config trained with different seeds, or None."""
    first = _seedless(configs[0])
    for ref, cfg in zip(refs[1:], configs[1:]):
        other = _seedless(cfg)
        diff = [f"{k}={other.get(k)!r} where {refs[0]} has {first.get(k)!r}" for k in sorted(set(first) | set(other))
                if first.get(k) != other.get(k)]
        if diff:
            return (f"{name}'s runs differ in more than the seed: {ref} has {', '.join(diff)}; the runs of one side "
                    f"must be one config trained with different `seed`s (compare configs as A against B instead)")
    seeds = [cfg.seed for cfg in configs]
    for i, s in enumerate(seeds):
        if s in seeds[:i]:
            return (f"{name}'s runs {refs[seeds.index(s)]} and {refs[i]} both have seed {s}: a seed interval "
                    f"needs each training seed once; pass one of them")
    return None


def blocks_problem(refs: Sequence[str], blocks: Sequence[torch.Tensor]) -> str | None:
    """Why the runs were not all scored on the same validation blocks, or None."""
    for ref, other in zip(refs[1:], blocks[1:]):
        if other.shape != blocks[0].shape or not torch.equal(other, blocks[0]):
            runs = "the two runs'" if len(refs) == 2 else f"{refs[0]}'s and {ref}'s"
            return (f"{runs} validation blocks differ (another corpus, context or val_blocks); "
                    "a paired comparison needs the same blocks")
    return None


_MEASURE_TEXT = {"bound": "negative ELBO (the training objective's bound)",
                 "iw": "importance-weighted bound at K = {k}",
                 "nll": "exact NLL (which it lacks)"}


def measure_line(measure: str, iw_samples: int) -> str:
    """Which measure the comparison used, in words (printed first)."""
    return (f"measure: {measure}: an LTM's {_MEASURE_TEXT[measure].format(k=iw_samples)}, an AR's exact NLL "
            "(for an AR the bound, the IW bound and the NLL are all its exact NLL)")


def measure_problem(measure: str, iw_samples: int, sides: dict[str, list[RunConfig]]) -> str | None:
    """Why a side lacks `measure` (naming what to run instead), or None."""
    for name, configs in sides.items():
        if configs[0].model.kind != "ltm":
            continue
        if measure == "nll":
            return (f"{name} is an LTM, which has no exact NLL (its val/nll is the NLL given one sample of z, not a "
                    "likelihood): compare its likelihood bound with --measure iw --iw-samples K (val/ppl_iw, which "
                    "training logs when train.iw_samples > 0; `python -m ltm.rescore` scores it at several K)")
        if measure == "iw" and iw_samples < 1:
            return (f"{name} is an LTM and --iw-samples is {iw_samples}: its IW bound (val/ppl_iw) needs K >= 1 "
                    "importance samples; pass --iw-samples K (e.g. 64)")
    return None


def _measured(result: dict, name: str) -> str:
    """`name`'s measure, and what its bound is made of, for the printed lines."""
    measure = result["measure"]
    extra = f"{measure} {result[f'{name}_{measure}']:.4f}, " if measure not in ("bound", "nll") else ""
    return (f"{extra}bound {result[name + '_bound']:.4f} nats/token = NLL {result[name + '_nll']:.4f} + KL "
            f"{result[name + '_kl']:.4f}")


def _print_single(result: dict) -> None:
    """The command's answer, on stdout (the CLI's own output: the library functions above print nothing)."""
    for name in ("A", "B"):
        print(f"{name}: {result[name + '_run']}: {_measured(result, name)}")
    for column in compared(result["measure"]):
        print(f"A - B, {column}: {result[column + '_A_minus_B']:+.4f} nats/token, 95% interval "
              f"[{result[column + '_ci_low']:+.4f}, {result[column + '_ci_high']:+.4f}]")
    print(f"(paired bootstrap over {result['blocks']} validation blocks)")


def _print_seeds(result: dict, bootstrap: int) -> None:
    """The command's answer for seeded arms, on stdout."""
    for name in ("A", "B"):
        pairs = (p.split("=") for p in result[name + "_seed_bounds"].split(";"))
        per_seed = ", ".join(f"seed {s}: {float(v):.4f}" for s, v in pairs)
        print(f"{name}: {result[name + '_run']}, mean of {result[name + '_seeds']} seeds: "
              f"{_measured(result, name)} ({result['measure']} per seed: {per_seed})")
    for c in compared(result["measure"]):
        print(f"A - B, {c}: {result[c + '_A_minus_B']:+.4f} nats/token, 95% intervals: over blocks "
              f"[{result[c + '_ci_low']:+.4f}, {result[c + '_ci_high']:+.4f}], over seeds "
              f"[{result[c + '_seed_ci_low']:+.4f}, {result[c + '_seed_ci_high']:+.4f}] "
              f"(Welch t, df {result[c + '_seed_df']:.1f}), both [{result[c + '_both_ci_low']:+.4f}, "
              f"{result[c + '_both_ci_high']:+.4f}]")
    print(f"(over blocks: paired bootstrap over {result['blocks']} validation blocks of the seed-averaged values; "
          f"over seeds: Welch t interval on the {result['A_seeds']} + {result['B_seeds']} seeds' means, "
          f"seeds independent across arms; both: {bootstrap} bootstrap draws resampling each arm's seeds and the "
          f"blocks, paired across arms, together)")


def _parser() -> argparse.ArgumentParser:
    epilog = exit_help("compared", "an error (its message says why)", "never (compare takes no lock)")
    parser = argparse.ArgumentParser(prog="python analysis/compare.py", description=__doc__,
                                     epilog=textwrap.fill(epilog, 100),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    for side in ("a", "b"):
        parser.add_argument(side, help="run key, checkpoint path or MLflow run id; several, comma-separated: "
                                       "one config trained with different seeds")
    parser.add_argument("--runs-dir", default="runs")
    parser.add_argument("--tracking-uri", help="the store that knows the runs (default sqlite:///<runs-dir>/mlflow.db)")
    parser.add_argument("--blocks", type=int, default=64, help="validation blocks scored (default 64)")
    parser.add_argument("--bootstrap", type=int, default=2000)
    parser.add_argument("--measure", choices=("bound", "iw", "nll"), default="bound",
                        help="what to compare (default bound): an LTM's negative ELBO, its IW bound at --iw-samples, "
                             "or the exact NLL (AR only); for an AR all three are its exact NLL")
    parser.add_argument("--iw-samples", type=int, default=64, help="K for --measure iw (default 64)")
    parser.add_argument("--out", help="also write the result as a one-row CSV")
    add_verify_option(parser, "read")
    add_verbosity(parser)
    return parser


def _score_sides(args: argparse.Namespace, sides: dict[str, list[str]]) -> tuple[dict, str | None]:
    """Every run scored, by side; and why they cannot be compared (None when they can)."""
    runs_dir = Path(args.runs_dir).resolve()
    uri, verify = tracking_uri_option(args.tracking_uri, runs_dir), not args.no_verify
    configs = {name: [RunConfig.from_dict(resolve(r, uri, runs_dir, verify).config) for r in refs]
               for name, refs in sides.items()}  # from the checkpoints' configs, before any scoring
    for name, refs in sides.items():
        problem = side_problem(name, refs, configs[name]) if len(refs) > 1 else None
        if problem:
            return {}, problem
    problem = measure_problem(args.measure, args.iw_samples, configs)
    if problem:
        return {}, problem
    k = args.iw_samples if args.measure == "iw" else 0
    scored = {name: [score_run(ref, runs_dir, args.blocks, tracking_uri=uri, verify=verify, iw_samples=k)
                     for ref in refs] for name, refs in sides.items()}
    runs = scored["A"] + scored["B"]
    return scored, blocks_problem(sides["A"] + sides["B"], [s.blocks for s in runs])


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    configure_logging(log_level(args))
    if args.blocks < 2 or args.bootstrap < 1:
        parser.error("--blocks must be >= 2 and --bootstrap >= 1")
    sides = {"A": _refs(args.a), "B": _refs(args.b)}
    if len(sides["A"]) != len(sides["B"]) and min(len(sides["A"]), len(sides["B"])) == 1:
        one = "A" if len(sides["A"]) == 1 else "B"
        print(f"error: A has {len(sides['A'])} runs and B {len(sides['B'])}: an interval over training seeds needs "
              f"at least 2 seeds on each side; give {one} its other seeds (comma-separated) or compare one run "
              "per side", file=sys.stderr)
        return Exit.USAGE
    try:
        scored, problem = _score_sides(args, sides)
    except (ConfigError, FileNotFoundError, ValueError, TrackingUnusable) as err:
        print(f"error: {err}", file=sys.stderr)
        return Exit.USAGE
    if problem:
        print(f"error: {problem}", file=sys.stderr)
        return Exit.USAGE
    a, b = ([s.frame for s in scored[name]] for name in ("A", "B"))
    labels = {"A_run": a[0]["run"].iloc[0], "B_run": b[0]["run"].iloc[0]}
    print(measure_line(args.measure, args.iw_samples))
    if len(a) == 1:
        result = {**labels, **compare(a[0], b[0], args.bootstrap, measure=args.measure)}
        _print_single(result)
    else:
        result = {**labels, **compare_seeds(a, b, args.bootstrap, measure=args.measure)}
        _print_seeds(result, args.bootstrap)
    if args.out:
        atomic_write(args.out, pd.DataFrame([result]).to_csv(index=False))  # whole or not at all, even on Ctrl-C
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())

"""The KL floor: what the inner loop's KL(q || p) costs when z carries nothing (docs/METHOD.md section 7).

With a decoder that ignores z the NLL has no gradient with respect to (mu, logvar), so the inner
loop is AdamW on the KL term alone. That problem separates into independent scalar problems, one
per latent dimension, each a deterministic function of its initial (mu, logvar). Starting from
logvar = -5, AdamW lifts logvar by at most the sum of the inner learning rates, so at small T a
large part of the KL is this floor, not information about the sequence.

`kl_floor(cfg, n_latents, d_model)` is its expectation over the initialisation, per sequence;
`start_kl_floor(model, cfg)` follows the start the model uses (`inference.start`).
Printed as a table (per dimension, and in nats/token for the micro, micro-rf and LTM-L shapes):

    python -m ltm.kl_floor [--steps 1,4,16,32,64,128] [--init-logvar -5]
"""

# ruff: noqa: E402 (the signal handler goes in before the imports, which load torch)
from __future__ import annotations

from ltm.signals import exit_on_signal

exit_on_signal(__name__)  # run as a command: Ctrl-C exits 3 with a message, not a traceback
import argparse
import dataclasses
import functools
import sys

import torch

from ltm.cli import add_verbosity, configure_logging, log_level
from ltm.config import InferenceConfig, model_preset
from ltm.model import LatentThoughtModel
from ltm.names import Exit, exit_help
from ltm.posterior import adamw_step

_QUANTILES = 4096
"""Initial values per parameter: midpoint quantiles of the initial normal. The per-dimension KL is
not smooth in the initial mu (Adam's first step is lr * sign(grad)), so an even grid of quantiles
is used rather than Gauss-Hermite nodes; its error is far below 0.1 %."""


def _floor_per_dim(cfg: InferenceConfig, mu0: torch.Tensor, logvar0: torch.Tensor) -> torch.Tensor:
    """Expected KL(q || N(0, 1)) after the inner loop with a z-blind decoder, of each latent dimension
    whose start is drawn around the centre (mu0, logvar0) (tensors of one shape; the result has it too)."""
    probs = (torch.arange(_QUANTILES, dtype=torch.float64) + 0.5) / _QUANTILES
    standard = torch.distributions.Normal(0.0, 1.0).icdf(probs)
    mu = mu0.double()[..., None] + cfg.init_mu_std * standard
    if cfg.fixed_variance:
        logvar = logvar0.double()[..., None].expand_as(mu).clone()
        params = [mu]
    else:
        logvar = logvar0.double()[..., None] + cfg.init_logvar_std * standard
        params = [mu, logvar]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    beta1, beta2 = cfg.betas
    for step in range(cfg.steps):
        # d KL / d mu = mu and d KL / d logvar = (exp(logvar) - 1) / 2, the gradients the loop sees
        grads = [mu.clone(), 0.5 * (logvar.exp() - 1)][:len(params)]
        adamw_step(params, grads, exp_avg, exp_avg_sq, step + 1, cfg.lr(step), beta1, beta2, cfg.eps,
                   cfg.weight_decay)
    # mu and logvar are independent given the loop, so the expectation of the sum is the sum of the
    # two one-dimensional expectations: average each over its own quantile grid.
    return 0.5 * mu.square().mean(-1) + 0.5 * (logvar.exp() - 1 - logvar).mean(-1)


@functools.lru_cache(maxsize=64)  # a function of the config alone: every evaluation of a run reuses it
def kl_floor_per_dim(cfg: InferenceConfig) -> float:
    """Expected KL(q || N(0, 1)) of one latent dimension after the inner loop with a z-blind decoder,
    from the fixed start (mu 0, logvar init_logvar)."""
    return float(_floor_per_dim(cfg, torch.tensor(0.0), torch.tensor(cfg.init_logvar)))


def kl_floor(cfg: InferenceConfig, n_latents: int, d_model: int) -> float:
    """Expected KL per sequence (nats) that the inner loop ends at when z carries no information:
    the same AdamW, schedule, weight decay and initialisation, with the NLL's gradient zero."""
    if n_latents < 1 or d_model < 1:
        raise ValueError(f"need n_latents >= 1 and d_model >= 1, got {n_latents} and {d_model}")
    return kl_floor_per_dim(cfg) * n_latents * d_model


def start_kl_floor(model: LatentThoughtModel, cfg: InferenceConfig) -> float | None:
    """The KL floor per sequence of the model's own start: the fixed start's (`kl_floor`), or the
    learned start's from its trained centre, dimension by dimension. None for start="encoder": a start
    that depends on x has no floor of its own (when z carries nothing, the encoder, trained on its
    ELBO, can predict the prior itself), so its information is read from the lower bound `z_info_lb` instead."""
    if cfg.start == "encoder":
        return None
    if cfg.start == "learned":
        return float(_floor_per_dim(cfg, model.start.mu.detach(), model.start.logvar.detach()).sum())
    return kl_floor(cfg, model.cfg.n_latents, model.cfg.d_model)


def _table(steps: list[int], init_logvar: float) -> str:
    shapes = {"micro (N_z=8, d=128, ctx 128)": model_preset("micro"),
              "micro-rf (N_z=4, d=64, ctx 128)": model_preset("micro-rf"),
              "LTM-L (N_z=24, d=512, ctx 1024)": model_preset("ltm-l")}
    head = ["T", "KL floor per dim (nats)"] + [f"{name}: nats/token" for name in shapes]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for t in steps:
        cfg = dataclasses.replace(InferenceConfig(), steps=t, init_logvar=init_logvar)
        per_dim = kl_floor_per_dim(cfg)
        cells = [str(t), f"{per_dim:.3f}"] + [f"{per_dim * m.n_latents * m.d_model / m.ctx:.2f}"
                                               for m in shapes.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ltm.kl_floor", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=exit_help("printed", "an error (its message says why)",
                                                      "never (it reads and writes no run)"))
    parser.add_argument("--steps", default="1,4,16,32,64,128", help="inference steps T, comma-separated")
    parser.add_argument("--init-logvar", type=float, default=InferenceConfig().init_logvar,
                        help="the fixed start's log-variance (inference.init_logvar; the paper's -5)")
    add_verbosity(parser)
    args = parser.parse_args(argv)
    configure_logging(log_level(args))
    try:
        steps = [int(s) for s in args.steps.split(",")]
    except ValueError:
        parser.error(f"--steps takes integers separated by commas, e.g. 1,4,16; got {args.steps!r}")
    print(_table(steps, args.init_logvar))
    return Exit.OK


if __name__ == "__main__":
    sys.exit(main())

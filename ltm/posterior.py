"""Fast learning: per-sequence variational inference of the latent thoughts z (docs/METHOD.md section 3).

Each sequence gets its own Gaussian q(z) = N(mu, diag(exp(logvar))), fitted from scratch by
T steps of AdamW on the sum-reduced objective  NLL(x | z) + KL(q || N(0, I)),  z = mu + eps * sigma.
Sum reduction plus element-wise Adam make every sequence's update independent of the batch;
per-sequence noise generators make its random draws independent of the batch too.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from ltm.config import InferenceConfig
from ltm.model import LatentThoughtModel, Stem, token_nll


@dataclass
class Posterior:
    """The fitted q(z) of each sequence in a batch."""

    mu: torch.Tensor
    """(B, n_latents, d_model)"""
    logvar: torch.Tensor
    """(B, n_latents, d_model)"""
    z: torch.Tensor
    """The z_T the decoder is trained and decodes with: a sample from q (mu if fixed variance)."""
    eps: torch.Tensor
    """The noise z was drawn with: the one draw of the call when reuse_noise (which the released
    code's scoring reuses), otherwise a fresh draw."""
    trace: torch.Tensor
    """(steps, B): each sequence's objective NLL + KL in nats at each inner step."""
    start_mu: torch.Tensor | None = None
    start_logvar: torch.Tensor | None = None
    """Where the loop started, for a trained start (`inference.start`): attached to the start's
    parameters when the call ran with gradients enabled, so that `start_bound` can train them."""
    start_eps: torch.Tensor | None = None
    """The noise `start_bound` scores the start at (fresh, from the sequence's own stream)."""
    stem: Stem | None = None
    """The decoder's z-independent stem of the inputs, when the loop computed it (decoder_grad="final")."""

    def kl(self) -> torch.Tensor:
        """KL(q || N(0, I)) per sequence, shape (B,)."""
        return gaussian_kl(self.mu, self.logvar)


def gaussian_kl(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, exp(logvar)) || N(0, I)) summed over all but the batch dimension."""
    return 0.5 * (mu.square() + logvar.exp() - 1.0 - logvar).flatten(1).sum(1)


class NoiseSource:
    """Independent standard-normal draws per sequence, reproducible from per-sequence seeds,
    so a sequence's draws do not depend on what else is in the batch."""

    def __init__(self, seeds: Sequence[int] | torch.Tensor, shape: tuple[int, ...], device: torch.device) -> None:
        seeds = [int(s) for s in seeds]
        self.shape, self.device = shape, device
        self.generators = [torch.Generator(device=device).manual_seed(s) for s in seeds]

    def draw(self) -> torch.Tensor:
        """One (B, *shape) draw."""
        return torch.stack([torch.randn(self.shape, generator=g, device=self.device) for g in self.generators])


def draw_seeds(batch: int, generator: torch.Generator | None = None) -> list[int]:
    """Per-sequence seeds from `generator` (or torch's global RNG)."""
    return torch.randint(0, 2**62, (batch,), generator=generator).tolist()


def infer_posterior(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig, *,
                    seeds: Sequence[int] | torch.Tensor | None = None,
                    loss_mask: torch.Tensor | None = None, compiled: bool = False) -> Posterior:
    """Fit q(z) for each sequence of `tokens` (B, L) by cfg.steps steps of AdamW.

    The objective scores tokens[:, 1:] given tokens[:, :-1]; `loss_mask` (B, L-1), if given,
    selects which of those predictions count (e.g. to ignore padding). `seeds` fix each
    sequence's noise; by default they are drawn from torch's global RNG. With
    decoder_grad="final" the decoder's parameters are frozen for the loop, so its backward computes
    the gradients of mu and logvar only (eager or `compiled` with torch.compile alike) and .grad is
    left untouched; "trajectory" accumulates every step's gradient into it, as the released code
    does (always eager: it needs the weight gradients).
    """
    B = tokens.shape[0]
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    noise = NoiseSource(_checked_seeds(model, tokens, seeds), (model.cfg.n_latents, model.cfg.d_model), tokens.device)
    trajectory = cfg.decoder_grad == "trajectory"

    start_mu, start_logvar = _start(model, tokens, cfg, noise)
    mu = start_mu.detach().clone().requires_grad_()
    if cfg.fixed_variance:
        logvar = start_logvar
        params = [mu]
    else:
        logvar = start_logvar.detach().clone().requires_grad_()
        params = [mu, logvar]
    exp_avg = [torch.zeros_like(p) for p in params]
    exp_avg_sq = [torch.zeros_like(p) for p in params]
    eps = noise.draw() if cfg.reuse_noise else None
    beta1, beta2 = cfg.betas
    trace = []

    with torch.enable_grad(), contextlib.nullcontext() if trajectory else frozen(model):
        # The stem does not depend on z: compute it once, outside the graph. The trajectory
        # mode needs the decoder's full graph at every step, so it recomputes it.
        stem = None if trajectory or not cfg.steps else _no_grad_stem(model, inputs)
        objective_of = _compiled_objective if compiled and not trajectory else _objective
        for step in range(cfg.steps):
            if not cfg.reuse_noise:
                eps = noise.draw()
            if trajectory:
                objective, grads = _trajectory_step(model, inputs, targets, loss_mask, mu, logvar, eps, params)
            else:
                objective = objective_of(model, stem, mu, logvar, eps, targets, loss_mask)
                grads = torch.autograd.grad(objective.sum(), params)
            trace.append(objective.detach())
            adamw_step(params, grads, exp_avg, exp_avg_sq, step + 1, cfg.lr(step), beta1, beta2,
                        cfg.eps, cfg.weight_decay)

    mu, logvar = mu.detach(), logvar.detach()
    if not cfg.reuse_noise:
        eps = noise.draw()  # z_T is a fresh sample of the final q
    z = mu if cfg.fixed_variance else mu + eps * (0.5 * logvar).exp()
    trace = torch.stack(trace) if trace else torch.zeros(0, B, device=tokens.device)
    post = Posterior(mu=mu, logvar=logvar, z=z, eps=eps, trace=trace, stem=stem)
    if getattr(model, "start", None) is not None:  # a trained start (a duck-typed decoder may have none)
        post.start_mu, post.start_logvar, post.start_eps = start_mu, start_logvar, noise.draw()
    return post


def _checked_seeds(model: LatentThoughtModel, tokens: torch.Tensor,
                   seeds: Sequence[int] | torch.Tensor | None) -> Sequence[int] | torch.Tensor:
    if model.cfg.kind != "ltm":
        raise ValueError("infer_posterior needs an LTM (model.kind='ltm'); an AR model has no latents")
    if tokens.dim() != 2 or tokens.shape[1] < 2:
        raise ValueError(f"tokens must be (batch, length >= 2), got shape {tuple(tokens.shape)}")
    seeds = draw_seeds(tokens.shape[0]) if seeds is None else seeds
    if len(seeds) != tokens.shape[0]:
        raise ValueError(f"need one seed per sequence: {len(seeds)} seeds for a batch of {tokens.shape[0]}")
    return seeds


def _trajectory_step(model: LatentThoughtModel, inputs: torch.Tensor, targets: torch.Tensor,
                     loss_mask: torch.Tensor | None, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor,
                     params: list[torch.Tensor]) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The released code's inner step: a full backward, whose weight gradients accumulate in the decoder's .grad."""
    z = mu + eps * (0.5 * logvar).exp()
    objective = _masked_sum(token_nll(model(inputs, z), targets), loss_mask) + gaussian_kl(mu, logvar)
    objective.sum().backward()
    grads = [p.grad for p in params]
    for p in params:
        p.grad = None
    return objective, grads


def _start(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig,
           noise: NoiseSource) -> tuple[torch.Tensor, torch.Tensor]:
    """Each sequence's starting (mu, logvar) (`ltm.start`); the fixed and learned starts draw from
    `noise` in the same order (mu first), so a learned start at its initial value is the fixed start."""
    if cfg.start == "encoder":  # float32 under bf16 autocast too: the loop's AdamW state follows these dtypes
        mu0, logvar0 = model.start(tokens, model.embed)
        return mu0.float(), logvar0.float()
    if cfg.start == "learned":
        mu0, logvar0 = model.start(tokens, model.embed)
    else:
        shape = (tokens.shape[0], model.cfg.n_latents, model.cfg.d_model)
        mu0 = torch.zeros(shape, device=tokens.device)
        logvar0 = torch.full(shape, cfg.init_logvar, device=tokens.device)
    mu = mu0 + cfg.init_mu_std * noise.draw()
    if cfg.fixed_variance:
        return mu, logvar0
    return mu, logvar0 + cfg.init_logvar_std * noise.draw()


def start_bound(model: LatentThoughtModel, tokens: torch.Tensor, post: Posterior,
                loss_mask: torch.Tensor | None = None, kl_weight: float = 1.0) -> torch.Tensor:
    """Each sequence's negative ELBO at its trained start, NLL(x | z_0) + KL(q_0 || p) with
    z_0 = start_mu + start_eps * sigma_0, shape (B,); `kl_weight` < 1 only while the KL is annealed
    in training (`inference.start_kl_warmup`). The decoder is frozen for it: its backward reaches
    the start's parameters only (the training signal of `inference.start`; Kim et al. 2018). At
    evaluation it is the T = 0 bound that the amortisation gap is measured from."""
    if post.start_mu is None:
        raise ValueError("start_bound needs a posterior of a trained start (inference.start=learned or encoder)")
    inputs, targets = tokens[:, :-1], tokens[:, 1:]
    stem = post.stem if post.stem is not None else _no_grad_stem(model, inputs)
    z0 = post.start_mu + post.start_eps * (0.5 * post.start_logvar).exp()
    with frozen(model):
        nll = _masked_sum(token_nll(model.forward_from_stem(stem, z0), targets), loss_mask)
    return nll + kl_weight * gaussian_kl(post.start_mu, post.start_logvar)


def _objective(model: LatentThoughtModel, stem: Stem, mu: torch.Tensor, logvar: torch.Tensor, eps: torch.Tensor,
               targets: torch.Tensor, loss_mask: torch.Tensor | None) -> torch.Tensor:
    """Each sequence's NLL(x | z) + KL at z = mu + eps * sigma, from the stem on."""
    z = mu + eps * (0.5 * logvar).exp()
    nll = _masked_sum(token_nll(model.forward_from_stem(stem, z), targets), loss_mask)
    return nll + gaussian_kl(mu, logvar)


# One graph per shape (fixed shapes: no recompilation per batch). The decoder is frozen while it
# runs, so the compiled backward computes the gradients of mu and logvar and no weight gradient.
_compiled_objective = torch.compile(_objective, dynamic=False)


@contextlib.contextmanager
def frozen(model: torch.nn.Module) -> Iterator[None]:
    """The model's parameters with requires_grad=False for the block: a backward through it then
    computes input gradients only (eager autograd and torch.compile's graphs alike)."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


def _no_grad_stem(model: LatentThoughtModel, inputs: torch.Tensor):
    with torch.no_grad():
        return model.stem(inputs)


def _masked_sum(nll: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return (nll if mask is None else nll * mask).sum(1)


@torch.no_grad()
def adamw_step(params: list[torch.Tensor], grads: Sequence[torch.Tensor], exp_avg: list[torch.Tensor],
               exp_avg_sq: list[torch.Tensor], step: int, lr: float, beta1: float, beta2: float, eps: float,
               weight_decay: float) -> None:
    """One in-place AdamW update of `params` (step counts from 1): exactly torch.optim.AdamW's
    (decoupled decay, bias-corrected moments), written out so the lr can change every step
    without optimiser objects in the hot loop. The KL floor (`ltm.kl_floor`) runs the same update."""
    bias1, bias2_sqrt = 1 - beta1**step, (1 - beta2**step) ** 0.5
    for p, g, m, v in zip(params, grads, exp_avg, exp_avg_sq):
        p.mul_(1 - lr * weight_decay)
        m.lerp_(g, 1 - beta1)
        v.mul_(beta2).addcmul_(g, g, value=1 - beta2)
        p.addcdiv_(m, v.sqrt().div_(bias2_sqrt).add_(eps), value=-lr / bias1)

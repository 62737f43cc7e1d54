"""Honest scoring: upper bounds on -log p(x) and the perplexities they imply (METHOD.md section 4).

For an LTM the posterior is fitted on each evaluated sequence (T steps, as in training), then

* ELBO bound   NLL(x | z) + KL(q || p), z drawn with FRESH noise (default), an unbiased
  single-sample estimate of the negative ELBO;
* IW bound     -log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k), K fresh samples from q (tighter as K grows);
* reuse score  the released code's number: z drawn with the noise of the last inner step, which
  the optimiser could exploit, so it is optimistic. Reported, named, never the default.

Perplexity is token-weighted, exp(sum of bounds / tokens); the released code's mean over sequences
of exp(bound / length) is reported as `*_seqmean`. An AR model's "bound" is its exact NLL.

Evaluation never touches training state: the inference loop runs with decoder_grad="final" (no
decoder .grad), its noise comes from its own seeded generators (torch's global RNG untouched),
and no optimiser is involved.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import torch

from ltm.config import InferenceConfig
from ltm.model import LatentThoughtModel, token_nll
from ltm.posterior import NoiseSource, infer_posterior

# Seed offsets keep the scoring noise independent of the inference noise of the same sequence.
_SCORE_STREAM, _IW_STREAM = 1_000_003, 2_000_029


@dataclass
class SequenceBounds:
    """Per-sequence results, each of shape (B,), in nats."""

    nll: torch.Tensor
    """-log p(x | z) at one fresh-noise sample of q (exact NLL for AR)."""
    kl: torch.Tensor
    """KL(q || p) (zero for AR)."""
    n_tokens: torch.Tensor
    """Predicted tokens per sequence."""
    nll_reuse: torch.Tensor | None = None
    """-log p(x | z) at the last inner step's noise (released-code scoring)."""
    iw: torch.Tensor | None = None
    """K-sample importance-weighted bound on -log p(x)."""

    @property
    def elbo(self) -> torch.Tensor:
        """The negative-ELBO bound NLL + KL per sequence."""
        return self.nll + self.kl


def sequence_bounds(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig, *,
                    seeds: Sequence[int], iw_samples: int = 0,
                    loss_mask: torch.Tensor | None = None) -> SequenceBounds:
    """Bounds on -log p(tokens[:, 1:] | tokens[:, 0]) for each sequence of a batch."""
    if iw_samples < 0:
        raise ValueError(f"iw_samples must be >= 0, got {iw_samples}")
    targets = tokens[:, 1:]
    n_tokens = (torch.full((tokens.shape[0],), targets.shape[1], device=tokens.device, dtype=torch.float32)
                if loss_mask is None else loss_mask.float().sum(1))

    def nll_of(z: torch.Tensor | None, stem=None) -> torch.Tensor:
        logits = model(tokens[:, :-1], z) if stem is None else model.forward_from_stem(stem, z)
        per_token = token_nll(logits, targets)
        return (per_token if loss_mask is None else per_token * loss_mask).sum(1)

    if model.cfg.kind == "ar":
        with torch.no_grad():
            nll = nll_of(None)
        zero = torch.zeros_like(nll)
        return SequenceBounds(nll=nll, kl=zero, n_tokens=n_tokens, nll_reuse=nll,
                              iw=nll if iw_samples else None)

    post = infer_posterior(model, tokens, dataclasses.replace(cfg, decoder_grad="final"),
                           seeds=seeds, loss_mask=loss_mask)
    sigma = (0.5 * post.logvar).exp()
    with torch.no_grad():
        stem = model.stem(tokens[:, :-1])
        fresh = NoiseSource([s + _SCORE_STREAM for s in seeds], tuple(post.mu.shape[1:]), tokens.device)
        nll = nll_of(post.mu + fresh.draw() * sigma, stem)
        nll_reuse = nll_of(post.mu + post.eps * sigma, stem)
        iw = None
        if iw_samples:
            draws = NoiseSource([s + _IW_STREAM for s in seeds], tuple(post.mu.shape[1:]), tokens.device)
            log_w = []
            for _ in range(iw_samples):
                eps = draws.draw()
                z = post.mu + eps * sigma
                # log p(z) - log q(z): the 2*pi terms cancel; z = mu + sigma * eps.
                log_ratio = (-0.5 * z.square() + 0.5 * eps.square() + 0.5 * post.logvar).flatten(1).sum(1)
                log_w.append(log_ratio - nll_of(z, stem))
            iw = -(torch.logsumexp(torch.stack(log_w), dim=0) - math.log(iw_samples))
    return SequenceBounds(nll=nll, kl=post.kl(), n_tokens=n_tokens, nll_reuse=nll_reuse, iw=iw)


def perplexity(bound: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """Token-weighted perplexity exp(sum of bounds / sum of tokens)."""
    return math.exp(bound.sum().item() / n_tokens.sum().item())


def perplexity_seqmean(bound: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """The released code's variant: mean over sequences of exp(bound / length)."""
    return (bound / n_tokens).exp().mean().item()


def evaluate_bounds(model: LatentThoughtModel, batches: Iterable[torch.Tensor], cfg: InferenceConfig, *,
                    seed: int = 0, iw_samples: int = 0, prefix: str = "val") -> dict[str, float]:
    """Bounds over a fixed evaluation set, as metrics named `{prefix}/...`.

    Keys: nll and kl (nats per token), ppl_bound (fresh-noise ELBO), ppl_bound_seqmean,
    ppl_reuse (released-code scoring, optimistic), ppl_iw (when iw_samples > 0).
    Sequence i of the whole set always gets seed `seed + i`, so results do not depend on batching.
    """
    parts: list[SequenceBounds] = []
    offset = 0
    for batch in batches:
        seeds = [seed + offset + i for i in range(batch.shape[0])]
        offset += batch.shape[0]
        parts.append(sequence_bounds(model, batch, cfg, seeds=seeds, iw_samples=iw_samples))
    if not parts:
        raise ValueError("evaluate_bounds got no batches to evaluate")

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts]).double()

    n = cat("n_tokens")
    nll, kl = cat("nll"), cat("kl")
    metrics = {
        f"{prefix}/nll": nll.sum().item() / n.sum().item(),
        f"{prefix}/kl": kl.sum().item() / n.sum().item(),
        f"{prefix}/ppl_bound": perplexity(nll + kl, n),
        f"{prefix}/ppl_bound_seqmean": perplexity_seqmean(nll + kl, n),
        f"{prefix}/ppl_reuse": perplexity(cat("nll_reuse") + kl, n),
    }
    if iw_samples:
        metrics[f"{prefix}/ppl_iw"] = perplexity(cat("iw"), n)
    return metrics

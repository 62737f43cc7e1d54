"""Honest scoring: upper bounds on -log p(x) and the perplexities they imply (docs/METHOD.md section 6).

For an LTM the posterior is fitted on each evaluated sequence (T steps, as in training), then

* ELBO bound   NLL(x | z) + KL(q || p), z drawn with FRESH noise (default), an unbiased
  single-sample estimate of the negative ELBO;
* IW bound     -log (1/K) sum_k p(x | z_k) p(z_k) / q(z_k), K fresh samples from q (tighter as K grows);
* reuse score  the released code's number: a second inference pass with ONE noise draw reused at
  every inner step (reuse_noise=True, whatever the run's own setting), scored at that same draw,
  which the optimiser could exploit, so it is optimistic. Reported, named, never the default.

And what the bound is made of, so a curve can be read (the "Reading an LTM bound" README section):

* KL floor     the KL the inner loop ends at when z carries nothing, from the run's own start
  (`ltm.kl_floor.start_kl_floor`; not defined for an encoder's x-dependent start);
* NLL other z  the NLL of each sequence given ANOTHER sequence's posterior sample (sequence i + N/2's);
  NLL other z - NLL is how much the decoder RELIES on z: one wrong but plausible z misleads it;
* z info (lower bound)  what z carries, `info_lower_bound`: each sequence's NLL at its own sample
  against its NLL under the mixture of that sample and K - 1 FAR sequences' samples (at least 3
  apart in the evaluation order, never a neighbour, which may share a document): a contrastive
  lower bound on I(x; z) under the aggregate posterior, so it never exceeds the mean KL on
  average; it reads at most log K per sequence (`z_info_cap`). It replaces the retired
  NLL mixture - NLL (own sample against a mixture of others only), which is biased upwards and
  exceeded the KL;
* NLL prior    the NLL given z drawn from the prior N(0, I);
* bound at the start, for a trained start (`inference.start`): the negative ELBO of the posterior
  before refinement (T = 0); minus the bound after it, the amortisation gap.

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
from ltm.kl_floor import start_kl_floor
from ltm.model import LatentThoughtModel, Stem, token_nll
from ltm.names import (AMORTISATION_GAP, BOUND, BOUND_START, KL, KL_ABOVE_FLOOR, KL_FLOOR, NLL, NLL_OTHER_Z,
                       NLL_PRIOR, PPL_BOUND, PPL_BOUND_SEQMEAN, PPL_IW, PPL_REUSE, VAL, Z_INFO_CAP, Z_INFO_LB,
                       Z_INFO_LB_CI, metric)
from ltm.posterior import NoiseSource, infer_posterior, start_bound

# Seed offsets keep each kind of scoring noise independent of the inference noise of the same sequence.
_SCORE_STREAM, _IW_STREAM, _PRIOR_STREAM = 1_000_003, 2_000_029, 3_000_017


@dataclass
class SequenceBounds:
    """Per-sequence results, each of shape (B,), in nats."""

    nll: torch.Tensor
    """-log p(x | z) at one fresh-noise sample z of q (exact NLL for AR)."""
    kl: torch.Tensor
    """KL(q || p) (zero for AR)."""
    n_tokens: torch.Tensor
    """Predicted tokens per sequence."""
    reuse: torch.Tensor | None = None
    """The released code's score: NLL + KL of a reuse-noise posterior at its own noise (AR: exact NLL)."""
    iw: torch.Tensor | None = None
    """K-sample importance-weighted bound on -log p(x)."""
    z: torch.Tensor | None = None
    """(B, n_latents, d_model): the sample `nll` was scored at (None for AR)."""
    nll_prior: torch.Tensor | None = None
    """-log p(x | z) at z ~ N(0, I) (None for AR)."""
    start: torch.Tensor | None = None
    """The negative ELBO at a trained start, before refinement (None for the fixed start and AR)."""

    @property
    def elbo(self) -> torch.Tensor:
        """The negative-ELBO bound NLL + KL per sequence."""
        return self.nll + self.kl


def sequence_nll(model: LatentThoughtModel, tokens: torch.Tensor, z: torch.Tensor | None, *,
                 loss_mask: torch.Tensor | None = None, stem=None) -> torch.Tensor:
    """-log p(tokens[:, 1:] | tokens[:, :-1], z) per sequence (B,), masked by `loss_mask` if given."""
    with torch.no_grad():
        logits = model(tokens[:, :-1], z) if stem is None else model.forward_from_stem(stem, z)
        per_token = token_nll(logits, tokens[:, 1:])
    return (per_token if loss_mask is None else per_token * loss_mask).sum(1)


def sequence_bounds(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig, *,
                    seeds: Sequence[int], iw_samples: int = 0, loss_mask: torch.Tensor | None = None,
                    reuse_score: bool = True, compiled: bool = False) -> SequenceBounds:
    """Bounds on -log p(tokens[:, 1:] | tokens[:, 0]) for each sequence of a batch.

    `reuse_score=False` skips the released code's score, which costs a second inference pass;
    `compiled` runs the inference loops through torch.compile."""
    if iw_samples < 0:
        raise ValueError(f"iw_samples must be >= 0, got {iw_samples}")
    n_tokens = (torch.full((tokens.shape[0],), tokens.shape[1] - 1, device=tokens.device, dtype=torch.float32)
                if loss_mask is None else loss_mask.float().sum(1))

    if model.cfg.kind == "ar":
        nll = sequence_nll(model, tokens, None, loss_mask=loss_mask)
        return SequenceBounds(nll=nll, kl=torch.zeros_like(nll), n_tokens=n_tokens, reuse=nll,
                              iw=nll if iw_samples else None)

    cfg = dataclasses.replace(cfg, decoder_grad="final")
    post = infer_posterior(model, tokens, cfg, seeds=seeds, loss_mask=loss_mask, compiled=compiled)
    sigma = (0.5 * post.logvar).exp()
    shape = tuple(post.mu.shape[1:])
    with torch.no_grad():
        stem = model.stem(tokens[:, :-1])

    def nll_of(z: torch.Tensor) -> torch.Tensor:
        return sequence_nll(model, tokens, z, loss_mask=loss_mask, stem=stem)

    z = post.mu + NoiseSource([s + _SCORE_STREAM for s in seeds], shape, tokens.device).draw() * sigma
    nll = nll_of(z)
    nll_prior = nll_of(NoiseSource([s + _PRIOR_STREAM for s in seeds], shape, tokens.device).draw())
    # The released code's score needs its own inference: one noise draw for the whole loop.
    reuse = None
    if reuse_score:
        reused = post if cfg.reuse_noise else infer_posterior(
            model, tokens, dataclasses.replace(cfg, reuse_noise=True), seeds=seeds, loss_mask=loss_mask,
            compiled=compiled)
        reuse = nll_of(reused.z) + reused.kl()
    iw = None
    if iw_samples:
        draws = NoiseSource([s + _IW_STREAM for s in seeds], shape, tokens.device)
        log_w = []
        for _ in range(iw_samples):
            eps = draws.draw()
            z_k = post.mu + eps * sigma
            # log p(z) - log q(z): the 2*pi terms cancel; z = mu + sigma * eps.
            log_ratio = (-0.5 * z_k.square() + 0.5 * eps.square() + 0.5 * post.logvar).flatten(1).sum(1)
            log_w.append(log_ratio - nll_of(z_k))
        iw = -(torch.logsumexp(torch.stack(log_w), dim=0) - math.log(iw_samples))
    start = start_bound(model, tokens, post, loss_mask) if post.start_mu is not None else None
    return SequenceBounds(nll=nll, kl=post.kl(), n_tokens=n_tokens, reuse=reuse, iw=iw, z=z, nll_prior=nll_prior,
                          start=start)


def iw_bounds(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig, *, seeds: Sequence[int],
              ks: Sequence[int], chunk: int = 8) -> dict[int, torch.Tensor]:
    """The K-sample IW bound per sequence (B,) at each K of `ks`, from ONE posterior and one stream of
    draws: the first K draws of the largest K (the same draws `sequence_bounds(iw_samples=K)` makes), so
    the bounds at successive K differ only by the samples added. The draws are scored `chunk` at a time
    and folded into a running log-sum-exp: memory does not grow with K. An AR's bound is its exact NLL
    at every K."""
    ks = sorted(set(ks))
    if not ks or ks[0] < 1 or chunk < 1:
        raise ValueError(f"IW needs every K >= 1 and chunk >= 1, got K = {ks} and chunk = {chunk}")
    if model.cfg.kind == "ar":
        return dict.fromkeys(ks, sequence_nll(model, tokens, None))
    post = infer_posterior(model, tokens, dataclasses.replace(cfg, decoder_grad="final"), seeds=seeds)
    sigma, shape = (0.5 * post.logvar).exp(), tuple(post.mu.shape[1:])
    with torch.no_grad():
        stem = model.stem(tokens[:, :-1])
    draws = NoiseSource([s + _IW_STREAM for s in seeds], shape, tokens.device)
    running = torch.full((len(tokens),), -math.inf, dtype=torch.float64, device=tokens.device)
    out, done = {}, 0
    for k in ks:
        while done < k:
            c = min(chunk, k - done)
            eps = torch.stack([draws.draw() for _ in range(c)])  # (c, B, *shape)
            z = post.mu + eps * sigma
            log_ratio = (-0.5 * z.square() + 0.5 * eps.square() + 0.5 * post.logvar).flatten(2).sum(2)
            repeated = Stem(stem.h.repeat(c, 1, 1), stem.rope, stem.window)
            nll = sequence_nll(model, tokens.repeat(c, 1), z.flatten(0, 1), stem=repeated).view(c, -1)
            running = torch.logsumexp(torch.cat([running[None], (log_ratio - nll).double()]), 0)
            done += c
        out[k] = -(running - math.log(k))
    return out


def perplexity(bound: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """Token-weighted perplexity exp(sum of bounds / sum of tokens)."""
    return math.exp(bound.sum().item() / n_tokens.sum().item())


def perplexity_seqmean(bound: torch.Tensor, n_tokens: torch.Tensor) -> float:
    """The released code's variant: mean over sequences of exp(bound / length)."""
    return (bound / n_tokens).exp().mean().item()


def evaluate_bounds(model: LatentThoughtModel, batches: Iterable[torch.Tensor], cfg: InferenceConfig, *,
                    seed: int = 0, iw_samples: int = 0, prefix: str = VAL, compiled: bool = False) -> dict[str, float]:
    """Bounds over a fixed evaluation set, as metrics named `{prefix}/...`.

    Keys: bound = nll + kl, nll and kl (nats per token; an AR's bound is its NLL), ppl_bound (fresh-noise
    ELBO), ppl_bound_seqmean, ppl_reuse (released-code scoring, optimistic), ppl_iw (when iw_samples > 0);
    for an LTM also, in nats per token, kl_floor and kl_above_floor (not for start="encoder"), nll_other_z
    (given sequence i + N/2's sample, N sequences; needs N >= 2), z_info_lb with z_info_lb_ci and z_info_cap
    (`info_lower_bound` against up to K - 1 = min(8, N - 5) others at distances >= 3; needs N >= 8),
    nll_prior, and for a trained start bound_start and amortisation_gap. Sequence i of the whole set always
    gets seed `seed + i`, so results do not depend on batching. `compiled`: the inference loops through torch.compile.
    """
    batches = list(batches)
    parts: list[SequenceBounds] = []
    offset = 0
    for batch in batches:
        seeds = [seed + offset + i for i in range(batch.shape[0])]
        offset += batch.shape[0]
        parts.append(sequence_bounds(model, batch, cfg, seeds=seeds, iw_samples=iw_samples, compiled=compiled))
    if not parts:
        raise ValueError("evaluate_bounds got no batches to evaluate")

    def cat(name: str) -> torch.Tensor:
        return torch.cat([getattr(p, name) for p in parts]).double()

    n = cat("n_tokens")
    tokens = n.sum().item()
    nll, kl = cat("nll"), cat("kl")
    values = {
        BOUND: (nll + kl).sum().item() / tokens,
        NLL: nll.sum().item() / tokens,
        KL: kl.sum().item() / tokens,
        PPL_BOUND: perplexity(nll + kl, n),
        PPL_BOUND_SEQMEAN: perplexity_seqmean(nll + kl, n),
        PPL_REUSE: perplexity(cat("reuse"), n),
    }
    if iw_samples:
        values[PPL_IW] = perplexity(cat("iw"), n)
    if model.cfg.kind == "ltm":
        floor = start_kl_floor(model, cfg)
        if floor is not None:
            values[KL_FLOOR] = floor * len(n) / tokens
            values[KL_ABOVE_FLOOR] = values[KL] - values[KL_FLOOR]
        values[NLL_PRIOR] = cat("nll_prior").sum().item() / tokens
        if parts[0].start is not None:
            start = cat("start").sum().item() / tokens
            values[BOUND_START] = start
            values[AMORTISATION_GAP] = start - (nll + kl).sum().item() / tokens
        values.update(_other_z_measures(model, batches, parts, tokens))
    return {metric(prefix, name): value for name, value in values.items()}


def other_offsets(n: int, k_max: int = 8) -> list[int]:
    """Offsets d of the other sequences (i + d) mod n whose samples sequence i is scored with: n // 2 (the
    single other z) and up to k_max spread over [3, n - 3], so that no sequence is scored with a
    neighbour's z (neighbouring evaluation blocks are consecutive pieces of one stream and can share a
    document, whose z would carry real information about the other block)."""
    if n < 8:
        return []
    k = min(k_max, n - 5)  # n // 2 and k - 1 others from 3 to n - 3, evenly spaced
    return sorted({round(3 + j * (n - 6) / (k - 2)) for j in range(k - 1)} | {n // 2})


def info_lower_bound(own_nll: torch.Tensor, far_nll: torch.Tensor) -> torch.Tensor:
    """Per sequence i (nats): log p(x_i | z_i) - log (1/K) sum_j p(x_i | z_j), the j over z_i itself and
    the K - 1 rows of `far_nll` ((K - 1, B): -log p(x_i | z_j) at far sequences' samples z_j).

    Why it cannot exceed the KL on average: with (x_i, z_i) drawn from q(x) q(z | x) and the far z_j
    from other, independent sequences' posteriors, this is the InfoNCE bound with the decoder's
    log-likelihood as critic, so its expectation is at most I(x; z) under the aggregate posterior
    q(z) = E_x q(z | x) (and at most log K). And I(x; z) = E_x KL(q(z | x) || q(z)) = E_x KL(q(z | x) || p(z))
    - KL(q(z) || p(z)) <= the mean KL. Counting the own sample in the mixture is what bounds it: the
    retired measure, own sample against a mixture of others only, is biased upwards (-log of a K-sample
    mean overstates the NLL under q(z)), and so is the own samples' mixture against the others',
    whose large-K limit exceeds I(x; z) even for an exact posterior. The blocks are consecutive
    pieces of one stream, not independent: far samples (>= 3 blocks away) keep a shared document
    out. Blocks independent, so its interval is a t-interval over blocks (`block_interval`)."""
    if far_nll.dim() != 2 or far_nll.shape[1] != own_nll.shape[0]:
        raise ValueError(f"far_nll must be (K - 1, B) with B = {own_nll.shape[0]}, got {tuple(far_nll.shape)}")
    log_p = -torch.cat([own_nll[None], far_nll]).double()
    return log_p[0] - (torch.logsumexp(log_p, 0) - math.log(len(log_p)))


def block_interval(per_block: torch.Tensor, tokens: float) -> tuple[float, float]:
    """The sum of per-block values over `tokens` (nats/token) and its 95 % half-width (normal, over blocks)."""
    x = per_block.double()
    spread = x.std().item() * math.sqrt(len(x)) if len(x) > 1 else 0.0
    return x.sum().item() / tokens, 1.96 * spread / tokens


def _other_z_measures(model: LatentThoughtModel, batches: list[torch.Tensor], parts: list[SequenceBounds],
                      tokens: float) -> dict[str, float]:
    """nll_other_z (each sequence given sequence (i + N/2)'s sample) and the information lower bound with
    its interval and cap (`info_lower_bound` over the samples at `other_offsets`), nats/token."""
    z = torch.cat([p.z for p in parts])
    n = len(z)
    if n < 2:
        return {}
    offsets = other_offsets(n) or [n // 2]
    shifted = {d: z.roll(-d, dims=0) for d in offsets}
    nlls: dict[int, list[torch.Tensor]] = {d: [] for d in offsets}
    start = 0
    for batch in batches:  # one batch's z-independent stem at a time, for all K offsets
        with torch.no_grad():
            stem = model.stem(batch[:, :-1])
        for d in offsets:
            nlls[d].append(sequence_nll(model, batch, shifted[d][start:start + len(batch)], stem=stem).double())
        start += len(batch)
    per_offset = {d: torch.cat(per_batch) for d, per_batch in nlls.items()}
    out = {NLL_OTHER_Z: per_offset[n // 2].sum().item() / tokens}
    if len(offsets) >= 2:
        own = torch.cat([p.nll for p in parts]).double()
        info, half = block_interval(info_lower_bound(own, torch.stack([per_offset[d] for d in offsets])), tokens)
        out.update({Z_INFO_LB: info, Z_INFO_LB_CI: half, Z_INFO_CAP: n * math.log(len(offsets) + 1) / tokens})
    return out

"""Evaluations of a trained checkpoint beyond its validation loss: zero-shot perplexity on other
corpora and generation quality (GSM8K in-context learning is in `ltm.gsm8k`).

Both treat LTM and AR checkpoints the same way: an LTM's perplexity is a bound (posterior fitted
per block, fresh-noise ELBO and importance-weighted), an AR model's is exact.
"""

from __future__ import annotations

import dataclasses
import math
import re
from collections.abc import Callable
from pathlib import Path

import torch

from ltm.config import InferenceConfig, RunConfig
from ltm.data import HUB_DATASETS, DataError, TokenBlocks, load_blocks, load_tokenizer
from ltm.evaluate import evaluate_bounds, sequence_bounds
from ltm.generate import generate, posterior_latents, sample_prior
from ltm.model import LatentThoughtModel
from ltm.names import BLOCKS, ZERO_SHOT, metric

# -- zero-shot perplexity ----------------------------------------------------------------------


def corpus_label(name: str) -> str:
    """A metric-safe name for a corpus: the hub name, or `<folder>-<file stem>` of a local path."""
    if name in HUB_DATASETS:
        return name
    path = Path(name)
    return re.sub(r"[^A-Za-z0-9_.-]+", "-", f"{path.parent.name}-{path.stem}" if path.parent.name else path.stem)


def corpus_blocks(cfg: RunConfig, corpus: str) -> TokenBlocks:
    """Blocks of ctx + 1 tokens of another corpus, in the checkpoint's tokenizer.

    Hub corpora are read from their evaluation split (`HUB_DATASETS[...].validation`), local
    files whole.
    """
    if cfg.data.name == "synthetic":
        raise DataError("this checkpoint was trained on the synthetic corpus, whose vocabulary reads no text; "
                        "zero-shot perplexity needs a checkpoint trained on text (data.name a hub name or a path)")
    return load_blocks(dataclasses.replace(cfg.data, val_name=corpus), cfg.model.ctx, "validation")


def zero_shot(model: LatentThoughtModel, cfg: RunConfig, corpus: str, *, max_blocks: int = 64,
              batch_size: int = 16, iw_samples: int = 8, seed: int = 0,
              progress: Callable[[int, int], None] | None = None) -> dict[str, float]:
    """Perplexity bounds of the checkpoint on the first `max_blocks` blocks of `corpus`; `progress`
    is told (blocks done, blocks) after each batch.

    Metrics `zeroshot/<label>/{nll, kl, ppl_bound, ppl_bound_seqmean, ppl_reuse, ppl_iw, blocks}`, and
    for an LTM `kl_floor`, `nll_other_z`, `z_info_lb`, `nll_prior` (see `evaluate_bounds`); for AR runs every bound
    is the exact perplexity.
    """
    blocks = corpus_blocks(cfg, corpus)
    n = min(max_blocks, len(blocks))
    if n < 1:
        raise DataError(f"{corpus} gives no block of {cfg.model.ctx + 1} tokens; use a longer corpus")
    device = next(model.parameters()).device
    def batches():
        for i in range(0, n, batch_size):
            yield blocks.batch(range(i, min(i + batch_size, n))).to(device)
            if progress is not None:  # the consumer came back for more: this batch is scored
                progress(min(i + batch_size, n), n)

    prefix = metric(ZERO_SHOT, corpus_label(corpus))
    model.eval()
    metrics = evaluate_bounds(model, batches(), cfg.inference, seed=seed, iw_samples=iw_samples, prefix=prefix)
    return {**metrics, metric(prefix, BLOCKS): float(n)}


# -- generation -------------------------------------------------------------------------------


@dataclasses.dataclass
class Samples:
    """Generated token ids of one setting, (B, prefix + length), and how many leading ids are the prompt."""

    name: str
    tokens: torch.Tensor
    prompt_length: int


def unconditional_samples(model: LatentThoughtModel, bos_id: int, *, n: int, length: int,
                          prior_temperatures: list[float], temperature: float = 1.0, top_p: float | None = None,
                          seed: int = 0) -> list[Samples]:
    """Samples from [BOS]: z ~ N(0, s^2 I) for each prior temperature s (AR: one setting, no z)."""
    device = next(model.parameters()).device
    prompt = torch.full((n, 1), bos_id, dtype=torch.long, device=device)
    settings = prior_temperatures if model.cfg.kind == "ltm" else [None]
    out = []
    for s in settings:
        gen = torch.Generator(device=device).manual_seed(seed)
        z = None if s is None else sample_prior(model.cfg, n, s, generator=gen, device=device)
        tokens = generate(model, prompt, length, z=z, temperature=temperature, top_p=top_p, generator=gen)
        out.append(Samples("uncond" if s is None else f"uncond_s{s:g}", tokens, 1))
    return out


def conditional_samples(model: LatentThoughtModel, cfg: InferenceConfig, prefixes: torch.Tensor, *, length: int,
                        temperature: float = 1.0, top_p: float | None = None, seed: int = 0) -> Samples:
    """Continuations of prefixes (B, P); an LTM first fits q(z) on each prefix and samples z from it."""
    z = None
    if model.cfg.kind == "ltm":
        z = posterior_latents(model, prefixes, cfg, seeds=[seed + i for i in range(len(prefixes))],
                              use_mean=False).detach()
    gen = torch.Generator(device=prefixes.device).manual_seed(seed)
    tokens = generate(model, prefixes, length, z=z, temperature=temperature, top_p=top_p, generator=gen)
    return Samples("cond", tokens, prefixes.shape[1])


def unigram_entropy(tokens: torch.Tensor) -> float:
    """Mean over samples of the entropy (nats) of each sample's token frequencies; low = repetitive."""
    values = []
    for row in tokens:
        counts = torch.bincount(row).double()
        p = counts[counts > 0] / counts.sum()
        values.append(-(p * p.log()).sum().item())
    return sum(values) / len(values)


def generative_perplexity(reference: LatentThoughtModel, ref_cfg: InferenceConfig, samples: Samples, *,
                          seed: int = 0, batch_size: int = 16) -> float:
    """Perplexity of the generated tokens (not the prompt) under a reference model (a bound for an LTM)."""
    tokens = samples.tokens
    if tokens.shape[1] - 1 > reference.cfg.ctx:
        raise ValueError(f"samples of {tokens.shape[1]} tokens exceed the reference model's context "
                         f"({reference.cfg.ctx} + 1); generate fewer tokens")
    mask = torch.zeros(tokens.shape[0], tokens.shape[1] - 1, device=tokens.device)
    mask[:, samples.prompt_length - 1:] = 1  # predictions of generated tokens only
    total, count = 0.0, 0.0
    for i in range(0, len(tokens), batch_size):
        part = tokens[i:i + batch_size]
        bounds = sequence_bounds(reference, part, ref_cfg, seeds=[seed + i + j for j in range(len(part))],
                                 loss_mask=mask[i:i + batch_size], reuse_score=False)
        total += bounds.elbo.sum().item()
        count += bounds.n_tokens.sum().item()
    return math.exp(total / count)


def check_same_tokenizer(cfg: RunConfig, ref_cfg: RunConfig) -> None:
    """A reference model must read the samples' token ids as the same text."""
    if _vocabulary(cfg) != _vocabulary(ref_cfg):
        raise DataError("the reference checkpoint uses a different tokenizer from the evaluated one, so its "
                        "perplexity of the samples would be meaningless; pick a reference trained with the same "
                        "data.tokenizer on the same data")


def _vocabulary(cfg: RunConfig) -> tuple:
    d = cfg.data
    if d.name == "synthetic":  # the process (its seed) gives the ids their meaning
        return ("synthetic", d.synthetic_vocab, d.synthetic_slots, d.seed)
    return ("text", load_tokenizer(d).cache_key)

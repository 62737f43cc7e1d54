"""Decoding with a KV cache: z from the prior (with a temperature) or from a posterior fitted on a prompt."""

from __future__ import annotations

import torch

from ltm.config import InferenceConfig, ModelConfig
from ltm.model import KVCache, LatentThoughtModel
from ltm.posterior import infer_posterior


def sample_prior(cfg: ModelConfig, batch: int, temperature: float = 1.0, *,
                 generator: torch.Generator | None = None, device: torch.device | str = "cpu") -> torch.Tensor:
    """z ~ N(0, temperature^2 I), shape (batch, n_latents, d_model)."""
    if cfg.kind != "ltm":
        raise ValueError("an AR model has no latents to sample")
    shape = (batch, cfg.n_latents, cfg.d_model)
    return temperature * torch.randn(shape, generator=generator, device=device)


def posterior_latents(model: LatentThoughtModel, prompt: torch.Tensor, cfg: InferenceConfig, *,
                      seeds: list[int], use_mean: bool = True) -> torch.Tensor:
    """z for conditional generation: fit q(z) on the prompt and take its mean (or its sample z_T)."""
    post = infer_posterior(model, prompt, cfg, seeds=seeds)
    return post.mu if use_mean else post.z


@torch.no_grad()
def generate(model: LatentThoughtModel, prompt: torch.Tensor, max_new_tokens: int, *,
             z: torch.Tensor | None = None, temperature: float = 1.0, top_k: int | None = None,
             top_p: float | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
    """Continue `prompt` (B, L) by `max_new_tokens` tokens; temperature 0 decodes greedily.

    Returns (B, L + max_new_tokens). The prompt must fit the model's context; later tokens keep
    attending to the last `window` positions through the cache.
    """
    if prompt.dim() != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be (batch, length >= 1), got shape {tuple(prompt.shape)}")
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    cache = KVCache(model.cfg.n_layers)
    out = [prompt]
    logits = model(prompt, z, cache=cache)[:, -1]
    for i in range(max_new_tokens):
        token = _pick(logits.float(), temperature, top_k, top_p, generator)
        out.append(token)
        if i + 1 < max_new_tokens:
            logits = model(token, z, cache=cache)[:, -1]
    return torch.cat(out, dim=1)


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> torch.Tensor:
    """One next token (B, 1) from the last position's logits (B, V)."""
    if temperature == 0:
        return logits.argmax(dim=-1, keepdim=True)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = logits.topk(top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # Drop a token when the tokens ranked above it already cover top_p (the top one always stays).
        drop = (cumulative - sorted_logits.softmax(dim=-1)) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(-1, order, drop), float("-inf"))
    return torch.multinomial(logits.softmax(dim=-1), 1, generator=generator)

"""Slow learning: the decoder update (METHOD.md section 3)."""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from ltm.config import InferenceConfig
from ltm.model import LatentThoughtModel
from ltm.posterior import infer_posterior


def decoder_loss(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig,
                 seeds: Sequence[int]) -> torch.Tensor:
    """Mean next-token cross-entropy of the decoder at the inferred z_T (detached).

    For an LTM this runs the inference loop first (which, with decoder_grad="trajectory",
    already accumulates into the decoder's .grad); an AR model is scored directly.
    """
    z = infer_posterior(model, tokens, cfg, seeds=seeds).z if model.cfg.kind == "ltm" else None
    logits = model(tokens[:, :-1], z)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

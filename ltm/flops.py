"""FLOPs per token, in one audited place (METHOD.md section 5).

Two conventions:

* "paper": the authors' tables, (T + 1) * (6 N + 24 L d w) per training token, N counting every
  parameter (embedding included) and w the attention window. A convention, not a measurement.
* "exact": what this project's code executes, counting 2 FLOPs per multiply-add of every matmul
  (the same ops torch.utils.flop_counter counts; norms, softmax and elementwise work are not counted):
  projections, attention scores and values over the key rectangle the kernel computes (the whole
  sequence for masked or causal SDPA; each block of queries' window for the windowed kernels of
  `ltm.attention`, where they are used; every latent for cross-attention), the latent key/value
  projections, and the unembedding. Backward passes count what autograd runs:

  - inner step, decoder_grad="final": forward without the z-independent stem (which the loop
    computes once), then input gradients only on the path from z (no weight gradients);
  - inner step, decoder_grad="trajectory": a full forward and a full backward (weights too);
  - decoder update: a full forward and backward, with no input gradient into the detached z_T.

  A training token costs T inner steps + one decoder update; an evaluation token T inner steps +
  one scoring forward (each extra importance sample adds one forward without the stem).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils import flop_counter

from ltm.attention import uses_window_kernel, windowed_keys
from ltm.config import ModelConfig
from ltm.model import build_model


@dataclass(frozen=True)
class _Op:
    """One matmul of the forward pass, its FLOPs per sequence, and how backward treats it."""

    flops: float
    kind: Literal["linear", "attention"]
    in_stem: bool = False
    """Computed once per inference loop (z-independent)."""
    input_is_latent: bool = False
    """Its input is z (no input gradient in the decoder update: z_T is detached)."""
    input_needs_no_grad_in_loop: bool = False
    """Its input comes from the stem, so the inference loop needs no input gradient for it."""


def _forward_ops(cfg: ModelConfig, S: int) -> list[_Op]:
    d, V, hid = cfg.d_model, cfg.vocab_size, cfg.mlp_hidden
    m = cfg.latents_per_layer
    # the windowed kernels compute each query block's window; the dense mask, every key
    keys = windowed_keys(S, cfg.attn_window) if uses_window_kernel(S, cfg.attn_window) else S
    ops: list[_Op] = []
    for layer in range(cfg.n_layers):
        stem = layer == 0
        ops += [
            _Op(2 * S * d * 3 * d, "linear", in_stem=stem),           # self-attention q, k, v
            _Op(4 * S * keys * d, "attention", in_stem=stem),         # scores and values over the kernel's keys
            _Op(2 * S * d * d, "linear", in_stem=stem),               # self-attention output
        ]
        if cfg.kind == "ltm":
            ops += [
                _Op(2 * S * d * d, "linear", input_needs_no_grad_in_loop=stem),  # cross-attention query
                _Op(2 * m * d * 2 * d, "linear", input_is_latent=True),          # latent keys and values
                _Op(4 * S * m * d, "attention"),                                  # scores and values over m latents
                _Op(2 * S * d * d, "linear"),                                     # cross-attention output
            ]
        ops += [
            _Op(2 * S * d * hid, "linear"),                           # SwiGLU gate
            _Op(2 * S * d * hid, "linear"),                           # SwiGLU up
            _Op(2 * S * hid * d, "linear"),                           # SwiGLU down
        ]
    ops.append(_Op(2 * S * d * V, "linear"))                          # unembedding
    return ops


# Flash-style attention backward recomputes the scores, then computes dV, dP, dQ and dK:
# five matmuls of the forward's size against its two.
_ATTENTION_BACKWARD = 2.5


def _full_step(ops: list[_Op], detach_latents: bool) -> float:
    """Forward + backward with weight gradients (no input gradient into a detached z)."""
    total = 0.0
    for op in ops:
        if op.kind == "attention":
            backward = _ATTENTION_BACKWARD * op.flops
        elif op.input_is_latent and detach_latents:
            backward = op.flops  # weight gradient only
        else:
            backward = 2 * op.flops  # input and weight gradients
        total += op.flops + backward
    return total


def _inner_step(ops: list[_Op]) -> float:
    """Forward past the stem + input gradients on the path from z (no weight gradients)."""
    total = 0.0
    for op in ops:
        if op.in_stem:
            continue
        if op.kind == "attention":
            total += (1 + _ATTENTION_BACKWARD) * op.flops  # the kernel returns dq, dk and dv together
        elif op.input_needs_no_grad_in_loop:
            total += op.flops
        else:
            total += 2 * op.flops
    return total


def flops_per_token(cfg: ModelConfig, steps: int, *, convention: Literal["exact", "paper"] = "exact",
                    phase: Literal["train", "eval"] = "train",
                    decoder_grad: Literal["final", "trajectory"] = "final",
                    seq_len: int | None = None) -> float:
    """FLOPs per token of a training step (or an evaluation) with `steps` inner steps.

    `seq_len` is the length of the model's input (default cfg.ctx); AR models ignore `steps`.
    """
    if convention not in ("exact", "paper"):
        raise ValueError(f"convention must be 'exact' or 'paper', got {convention!r}")
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    steps = steps if cfg.kind == "ltm" else 0
    S = seq_len or cfg.ctx

    if convention == "paper":
        n_params = _param_count(cfg)
        per_pass = 6 * n_params + 24 * cfg.n_layers * cfg.d_model * cfg.attn_window
        if phase == "train":
            return (steps + 1) * per_pass
        return steps * per_pass + per_pass / 3

    ops = _forward_ops(cfg, S)
    forward = sum(op.flops for op in ops)
    if decoder_grad == "trajectory":
        loop = steps * _full_step(ops, detach_latents=False)
    else:  # the stem once, then T lighter steps
        loop = steps * _inner_step(ops) + (sum(op.flops for op in ops if op.in_stem) if steps else 0)
    last = _full_step(ops, detach_latents=True) if phase == "train" else forward
    return (loop + last) / S


_PARAM_CACHE: dict[ModelConfig, int] = {}


def _param_count(cfg: ModelConfig) -> int:
    if cfg not in _PARAM_CACHE:
        with torch.device("meta"):  # shapes only, no memory
            _PARAM_CACHE[cfg] = build_model(cfg).num_params()
    return _PARAM_CACHE[cfg]


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation of each device: the run's tokens/s shared over its `devices` (processes,
    one GPU each), times FLOPs per token, over one device's peak FLOP/s."""
    return tokens_per_s / devices * flops_per_tok / peak_flops


def _cpu_flash_forward(query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_flop_count(query_shape, key_shape, value_shape)


def _cpu_flash_backward(grad_out_shape, query_shape, key_shape, value_shape, *args, **kwargs) -> int:
    return flop_counter.sdpa_backward_flop_count(grad_out_shape, query_shape, key_shape, value_shape)


def flop_counter_mode() -> flop_counter.FlopCounterMode:
    """torch's FlopCounterMode, taught the CPU flash-attention kernels it does not count by itself."""
    aten = torch.ops.aten
    return flop_counter.FlopCounterMode(display=False, custom_mapping={
        aten._scaled_dot_product_flash_attention_for_cpu: _cpu_flash_forward,
        aten._scaled_dot_product_flash_attention_for_cpu_backward: _cpu_flash_backward,
    })

"""FLOPs per token, in one audited place (docs/METHOD.md section 9).

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

A trained posterior start (`inference.start`, `ltm.start`) adds, per training token, the pass that
trains it: its bound's decoder forward past the stem with input gradients only (an inner step; the
stem too when T = 0), and for start="encoder" the encoder's forward and full backward (no input
gradient into its detached embeddings); per evaluation token, the encoder's forward. In the paper
convention that pass is one more (6 N + 24 L d w) and the encoder (6 N_enc + 24 L_enc d S) per
training token, a third of that per evaluation token, N_enc counting its parameters and S the block.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Literal

import torch
from torch.utils import flop_counter

from ltm.attention import uses_window_kernel, windowed_keys
from ltm.config import ModelConfig, RunConfig
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
    keys = windowed_keys(cfg.attn_window) if uses_window_kernel(S, cfg.attn_window) else S
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


def _encoder_ops(cfg: ModelConfig, S: int, layers: int) -> list[_Op]:
    """The start="encoder" forward over a block of S tokens (`ltm.start.BlockEncoder`)."""
    d, hid, N = cfg.d_model, cfg.mlp_hidden, cfg.n_latents
    ops: list[_Op] = []
    for layer in range(layers):
        ops += [
            _Op(2 * S * d * 3 * d, "linear", input_needs_no_grad_in_loop=layer == 0),  # q, k, v (embeddings detached)
            _Op(4 * S * S * d, "attention"),                 # bidirectional: every query sees every key
            _Op(2 * S * d * d, "linear"),
            _Op(2 * S * d * hid, "linear"), _Op(2 * S * d * hid, "linear"), _Op(2 * S * hid * d, "linear"),
        ]
    ops += [
        _Op(2 * S * d * 2 * d, "linear"),                    # read-out keys and values of the encoding
        _Op(2 * N * d * d, "linear"),                        # queries
        _Op(4 * N * S * d, "attention"),
        _Op(2 * N * d * d, "linear"),
        _Op(2 * N * d * hid, "linear"), _Op(2 * N * d * hid, "linear"), _Op(2 * N * hid * d, "linear"),
        _Op(2 * N * d * 2 * d, "linear"),                    # (mu, logvar)
    ]
    return ops


def _encoder_train(ops: list[_Op]) -> float:
    """Forward and backward with weight gradients and input gradients (none into the embeddings)."""
    total = 0.0
    for op in ops:
        backward = (_ATTENTION_BACKWARD if op.kind == "attention" else
                    1.0 if op.input_needs_no_grad_in_loop else 2.0) * op.flops
        total += op.flops + backward
    return total


def flops_per_token(cfg: ModelConfig, steps: int, *, convention: Literal["exact", "paper"] = "exact",
                    phase: Literal["train", "eval"] = "train",
                    decoder_grad: Literal["final", "trajectory"] = "final",
                    seq_len: int | None = None, start: Literal["fixed", "learned", "encoder"] = "fixed",
                    encoder_layers: int = 1) -> float:
    """FLOPs per token of a training step (or an evaluation) with `steps` inner steps, from the
    posterior start `start` (`inference.start`; its encoder has `encoder_layers` layers).

    `seq_len` is the length of the model's input (default cfg.ctx); AR models ignore `steps` and `start`.
    """
    if convention not in ("exact", "paper"):
        raise ValueError(f"convention must be 'exact' or 'paper', got {convention!r}")
    if phase not in ("train", "eval"):
        raise ValueError(f"phase must be 'train' or 'eval', got {phase!r}")
    if steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    if start not in ("fixed", "learned", "encoder"):
        raise ValueError(f"start must be 'fixed', 'learned' or 'encoder', got {start!r}")
    steps, start = (steps, start) if cfg.kind == "ltm" else (0, "fixed")
    S = seq_len or cfg.ctx
    train = phase == "train"

    if convention == "paper":
        per_pass = 6 * _param_count(cfg) + 24 * cfg.n_layers * cfg.d_model * cfg.attn_window
        encoder = (6 * _encoder_param_count(cfg, encoder_layers) + 24 * encoder_layers * cfg.d_model * (S + 1)
                   if start == "encoder" else 0.0)
        if train:
            return (steps + 1 + (start != "fixed")) * per_pass + encoder
        return steps * per_pass + (per_pass + encoder) / 3

    ops = _forward_ops(cfg, S)
    forward = sum(op.flops for op in ops)
    stem = sum(op.flops for op in ops if op.in_stem)
    if decoder_grad == "trajectory":
        loop = steps * _full_step(ops, detach_latents=False)
    else:  # the stem once, then T lighter steps
        loop = steps * _inner_step(ops) + (stem if steps else 0)
    last = _full_step(ops, detach_latents=True) if train else forward
    extra = 0.0
    if start != "fixed" and train:  # the start's own bound (the loop's stem is reused when there is one)
        extra += _inner_step(ops) + (stem if not steps or decoder_grad == "trajectory" else 0)
    if start == "encoder":  # the encoder reads the whole block: S + 1 tokens
        encoder = _encoder_ops(cfg, S + 1, encoder_layers)
        extra += _encoder_train(encoder) if train else sum(op.flops for op in encoder)
    return (loop + last + extra) / S


def run_flops_per_token(cfg: RunConfig, model: ModelConfig, convention: Literal["exact", "paper"] = "exact") -> float:
    """FLOPs per training token of the run `cfg` (its inference loop and start) with `model`, the run's
    model config with the data's vocabulary."""
    inf = cfg.inference
    return flops_per_token(model, inf.steps, convention=convention, decoder_grad=inf.decoder_grad, start=inf.start,
                           encoder_layers=inf.encoder_layers)


_PARAM_CACHE: dict[ModelConfig, int] = {}


def _param_count(cfg: ModelConfig) -> int:
    if cfg not in _PARAM_CACHE:
        with torch.device("meta"):  # shapes only, no memory
            _PARAM_CACHE[cfg] = build_model(cfg).num_params()
    return _PARAM_CACHE[cfg]


def _encoder_param_count(cfg: ModelConfig, layers: int) -> int:
    from ltm.config import InferenceConfig
    from ltm.start import BlockEncoder
    with torch.device("meta"):
        encoder = BlockEncoder(cfg, InferenceConfig(start="encoder", encoder_layers=layers))
        return sum(p.numel() for p in encoder.parameters())


def mfu(tokens_per_s: float, flops_per_tok: float, peak_flops: float, devices: int = 1) -> float:
    """Model FLOPs utilisation of each device: the run's tokens/s shared over its `devices` (processes,
    one GPU each), times FLOPs per token, over one device's peak FLOP/s."""
    return tokens_per_s / devices * flops_per_tok / peak_flops


GPU_PEAKS = {
    "NVIDIA H100 80GB HBM3": 989e12,  # H100 SXM
    "NVIDIA H100 PCIe": 756e12,
    "NVIDIA H100 NVL": 835e12,
    "NVIDIA H200": 989e12,  # H200 SXM
    "NVIDIA H200 NVL": 835e12,
    "NVIDIA A100-SXM4-40GB": 312e12,
    "NVIDIA A100-SXM4-80GB": 312e12,
    "NVIDIA A100-PCIE-40GB": 312e12,
    "NVIDIA A100 80GB PCIe": 312e12,
    "NVIDIA L40S": 362e12,
    "NVIDIA A10": 125e12,
    "NVIDIA A10G": 70e12,  # AWS's A10 variant: fewer tensor FLOPs than the A10 (A10G datasheet)
    "NVIDIA L4": 121e12,
}
"""Dense (no sparsity) bf16 tensor peaks in FLOP/s, by the exact name torch.cuda.get_device_name
gives: an H100 PCIe or an H200 NVL is not an SXM part, and a name not listed gets no mfu."""


def peak_flops(device: torch.device, configured: float) -> float:
    """The configured peak (train.peak_flops), else the GPU's dense bf16 peak by its exact name, else 0:
    no mfu (on a CPU, or with a warning on a GPU not in the table)."""
    if configured or device.type != "cuda":
        return configured
    name = torch.cuda.get_device_name(device)
    if name not in GPU_PEAKS:
        warnings.warn(f"no dense bf16 peak is known for the GPU {name!r}, so mfu is not logged; give it as "
                      "FLOP/s with --set train.peak_flops=<peak> (e.g. 989e12 for an H100 SXM)", stacklevel=2)
        return 0.0
    return GPU_PEAKS[name]


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

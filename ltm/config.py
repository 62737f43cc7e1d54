"""Configuration dataclasses and named presets.

Every run is fully described by these dataclasses; they validate themselves on
construction (and on `dataclasses.replace`) with errors that say what to change.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Literal


class ConfigError(ValueError):
    """A configuration that cannot be run; the message says what to change."""


@dataclass(frozen=True)
class ModelConfig:
    """The decoder: an LTM (latent-conditioned) or its autoregressive twin."""

    kind: Literal["ltm", "ar"] = "ltm"
    """"ltm" adds cross-attention to per-layer latent vectors z; "ar" is the same decoder without it."""
    vocab_size: int = 50258
    """Token vocabulary; GPT-2 BPE plus one begin-of-text token in the paper."""
    n_layers: int = 6
    d_model: int = 512
    n_heads: int = 8
    ctx: int = 1024
    """Training block length in tokens."""
    window: int | None = 256
    """Self-attention sees the last `window` tokens (itself included); None means full causal context."""
    n_latents: int = 24
    """Total latent vectors, split evenly over the layers (ignored for kind="ar")."""
    latent_rope: bool = False
    """Released-code option: rotate the cross-attention query at its token position and
    latent j's key at pseudo-position j * (ctx // latents per layer)."""
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        if self.kind not in ("ltm", "ar"):
            raise ConfigError(f"model.kind must be 'ltm' or 'ar', got {self.kind!r}")
        for name in ("vocab_size", "n_layers", "d_model", "n_heads", "ctx"):
            if getattr(self, name) < 1:
                raise ConfigError(f"model.{name} must be >= 1, got {getattr(self, name)}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"model.d_model={self.d_model} is not divisible by model.n_heads={self.n_heads}; "
                f"pick n_heads among {[h for h in range(1, self.d_model + 1) if self.d_model % h == 0 and h <= 64]}")
        if (self.d_model // self.n_heads) % 2:
            raise ConfigError(f"head width d_model/n_heads={self.d_model // self.n_heads} must be even for RoPE")
        if self.window is not None and not 1 <= self.window <= self.ctx:
            raise ConfigError(
                f"model.window={self.window} must be between 1 and model.ctx={self.ctx} "
                "(use window=None for full causal attention)")
        if self.kind == "ltm":
            if self.n_latents < self.n_layers:
                raise ConfigError(
                    f"model.n_latents={self.n_latents} must be at least model.n_layers={self.n_layers} "
                    "(each layer attends to its own latents)")
            if self.n_latents % self.n_layers:
                lo = self.n_latents // self.n_layers * self.n_layers
                raise ConfigError(
                    f"model.n_latents={self.n_latents} is not divisible by model.n_layers={self.n_layers}; "
                    f"use a multiple of {self.n_layers}, e.g. {lo or self.n_layers} or {lo + self.n_layers}")

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def latents_per_layer(self) -> int:
        return self.n_latents // self.n_layers if self.kind == "ltm" else 0

    @property
    def mlp_hidden(self) -> int:
        """SwiGLU hidden width: 8d/3 rounded up to a multiple of 32 (1376 for d=512)."""
        return 32 * math.ceil(8 * self.d_model / 3 / 32)

    @property
    def attn_window(self) -> int:
        """The effective self-attention window in tokens."""
        return self.ctx if self.window is None else self.window


@dataclass(frozen=True)
class InferenceConfig:
    """Fast learning: the per-sequence variational inference loop (METHOD.md section 2)."""

    steps: int = 16
    """T, the number of inner gradient steps; the same in training and evaluation."""
    lr_max: float = 0.34
    lr_min: float = 0.034
    """The inner learning rate follows a cosine from lr_max at step 0 towards lr_min."""
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 0.01
    init_mu_std: float = 0.01
    init_logvar: float = -5.0
    init_logvar_std: float = 0.1
    fixed_variance: bool = False
    """Freeze logvar at init_logvar (no noise on its init) and return z = mu."""
    reuse_noise: bool = False
    """Released-code behaviour: draw eps once per call and reuse it at every step."""
    decoder_grad: Literal["final", "trajectory"] = "final"
    """"final": the decoder learns from the final z only (paper). "trajectory": every inner
    step's sum-reduced loss also accumulates into the decoder's .grad (released code)."""

    def __post_init__(self) -> None:
        if self.steps < 0:
            raise ConfigError(f"inference.steps must be >= 0, got {self.steps}")
        if not 0 < self.lr_min <= self.lr_max:
            raise ConfigError(
                f"need 0 < inference.lr_min <= inference.lr_max, got {self.lr_min} and {self.lr_max}")
        if not all(0 <= b < 1 for b in self.betas) or len(self.betas) != 2:
            raise ConfigError(f"inference.betas must be two numbers in [0, 1), got {self.betas}")
        if self.decoder_grad not in ("final", "trajectory"):
            raise ConfigError(
                f"inference.decoder_grad must be 'final' or 'trajectory', got {self.decoder_grad!r}")

    def lr(self, step: int) -> float:
        """Inner learning rate at step s of T (cosine from lr_max to lr_min)."""
        return self.lr_min + 0.5 * (1 + math.cos(math.pi * step / self.steps)) * (self.lr_max - self.lr_min)


# ---------------------------------------------------------------------------------------
# Presets. The paper's three sizes pin the architecture (parameter counts in METHOD.md);
# the micro sizes keep the same shape ratios at a width a laptop CPU trains in minutes.

_PAPER = dict(vocab_size=50258, d_model=512, n_heads=8, ctx=1024, window=256, n_latents=24)
_MICRO = dict(vocab_size=512, d_model=128, n_heads=4, ctx=128, window=64, n_latents=8)

MODEL_PRESETS: dict[str, ModelConfig] = {
    "smoke": ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, ctx=32, window=16, n_latents=4),
    "micro-s": ModelConfig(n_layers=2, **_MICRO),
    "micro-m": ModelConfig(n_layers=4, **_MICRO),
    "micro-l": ModelConfig(n_layers=8, **_MICRO),
    "ltm-s": ModelConfig(n_layers=3, **_PAPER),
    "ltm-m": ModelConfig(n_layers=6, **_PAPER),
    "ltm-l": ModelConfig(n_layers=12, **_PAPER),
}
MODEL_PRESETS["micro"] = MODEL_PRESETS["micro-s"]


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named model configuration ("smoke", "micro[-s|-m|-l]", "ltm-s|m|l"), with overrides."""
    try:
        cfg = MODEL_PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown model preset {name!r}; known presets: {', '.join(MODEL_PRESETS)}") from None
    return dataclasses.replace(cfg, **overrides) if overrides else cfg


@dataclass(frozen=True)
class DataConfig:
    """Where training text comes from and how it becomes blocks of ctx + 1 tokens."""

    name: str = "synthetic"
    """"synthetic" (built-in corpus), a hub name (openwebtext, wikitext-2, wikitext-103,
    tinystories, gsm8k) or a local path (.txt file or folder, .jsonl, .parquet, saved dataset)."""
    tokenizer: Literal["auto", "gpt2", "bpe"] = "auto"
    """"auto": the synthetic corpus uses its own vocabulary, text sources GPT-2 BPE + BOS."""
    bpe_vocab_size: int = 8192
    """Vocabulary of the byte-level BPE trained on the training split (tokenizer="bpe")."""
    text_field: str = "text"
    """Field holding the text in .jsonl/.parquet/hub records."""
    val_blocks: int = 64
    """Blocks held out (deterministically) for validation when the source has no validation split."""
    synthetic_tokens: int = 2_000_000
    """Size of the generated training stream for name="synthetic"."""
    seed: int = 0
    """Seed of the corpus itself (synthetic generation, shuffles); independent of the run seed."""
    cache_dir: str | None = None
    """Token cache folder; None uses $LTM_CACHE or ~/.cache/ltm."""

    def __post_init__(self) -> None:
        if not self.name:
            raise ConfigError("data.name is empty; use 'synthetic', a hub name or a local path")
        if self.tokenizer not in ("auto", "gpt2", "bpe"):
            raise ConfigError(f"data.tokenizer must be 'auto', 'gpt2' or 'bpe', got {self.tokenizer!r}")
        if self.val_blocks < 1:
            raise ConfigError(f"data.val_blocks must be >= 1, got {self.val_blocks}")
        if self.bpe_vocab_size < 260:
            raise ConfigError(f"data.bpe_vocab_size must be >= 260 (256 bytes + specials), got {self.bpe_vocab_size}")

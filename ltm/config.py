"""Configuration dataclasses and named presets.

Every run is fully described by these dataclasses; they validate themselves on
construction (and on `dataclasses.replace`) with errors that say what to change.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import numbers
from dataclasses import dataclass
from typing import Literal


class ConfigError(ValueError):
    """A configuration that cannot be run; the message says what to change."""


GPT2_VOCAB = 50258
"""GPT-2's 50,257 tokens (EOS last) plus the added BOS: the paper's vocabulary (ltm.data.gpt2_tokenizer)."""

SEEDS = 10**7
"""A run's seed is in [0, SEEDS): its sequences' inference-noise seeds, seed x 10^12 + the sequence's index
(`ltm.objective.sample_seed`), must fit torch's 64-bit generator seeds."""


def _whole(value: object) -> bool:
    """An int of a count or seed: a whole number (not a bool, not a float) that fits an int64 (a tensor, an
    MLflow metric step)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool) and -2**63 <= value < 2**63


def _finite(value: object) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool) and math.isfinite(value)


def check_at_least(section: object, prefix: str, low: float, names: tuple[str, ...], strict: bool = False) -> None:
    """Each of `names` >= `low` (> with `strict`); ConfigError naming the first that is not."""
    for name in names:
        value = getattr(section, name)
        if value < low or (strict and value == low):
            raise ConfigError(f"{prefix}{name} must be {'>' if strict else '>='} {low:g}, got {value}")


def check_kinds(section: object, prefix: str) -> None:
    """Every field of a config section holds a value of its declared kind (each section's first check), so a
    number that cannot work is refused naming its key before a run exists, not at its first update: an int
    field a whole number that fits an int64 (2.5 or 1e400 is refused, not rounded), a float field a finite
    number (not nan or inf), a pair of floats two finite numbers, a bool field true or false."""
    for f in dataclasses.fields(section):
        value, kind, key = getattr(section, f.name), f.type, f"{prefix}{f.name}"  # f.type: the annotation's text
        if value is None and kind.endswith("| None"):
            continue
        if kind.startswith("int") and not _whole(value):
            raise ConfigError(f"{key} must be a whole number below 2^63 (an int64), got {value!r}")
        if kind == "float" and not _finite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        if kind.startswith("tuple[float") and not (isinstance(value, tuple) and all(map(_finite, value))):
            raise ConfigError(f"{key} must be finite numbers, got {value!r}")
        if kind == "bool" and not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")


@dataclass(frozen=True)
class ModelConfig:
    """The decoder: an LTM (latent-conditioned) or its autoregressive twin."""

    kind: Literal["ltm", "ar"] = "ltm"
    """"ltm" adds cross-attention to per-layer latent vectors z; "ar" is the same decoder without it."""
    vocab_size: int = GPT2_VOCAB
    """Token vocabulary; GPT-2 BPE plus one begin-of-text token in the paper. Training takes it from
    the data (the tokenizer's vocabulary), so it is not part of a run's identity."""
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
    """Released-code option: rotate the cross-attention query at its token position and a layer's
    latent j's key at pseudo-position j * (ctx // n_latents), the same positions in every layer."""
    rope_theta: float = 10000.0
    init_std: float = 0.02

    def __post_init__(self) -> None:
        check_kinds(self, "model.")
        check_at_least(self, "model.", 0, ("rope_theta",), strict=True)
        check_at_least(self, "model.", 0, ("init_std",))
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

    @property
    def receptive_field(self) -> int:
        """Tokens a prediction can depend on through the self-attention stack alone:
        n_layers * (window - 1) + 1, at most the context."""
        return min(self.ctx, self.n_layers * (self.attn_window - 1) + 1)


@dataclass(frozen=True)
class InferenceConfig:
    """Fast learning: the per-sequence variational inference loop (docs/METHOD.md section 3)."""

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
    start: Literal["fixed", "learned", "encoder"] = "fixed"
    """Where each sequence's posterior starts (`ltm.start`). "fixed": mu ~ N(0, init_mu_std^2), logvar
    ~ N(init_logvar, init_logvar_std^2) (paper). "learned": the same draw around a per-latent (mu0, logvar0)
    that slow learning trains. "encoder": a small bidirectional encoder of the block predicts (mu, logvar)
    (semi-amortised; steps=0 is a purely amortised posterior). The learned and encoder starts are trained
    on the negative ELBO at the start, with the decoder frozen for that term (Kim et al. 2018)."""
    encoder_layers: int = 1
    """Bidirectional layers of the start="encoder" encoder (before its latent read-out)."""
    start_kl_warmup: float = 0.0
    """For a trained start: the fraction of training over which the KL weight of the start's own
    objective rises linearly from 0 to 1 (KL annealing, against posterior collapse; Bowman et al.
    2016). 0: the negative ELBO from the first update. Evaluation always scores the full bound."""

    def __post_init__(self) -> None:
        check_kinds(self, "inference.")
        check_at_least(self, "inference.", 0, ("eps",), strict=True)
        check_at_least(self, "inference.", 0, ("init_mu_std", "init_logvar_std", "weight_decay"))
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
        if self.start not in ("fixed", "learned", "encoder"):
            raise ConfigError(f"inference.start must be 'fixed', 'learned' or 'encoder', got {self.start!r}")
        if self.encoder_layers < 1:
            raise ConfigError(f"inference.encoder_layers must be >= 1, got {self.encoder_layers}")
        if not 0 <= self.start_kl_warmup <= 1:
            raise ConfigError("inference.start_kl_warmup is a fraction of training in [0, 1], "
                              f"got {self.start_kl_warmup}")
        if self.start != "fixed" and self.fixed_variance:
            raise ConfigError(f"inference.fixed_variance needs inference.start=fixed (got {self.start!r}): a trained "
                              "start learns its log-variance")

    def lr(self, step: int) -> float:
        """Inner learning rate at step s of T (cosine from lr_max to lr_min)."""
        return self.lr_min + 0.5 * (1 + math.cos(math.pi * step / self.steps)) * (self.lr_max - self.lr_min)


# ---------------------------------------------------------------------------------------
# Presets. The paper's three sizes pin the architecture (parameter counts in docs/METHOD.md section 1);
# the micro sizes keep the same shape ratios at a width a laptop CPU trains in minutes.

_PAPER = dict(vocab_size=GPT2_VOCAB, d_model=512, n_heads=8, ctx=1024, window=256, n_latents=24)
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
# Where latents can pay (docs/RESULTS.md): 2 layers of an 8-token window see 15 tokens, while the
# micro-rf corpus repeats each document's plan every ~40 tokens, inside a 128-token block.
MODEL_PRESETS["micro-rf"] = ModelConfig(vocab_size=128, n_layers=2, d_model=64, n_heads=4, ctx=128, window=8,
                                        n_latents=4)


def model_preset(name: str, **overrides) -> ModelConfig:
    """A named model configuration (a key of MODEL_PRESETS), with overrides."""
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
    val_name: str | None = None
    """Validation source (same kinds as name), used whole; None: the source's own validation
    split, or the last val_blocks blocks of the training stream when it has none."""
    synthetic_tokens: int = 2_000_000
    """Size of the generated training stream for name="synthetic"."""
    synthetic_vocab: int = 512
    """Vocabulary of the synthetic corpus (the model's vocab_size is taken from the data)."""
    synthetic_slots: int = 16
    """Slots in a synthetic document's plan; a slot recurs about every slots * (1 + p) / p tokens (p the
    event probability; 80 tokens for 16 slots), so set it so that this exceeds the model's receptive
    field n_layers * (window - 1) + 1 while staying inside the block, for the latent to matter."""
    synthetic_topics: int = 8
    """Topics of the synthetic corpus: each a sparse bigram chain over the words."""
    synthetic_branching: int = 8
    """Successors per word in a topic's chain (fewer: an easier short-range structure to learn)."""
    synthetic_event_prob: float = 0.25
    """Probability that a slot marker (then its value) follows a word or value."""
    synthetic_doc_len: float = 300.0
    """Mean synthetic document length in tokens (BOS and EOS included)."""
    seed: int = 0
    """Seed of the corpus itself (synthetic generation, shuffles); independent of the run seed."""
    cache_dir: str | None = None
    """Token cache folder; None uses $LTM_CACHE or ~/.cache/ltm."""

    def __post_init__(self) -> None:
        check_kinds(self, "data.")
        check_at_least(self, "data.", 0, ("seed",))
        if not self.name:
            raise ConfigError("data.name is empty; use 'synthetic', a hub name or a local path")
        if self.tokenizer not in ("auto", "gpt2", "bpe"):
            raise ConfigError(f"data.tokenizer must be 'auto', 'gpt2' or 'bpe', got {self.tokenizer!r}")
        if self.val_blocks < 1:
            raise ConfigError(f"data.val_blocks must be >= 1, got {self.val_blocks}")
        if self.bpe_vocab_size < 260:
            raise ConfigError(f"data.bpe_vocab_size must be >= 260 (256 bytes + specials), got {self.bpe_vocab_size}")
        if self.val_name is not None and not self.val_name:
            raise ConfigError("data.val_name is empty; use None or a source like data.name")
        if self.synthetic_tokens < 2:
            raise ConfigError(f"data.synthetic_tokens must be >= 2, got {self.synthetic_tokens}")
        for name in ("synthetic_slots", "synthetic_topics", "synthetic_branching"):
            if getattr(self, name) < 1:
                raise ConfigError(f"data.{name} must be >= 1, got {getattr(self, name)}")
        if not 0 < self.synthetic_event_prob < 1:
            raise ConfigError(f"data.synthetic_event_prob must be in (0, 1), got {self.synthetic_event_prob}")
        if self.synthetic_doc_len < 4:
            raise ConfigError(f"data.synthetic_doc_len must be >= 4 tokens, got {self.synthetic_doc_len}")
        # the synthetic vocabulary is words + slot markers + vocab // 4 values + EOS + BOS
        words = self.synthetic_vocab - 2 - self.synthetic_slots - self.synthetic_vocab // 4
        if words < max(8, self.synthetic_branching):
            raise ConfigError(
                f"data.synthetic_vocab={self.synthetic_vocab} leaves {words} word tokens with "
                f"{self.synthetic_slots} slots; need >= max(8, synthetic_branching={self.synthetic_branching}): "
                "raise synthetic_vocab or lower synthetic_slots")


@dataclass(frozen=True)
class TrainConfig:
    """Slow learning: the decoder's optimiser, schedule, budget, evaluation and checkpoints."""

    tokens: int = 2_000_000
    """Training budget in input tokens (updates x batch_size x ctx)."""
    batch_size: int = 16
    """Sequences per decoder update, over all processes (the paper: 512 x 1024 = 524,288 tokens)."""
    micro_batch_size: int = 0
    """Sequences per forward/backward on one process; 0 = the whole per-process batch at once."""
    lr: float = 4e-4
    min_lr: float = 4e-5
    warmup_steps: int = 1000
    schedule: Literal["cosine", "wsd", "constant"] = "cosine"
    """The learning rate after the linear warmup (`ltm.objective.lr_at`). "cosine": from lr down to min_lr at
    the budget's end. "wsd" (warmup-stable-decay, Hägele et al. 2024): lr until the last decay_fraction of the
    budget's updates, then down to min_lr; a wsd run branches from its trunk (`RunConfig.trunk`). "constant":
    lr for ever: a trunk, whose run key leaves out train.tokens (the tokens it runs, or resumes, up to)."""
    decay_fraction: float = 0.2
    """schedule=wsd: the share of the budget's updates spent decaying, in (0, 1)."""
    decay_shape: Literal["1-sqrt", "linear"] = "1-sqrt"
    """schedule=wsd: "1-sqrt": min_lr + (lr - min_lr)(1 - sqrt(p)), p the progress through the decay (Hägele
    et al.'s recommendation); "linear": min_lr + (lr - min_lr)(1 - p)."""
    betas: tuple[float, float] = (0.9, 0.95)
    weight_decay: float = 0.1
    """Applied to matrices and embeddings, not to norm gains."""
    grad_clip: float = 1.0
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """"auto": bf16 autocast on CUDA, fp32 on CPU (bf16 is slower on CPUs without AMX; see benchmarks)."""
    eval_every: int = 0
    """Evaluate every this many tokens (0: only at the end)."""
    eval_blocks: int = 32
    """Validation blocks evaluated (the first ones of the validation split: a fixed set)."""
    eval_batch_size: int = 16
    iw_samples: int = 8
    """Importance samples for val/ppl_iw (0 to skip)."""
    log_every: int = 0
    """Log training metrics every this many tokens (0: every update)."""
    checkpoint_every: int = 0
    """Checkpoint every this many tokens (0: only on exit)."""
    peak_flops: float = 0.0
    """Hardware peak FLOP/s for the mfu metric (0: look it up for known GPUs, else no mfu)."""
    compile: Literal["auto", "on", "off"] = "auto"
    """torch.compile the inner loop and the decoder update. "auto": on CUDA; on a CPU for runs long
    enough to repay the compile (benchmarks/RESULTS.md). Not part of the run's identity: the compiled
    and eager programs compute the same numbers up to float rounding."""

    def __post_init__(self) -> None:
        check_kinds(self, "train.")
        check_at_least(self, "train.", 0, ("weight_decay", "peak_flops"))
        for name in ("tokens", "batch_size", "eval_blocks", "eval_batch_size"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be >= 1, got {getattr(self, name)}")
        for name in ("micro_batch_size", "warmup_steps", "eval_every", "log_every", "checkpoint_every", "iw_samples"):
            if getattr(self, name) < 0:
                raise ConfigError(f"train.{name} must be >= 0, got {getattr(self, name)}")
        if self.micro_batch_size and self.batch_size % self.micro_batch_size:
            raise ConfigError(f"train.batch_size={self.batch_size} is not a multiple of "
                              f"train.micro_batch_size={self.micro_batch_size}")
        if not 0 <= self.min_lr <= self.lr:
            raise ConfigError(f"need 0 <= train.min_lr <= train.lr, got {self.min_lr} and {self.lr}")
        if not self.grad_clip > 0:
            raise ConfigError(f"train.grad_clip must be > 0 (the largest gradient norm), got {self.grad_clip}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"train.betas must be two numbers in [0, 1), got {self.betas}")
        if self.compile not in ("auto", "on", "off"):
            raise ConfigError(f"train.compile must be 'auto', 'on' or 'off', got {self.compile!r}")
        if self.precision not in ("auto", "fp32", "bf16"):
            raise ConfigError(f"train.precision must be 'auto', 'fp32' or 'bf16', got {self.precision!r}")
        self._check_schedule()

    def _check_schedule(self) -> None:
        if self.schedule not in ("cosine", "wsd", "constant"):
            raise ConfigError(f"train.schedule must be 'cosine', 'wsd' or 'constant', got {self.schedule!r}")
        if self.decay_shape not in ("1-sqrt", "linear"):
            raise ConfigError(f"train.decay_shape must be '1-sqrt' or 'linear', got {self.decay_shape!r}")
        if self.schedule == "wsd" and not 0 < self.decay_fraction < 1:
            raise ConfigError(f"train.decay_fraction is the share of the budget spent decaying, in (0, 1) (e.g. "
                              f"0.2), got {self.decay_fraction}")


@dataclass(frozen=True)
class RunConfig:
    """Everything that defines one training run; the hash of the fields it uses is its identity (run key)."""

    model: ModelConfig = ModelConfig()
    inference: InferenceConfig = InferenceConfig()
    data: DataConfig = DataConfig()
    train: TrainConfig = TrainConfig()
    seed: int = 0

    def __post_init__(self) -> None:
        check_kinds(self, "")
        if not 0 <= self.seed < SEEDS:
            raise ConfigError(f"seed must be in [0, {SEEDS:,}), got {self.seed}")
        if self.model.kind == "ltm" and self.inference.steps < 1 and self.inference.start != "encoder":
            raise ConfigError(f"an LTM needs inference.steps >= 1 (got {self.inference.steps}): with 0 its latents are "
                              "never inferred and the decoder trains on the posterior's starting point; for a model "
                              "without latents use model.kind=ar (or inference.start=encoder for a purely amortised "
                              "posterior)")
        self._check_schedule()

    def _check_schedule(self) -> None:
        """A wsd run's decay starts after its warmup; no schedule but cosine has a trained start's KL warmup (a
        fraction of the budget: a trunk's would depend on the budget it does not know)."""
        tc = self.train
        if tc.schedule != "cosine" and self.inference.start != "fixed" and self.inference.start_kl_warmup:
            raise ConfigError(f"inference.start_kl_warmup={self.inference.start_kl_warmup} needs train.schedule=cosine "
                              f"(got {tc.schedule!r}): a trunk's KL warmup cannot be a fraction of a budget it does "
                              "not have; set it to 0")
        if tc.schedule == "wsd" and self.decay_start <= tc.warmup_steps:
            raise ConfigError(
                f"train.tokens={tc.tokens:,} with train.decay_fraction={tc.decay_fraction:g} branches from the trunk "
                f"at update {self.decay_start} ({self.decay_start * self.tokens_per_update:,} tokens), inside its "
                f"train.warmup_steps={tc.warmup_steps}: raise train.tokens to at least "
                f"{math.ceil((tc.warmup_steps + 1) / (1 - tc.decay_fraction)) * self.tokens_per_update:,} or lower "
                "train.decay_fraction or train.warmup_steps")

    @property
    def decay_start(self) -> int:
        """schedule=wsd: the update at which the decay starts (the trunk's last update, its branch point): the
        budget's updates x (1 - train.decay_fraction), rounded down."""
        return math.floor(self.updates * (1 - self.train.decay_fraction))

    def branch_point(self) -> int:
        """Tokens at which a wsd run leaves its trunk: `decay_start` whole updates (ConfigError for any other
        schedule; construction already refused a branch point inside the warmup)."""
        if self.train.schedule != "wsd":
            raise ConfigError(f"a branch point needs train.schedule=wsd, got {self.train.schedule!r}")
        return self.decay_start * self.tokens_per_update

    def trunk(self) -> "RunConfig":
        """The trunk a wsd run branches from: the same run at a constant rate (schedule "constant", everything
        else equal), up to this run's branch point. Its run key is the same whatever its tokens."""
        return dataclasses.replace(self, train=dataclasses.replace(self.train, schedule="constant",
                                                                   tokens=self.branch_point()))

    @property
    def tokens_per_update(self) -> int:
        """Tokens one optimiser update trains on: train.batch_size blocks of model.ctx."""
        return self.train.batch_size * self.model.ctx

    @property
    def updates(self) -> int:
        """Updates a run makes: train.tokens rounded up to whole updates, at least one."""
        return max(1, math.ceil(self.train.tokens / self.tokens_per_update))

    def to_dict(self) -> dict:
        """Nested plain dict (JSON-able)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "RunConfig":
        """Inverse of to_dict; unknown keys are errors."""
        sections = {"model": ModelConfig, "inference": InferenceConfig, "data": DataConfig, "train": TrainConfig}
        unknown = set(d) - set(sections) - {"seed"}
        if unknown:
            raise ConfigError(f"unknown run config sections {sorted(unknown)}; known: {sorted(sections)} and seed")
        kwargs = {}
        for name, section in sections.items():
            values = dict(d.get(name, {}))
            fields = {f.name: f for f in dataclasses.fields(section)}
            bad = set(values) - set(fields)
            if bad:
                raise ConfigError(f"unknown {name} fields {sorted(bad)}; known: {sorted(fields)}")
            for key, value in values.items():
                if isinstance(value, list):
                    values[key] = tuple(value)
                elif isinstance(value, float) and value.is_integer() and fields[key].type.startswith("int"):
                    values[key] = int(value)  # JSON's 1e6 is a float: the count it writes, as --set reads it
            kwargs[name] = section(**values)
        return cls(seed=d.get("seed", 0), **kwargs)

    def flat(self) -> dict[str, object]:
        """Dotted keys ("inference.steps", "seed") to values: the MLflow params."""
        out: dict[str, object] = {}
        for section, values in self.to_dict().items():
            if isinstance(values, dict):
                out.update({f"{section}.{k}": v for k, v in values.items()})
            else:
                out[section] = values
        return out

    def with_overrides(self, assignments: list[str] | dict[str, object]) -> "RunConfig":
        """Apply "key=value" strings (or a {dotted key: value} dict), parsing values by the field's type."""
        items = assignments.items() if isinstance(assignments, dict) else (split_assignment(a) for a in assignments)
        d = self.to_dict()
        current = self.flat()
        for key, raw in items:
            if key not in current:
                raise ConfigError(f"unknown config key {key!r}; known keys: {', '.join(sorted(current))}")
            value = parse_value(raw, current[key], key) if isinstance(raw, str) else raw
            if "." in key:
                section, field = key.split(".", 1)
                d[section][field] = value
            else:
                d[key] = value
        return RunConfig.from_dict(d)

    def identity(self) -> dict:
        """to_dict() without the fields the run ignores, so that changing one never makes a new run."""
        d = self.to_dict()
        d["data"].pop("cache_dir")  # where tokens are cached
        d["train"].pop("compile")  # how the same program is executed
        d["model"].pop("vocab_size")  # always the data's vocabulary, which the data fields fix
        if self.inference.start == "fixed":  # the paper's start: keys from before the option existed
            d["inference"].pop("start")
        if self.inference.start == "fixed" or not self.inference.start_kl_warmup:  # (added after the starts)
            d["inference"].pop("start_kl_warmup")
        if self.inference.start != "encoder":
            d["inference"].pop("encoder_layers")
        if self.model.kind == "ar":  # no latents, so no inference loop
            del d["inference"]
            d["model"].pop("n_latents")
            d["model"].pop("latent_rope")
        if self.data.name != "synthetic":
            for name in [k for k in d["data"] if k.startswith("synthetic_")]:
                d["data"].pop(name)
        if self.data.tokenizer != "bpe":
            d["data"].pop("bpe_vocab_size")
        self._schedule_identity(d["train"])
        return d

    def _schedule_identity(self, train: dict) -> None:
        """Cosine runs keep their keys from before the schedule options; a trunk (constant) uses neither its
        budget nor min_lr: one key for every branch point of the trunk (`trunk`)."""
        if self.train.schedule == "cosine":
            train.pop("schedule")
        if self.train.schedule != "wsd":
            train.pop("decay_fraction")
            train.pop("decay_shape")
        if self.train.schedule == "constant":
            train.pop("tokens")
            train.pop("min_lr")

    def run_key(self) -> str:
        """A stable 16-hex-digit hash of identity(), seed included: the run's name everywhere."""
        blob = json.dumps(self.identity(), sort_keys=True, default=str).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


def split_assignment(text: str, example: str = "inference.steps=32") -> tuple[str, str]:
    """"key=value" as (key, value), both stripped; ConfigError without an "=" or a key."""
    key, eq, value = text.partition("=")
    if not eq or not key.strip():
        raise ConfigError(f"expected key=value, got {text!r} (e.g. {example})")
    return key.strip(), value.strip()


_TAKES = {bool: "true or false", int: "a whole number, e.g. 32 or 1e6", float: "a finite number, e.g. 0.5 or 1e-3",
          tuple: "finite numbers separated by commas, e.g. 0.9,0.95"}


def _whole_number(text: str) -> int:
    """"32", or "1e6" with an exponent; ValueError for a fraction (2.5, 2.5e0), nan, inf or 1e400 (no rounding)."""
    if "e" not in text.lower():
        return int(text)
    number = float(text)
    if not math.isfinite(number) or number != int(number):
        raise ValueError(text)
    return int(number)


def _finite_number(text: str) -> float:
    """A float, not nan or inf (1e400 reads as inf); ValueError otherwise."""
    number = float(text)
    if not math.isfinite(number):
        raise ValueError(text)
    return number


def parse_value(raw: str, like: object, key: str) -> object:
    """A command-line value typed like `like`, the option's current value: "none", "null" or nothing is
    None; bools from true/false/1/0; ints (1e6 too); floats; tuples of floats and lists from commas; where
    `like` is None (an optional number or string) or a list's items, an int, else a float, else the text.
    A number that cannot work (nan, inf, 1e400, a fraction for a whole number) is refused (ConfigError) with
    what the key takes."""
    def scalar(text: str) -> object:
        for parse in (int, _finite_number):
            try:
                return parse(text)
            except ValueError:
                pass
        return text

    try:
        if raw.lower() in ("none", "null", ""):
            return None
        if isinstance(like, bool):
            if raw.lower() not in ("true", "false", "1", "0"):
                raise ValueError
            return raw.lower() in ("true", "1")
        if isinstance(like, int):
            return _whole_number(raw)
        if isinstance(like, float):
            return _finite_number(raw)
        if isinstance(like, tuple):
            return tuple(_finite_number(x) for x in raw.split(","))
        if isinstance(like, list):
            return [scalar(x.strip()) for x in raw.split(",") if x.strip()]
        if like is None:
            return scalar(raw)
        return raw
    except ValueError:
        takes = _TAKES.get(type(like), type(like).__name__)
        raise ConfigError(f"cannot parse {key}={raw!r} as {type(like).__name__}: {key} takes {takes}") from None


# Run presets: a model preset with a training recipe sized for it.
def _run_presets() -> dict[str, RunConfig]:
    smoke = RunConfig(
        model=MODEL_PRESETS["smoke"], inference=InferenceConfig(steps=4),
        data=DataConfig(synthetic_tokens=200_000, synthetic_vocab=64, synthetic_slots=4, val_blocks=16),
        train=TrainConfig(tokens=16_384, batch_size=8, lr=3e-3, min_lr=3e-4, warmup_steps=8,
                          eval_blocks=8, eval_batch_size=8, iw_samples=4, eval_every=8192))
    micro = RunConfig(
        model=MODEL_PRESETS["micro"], inference=InferenceConfig(steps=16),
        data=DataConfig(synthetic_tokens=2_000_000, val_blocks=64),
        train=TrainConfig(tokens=400_000, batch_size=16, lr=2e-3, min_lr=2e-4, warmup_steps=20,
                          eval_blocks=32, iw_samples=8, eval_every=100_000, checkpoint_every=100_000))
    # The corpus of the micro studies: a plan of 8 slots over 32 values, recurring every ~40 tokens,
    # and 4 topics of a 4-successor word chain, simple enough for an AR of the same window to come
    # within 1.3x of its receptive-field optimum in a few hundred thousand tokens.
    micro_rf = RunConfig(
        model=MODEL_PRESETS["micro-rf"], inference=InferenceConfig(steps=16),
        data=DataConfig(synthetic_tokens=2_000_000, synthetic_vocab=128, synthetic_slots=8, synthetic_topics=4,
                        synthetic_branching=4, val_blocks=64),
        train=TrainConfig(tokens=600_000, batch_size=8, lr=4e-3, min_lr=4e-4, warmup_steps=20,
                          eval_blocks=32, iw_samples=8, eval_every=150_000, checkpoint_every=150_000))
    paper = {size: RunConfig(
        model=MODEL_PRESETS[size], inference=InferenceConfig(steps=16),
        data=DataConfig(name="openwebtext", val_blocks=256),
        train=TrainConfig(tokens=3_000_000_000, batch_size=512, micro_batch_size=32, eval_every=50_000_000,
                          eval_blocks=256, checkpoint_every=50_000_000, log_every=5_242_880))
        for size in ("ltm-s", "ltm-m", "ltm-l")}
    return {"smoke": smoke, "micro": micro, "micro-rf": micro_rf, **paper}


RUN_PRESETS: dict[str, RunConfig] = _run_presets()


def run_preset(name: str) -> RunConfig:
    """A named run recipe: "smoke" (seconds on a CPU), "micro" (minutes on a laptop), "micro-rf" (the
    micro studies' receptive-field-limited regime), "ltm-s|m|l" (paper)."""
    try:
        return RUN_PRESETS[name.lower()]
    except KeyError:
        raise ConfigError(f"unknown run preset {name!r}; known presets: {', '.join(RUN_PRESETS)}") from None


def describe(cfg: RunConfig) -> str:
    """One line saying what a run is, for its MLflow description: "LTM micro-rf L2 d64 window 8 T=16 N_z=4
    logvar=0 start, 600k tokens"; the run recipe whose decoder it uses, if any (its kind, window, latents and
    vocabulary aside: the line states them)."""
    m, inf = cfg.model, cfg.inference
    def decoder(model: ModelConfig) -> dict:
        return {k: v for k, v in dataclasses.asdict(model).items() if k not in ("vocab_size", "kind", "window",
                                                                                 "n_latents")}

    recipe = next((name for name, preset in RUN_PRESETS.items() if decoder(preset.model) == decoder(m)), None)
    words = [m.kind.upper(), *([recipe] if recipe else []), f"L{m.n_layers}", f"d{m.d_model}",
             "full context" if m.window is None else f"window {m.window}"]
    if m.kind == "ltm":
        start = {"fixed": f"logvar={inf.init_logvar:g}", "learned": "learned",
                 "encoder": f"{inf.encoder_layers}-layer encoder"}[inf.start]
        words += [f"T={inf.steps}", f"N_z={m.n_latents}", f"{start} start"]
    tail = f"{_count(cfg.updates * cfg.tokens_per_update)} tokens"
    tc = cfg.train
    tail += {"cosine": "", "constant": " (constant-lr trunk)",
             "wsd": f" (wsd, {tc.decay_shape} decay over the last {tc.decay_fraction:.0%})"}[tc.schedule]
    if cfg.data.name != "synthetic":
        tail += f" of {cfg.data.name.rstrip('/').rpartition('/')[2]}"  # a local file by its name
    return " ".join(words) + f", {tail}" + (f", seed {cfg.seed}" if cfg.seed else "")


def _count(n: int) -> str:
    """600k, 1.5M, 3B: a token count at a glance (three significant digits)."""
    for scale, suffix in ((1e9, "B"), (1e6, "M"), (1e3, "k")):
        if n >= scale:
            return f"{float(f'{n / scale:.3g}'):g}{suffix}"
    return str(n)

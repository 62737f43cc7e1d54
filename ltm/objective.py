"""What one training update optimises, and how: the loss, the learning-rate schedule, the optimiser,
the precision, the compile policy and the inference-noise seeds (docs/METHOD.md section 5).

The training loop (`ltm.loop`) runs these; the memory model (`ltm.memory`), the benchmarks and the
evaluation tasks use the same ones, so what they measure is what training does.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from ltm.config import InferenceConfig, ModelConfig, TrainConfig
from ltm.model import LatentThoughtModel
from ltm.posterior import infer_posterior, start_bound
from ltm.start import NO_DECAY

EVAL_SEED = 20_250_000
"""Every evaluation of every run uses the same noise seeds, so curves are not jittered by them."""

CPU_COMPILE_MIN_FLOPS = 1e13
"""Training FLOPs (exact) from which "auto" compiles on a CPU; see use_compile."""
CPU_COMPILE_SECONDS = 25
"""About how long compiling a run's training shapes takes on an idle 2-core CPU (22 s for micro's,
benchmarks/RESULTS.md): what a run tells its user before the first update waits for it."""


def decoder_loss(model: LatentThoughtModel, tokens: torch.Tensor, cfg: InferenceConfig | None,
                 seeds: Sequence[int] | None, compiled: bool = False,
                 progress: float = 1.0) -> tuple[torch.Tensor, torch.Tensor]:
    """(mean next-token cross-entropy at the inferred z_T, summed KL of the posteriors).

    For an LTM this runs the inference loop first (which, with decoder_grad="trajectory",
    already accumulates into the decoder's .grad); an AR model is scored directly (KL 0).
    `compiled` runs both through torch.compile (one graph per shape). `progress` (0 to 1, the share
    of training done) sets a trained start's KL weight while `cfg.start_kl_warmup` anneals it.
    """
    post = infer_posterior(model, tokens, cfg, seeds=seeds, compiled=compiled) if model.cfg.kind == "ltm" else None
    z, kl = (post.z, post.kl().sum()) if post is not None else (None, torch.zeros((), device=tokens.device))
    loss = (_compiled_cross_entropy if compiled else _cross_entropy)(model, tokens, z)
    if model.start is not None:
        # A trained start learns from its own bound per token (the decoder is frozen for it). Added as
        # bound - bound.detach(): its gradient joins the backward, while the loss keeps the CE's value.
        weight = min(1.0, progress / cfg.start_kl_warmup) if cfg.start_kl_warmup else 1.0
        start = start_bound(model, tokens, post, kl_weight=weight).sum() / tokens[:, 1:].numel()
        loss = loss + (start - start.detach())
    return loss, kl


def _cross_entropy(model: LatentThoughtModel, tokens: torch.Tensor, z: torch.Tensor | None) -> torch.Tensor:
    logits = model(tokens[:, :-1], z)
    return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())


_compiled_cross_entropy = torch.compile(_cross_entropy, dynamic=False)


def sample_seed(run_seed: int, sample_index: int) -> int:
    """The inference-noise seed of the sample_index-th training sequence of a run: independent of
    batching and of the number of processes."""
    return run_seed * 10**12 + sample_index


def lr_at(step: int, total_steps: int, cfg: TrainConfig) -> float:
    """The learning rate of update `step` of `total_steps`: linear warmup, then cfg.schedule's curve (cosine
    from lr to min_lr at the last step; wsd: lr, then cfg.decay_shape down to min_lr over the last
    cfg.decay_fraction of the updates; constant: lr)."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.schedule == "constant":
        return cfg.lr
    if cfg.schedule == "wsd":
        decay_start = math.floor(total_steps * (1 - cfg.decay_fraction))  # RunConfig.decay_start
        if step < decay_start:
            return cfg.lr
        progress = min(1.0, (step - decay_start) / max(1, total_steps - decay_start))
        left = 1 - math.sqrt(progress) if cfg.decay_shape == "1-sqrt" else 1 - progress
        return cfg.min_lr + left * (cfg.lr - cfg.min_lr)
    progress = (step - cfg.warmup_steps) / max(1, total_steps - cfg.warmup_steps)
    return cfg.min_lr + 0.5 * (1 + math.cos(math.pi * min(1.0, progress))) * (cfg.lr - cfg.min_lr)


def make_optimizer(model: torch.nn.Module, cfg: TrainConfig) -> torch.optim.AdamW:
    """AdamW with weight decay on matrices and embeddings, none on norm gains or a learned start's centre."""
    decay = [p for name, p in model.named_parameters() if p.dim() >= 2 and name not in NO_DECAY]
    no_decay = [p for name, p in model.named_parameters() if p.dim() < 2 or name in NO_DECAY]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = next(model.parameters()).device.type == "cuda"  # one kernel for the whole update on a GPU
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, **({"fused": True} if fused else {"foreach": True}))


def autocast_for(device: torch.device, precision: str):
    """bf16 autocast where train.precision asks for it ("auto": on CUDA), else nothing: training and evaluations."""
    use_bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16) if use_bf16 else contextlib.nullcontext()


# -- compiling -------------------------------------------------------------------------------

def use_compile(setting: str, device: torch.device, training_flops: float) -> bool:
    """Whether train.compile=setting compiles: "auto" on CUDA, and on a CPU for runs of at least
    CPU_COMPILE_MIN_FLOPS (below it the compile costs more than it saves; benchmarks/RESULTS.md)."""
    if setting != "auto":
        return setting == "on"
    return device.type == "cuda" or training_flops >= CPU_COMPILE_MIN_FLOPS


def compile_notice(device: torch.device) -> str:
    """What a compiling run says before its first update, which waits for the compile."""
    cost = (f"about {CPU_COMPILE_SECONDS} s on an idle 2-core CPU, longer on a busy one" if device.type == "cpu"
            else "the first update waits for it")
    return (f"compiling the inner loop and the decoder for this run's shapes (once per process: {cost}; "
            "--set train.compile=off skips it)")


def c_compiler(environ: Mapping[str, str] | None = None) -> str | None:
    """The C compiler Triton would build its CUDA launchers with: $CC, else gcc, else clang on $PATH
    (triton/runtime/build.py), or None."""
    environ = os.environ if environ is None else environ
    path = environ.get("PATH", os.defpath)
    if "CC" in environ:
        return shutil.which(environ["CC"], path=path)
    return shutil.which("gcc", path=path) or shutil.which("clang", path=path)


INSTALL_C_COMPILER = ("install one (e.g. `apt install gcc`, `conda install -c conda-forge gcc`, or `module load gcc` "
                      "on a cluster) or set CC to it")


def missing_c_compiler(environ: Mapping[str, str] | None = None) -> str | None:
    """Why Triton would find no C compiler ("neither gcc nor clang is on PATH"), or None when it finds one."""
    environ = os.environ if environ is None else environ
    if c_compiler(environ) is not None:
        return None
    return f"CC={environ['CC']!r} is not an executable" if "CC" in environ else "neither gcc nor clang is on PATH"


def check_c_compiler(environ: Mapping[str, str] | None = None) -> None:
    """Refuse a compiling CUDA run up front when Triton would find no C compiler (it needs one at the
    first compiled step, long after the run is created)."""
    named = missing_c_compiler(environ)
    if named is not None:
        raise RuntimeError(f"torch.compile on CUDA needs a C compiler for Triton, and {named}; {INSTALL_C_COMPILER}, "
                           "or run without compiling: --set train.compile=off")


def check_window_compiler(model: ModelConfig, device: torch.device, environ: Mapping[str, str] | None = None) -> str:
    """The attention form a model takes at its context on `device` (`ltm.attention.window_kind`: "flex",
    "chunked", "dense", or "causal"), checked as a compiling run is: FlexAttention on CUDA is compiled by
    Triton, which needs a C compiler; raises RuntimeError naming what to install or set. An evaluation calls
    it before its setup (`studies.tasks`): it runs FlexAttention on CUDA whatever train.compile says."""
    from ltm.attention import window_kind

    kind = window_kind(model.ctx, model.attn_window, device.type) or "causal"
    missing = missing_c_compiler(environ) if device.type == "cuda" and kind == "flex" else None
    if missing:
        raise RuntimeError(f"this evaluation runs on {device} with FlexAttention (context {model.ctx}, window "
                           f"{model.attn_window}), which Triton compiles with a C compiler, and {missing}; "
                           f"{INSTALL_C_COMPILER}")
    return kind

"""Memory of a training update (issue 19): the estimate of `ltm.memory` against the peak measured on
this CPU, its corner interpolation against full traces of the paper's shapes, and what the paper
presets need on a GPU.

    python benchmarks/bench_memory.py

Prints a markdown report; paste it into benchmarks/RESULTS.md with the machine and command.
"""

from __future__ import annotations

import time

import torch

from ltm.attention import uses_window_kernel
from ltm.config import GPT2_VOCAB, RunConfig, run_preset
from ltm.memory import _traced, gib, measure_peak_bytes, step_memory, trace_peak_bytes
from studies.costs import usable_gb

VALIDATION = [  # (config, micro-batch): tests/test_memory.py measures the same kinds of update
    (run_preset("micro").with_overrides({"inference.steps": 4}), 8),
    (run_preset("micro").with_overrides({"inference.steps": 4}), 2),
    (run_preset("micro").with_overrides({"model.kind": "ar"}), 8),
    (run_preset("micro-rf").with_overrides({"inference.steps": 2, "model.ctx": 512, "model.window": 64}), 2),
    (run_preset("micro-rf").with_overrides({"inference.steps": 1, "model.window": None}), 4),
    (run_preset("micro-rf").with_overrides({"inference.steps": 3, "inference.decoder_grad": "trajectory"}), 4),
    (run_preset("micro").with_overrides({"inference.steps": 2, "train.precision": "bf16"}), 4),
    (run_preset("micro").with_overrides({"inference.steps": 16, "train.batch_size": 8}), 2),
    (run_preset("micro").with_overrides({"model.n_layers": 4, "inference.steps": 2}), 4),
    (run_preset("micro").with_overrides({"model.n_layers": 4, "inference.steps": 2}), 16),
    (run_preset("micro-rf").with_overrides({"model.kind": "ar", "model.n_layers": 3, "model.ctx": 512,
                                             "model.window": 64, "train.batch_size": 6}), 3),
]


def attention_form(cfg: RunConfig) -> str:
    m = cfg.model
    if m.attn_window >= m.ctx:
        return "causal"
    return f"w={m.attn_window} " + ("chunked" if uses_window_kernel(m.ctx, m.attn_window) else "dense mask")


def validation() -> list[str]:
    rows = ["| config | layers | attention | T | decoder_grad | precision | micro-batch | estimate (MB) | "
            "measured (MB) | estimate / measured |", "|---|---|---|---|---|---|---|---|---|---|"]
    for cfg, micro in VALIDATION:
        cfg = cfg.with_overrides({"train.micro_batch_size": micro})
        memory = step_memory(cfg, "cpu")
        estimate, measured = memory.peak_bytes(), measure_peak_bytes(cfg, micro, memory.precision)
        m = cfg.model
        rows.append(f"| {m.kind} d={m.d_model} ctx={m.ctx} N_z={m.n_latents if m.kind == 'ltm' else '-'} "
                    f"batch={cfg.train.batch_size} | {m.n_layers} | {attention_form(cfg)} | "
                    f"{cfg.inference.steps if m.kind == 'ltm' else '-'} | {cfg.inference.decoder_grad} | "
                    f"{memory.precision} | {micro} | {estimate / 1e6:.3f} | {measured / 1e6:.3f} | "
                    f"{estimate / measured:.4f} |")
    return rows


def paper_shapes() -> list[str]:
    rows = ["| preset | N_z | micro-batch | interpolated (GB) | full trace (GB) | ratio |", "|---|---|---|---|---|---|"]
    for preset, n_latents, micro in [("ltm-s", 24, 32), ("ltm-m", 192, 5), ("ltm-l", 24, 32), ("ltm-l", 192, 8)]:
        cfg = run_preset(preset).with_overrides({"inference.steps": 2, "model.n_latents": n_latents,
                                                  "model.vocab_size": GPT2_VOCAB})
        estimate = step_memory(cfg, "cuda").peak_bytes(micro)
        full = max(trace_peak_bytes(cfg, micro, "bf16").values())
        rows.append(f"| {preset} | {n_latents} | {micro} | {gib(estimate):.3f} | {gib(full):.3f} "
                    f"| {estimate / full:.5f} |")
    return rows


def paper_presets() -> list[str]:
    gpus = (40, 80, 141)
    rows = ["| preset | N_z | peak at micro-batch 32 (GB) | at 1 (GB) | " + " | ".join(
        f"largest micro-batch, {g} GB GPU ({usable_gb(g, 1):.3g} usable)" for g in gpus) + " |",
        "|---|---|---|---|" + "---|" * len(gpus)]
    for preset in ("ltm-s", "ltm-m", "ltm-l"):
        for n_latents in (24, 192):
            cfg = run_preset(preset).with_overrides({"inference.steps": 64, "model.n_latents": n_latents,
                                                      "model.vocab_size": GPT2_VOCAB})
            memory = step_memory(cfg, "cuda")
            fits = [memory.largest_micro_batch(usable_gb(g, 1) * 2**30) for g in gpus]
            rows.append(f"| {preset} | {n_latents} | {gib(memory.peak_bytes()):.2f} "
                        f"| {gib(memory.peak_bytes(1)):.2f} | " + " | ".join(map(str, fits)) + " |")
    return rows


def estimator_time() -> str:
    """Cold: every trace the paper preset's 48 points need, from an empty cache."""
    _traced.cache_clear()
    wall, cpu = time.perf_counter(), time.process_time()
    for preset in ("ltm-s", "ltm-m", "ltm-l"):
        for steps in (16, 32, 64, 128):
            for n_latents in (24, 48, 96, 192):
                cfg = run_preset(preset).with_overrides({"inference.steps": steps, "model.n_latents": n_latents,
                                                          "model.vocab_size": GPT2_VOCAB})
                memory = step_memory(cfg, "cuda")
                memory.peak_bytes(1), memory.largest_micro_batch(usable_gb(141, 1) * 2**30)
    return (f"the paper preset's 48 points (peak, peak at 1, largest micro-batch on 141 GB) from cold: "
            f"{time.perf_counter() - wall:.2f} s wall, {time.process_time() - cpu:.2f} s CPU, "
            f"{_traced.cache_info().misses} traces")


def main() -> None:
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads\n")
    print("### Estimate against the peak measured on this CPU\n")
    print("\n".join(validation()))
    print("\n### Corner interpolation against the full trace (fake tensors, bf16 autocast, GPT-2 vocabulary)\n")
    print("\n".join(paper_shapes()))
    print("\n### The paper presets on a GPU (bf16 autocast, eager; T does not matter)\n")
    print("\n".join(paper_presets()))
    print(f"\n{estimator_time()}")


if __name__ == "__main__":
    main()

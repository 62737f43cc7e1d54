"""Core-library benchmarks: the inner step against a forward pass, the AR baseline against a
reference GPT, and LTM training throughput and MFU, in fp32 and bf16 autocast, eager and compiled
(torch.compile); and sliding-window self-attention, dense mask against the windowed forms.

    python benchmarks/bench_core.py                 # micro config, this machine's CPU
    python benchmarks/bench_core.py --preset ltm-s --device cuda --batch 32 --dtypes bf16

Prints a markdown report; paste it into benchmarks/RESULTS.md with the machine and command.
Run it on a quiet machine: every number is a median over repeats after warm-up.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import platform
import statistics
import time

import torch
import torch.nn.functional as F

import ltm
from ltm.flops import flops_per_token
from ltm.model import token_nll
from ltm.train import decoder_loss

from reference_gpt import ReferenceGPT

DTYPES = {"fp32": None, "bf16": torch.bfloat16}


def sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def median_seconds(fn, device: str, warmup: int, repeat: int) -> float:
    for _ in range(warmup):
        fn()
    sync(device)
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        sync(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def autocast(device: str, dtype):
    return torch.autocast(device, dtype=dtype) if dtype is not None else contextlib.nullcontext()


def matmul_peak(device: str, dtype: torch.dtype, n: int) -> float:
    """Measured dense matmul FLOP/s for square n x n matrices."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    seconds = median_seconds(lambda: a @ b, device, warmup=3, repeat=10)
    return 2 * n**3 / seconds


def inner_step_cost(model, tokens, device, dtype, steps: int, repeat: int, compiled: bool) -> tuple[float, float]:
    """(seconds per inner step, seconds per no-grad forward pass with its loss) for one batch; the
    forward is eager in both modes (evaluation scores eagerly), so the ratio is the loop's cost in
    units of a plain scoring pass."""
    seeds = list(range(len(tokens)))
    z = torch.randn(len(tokens), model.cfg.n_latents, model.cfg.d_model, device=device)

    def infer(n):
        with autocast(device, dtype):
            ltm.infer_posterior(model, tokens, ltm.InferenceConfig(steps=n), seeds=seeds, compiled=compiled)

    def forward():  # a scoring forward: logits and the loss
        with torch.no_grad(), autocast(device, dtype):
            token_nll(model(tokens[:, :-1], z), tokens[:, 1:]).sum()

    loop = median_seconds(lambda: infer(steps), device, 2, repeat)
    setup = median_seconds(lambda: infer(0), device, 2, repeat)
    return (loop - setup) / steps, median_seconds(forward, device, 2, repeat * 3)


def train_step_seconds(model, tokens, device, dtype, step_fn, repeat: int) -> float:
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")

    def step():
        with autocast(device, dtype):
            loss = step_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return median_seconds(step, device, 2, repeat)


def core_rows(args, cfg, tokens, dtype, peak: float, compiled: bool) -> str:
    """One table row: inner step / forward, AR and reference GPT training, LTM training and its MFU."""
    device, n_tok, seeds = args.device, tokens.numel() - len(tokens), list(range(len(tokens)))
    torch.manual_seed(0)
    model = ltm.build_model(cfg).to(device)
    step, forward = inner_step_cost(model, tokens, device, dtype, steps=8, repeat=args.repeat, compiled=compiled)
    ar = ltm.build_model(dataclasses.replace(cfg, kind="ar")).to(device)
    ar_s = train_step_seconds(ar, tokens, device, dtype,
                              lambda: decoder_loss(ar, tokens, None, seeds, compiled=compiled)[0], args.repeat)
    ref = ReferenceGPT(cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.ctx).to(device)
    ref_forward = torch.compile(ref) if compiled else ref

    def ref_loss():
        logits = ref_forward(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    ref_s = train_step_seconds(ref, tokens, device, dtype, ref_loss, args.repeat)
    icfg = ltm.InferenceConfig(steps=args.steps)
    ltm_s = train_step_seconds(model, tokens, device, dtype,
                               lambda: decoder_loss(model, tokens, icfg, seeds, compiled=compiled)[0],
                               max(2, args.repeat // 2))
    ltm_tps = n_tok / ltm_s
    mfu = ltm_tps * flops_per_token(cfg, args.steps) / peak
    return (f"{step / forward:.2f} | {n_tok / ar_s:,.0f} | {n_tok / ref_s:,.0f} | {ref_s / ar_s:.2f}x "
            f"| {ltm_tps:,.0f} | {100 * mfu:.1f}%")


def window_rows(args) -> list[str]:
    """Self-attention alone, forward + backward at (batch, heads, ctx, head width) with a sliding window:
    the dense mask against each windowed form this device runs, and how far their outputs are apart."""
    from ltm.attention import plan_window, window_attention

    device, (B, H, T, Dh), w = args.device, args.window_shape, args.window
    q, k, v = (torch.randn(B, H, T, Dh, device=device, requires_grad=True) for _ in range(3))
    rows, dense_out, dense_s = [], None, None
    for kind in ("dense", "chunked") + (("flex",) if device == "cuda" else ()):
        window = plan_window(T, w, H, torch.device(device), kind)

        def step():
            out = window_attention(q, k, v, window)
            out.sum().backward()
            return out

        seconds = median_seconds(step, device, 2, args.repeat * 2)
        with torch.no_grad():
            out = window_attention(q, k, v, window)
        dense_out = out if dense_out is None else dense_out
        dense_s = seconds if dense_s is None else dense_s
        rows.append(f"| {kind} | {1e3 * seconds:.1f} | {dense_s / seconds:.2f}x | {(out - dense_out).abs().max().item():.1e} |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="micro")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--steps", type=int, default=16, help="inference steps T for the LTM training benchmark")
    parser.add_argument("--dtypes", default="fp32,bf16")
    parser.add_argument("--modes", default="eager,compiled", help="eager, compiled (torch.compile), or both")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--peak-n", type=int, default=2048, help="matrix size for the matmul peak")
    parser.add_argument("--window", type=int, default=256, help="sliding window of the attention benchmark")
    parser.add_argument("--window-shape", type=lambda s: tuple(int(x) for x in s.split(",")), default=(2, 8, 1024, 64),
                        help="batch,heads,ctx,head width of the attention benchmark (LTM-S: 8 heads of 64)")
    parser.add_argument("--skip", default="", help="comma-separated sections to skip: core, window")
    args = parser.parse_args()
    device = args.device
    cfg = ltm.model_preset(args.preset)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, cfg.ctx + 1), device=device,
                           generator=torch.Generator(device).manual_seed(0))

    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, {platform.processor() or platform.machine()}"
          + (f", {torch.cuda.get_device_name()}" if device == "cuda" else ""))
    if "core" not in args.skip:
        print(f"\n## `{args.preset}` on {device}: batch {args.batch} x ctx {cfg.ctx}, T={args.steps}\n")
        print("| dtype | mode | matmul peak TFLOP/s | inner step / forward (time) | (FLOPs) | AR tok/s | reference GPT tok/s "
              "| AR / reference | LTM T=%d tok/s | LTM MFU |" % args.steps)
        print("|---|---|---|---|---|---|---|---|---|---|")
        flops_ratio = ((flops_per_token(cfg, 1, phase="eval") - flops_per_token(cfg, 0, phase="eval"))
                       / flops_per_token(cfg, 0, phase="eval"))
        for name in args.dtypes.split(","):
            dtype = DTYPES[name]
            peak = matmul_peak(device, dtype or torch.float32, args.peak_n)
            for mode in args.modes.split(","):
                row = core_rows(args, cfg, tokens, dtype, peak, compiled=mode == "compiled")
                print(f"| {name} | {mode} | {peak / 1e12:.3f} | {row.split(' | ', 1)[0]} | {flops_ratio:.2f} | "
                      f"{row.split(' | ', 1)[1]} |", flush=True)
        print(f"\nexact FLOPs/token at T={args.steps}: {flops_per_token(cfg, args.steps):.3e}; the reference GPT is "
              "compiled in the compiled rows too")
    if "window" not in args.skip:
        B, H, T, Dh = args.window_shape
        print(f"\n## Sliding-window self-attention on {device}: batch {B}, {H} heads of {Dh}, ctx {T}, window "
              f"{args.window}, fp32, forward + backward\n")
        print("| form | ms | vs dense | max abs difference from dense |")
        print("|---|---|---|---|")
        for row in window_rows(args):
            print(row, flush=True)


if __name__ == "__main__":
    main()

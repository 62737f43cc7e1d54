"""Core-library benchmarks: the inner step against a forward pass, the AR baseline against a
reference GPT, and LTM training throughput and MFU, in fp32 and bf16 autocast, eager and compiled
(torch.compile); and sliding-window self-attention, dense mask against the windowed forms.

    python benchmarks/bench_core.py                 # micro config, this machine's CPU
    python benchmarks/bench_core.py --preset ltm-s --device cuda --batch 32 --dtypes bf16

Prints a markdown report; paste it into benchmarks/RESULTS.md with the machine and command.
Run it on a quiet machine: every number is a median over repeats after warm-up, and the AR /
reference and attention speed-ups are medians of ratios taken in interleaved rounds.
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
from ltm.objective import decoder_loss

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


def interleaved_seconds(fns: list, device: str, warmup: int, repeat: int) -> list[list[float]]:
    """Each function's times over `repeat` rounds, the functions taking turns within a round (the
    order rotating), so a machine whose speed drifts between minutes slows them alike: ratios of
    the same round compare like with like."""
    for fn in fns:
        for _ in range(warmup):
            fn()
    sync(device)
    times: list[list[float]] = [[] for _ in fns]
    for r in range(repeat):
        for i in [(r + j) % len(fns) for j in range(len(fns))]:
            start = time.perf_counter()
            fns[i]()
            sync(device)
            times[i].append(time.perf_counter() - start)
    return times


def ratio_summary(numerator: list[float], denominator: list[float]) -> str:
    """The median of the per-round ratios, with their range: "1.02x (0.97-1.06)"."""
    ratios = sorted(a / b for a, b in zip(numerator, denominator))
    return f"{statistics.median(ratios):.2f}x ({ratios[0]:.2f}-{ratios[-1]:.2f})"


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


def train_step(model, device, dtype, loss_fn):
    """One optimizer step on `loss_fn()`, as training takes it (AdamW, clipping)."""
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.1,
                            fused=device == "cuda")

    def step():
        with autocast(device, dtype):
            loss = loss_fn()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)

    return step


def core_rows(args, cfg, tokens, dtype, peak: float, compiled: bool) -> str:
    """One table row: inner step / forward, AR and reference GPT training, LTM training and its MFU."""
    device, n_tok, seeds = args.device, tokens.numel() - len(tokens), list(range(len(tokens)))
    torch.manual_seed(0)
    model = ltm.build_model(cfg).to(device)
    step, forward = inner_step_cost(model, tokens, device, dtype, steps=8, repeat=args.repeat, compiled=compiled)
    ar = ltm.build_model(dataclasses.replace(cfg, kind="ar")).to(device)
    ar_step = train_step(ar, device, dtype, lambda: decoder_loss(ar, tokens, None, seeds, compiled=compiled)[0])
    ref = ReferenceGPT(cfg.vocab_size, cfg.n_layers, cfg.d_model, cfg.n_heads, cfg.ctx).to(device)
    ref_forward = torch.compile(ref) if compiled else ref

    def ref_loss():
        logits = ref_forward(tokens[:, :-1])
        return F.cross_entropy(logits.float().flatten(0, 1), tokens[:, 1:].flatten())

    # AR and reference take turns (2 x repeat rounds): their ratio is taken round by round
    ar_times, ref_times = interleaved_seconds([ar_step, train_step(ref, device, dtype, ref_loss)], device, 2,
                                              2 * args.repeat)
    icfg = ltm.InferenceConfig(steps=args.steps)
    ltm_s = median_seconds(train_step(model, device, dtype,
                                      lambda: decoder_loss(model, tokens, icfg, seeds, compiled=compiled)[0]),
                           device, 2, max(2, args.repeat // 2))
    ltm_tps = n_tok / ltm_s
    mfu = ltm_tps * flops_per_token(cfg, args.steps) / peak
    return (f"{step / forward:.2f} | {n_tok / statistics.median(ar_times):,.0f} | "
            f"{n_tok / statistics.median(ref_times):,.0f} | {ratio_summary(ref_times, ar_times)} "
            f"| {ltm_tps:,.0f} | {100 * mfu:.1f}%")


def window_rows(args) -> list[str]:
    """Self-attention alone, forward + backward at (batch, heads, ctx, head width) with a sliding window:
    the dense mask against each windowed form this device runs, and how far their outputs are apart."""
    from ltm.attention import plan_window, window_attention

    device, (B, H, T, Dh), w = args.device, args.window_shape, args.window
    q, k, v = (torch.randn(B, H, T, Dh, device=device, requires_grad=True) for _ in range(3))
    kinds = ("dense", "chunked") + (("flex",) if device == "cuda" else ())
    windows = [plan_window(T, w, H, torch.device(device), kind) for kind in kinds]

    def step(window):
        return lambda: window_attention(q, k, v, window).sum().backward()

    # the forms take turns (4 x repeat rounds): each speed-up is taken round by round against the dense mask
    times = interleaved_seconds([step(window) for window in windows], device, 2, 4 * args.repeat)
    with torch.no_grad():
        outs = [window_attention(q, k, v, window) for window in windows]
    return [f"| {kind} | {1e3 * statistics.median(t):.1f} | {ratio_summary(times[0], t)} | "
            f"{(out - outs[0]).abs().max().item():.1e} |" for kind, t, out in zip(kinds, times, outs)]


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
        print("| dtype | mode | matmul peak TFLOP/s | inner step / forward (time) | (FLOPs) | AR tok/s "
              "| reference GPT tok/s | AR / reference (median of rounds, range) | LTM T=%d tok/s | LTM MFU |"
              % args.steps)
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
        print("| form | ms (median) | vs dense: median of the rounds (range) | max abs difference from dense |")
        print("|---|---|---|---|")
        for row in window_rows(args):
            print(row, flush=True)


if __name__ == "__main__":
    main()

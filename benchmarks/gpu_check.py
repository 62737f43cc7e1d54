"""GPU acceptance check: what the CPU tests cannot show, in one command on one GPU (sized to take
under ten minutes on an H100/H200, most of it compiling; not yet timed on one).

    python benchmarks/gpu_check.py --out runs/gpu_check      # also writes runs/gpu_check.json and .md

(a) cuda_tests: `pytest tests/test_cuda.py` (the GPU paths against the CPU; skipped without a GPU).
(b) resume: LTM-S (`--preset ltm-s`) on the synthetic corpus, compiled, bf16, stopped by SIGTERM
    after its first checkpoint: it must exit 3, resume from the checkpoint when started again,
    FINISH, and end within `--tolerance` of the same run left alone (final val/ppl_bound, val/nll,
    train/loss). Within a tolerance, not equal: CUDA's kernels (atomic adds in the attention and
    embedding backward) are not bitwise deterministic, so two uninterrupted runs differ as well.
(c) inner_loop: the compiled inner loop at the paper's shape (LTM-S: ctx 1024, window 256, so
    FlexAttention): its posterior against eager's in fp32, and the time of an inner step of each in bf16.
(d) mfu: training throughput and MFU per GPU at LTM-S, -M and -L (the paper's vocabulary), a few
    timed compiled bf16 steps each, against the GPU's dense bf16 peak (ltm.flops.GPU_PEAKS).

Prints a one-screen report (markdown); the numbers go into benchmarks/RESULTS.md. Exit status: 0 all
passed, 1 a check failed, 2 no GPU.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ltm.names import TOKENS_PER_S, TRAIN_LOSS, VAL_NLL, VAL_PPL_BOUND

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("cuda_tests", "resume", "inner_loop", "mfu")
NO_GPU = "no CUDA device: run this on a GPU machine"
COMPARED = (VAL_PPL_BOUND, VAL_NLL, TRAIN_LOSS)
"""The final numbers the resumed run must share with the uninterrupted one."""
HANG_S = 900
"""A subprocess still running after this long is hung: it is killed and its check fails."""


def run_command(tokens: int, checkpoint_every: int, runs: Path, cache: Path) -> list[str]:
    """`python -m ltm.train` for the resume check: LTM-S on the synthetic corpus, a short schedule
    and a small evaluation, so a run takes about a minute after its compile."""
    sets = {"train.tokens": tokens, "train.batch_size": 32, "train.micro_batch_size": 0, "train.warmup_steps": 10,
            "train.checkpoint_every": checkpoint_every, "train.log_every": 0, "train.eval_blocks": 32,
            "train.iw_samples": 4, "data.val_blocks": 32, "data.cache_dir": cache}
    return [sys.executable, "-m", "ltm.train", "--preset", "ltm-s", "--data", "synthetic", "--device", "cuda",
            "--runs-dir", str(runs), "--experiment", "gpu-check", "--no-progress",
            *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]]


def final_metrics(stdout: str) -> dict[str, float]:
    """The metrics `python -m ltm.train` prints at its end ("  name   value" lines)."""
    found = {}
    for line in stdout.splitlines():
        match = re.fullmatch(r"  (\S+)\s+(\S+)", line)
        if match:
            try:
                found[match[1]] = float(match[2])
            except ValueError:
                pass
    return found


def relative_differences(a: dict[str, float], b: dict[str, float], keys=COMPARED) -> dict[str, float]:
    """|a - b| / |a| per key (inf where either lacks it)."""
    return {k: abs(a[k] - b[k]) / abs(a[k]) if k in a and k in b else math.inf for k in keys}


def cuda_tests(args) -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    lines = out.stdout.strip().splitlines()
    return {"ok": out.returncode == 0, "summary": lines[-1] if lines else out.stderr[-500:],
            **({} if out.returncode == 0 else {"output_tail": out.stdout[-3000:]})}


def resume_check(args) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        tmp = Path(tmp)

        def train(runs: str, wait: bool = True):
            """`python -m ltm.train` into runs-dir tmp/runs, its output in tmp/runs.out and .err (files: a
            full pipe would stall it)."""
            with open(tmp / f"{runs}.out", "w") as out, open(tmp / f"{runs}.err", "w") as err:
                proc = subprocess.Popen(run_command(args.run_tokens, args.run_tokens // 8, tmp / runs, tmp / "cache"),
                                        cwd=ROOT, stdout=out, stderr=err)
            if wait:
                finish(proc)
            return proc

        def finish(proc: subprocess.Popen) -> int:
            try:
                return proc.wait(HANG_S)
            except subprocess.TimeoutExpired:
                proc.kill()
                raise

        def output(runs: str) -> tuple[str, str]:
            return (tmp / f"{runs}.out").read_text(), (tmp / f"{runs}.err").read_text()

        straight = train("straight")
        if straight.returncode != 0:
            return {"ok": False, "error": f"the uninterrupted run exited {straight.returncode}",
                    "output_tail": output("straight")[1][-3000:]}
        proc = train("interrupted", wait=False)
        while proc.poll() is None and not list((tmp / "interrupted" / "checkpoints").glob("*/ckpt-*.sha256")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        if finish(proc) != 3:
            return {"ok": False, "error": f"the SIGTERM'd run exited {proc.returncode}, not 3 (interrupted); if 0, "
                    "it finished before the signal: raise --run-tokens",
                    "output_tail": output("interrupted")[1][-3000:]}
        interrupted_out = output("interrupted")[0]
        resumed = train("interrupted")
        (a, _), (b, b_err) = output("straight"), output("interrupted")
    resumed_from = re.search(r"^resuming run .* from ([\d,]+) tokens", b_err, re.M)  # a message: on stderr
    diffs = relative_differences(final_metrics(a), final_metrics(b))
    finished = resumed.returncode == 0 and re.search(r"^FINISHED: ", b, re.M) is not None
    return {"ok": finished and resumed_from is not None and max(diffs.values()) <= args.tolerance,
            "interrupted": killed[0] if (killed := re.search(r"^KILLED: .*", interrupted_out, re.M)) else "",
            "resumed_exit": resumed.returncode, "resumed_from_tokens": resumed_from[1] if resumed_from else None,
            "uninterrupted": {k: final_metrics(a).get(k) for k in COMPARED},
            "resumed": {k: final_metrics(b).get(k) for k in COMPARED},
            "relative_difference": diffs, "tolerance": args.tolerance,
            **({} if finished else {"output_tail": b_err[-3000:]})}


def inner_loop_check(args) -> dict:
    import ltm
    from ltm.attention import plan_window
    from ltm.posterior import infer_posterior

    from bench_core import inner_step_cost

    device = torch.device("cuda")
    cfg = ltm.model_preset("ltm-s")
    torch.manual_seed(0)
    model = ltm.build_model(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.ctx + 1), device=device)
    kind = plan_window(cfg.ctx, cfg.attn_window, cfg.n_heads, device).kind
    torch._dynamo.reset()
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 for the comparison
    try:
        icfg = ltm.InferenceConfig(steps=4)
        eager = infer_posterior(model, tokens, icfg, seeds=range(8))
        compiled = infer_posterior(model, tokens, icfg, seeds=range(8), compiled=True)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    diff = {name: (getattr(compiled, name) - getattr(eager, name)).abs().max().item() for name in ("mu", "logvar")}
    step = {}
    for mode in ("eager", "compiled"):
        seconds, _ = inner_step_cost(model, tokens, "cuda", torch.bfloat16, steps=8, repeat=3,
                                     compiled=mode == "compiled")
        step[mode] = 1e3 * seconds
    return {"ok": kind == "flex" and max(diff.values()) <= 1e-3, "attention": kind, "batch": 8,
            "max_abs_difference_fp32": diff, "ms_per_inner_step_bf16": step,
            "compiled_speedup": step["eager"] / step["compiled"]}


def mfu_check(args) -> dict:
    import ltm
    from ltm.flops import flops_per_token, mfu
    from ltm.flops import peak_flops
    from ltm.objective import decoder_loss

    from bench_core import matmul_peak, median_seconds, train_step

    device = torch.device("cuda")
    peak = peak_flops(device, 0.0)  # warns, and gives 0, for a GPU not in the table
    sizes = {}
    for size in ("ltm-s", "ltm-m", "ltm-l"):
        torch._dynamo.reset()
        cfg = ltm.model_preset(size)
        torch.manual_seed(0)
        model = ltm.build_model(cfg).to(device)
        tokens = torch.randint(0, cfg.vocab_size, (args.batch, cfg.ctx + 1), device=device)
        icfg, seeds = ltm.InferenceConfig(steps=16), list(range(args.batch))
        step = train_step(model, "cuda", torch.bfloat16,
                          lambda: decoder_loss(model, tokens, icfg, seeds, compiled=True)[0])
        tps = args.batch * cfg.ctx / median_seconds(step, "cuda", warmup=2, repeat=args.repeat)
        sizes[size] = {TOKENS_PER_S: tps, "mfu": mfu(tps, flops_per_token(cfg, 16), peak) if peak else None}
        model = step = None  # frees the GPU memory before the next size
        torch.cuda.empty_cache()
    return {"ok": all(s[TOKENS_PER_S] > 0 for s in sizes.values()), "peak_tflops": peak / 1e12 or None,
            "matmul_bf16_tflops": matmul_peak("cuda", torch.bfloat16, 8192) / 1e12, "batch": args.batch,
            "T": 16, "sizes": sizes}


CHECKS = {"cuda_tests": cuda_tests, "resume": resume_check, "inner_loop": inner_loop_check, "mfu": mfu_check}


def markdown(report: dict) -> str:
    """The report as one screen of markdown."""
    lines = [f"# GPU check: {report['device']}, torch {report['torch']}, {report['date']}", ""]
    for name, r in report["sections"].items():
        verdict = "skipped" if r is None else ("PASS" if r["ok"] else "FAIL")
        lines.append(f"## {name}: {verdict}" + (f" ({r['seconds']:.0f} s)" if r else ""))
        if r is None:
            continue
        if "error" in r:
            lines.append(f"error: {r['error']}")
        if name == "cuda_tests":
            lines.append(r["summary"])
        elif name == "resume" and "resumed" in r:
            lines.append(f"SIGTERM -> exit 3 ({r['interrupted']}); resumed from {r['resumed_from_tokens']} tokens "
                         f"-> exit {r['resumed_exit']}; tolerance {r['tolerance']:g}")
            lines += ["", "| metric | uninterrupted | resumed | relative difference |", "|---|---|---|---|"]
            lines += [f"| {k} | {r['uninterrupted'][k]} | {r['resumed'][k]} | {r['relative_difference'][k]:.2e} |"
                      for k in COMPARED]
        elif name == "inner_loop" and "attention" in r:
            ms = r["ms_per_inner_step_bf16"]
            lines.append(f"LTM-S, batch {r['batch']}, attention {r['attention']}: fp32 max |compiled - eager| "
                         f"mu {r['max_abs_difference_fp32']['mu']:.1e}, "
                         f"logvar {r['max_abs_difference_fp32']['logvar']:.1e}; "
                         f"bf16 inner step {ms['eager']:.1f} ms eager, {ms['compiled']:.1f} ms compiled "
                         f"({r['compiled_speedup']:.2f}x)")
        elif name == "mfu" and "sizes" in r:
            peak = f"{r['peak_tflops']:g} TFLOP/s" if r["peak_tflops"] else "not in ltm.flops.GPU_PEAKS"
            lines.append(f"T={r['T']}, batch {r['batch']} x ctx 1024, compiled, bf16; dense bf16 peak {peak}; "
                         f"measured bf16 matmul {r['matmul_bf16_tflops']:.0f} TFLOP/s")
            lines += ["", "| size | tokens/s per GPU | MFU |", "|---|---|---|"]
            lines += [f"| {size} | {s[TOKENS_PER_S]:,.0f} | "
                      + (f"{100 * s['mfu']:.1f}% |" if s["mfu"] is not None else "- |")
                      for size, s in r["sizes"].items()]
        lines.append("")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", help="also write the report to OUT.json and OUT.md")
    parser.add_argument("--skip", default="", help=f"comma-separated checks to skip: {', '.join(SECTIONS)}")
    parser.add_argument("--run-tokens", type=int, default=4_194_304,
                        help="training tokens of the resume check's runs (batches of 32 x 1024)")
    parser.add_argument("--tolerance", type=float, default=2e-2,
                        help="largest relative difference between the resumed and the uninterrupted run's end")
    parser.add_argument("--batch", type=int, default=32, help="sequences per timed step of the MFU check")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps per size (after 2 untimed)")
    args = parser.parse_args(argv)
    skip = {s for s in args.skip.split(",") if s}
    if skip - set(SECTIONS):
        parser.error(f"--skip takes {', '.join(SECTIONS)}; got {', '.join(sorted(skip - set(SECTIONS)))}")
    if not torch.cuda.is_available():
        print(f"error: {NO_GPU}", file=sys.stderr)
        return 2
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sections": {}}
    for name in SECTIONS:
        if name in skip:
            report["sections"][name] = None
            continue
        print(f"{name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = CHECKS[name](args)
        except Exception as err:  # one check's failure is reported, and the others still run
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = time.perf_counter() - started
        report["sections"][name] = result
    text = markdown(report)
    print(text)
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".json").write_text(json.dumps(report, indent=1, default=str))
        out.with_suffix(".md").write_text(text)
    return 0 if all(r is None or r["ok"] for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

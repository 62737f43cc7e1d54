"""GPU acceptance check, in phases that each fit a short GPU session (one H100-class GPU):

    python benchmarks/gpu_check.py --phase resume --out runs/gpu_check     # first: resume and memory plan
    python benchmarks/gpu_check.py --phase inner --out runs/gpu_check
    python benchmarks/gpu_check.py --phase mfu --size ltm-s --out runs/gpu_check   # then ltm-m, ltm-l
    python benchmarks/gpu_check.py --phase cuda_tests --out runs/gpu_check

Each phase writes a one-screen report, DIR/<phase>.md and DIR/<phase>.json (DIR: --out), and prints it.
Expected wall times are desk estimates (not yet timed on a GPU), from the FLOPs of each phase's work at
a deliberately low achieved rate (20 TFLOP/s eager, 100 TFLOP/s compiled bf16), plus about 20 s per
Python process (torch and CUDA start, the synthetic corpus) and about 60-90 s per torch.compile of the
inner loop and decoder (the CPU compile of the smoke shapes takes ~30 s on 2 cores; a GPU host's CPUs
are faster, the paper shapes larger):

* resume (~3.5 min; the first, it alone answers "does a run resume correctly on CUDA and is the memory
  plan right"): LTM-S's shape (ctx 1024, window 256, T=16) on the synthetic corpus, eager bf16 with
  deterministic kernels (`torch.use_deterministic_algorithms`, CUBLAS_WORKSPACE_CONFIG), 16 updates of
  16 x 1024 tokens (6e14 FLOP: ~30 s) run three times (straight; stopped by SIGTERM after its first
  checkpoint; resumed): the resumed run must exit 3 then FINISH at the straight run's final numbers
  within --tolerance (default 1e-5 relative: an off-by-one batch moves them by far more, shown on a CPU
  by tests/test_gpu_check.py). Eager, not compiled: a compiled run is not bitwise reproducible and its
  compile would not fit the phase; the compiled program is checked against eager by the inner phase.
  Then the memory plan: one LTM-S-shape update (micro-batch 16 of 32, eager bf16, the chunked window
  that `ltm.memory` models) measured with torch.cuda.max_memory_allocated against
  `ltm.memory.step_memory`'s estimate, within 15% (the estimate's fake-tensor traces: ~30-60 s on the CPU).
* memory (~1.5 min): the memory half of the resume phase alone.
* inner (~2.5 min): the compiled inner loop at the paper shape (LTM-S: ctx 1024, window 256, so
  FlexAttention) against eager in fp32, and an inner step of each timed in bf16 (two compiles).
* mfu (~3 min per --size): training tokens/s and MFU per GPU at one size (ltm-s, ltm-m or ltm-l, the
  paper's vocabulary), a few timed compiled bf16 steps at T=16 (one compile, ~90 s).
* cuda_tests (~3 min): `pytest tests/test_cuda.py` (the GPU paths against the CPU; 9 tests, two compiles).

Exit status: 0 the phase passed, 1 a check failed, 2 bad options or no GPU.
"""

from __future__ import annotations

import argparse
import functools
import json
import math
import os
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
PHASES = {"resume": ("resume", "memory"), "memory": ("memory",), "inner": ("inner_loop",), "mfu": ("mfu",),
          "cuda_tests": ("cuda_tests",)}
"""--phase -> its checks, in order; the first phase is the most informative."""
EXPECTED_MINUTES = {"resume": 3.5, "memory": 1.5, "inner": 2.5, "mfu": 3.0, "cuda_tests": 3.0}
"""Desk estimates of each phase's wall time on one H100-class GPU (the docstring gives their basis)."""
NO_GPU = "no CUDA device: run this on a GPU machine"
COMPARED = (VAL_PPL_BOUND, VAL_NLL, TRAIN_LOSS)
"""The final numbers the resumed run must share with the uninterrupted one."""
RESUME_TOLERANCE = 1e-5
"""Largest relative difference allowed between the resumed and the straight run (deterministic kernels)."""
MEMORY_TOLERANCE = 0.15
"""Largest relative difference allowed between the measured peak and ltm.memory's estimate."""
HANG_S = 270
"""A subprocess still running after this long is hung: it is killed and its check fails (inside a phase's 5 min)."""
RESUME_SETS = {"train.batch_size": 16, "train.micro_batch_size": 0, "train.warmup_steps": 4, "train.log_every": 0,
               "train.eval_blocks": 16, "train.iw_samples": 4, "data.val_blocks": 16, "train.compile": "off"}
"""The resume runs: LTM-S's shape, eager, a small batch and evaluation (--run-tokens sets their length)."""


# -- the resume check ----------------------------------------------------------------------------

def run_command(tokens: int, checkpoint_every: int, runs: Path, cache: Path, device: str = "cuda",
                preset: str = "ltm-s") -> list[str]:
    """`python -m ltm.train` for the resume check, with deterministic kernels (`deterministic_env` too)."""
    sets = {**RESUME_SETS, "train.tokens": tokens, "train.checkpoint_every": checkpoint_every, "data.cache_dir": cache}
    argv = ["ltm.train", "--preset", preset, "--data", "synthetic", "--device", device, "--runs-dir", str(runs),
            "--experiment", "gpu-check", "--no-progress",
            *[arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]]
    launcher = ("import runpy, sys, torch; torch.use_deterministic_algorithms(True, warn_only=True); "
                f"sys.argv = {argv!r}; runpy.run_module('ltm.train', run_name='__main__')")
    return [sys.executable, "-c", launcher]


def deterministic_env() -> dict[str, str]:
    """cuBLAS's deterministic workspace, which torch.use_deterministic_algorithms asks for."""
    return {**os.environ, "CUBLAS_WORKSPACE_CONFIG": ":4096:8"}


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


def resume_verdict(straight: dict[str, float], resumed: dict[str, float],
                   tolerance: float = RESUME_TOLERANCE) -> tuple[bool, dict[str, float]]:
    """Whether the resumed run ended at the straight run's numbers (every COMPARED key within `tolerance`,
    relative), and the differences."""
    diffs = relative_differences(straight, resumed)
    return max(diffs.values()) <= tolerance, diffs


def resume_check(args) -> dict:
    """The straight run, the SIGTERM'd run and its resume, compared (`resume_verdict`)."""
    with tempfile.TemporaryDirectory(prefix="gpu-check-") as tmp:
        runner = _Runner(Path(tmp), args.run_tokens)
        straight = runner.train("straight")
        if straight.returncode != 0:
            return {"ok": False, "error": f"the uninterrupted run exited {straight.returncode}",
                    "output_tail": runner.output("straight")[1][-3000:]}
        proc = runner.train("interrupted", wait=False)
        while proc.poll() is None and not list((runner.tmp / "interrupted" / "checkpoints").glob("*/ckpt-*.sha256")):
            time.sleep(0.05)
        proc.send_signal(signal.SIGTERM)
        if runner.finish(proc) != 3:
            return {"ok": False, "error": f"the SIGTERM'd run exited {proc.returncode}, not 3 (interrupted); if 0, "
                    "it finished before the signal: raise --run-tokens",
                    "output_tail": runner.output("interrupted")[1][-3000:]}
        killed = re.search(r"^KILLED: .*", runner.output("interrupted")[0], re.M)
        resumed = runner.train("interrupted")
        (a, _), (b, b_err) = runner.output("straight"), runner.output("interrupted")
    resumed_from = re.search(r"^resuming run .* from ([\d,]+) tokens", b_err, re.M)  # a message: on stderr
    close, diffs = resume_verdict(final_metrics(a), final_metrics(b), args.tolerance)
    finished = resumed.returncode == 0 and re.search(r"^FINISHED: ", b, re.M) is not None
    return {"ok": finished and resumed_from is not None and close, "interrupted": killed[0] if killed else "",
            "resumed_exit": resumed.returncode, "resumed_from_tokens": resumed_from[1] if resumed_from else None,
            "uninterrupted": {k: final_metrics(a).get(k) for k in COMPARED},
            "resumed": {k: final_metrics(b).get(k) for k in COMPARED},
            "relative_difference": diffs, "tolerance": args.tolerance,
            **({} if finished else {"output_tail": b_err[-3000:]})}


class _Runner:
    """The resume check's `python -m ltm.train` processes, into runs-dir tmp/<name>, their output in
    tmp/<name>.out and .err (files: a full pipe would stall them)."""

    def __init__(self, tmp: Path, tokens: int) -> None:
        self.tmp, self.tokens = tmp, tokens

    def train(self, name: str, wait: bool = True) -> subprocess.Popen:
        command = run_command(self.tokens, self.tokens // 4, self.tmp / name, self.tmp / "cache")
        with open(self.tmp / f"{name}.out", "w") as out, open(self.tmp / f"{name}.err", "w") as err:
            proc = subprocess.Popen(command, cwd=ROOT, stdout=out, stderr=err, env=deterministic_env())
        if wait:
            self.finish(proc)
        return proc

    @staticmethod
    def finish(proc: subprocess.Popen) -> int:
        try:
            return proc.wait(HANG_S)
        except subprocess.TimeoutExpired:
            proc.kill()
            raise

    def output(self, name: str) -> tuple[str, str]:
        return (self.tmp / f"{name}.out").read_text(), (self.tmp / f"{name}.err").read_text()


# -- the memory plan -----------------------------------------------------------------------------

def memory_verdict(measured: int, estimate: int, tolerance: float = MEMORY_TOLERANCE) -> tuple[bool, float]:
    """Whether the measured peak is within `tolerance` of the estimate (relative to the estimate), and the
    relative difference (measured - estimate) / estimate."""
    diff = (measured - estimate) / estimate
    return abs(diff) <= tolerance, diff


def memory_config():
    """The memory check's run: LTM-S's shape on the synthetic corpus's vocabulary, micro-batch 16 of 32."""
    from ltm.config import run_preset

    cfg = run_preset("ltm-s").with_overrides(["data.name=synthetic", "train.batch_size=32",
                                              "train.micro_batch_size=16"])
    return cfg.with_overrides([f"model.vocab_size={cfg.data.synthetic_vocab}"])


def memory_check(args) -> dict:
    """One eager bf16 update of `memory_config` on the GPU: torch.cuda.max_memory_allocated against
    ltm.memory's estimate (which models the eager step with the chunked window)."""
    from ltm.memory import _prepare, gib, step_memory
    from ltm.objective import autocast_for, decoder_loss

    cfg, device = memory_config(), torch.device("cuda")
    micro = cfg.train.micro_batch_size
    estimate = step_memory(cfg, "cuda").peak_bytes(micro)
    with torch.device(device):
        model, optimizer = _prepare(cfg, micro)  # AdamW's state and the accumulated gradients exist
    model.attention = "chunked"  # the form ltm.memory traces (and an uncompiled CUDA run takes)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    batch = torch.randint(0, cfg.model.vocab_size, (micro, cfg.model.ctx + 1), device=device)
    with autocast_for(device, cfg.train.precision):
        loss, _ = decoder_loss(model, batch, cfg.inference, list(range(micro)))
    (loss * micro / cfg.train.batch_size).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
    optimizer.step()
    torch.cuda.synchronize()
    measured = torch.cuda.max_memory_allocated()
    ok, diff = memory_verdict(measured, estimate)
    return {"ok": ok, "measured_gb": gib(measured), "estimate_gb": gib(estimate), "relative_difference": diff,
            "micro_batch": micro, "batch": cfg.train.batch_size, "tolerance": MEMORY_TOLERANCE}


# -- the compiled inner loop, MFU, the CUDA tests ------------------------------------------------

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


def _compiled_loss(model, tokens, icfg, seeds) -> torch.Tensor:
    from ltm.objective import decoder_loss

    return decoder_loss(model, tokens, icfg, seeds, compiled=True)[0]


def mfu_check(args) -> dict:
    import ltm
    from ltm.flops import flops_per_token, mfu, peak_flops

    from bench_core import matmul_peak, median_seconds, train_step

    device = torch.device("cuda")
    peak = peak_flops(device, 0.0)  # warns, and gives 0, for a GPU not in the table
    cfg = ltm.model_preset(args.size)
    torch.manual_seed(0)
    model = ltm.build_model(cfg).to(device)
    tokens = torch.randint(0, cfg.vocab_size, (args.batch, cfg.ctx + 1), device=device)
    icfg, seeds = ltm.InferenceConfig(steps=16), list(range(args.batch))
    step = train_step(model, "cuda", torch.bfloat16, functools.partial(_compiled_loss, model, tokens, icfg, seeds))
    tps = args.batch * cfg.ctx / median_seconds(step, "cuda", warmup=2, repeat=args.repeat)
    return {"ok": tps > 0, "peak_tflops": peak / 1e12 or None, "size": args.size,
            "matmul_bf16_tflops": matmul_peak("cuda", torch.bfloat16, 8192) / 1e12, "batch": args.batch, "T": 16,
            TOKENS_PER_S: tps, "mfu": mfu(tps, flops_per_token(cfg, 16), peak) if peak else None}


def cuda_tests(args) -> dict:
    out = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_cuda.py"],
                         cwd=ROOT, capture_output=True, text=True, timeout=HANG_S)
    lines = out.stdout.strip().splitlines()
    return {"ok": out.returncode == 0, "summary": lines[-1] if lines else out.stderr[-500:],
            **({} if out.returncode == 0 else {"output_tail": out.stdout[-3000:]})}


CHECKS = {"resume": resume_check, "memory": memory_check, "inner_loop": inner_loop_check, "mfu": mfu_check,
          "cuda_tests": cuda_tests}


# -- the report ----------------------------------------------------------------------------------

def _section_lines(name: str, r: dict) -> list[str]:
    """A check's result as a few lines of markdown."""
    if name == "cuda_tests":
        return [r["summary"]]
    if name == "resume" and "resumed" in r:
        return [f"SIGTERM -> exit 3 ({r['interrupted']}); resumed from {r['resumed_from_tokens']} tokens "
                f"-> exit {r['resumed_exit']}; tolerance {r['tolerance']:g} relative", "",
                "| metric | uninterrupted | resumed | relative difference |", "|---|---|---|---|",
                *[f"| {k} | {r['uninterrupted'][k]} | {r['resumed'][k]} | {r['relative_difference'][k]:.2e} |"
                  for k in COMPARED]]
    if name == "memory" and "measured_gb" in r:
        return [f"LTM-S shape, micro-batch {r['micro_batch']} of {r['batch']}, eager bf16: measured peak "
                f"{r['measured_gb']:.2f} GB (torch.cuda.max_memory_allocated), ltm.memory's estimate "
                f"{r['estimate_gb']:.2f} GB: {100 * r['relative_difference']:+.1f}% (tolerance "
                f"{100 * r['tolerance']:g}%)"]
    if name == "inner_loop" and "attention" in r:
        ms, d = r["ms_per_inner_step_bf16"], r["max_abs_difference_fp32"]
        return [f"LTM-S, batch {r['batch']}, attention {r['attention']}: fp32 max |compiled - eager| mu {d['mu']:.1e}, "
                f"logvar {d['logvar']:.1e}; bf16 inner step {ms['eager']:.1f} ms eager, {ms['compiled']:.1f} ms "
                f"compiled ({r['compiled_speedup']:.2f}x)"]
    if name == "mfu" and TOKENS_PER_S in r:
        peak = f"{r['peak_tflops']:g} TFLOP/s" if r["peak_tflops"] else "not in ltm.flops.GPU_PEAKS"
        share = f"{100 * r['mfu']:.1f}%" if r["mfu"] is not None else "-"
        return [f"{r['size']}: T={r['T']}, batch {r['batch']} x ctx 1024, compiled, bf16: {r[TOKENS_PER_S]:,.0f} "
                f"tokens/s per GPU, MFU {share} (dense bf16 peak {peak}; measured bf16 matmul "
                f"{r['matmul_bf16_tflops']:.0f} TFLOP/s)"]
    return []


def markdown(report: dict) -> str:
    """A phase's report as one screen of markdown."""
    lines = [f"# GPU check, phase {report['phase']}: {report['device']}, torch {report['torch']}, {report['date']}",
             f"expected about {EXPECTED_MINUTES[report['phase']]:g} min (desk estimate)", ""]
    for name, r in report["sections"].items():
        lines.append(f"## {name}: {'PASS' if r['ok'] else 'FAIL'} ({r['seconds']:.0f} s)")
        if "error" in r:
            lines.append(f"error: {r['error']}")
        lines += [*_section_lines(name, r), ""]
    return "\n".join(lines)


def write_report(out: Path, report: dict) -> Path:
    """DIR/<phase>.md (one screen) and DIR/<phase>.json (everything); the .md's path."""
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{report['phase']}.json").write_text(json.dumps(report, indent=1, default=str))
    path = out / f"{report['phase']}.md"
    path.write_text(markdown(report))
    return path


def run_phase(phase: str, args, device_name: str) -> dict:
    """Run a phase's checks in order (one failure is reported, the next still runs); its report."""
    report = {"phase": phase, "device": device_name, "torch": torch.__version__,
              "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "sections": {}}
    for name in PHASES[phase]:
        print(f"{name} ...", flush=True)
        started = time.perf_counter()
        try:
            result = CHECKS[name](args)
        except Exception as err:
            result = {"ok": False, "error": f"{type(err).__name__}: {err}"}
        result["seconds"] = time.perf_counter() - started
        report["sections"][name] = result
    return report


def build_parser() -> argparse.ArgumentParser:
    phases = "; ".join(f"{p}: ~{m:g} min" for p, m in EXPECTED_MINUTES.items())
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--phase", required=True, choices=list(PHASES),
                        help=f"what to check (expected wall time on one H100-class GPU, desk estimate: {phases})")
    parser.add_argument("--out", required=True, help="folder for the report: OUT/<phase>.md and OUT/<phase>.json")
    parser.add_argument("--run-tokens", type=int, default=262_144,
                        help="training tokens of each resume run (16 updates of 16 x 1024)")
    parser.add_argument("--tolerance", type=float, default=RESUME_TOLERANCE,
                        help="largest relative difference between the resumed and the uninterrupted run's end")
    parser.add_argument("--size", default="ltm-s", choices=["ltm-s", "ltm-m", "ltm-l"], help="the mfu phase's model")
    parser.add_argument("--batch", type=int, default=32, help="sequences per timed step of the mfu phase")
    parser.add_argument("--repeat", type=int, default=5, help="timed steps of the mfu phase (after 2 untimed)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not torch.cuda.is_available():
        print(f"error: {NO_GPU}", file=sys.stderr)
        return 2
    report = run_phase(args.phase, args, torch.cuda.get_device_name())
    print(markdown(report))
    print(f"report: {write_report(Path(args.out), report)}")
    return 0 if all(r["ok"] for r in report["sections"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())

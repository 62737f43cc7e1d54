"""The SLURM cluster as the tests see it: whether one answers (the one reason SLURM tests skip), the
array a study driver submitted, and how a test ends a driver that overran without leaving its jobs to
block the tests after it, saying what the queue was doing."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
from pathlib import Path

import pytest


def slurm_unavailable_reason() -> str | None:
    """None when sbatch exists and sinfo reaches a controller, else why not."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (start a cluster with `bash slurm/start_local_slurm.sh`)"
    try:
        proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    return None if proc.returncode == 0 else f"sinfo cannot reach a SLURM controller: {proc.stderr.strip()[:200]}"


def array_tasks(runs: Path) -> list[str]:
    """The array tasks (`<array>_<index>`) the study in `runs` submitted, once it has."""
    files = list((runs / "slurm").glob("*/jobs.json"))
    return json.loads(files[0].read_text()) if files else []


def task_running(task: str) -> bool:
    out = subprocess.run(["squeue", "-h", "-r", "-o", "%i %T", "-j", task.split("_")[0]], capture_output=True,
                         text=True).stdout
    return f"{task} RUNNING" in out


def slurm_logs(runs: Path) -> str:
    """Every SLURM task's log of the study in `runs` (.out and .err), in order."""
    return "".join(p.read_text() for p in sorted((runs / "slurm").glob("*/*/*_log.*")))


def queue() -> str:
    """Every job in the queue, with its state and SLURM's reason for it (why a pending job waits)."""
    try:
        return subprocess.run(["squeue", "-r", "-o", "%i %j %T %M %R"], capture_output=True, text=True).stdout
    except OSError as err:
        return f"(no squeue here: {err})"


def what_slurm_did(runs: Path, output: str = "") -> str:
    """For a failure message: the driver's last output, the queue now, and the tasks' logs."""
    return (f"--- driver output (end)\n{output[-3000:]}\n--- squeue\n{queue()}\n"
            f"--- SLURM task logs (end)\n{slurm_logs(runs)[-4000:]}")


def stop_driver(proc: subprocess.Popen, runs: Path) -> None:
    """End a study driver that is still running (a failed test): SIGTERM cancels its array and stops its
    mlflow server; SIGKILL only if that hangs. Then cancel whatever of its array is still queued, so that
    it holds no CPU the next test's jobs wait for."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=180)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    arrays = sorted({task.split("_")[0] for task in array_tasks(runs)})
    if arrays:
        subprocess.run(["scancel", *arrays], capture_output=True, check=False)


def run_driver(argv: list[str], runs: Path, cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    """Run a study driver to its end (stdout and stderr apart); past `timeout` seconds stop it and its jobs
    and fail, saying what SLURM was doing."""
    proc = subprocess.Popen(argv, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        then = queue()  # before stopping the driver cancels its jobs
        stop_driver(proc, runs)
        out, err = proc.communicate()
        pytest.fail(f"the study did not end within {timeout:.0f} s; squeue then:\n{then}\n"
                    f"{what_slurm_did(runs, out + err)}")
    return subprocess.CompletedProcess(argv, proc.returncode, out, err)

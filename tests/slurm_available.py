"""Whether a SLURM cluster answers here: the one reason SLURM tests skip."""

import shutil
import subprocess


def slurm_unavailable_reason() -> str | None:
    """None when sbatch exists and sinfo reaches a controller, else why not."""
    if shutil.which("sbatch") is None:
        return "sbatch not on PATH (start a cluster with `bash slurm/start_local_slurm.sh`)"
    try:
        proc = subprocess.run(["sinfo", "-h"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as err:
        return f"sinfo failed: {err}"
    return None if proc.returncode == 0 else f"sinfo cannot reach a SLURM controller: {proc.stderr.strip()[:200]}"

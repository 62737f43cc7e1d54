"""A study's command line: every option, its default and its help (`studies.plan` validates them)."""

from __future__ import annotations

import argparse

from ltm.cli import add_run_options, add_verbosity, add_verify_option
from ltm.names import exit_help
from studies.costs import DEFAULT_MFU, DEFAULT_PEAK_TFLOPS
from studies.study import Study


def build_parser(study: Study) -> argparse.ArgumentParser:
    """The options of `python studies/<name>.py`, with the study's presets in its --help."""
    presets = "; ".join(f"{n}: {p.description}" for n, p in study.presets.items())
    parser = argparse.ArgumentParser(
        prog=f"python studies/{study.name}.py", description=f"{study.description} Presets: {presets}.",
        epilog="Starting the same study again skips finished points and resumes interrupted ones. "
               + exit_help("all finished", "some failed", "busy (points held by other processes)"))
    parser.add_argument("--cluster", choices=["local", "ray", "slurm"], default="local",
                        help="local: Ray Tune on this machine (default); ray: an existing Ray cluster (--address); "
                             "slurm: a submitit job array")
    parser.add_argument("--preset", default=study.default_preset, help=f"one of {', '.join(study.presets)} "
                                                                        f"(default {study.default_preset})")
    add_run_options(parser, experiment_default=None, experiment_shown=study.name, every_point=True)
    parser.add_argument("--seeds", default="0", help="comma-separated seeds, e.g. 0,1,2 (default 0)")
    parser.add_argument("--max-concurrent", type=int, default=0,
                        help="trials at once (default: CPUs / CPUs per trial locally; unlimited otherwise)")
    parser.add_argument("--cpus-per-trial", type=float,
                        help="CPUs per trial, per process with --processes-per-trial (default: the SLURM profile's "
                             "cpus_per_task, else the preset's)")
    parser.add_argument("--gpus-per-trial", type=float,
                        help="GPUs per trial on each of its nodes; fractions share a GPU under Ray, SLURM takes whole "
                             "GPUs (default: the SLURM profile's gpus_per_task, else the preset's)")
    parser.add_argument("--processes-per-trial", type=int,
                        help="SLURM: processes of each point on each of its nodes, one torch.distributed job "
                             "(default 1; on GPUs one per GPU: --gpus-per-trial)")
    parser.add_argument("--nodes-per-trial", type=int, default=1, help="SLURM: nodes of each point (default 1)")
    parser.add_argument("--max-failures", type=int, default=1, help="retries of a crashed trial (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the grid, its training FLOPs and GPU-hours, "
                                                               "resources and sbatch parameters; launch nothing")
    parser.add_argument("--mfu", type=float, default=DEFAULT_MFU,
                        help=f"model FLOPs utilisation the GPU-hours assume, in (0, 1] (default {DEFAULT_MFU})")
    parser.add_argument("--peak-tflops", type=float, default=DEFAULT_PEAK_TFLOPS,
                        help=f"a GPU's peak TFLOP/s for the GPU-hours (default {DEFAULT_PEAK_TFLOPS:g}: H100/H200 "
                             "dense bf16)")
    parser.add_argument("--gpu-mem-gb", type=float, help="memory of the GPU a trial gets, in GB of 2^30 bytes (141: "
                        "H200, 80: H100): each point's micro-batch is fitted to it, and a point that cannot fit even "
                        "at micro-batch 1 is refused (default: the SLURM profile's gpu_mem_gb)")
    add_verbosity(parser)
    _add_group_options(parser, study)
    return parser


def _add_group_options(parser: argparse.ArgumentParser, study: Study) -> None:
    """The options of evaluation studies, of Ray and of SLURM, each in its group of --help."""
    if any(p.task for p in study.presets.values()):
        task_group = parser.add_argument_group("evaluation")
        task_group.add_argument("--checkpoint", action="append", default=[], metavar="PATH_OR_RUN_ID",
                                help="evaluate this checkpoint (a path, or a training run's MLflow id in the "
                                     "study's store) instead of training the preset's models (repeatable)")
        add_verify_option(task_group, "evaluate")
        task_group.add_argument("--task", dest="task_overrides", action="append", default=[], metavar="KEY=VALUE",
                                help="override an argument of the evaluation, e.g. problems=100 or shots=0,5 "
                                     "(repeatable; --dry-run shows them)")
    ray_group = parser.add_argument_group("ray")
    ray_group.add_argument("--address", help="address of an existing Ray cluster (implies --cluster ray)")
    ray_group.add_argument("--fresh", action="store_true",
                           help="do not restore the Tune experiment of an earlier start")
    slurm_group = parser.add_argument_group("slurm")
    slurm_group.add_argument("--profile", help="SLURM profile: a name in slurm/profiles/ or a YAML path "
                                               "(default: the preset's)")
    slurm_group.add_argument("--mlflow-server", choices=["auto", "off"], default="auto",
                             help="auto (default): with a sqlite URI the driver serves it with `mlflow server` on this "
                                  "node and workers log over http; off: workers write the sqlite file directly "
                                  "(only safe when every job runs on this node's local disk)")
    slurm_group.add_argument("--no-wait", action="store_true", help="submit and return (needs an http tracking URI)")

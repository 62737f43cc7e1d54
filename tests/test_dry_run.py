"""A study's dry run sizes it: per point and in total, training tokens, FLOPs (exact and paper
conventions, `ltm.flops`) and GPU-hours at a stated MFU of a stated peak; per point the memory of a
training update (`ltm.memory`) and the largest micro-batch that fits a stated GPU."""

import dataclasses
import importlib
import json
import math
import os
import shutil
from pathlib import Path

import pytest

from ltm.config import DataConfig, RunConfig, run_preset
from ltm.data import load_tokenizer, planned_vocab_size
from ltm.flops import flops_per_token
from ltm.memory import gib, step_memory
from ltm.names import Exit
from studies.costs import DEFAULT_PEAK_TFLOPS, Cost, point_cost
from studies.generation import STUDY as GENERATION
from studies.inference_scaling import STUDY as INFERENCE_SCALING
from studies.launcher import main
from studies.messages import CheckpointSource, Point
from studies.plan import load_profile, plan
from studies.resources import SlurmProfile
from studies.study import GenerationTask
from studies.points import build_points

ROUNDING = 5e-3
"""The table prints 3 significant digits."""


def dry_run(study, argv, capsys) -> tuple[dict[str, dict], str]:
    """The dry run's table rows by key, and the lines after the table."""
    assert main(study, [*argv, "--dry-run"]) == 0
    table, rest = capsys.readouterr().out.split("\n\n", 1)
    header, *rows = [line.split() for line in table.splitlines()]
    return {row[0]: dict(zip(header, row)) for row in rows}, rest


def number(text: str) -> float:
    return float(text.replace(",", ""))


def expected(point: Point) -> tuple[int, float, float]:
    """Tokens and FLOPs of a point's training, worked out here from its config."""
    cfg = RunConfig.from_dict(point.config)
    per_update = cfg.train.batch_size * cfg.model.ctx
    tokens = math.ceil(cfg.train.tokens / per_update) * per_update
    model = dataclasses.replace(cfg.model, vocab_size=cfg.data.synthetic_vocab)  # the data's vocabulary
    steps = cfg.inference.steps
    return (tokens, tokens * flops_per_token(model, steps, decoder_grad=cfg.inference.decoder_grad),
            tokens * flops_per_token(model, steps, convention="paper"))


@pytest.mark.parametrize("study", [INFERENCE_SCALING, GENERATION], ids=lambda s: s.name)
def test_dry_run_prints_each_points_flops_and_gpu_hours_and_their_totals(tmp_path, capsys, study):
    # the model's vocabulary comes from the data (128 here), not from model.vocab_size (64)
    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--set", "data.synthetic_vocab=128",
            "--mfu", "0.5", "--peak-tflops", "0.01", "--gpus-per-trial", "1", "--max-concurrent", "2"]
    rows, rest = dry_run(study, argv, capsys)
    points = plan(study, argv).points
    assert set(rows) == {p.key for p in points}
    totals = [0.0, 0.0]
    hours = []
    for p in points:  # evaluation points count the training of the checkpoint they train first
        tokens, flops, paper = expected(p)
        row = rows[p.key]
        assert number(row["tokens"]) == tokens
        assert number(row["flops"]) == pytest.approx(flops, rel=ROUNDING)
        assert number(row["flops_paper"]) == pytest.approx(paper, rel=ROUNDING)
        hours.append(flops / (0.5 * 0.01e12) / 3600)
        assert number(row["gpu_h"]) == pytest.approx(hours[-1], rel=ROUNDING)
        totals = [totals[0] + flops, totals[1] + paper]
    training, gpu_time, wall = rest.splitlines()[1:4]
    words = training.split()
    assert words[0] == "training:" and words[3] == "exact," and words[6:8] == ["paper", "convention"]
    assert number(words[1]) == pytest.approx(totals[0], rel=ROUNDING)
    assert number(words[4]) == pytest.approx(totals[1], rel=ROUNDING)
    value, unit = gpu_time.split()[2:4]  # seconds at this small scale
    assert unit == "GPU-s" and number(value) == pytest.approx(sum(hours) * 3600, rel=ROUNDING)
    assert "of exact FLOPs at 50% MFU of 0.01 TFLOP/s" in gpu_time
    wall_s = max(sum(hours) / 2, max(hours)) * 3600
    assert wall.startswith("wall time: about ") and "with 2 trials x 1 GPU at once (estimate" in wall
    assert number(wall.split()[3]) == pytest.approx(wall_s, rel=ROUNDING) and wall.split()[4] == "s"


def test_a_study_without_gpus_gets_no_wall_time_estimate(tmp_path, capsys):
    _, rest = dry_run(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path)], capsys)
    assert "at 40% MFU of 989 TFLOP/s" in rest  # the defaults
    assert "wall time: not estimated, the trials get no GPU (--gpus-per-trial)" in rest


@pytest.mark.parametrize("hours, shown", [(1361.2, "1,361 GPU-h"), (0.25, "0.25 GPU-h"), (5 / 60, "5 GPU-min"),
                                          (3.4 / 3600, "3.4 GPU-s"), (2.59e-08, "under 1 GPU-s")])
def test_gpu_time_is_shown_in_a_unit_a_person_reads(hours, shown):
    from studies.costs import cost_summary, gpu_hours

    flops = hours * 3600 * 0.4 * 989e12  # what takes `hours` at 40% of 989 TFLOP/s
    assert gpu_hours(flops, 0.4, 989.0) == pytest.approx(hours)
    assert cost_summary([Cost(1, flops, flops)], 0.4, 989.0, 0, 1)[1].startswith(f"GPU time: {shown} of exact FLOPs")


def test_evaluating_a_given_checkpoint_trains_nothing():
    point = Point(key="k", config=run_preset("smoke").to_dict(), label={}, task=GenerationTask(),
                  source=CheckpointSource("/some/ckpt"))
    assert point_cost(point) == Cost(0, 0.0, 0.0)


@pytest.mark.parametrize("args, message", [
    (["--mfu", "0"], "--mfu is a fraction of the peak in (0, 1], e.g. --mfu 0.4 for 40%; got 0"),
    (["--mfu", "1.5"], "--mfu is a fraction of the peak in (0, 1], e.g. --mfu 0.4 for 40%; got 1.5"),
    (["--peak-tflops", "0"], "--peak-tflops must be > 0 (a GPU's peak TFLOP/s, e.g. 989"),
], ids=["mfu-0", "mfu-1.5", "peak-0"])
def test_bad_mfu_or_peak_is_a_usage_error(tmp_path, capsys, args, message):
    assert main(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--dry-run", *args]) == Exit.USAGE
    assert message in capsys.readouterr().err


def test_the_paper_scale_sample_costs_what_the_paper_says():
    """LTM-L at T=64 on 3B tokens: 32.2 GFLOPs/token in the paper's convention, about 1e20 FLOPs."""
    (point,) = [p for p in build_points(INFERENCE_SCALING, "paper", [0], None, [])
                if p.label.get("recipe") == "ltm-l" and p.label["inference.steps"] == 64
                and p.label["model.n_latents"] == 24]
    cost = point_cost(point)
    assert cost.tokens == 5723 * 512 * 1024  # 3e9 tokens in whole updates of 512 x 1024
    assert cost.flops_paper / cost.tokens == pytest.approx(3.22e10, rel=0.01)
    assert cost.flops_paper == pytest.approx(1e20, rel=0.05)
    assert cost.flops / cost.tokens == pytest.approx(flops_per_token(run_preset("ltm-l").model, 64), rel=1e-9)


def test_planned_vocab_size_is_the_tokenizers_without_reading_data():
    synthetic = DataConfig(synthetic_vocab=128, synthetic_slots=8)
    assert planned_vocab_size(synthetic) == load_tokenizer(synthetic).vocab_size == 128
    assert planned_vocab_size(DataConfig(name="openwebtext")) == 50258  # GPT-2 + BOS
    assert planned_vocab_size(DataConfig(name="openwebtext", tokenizer="bpe", bpe_vocab_size=4096)) == 4096


def test_the_default_peak_is_ltm_trains_h100_h200_peak():
    from ltm.flops import GPU_PEAKS

    assert DEFAULT_PEAK_TFLOPS * 1e12 == GPU_PEAKS["NVIDIA H200"] == GPU_PEAKS["NVIDIA H100 80GB HBM3"]


def test_slurm_requeues_needed_by_long_points_are_named():
    from studies.costs import Cost, cost_summary

    costs = [Cost(1, 0.4 * 989e12 * 3600 * h, 0.0) for h in (0.5, 25.0)]  # 0.5 and 25 GPU-hours
    lines = cost_summary(costs, 0.4, 989.0, 1, 2, SlurmProfile(time_min=600, max_num_timeout=1))
    assert "note: 1 point(s) outlast one job (time_min=600)" in lines[-1] and "up to 3 jobs" in lines[-1]
    assert "more than the profile's max_num_timeout=1 requeues" in lines[-1]
    assert not any("outlast" in line for line in cost_summary(costs, 0.4, 989.0, 1, 2, SlurmProfile(time_min=1600)))
    assert not any("outlast" in line for line in cost_summary(costs, 0.4, 989.0, 1, 2))  # not SLURM


def memory_of(point: Point, device: str, processes: int = 1):
    """The point's update in memory on one of its processes, worked out here from its config with the data's
    vocabulary."""
    cfg = RunConfig.from_dict(point.config)
    model = dataclasses.replace(cfg.model, vocab_size=cfg.data.synthetic_vocab)
    return step_memory(dataclasses.replace(cfg, model=model), device, processes)


WORLDS = {1: ["--gpus-per-trial", "1"], 2: ["--gpus-per-trial", "2"], 8: ["--gpus-per-trial", "8"],
          16: ["--gpus-per-trial", "8", "--nodes-per-trial", "2"]}
"""World sizes of a point on the GPU profile (one process per GPU of each node): the argv that gives each."""


@pytest.mark.parametrize("world", WORLDS)
def test_the_dry_runs_memory_is_the_estimators_at_the_per_process_batch(tmp_path, capsys, no_slurm, world):
    """Issue 31: 16 processes were planned (and fit_micro suggested) for the whole batch of 64, not their 4."""
    argv = ["--preset", "smoke", "--cluster", "slurm", "--profile", "gpu", "--runs-dir", str(tmp_path),
            "--set", "train.batch_size=64", "--gpu-mem-gb", "1.2", *WORLDS[world]]
    rows, rest = dry_run(INFERENCE_SCALING, argv, capsys)
    for p in plan(INFERENCE_SCALING, [*argv, "--dry-run"]).points:
        memory = memory_of(p, "cuda", world)
        assert memory.local_batch == 64 // world
        assert rows[p.key]["micro"] == str(64 // world)
        assert number(rows[p.key]["mem_gb"]) == pytest.approx(gib(memory.peak_bytes()), rel=ROUNDING)
        fit = int(rows[p.key]["fit_micro"])
        assert 0 < fit <= 64 // world and fit == memory.largest_micro_batch((1.2 * 0.9 - 1) * 2**30)
    assert (f"each of a point's {world} processes holds train.batch_size / {world} sequences" in rest) == (world > 1)
    # the profile's 64 GB per node is enough for 1 or 2 processes, not for 8 on a node
    host = "warning: the SLURM profile's mem_gb: 64 is per node, shared by the point's 8 processes there"
    assert (host in rest) == (world >= 8)
    assert ("set mem_gb: 128 (or more) in the profile" in rest) == (world >= 8)


def test_dry_run_prints_each_points_memory_and_the_micro_batch_that_fits_its_gpu(tmp_path, capsys):
    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path), "--gpus-per-trial", "1"]
    memories = {p.key: memory_of(p, "cuda") for p in plan(INFERENCE_SCALING, argv).points}
    # a GPU whose usable memory (90%, less 1 GB) lies between every point's peak at micro-batch 2 and at 4
    low, high = max(m.peak_bytes(2) for m in memories.values()), min(m.peak_bytes(4) for m in memories.values())
    assert low < high
    gpu_gb = (gib((low + high) / 2) + 1) / 0.9
    rows, rest = dry_run(INFERENCE_SCALING, [*argv, "--gpu-mem-gb", repr(gpu_gb)], capsys)
    for key, memory in memories.items():
        assert memory.precision == "bf16" and memory.micro_batch == 8  # the whole batch of 8 at once
        assert rows[key]["micro"] == "8" and rows[key]["fit_micro"] == "2"
        assert number(rows[key]["mem_gb"]) == pytest.approx(gib(memory.peak_bytes()), rel=ROUNDING)
    assert "at the precision it runs at on a GPU (train.precision=auto: bf16 autocast)" in rest
    assert (f"whose peak fits {gib((low + high) / 2):.3g} GB: a {gpu_gb:g} GB GPU less 10% headroom (allocator "
            "rounding, fragmentation, workspaces) and 1 GB for the CUDA context") in rest
    assert ("note: 4 point(s) need more than that at their micro-batch: "
            "set train.micro_batch_size to their fit_micro") in rest


def test_cpu_trials_get_the_cpu_estimate_and_no_fit(tmp_path, capsys):
    argv = ["--preset", "smoke", "--runs-dir", str(tmp_path)]
    rows, rest = dry_run(INFERENCE_SCALING, argv, capsys)
    for p in plan(INFERENCE_SCALING, argv).points:
        assert number(rows[p.key]["mem_gb"]) == pytest.approx(gib(memory_of(p, "cpu").peak_bytes()), rel=ROUNDING)
        assert rows[p.key]["fit_micro"] == "-"
    assert "at the precision it runs at on a CPU (train.precision=auto: fp32)" in rest and "fit_micro" not in rest


BIG = ["--preset", "smoke", "--set", "model.d_model=4096", "--set", "model.n_heads=32", "--gpus-per-trial", "1",
       "--gpu-mem-gb", "4"]
"""Smoke points made about 10 GB at micro-batch 1, on a 4 GB GPU."""


def test_a_study_with_a_point_that_cannot_fit_even_at_micro_batch_1_is_refused_before_anything_starts(tmp_path, capsys):
    runs = tmp_path / "runs"
    assert main(INFERENCE_SCALING, [*BIG, "--runs-dir", str(runs)]) == Exit.USAGE
    err = capsys.readouterr().err
    assert "error: 4 point(s) cannot fit a 4 GB GPU even at micro-batch 1 (" in err
    assert "run them on GPUs with more memory (--gpu-mem-gb, or the SLURM profile's gpu_mem_gb)" in err
    assert not (runs / "mlflow.db").exists() and not (runs / "ray").exists()


def test_the_dry_run_shows_the_grid_then_names_the_points_that_cannot_fit(tmp_path, capsys):
    assert main(INFERENCE_SCALING, [*BIG, "--runs-dir", str(tmp_path), "--dry-run"]) == Exit.USAGE
    out, err = capsys.readouterr()
    header, *rows = [line.split() for line in out.split("\n\n")[0].splitlines()]
    assert [dict(zip(header, r))["fit_micro"] for r in rows] == ["0"] * 4
    assert all(number(dict(zip(header, r))["mem_gb"]) > 4 for r in rows)
    assert "cannot fit a 4 GB GPU even at micro-batch 1" in err and "2.6 GB usable per process" in err


def test_the_gpu_profile_gives_the_gpu_memory(tmp_path, capsys):
    assert load_profile("gpu").gpu_mem_gb == 141  # an H200
    # the synthetic corpus stands in for OpenWebText, whose GPT-2 tokenizer a test machine may not have
    argv = ["--preset", "paper", "--cluster", "slurm", "--runs-dir", str(tmp_path), "--set", "data.name=synthetic"]
    rows, rest = dry_run(INFERENCE_SCALING, argv, capsys)
    assert len(rows) == 48 and all(r["micro"] == "32" and int(r["fit_micro"]) >= 32 for r in rows.values())
    assert "fits 126 GB: a 141 GB GPU less 10% headroom" in rest


def test_ltm_l_at_t64_and_micro_batch_32_fits_an_h200_with_room_to_spare():
    """The paper's LTM-L with its GPT-2 vocabulary, on a GPU (bf16 autocast)."""
    from studies.costs import point_memory, usable_gb

    (point,) = [p for p in build_points(INFERENCE_SCALING, "paper", [0], None, [])
                if p.label.get("recipe") == "ltm-l" and p.label["inference.steps"] == 64
                and p.label["model.n_latents"] == 24]
    memory = point_memory(point, True, usable_gb(141, 1))
    cfg = RunConfig.from_dict(point.config)
    estimate = step_memory(cfg.with_overrides({"model.vocab_size": 50258}), "cuda")
    assert memory.micro_batch == 32 and memory.peak_gb == pytest.approx(gib(estimate.peak_bytes()))
    weights_and_adamw = 16 * 76_279_296 / 2**30  # fp32 weights, gradients and two moments: 1.1 GB
    assert 10 * weights_and_adamw < memory.peak_gb < 126  # activations dominate; it fits
    assert memory.largest_fit == estimate.largest_micro_batch(usable_gb(141, 1) * 2**30) >= 32
    usable = usable_gb(141, 1) * 2**30
    assert estimate.peak_bytes(memory.largest_fit) <= usable < estimate.peak_bytes(2 * memory.largest_fit)


@pytest.mark.parametrize("args, message", [
    (["--gpu-mem-gb", "0", "--gpus-per-trial", "1"], "the GPU's memory (--gpu-mem-gb, or the profile's gpu_mem_gb) "
                                                     "is in GB and > 0, e.g. 80 for an H100; got 0.0"),
    (["--gpu-mem-gb", "80"], "--gpu-mem-gb sizes the GPU a trial gets, but the trials get none: add "
                             "--gpus-per-trial 1 or drop --gpu-mem-gb"),
], ids=["zero", "no-gpu"])
def test_bad_gpu_memory_is_a_usage_error(tmp_path, capsys, args, message):
    assert main(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path), "--dry-run", *args]) == Exit.USAGE
    assert message in capsys.readouterr().err


# -- planning where nothing runs: no SLURM, no GPU, no Ray cluster ------------------------------------

STUDIES = [importlib.import_module(f"studies.{name}").STUDY for name in
           ("inference_scaling", "sample_efficiency", "inference_cost", "icl_gsm8k", "zero_shot", "generation",
            "ladder")]
CLUSTERS = {"local": ["--cluster", "local"], "ray": ["--address", "10.255.255.1:6379"], "slurm": ["--cluster", "slurm"]}


@pytest.fixture
def no_slurm(monkeypatch) -> None:
    """PATH without SLURM's commands, as on a laptop (whatever this machine has)."""
    kept = [d for d in os.environ["PATH"].split(os.pathsep)
            if not any((Path(d) / command).exists() for command in ("srun", "sbatch"))]
    monkeypatch.setenv("PATH", os.pathsep.join(kept))
    assert shutil.which("srun") is None and shutil.which("sbatch") is None


def _tiny_gsm8k(folder: Path) -> Path:
    folder.mkdir()
    for split in ("train", "test"):
        (folder / f"{split}.jsonl").write_text(json.dumps({"question": "1 + 1?", "answer": "1 + 1 = 2\n#### 2"}) + "\n")
    return folder


@pytest.mark.parametrize("cluster", CLUSTERS)
@pytest.mark.parametrize("study", STUDIES, ids=lambda s: s.name)
def test_every_studys_dry_run_plans_without_slurm_gpu_or_ray_cluster(tmp_path, capsys, no_slurm, study, cluster):
    data = ["--data", str(_tiny_gsm8k(tmp_path / "gsm8k"))] if study.name == "icl_gsm8k" else []
    code = main(study, ["--preset", "smoke", "--runs-dir", str(tmp_path / "runs"), *CLUSTERS[cluster], *data,
                        "--dry-run"])
    out, err = capsys.readouterr()
    assert code == Exit.OK, err
    assert f"{study.name} / smoke: " in out and f"backend {cluster}" in out
    if cluster == "slurm":
        assert "#SBATCH --array=0-" in out and "#SBATCH --partition=debug" in out and "preview unavailable" not in out
    assert not [p.name for p in (tmp_path / "runs").glob("*")]  # planned: no store, no Ray or SLURM folder


def test_the_paper_scale_slurm_plan_prints_its_sbatch_parameters_on_a_laptop(tmp_path, capsys, no_slurm):
    """The planning case of issue 29: it printed the plan, then crashed looking for srun."""
    # the synthetic corpus stands in for OpenWebText, whose GPT-2 tokenizer a laptop may not have
    argv = ["--preset", "paper", "--cluster", "slurm", "--runs-dir", str(tmp_path), "--set", "data.name=synthetic"]
    rows, rest = dry_run(INFERENCE_SCALING, argv, capsys)
    assert len(rows) == 48
    sbatch = rest.split("sbatch parameters (one job array):\n", 1)[1].splitlines()
    for line in ("#SBATCH --array=0-47%16", "#SBATCH --gpus-per-task=1", "#SBATCH --cpus-per-task=8",
                 "#SBATCH --signal=USR2@180", "#SBATCH --job-name=inference_scaling-paper"):
        assert line in sbatch


def test_the_planned_sbatch_lines_are_the_ones_submission_writes(tmp_path, monkeypatch):
    """Planning builds submitit's SLURM executor without srun; with an srun on PATH submitit's own
    AutoExecutor (what a submission uses) writes the same file."""
    from studies.slurm_backend import _planning_executor, slurm_executor

    argv = ["--preset", "paper", "--cluster", "slurm", "--runs-dir", str(tmp_path), "--set", "data.name=synthetic",
            "--nodes-per-trial", "2", "--processes-per-trial", "4", "--gpus-per-trial", "4", "--dry-run"]
    planned = plan(INFERENCE_SCALING, argv)
    fake = tmp_path / "bin"
    fake.mkdir()
    (fake / "srun").write_text("#!/bin/sh\nexit 0\n")
    (fake / "srun").chmod(0o755)
    monkeypatch.setenv("PATH", f"{fake}{os.pathsep}{os.environ['PATH']}")
    submitted = slurm_executor(planned, tmp_path)._executor
    planning = _planning_executor(planned, tmp_path)
    assert planning.parameters == submitted.parameters and "gpus_per_node" in planning.parameters
    command = "python -u -m submitit.core._submit <folder>"
    assert planning._make_submission_file_text(command, "u") == submitted._make_submission_file_text(command, "u")


def test_a_dry_run_without_the_evaluation_data_shows_the_grid_then_names_what_is_missing(tmp_path, capsys, no_slurm):
    from studies.icl_gsm8k import STUDY as ICL_GSM8K

    folder = _tiny_gsm8k(tmp_path / "gsm8k")
    (folder / "test.jsonl").unlink()
    argv = ["--preset", "smoke", "--cluster", "slurm", "--runs-dir", str(tmp_path / "runs"), "--data", str(folder)]
    assert main(ICL_GSM8K, [*argv, "--dry-run"]) == Exit.USAGE
    out, err = capsys.readouterr()
    assert "icl_gsm8k / smoke: 2 points" in out and "#SBATCH --array=0-1%2" in out
    assert err.startswith("error: ") and "test.jsonl" in err
    assert main(ICL_GSM8K, argv) == Exit.USAGE  # and a real start is refused before anything is printed
    assert capsys.readouterr().out == ""


def test_the_dry_run_warns_when_the_profiles_signal_delay_is_shorter_than_an_update_and_a_checkpoint(tmp_path, capsys,
                                                                                                    no_slurm):
    """Issue 31: an LTM-L update at T=128 (1.4e16 FLOP exact) fits the GPU profile's signal_delay_s of 180 s at
    40% MFU of an H100, not at 10%."""
    from studies.costs import SIGNAL_MARGIN, _stop_seconds

    assert load_profile("gpu").signal_delay_s == 180
    argv = ["--preset", "paper", "--cluster", "slurm", "--runs-dir", str(tmp_path), "--set", "data.name=synthetic"]
    _rows, rest = dry_run(INFERENCE_SCALING, argv, capsys)
    assert "signal_delay_s" not in rest  # at the default 40% MFU an update and a checkpoint fit 180 s
    points = plan(INFERENCE_SCALING, [*argv, "--dry-run"]).points
    slowest = max((_stop_seconds(p, point_cost(p), 0.1, 989.0, 1) for p in points), key=lambda t: t[1] + t[2])
    key, update_s, write_s = slowest
    (point,) = [p for p in points if p.key == key]
    assert point.label["recipe"] == "ltm-l" and point.label["inference.steps"] == 128
    assert update_s == pytest.approx(point_cost(point).flops / RunConfig.from_dict(point.config).updates / 98.9e12)
    assert 1e16 < update_s * 98.9e12 < 2.3e16 and 0 < write_s < 10  # about 0.9 GB at 0.25 GB/s
    _rows, rest = dry_run(INFERENCE_SCALING, [*argv, "--mfu", "0.1"], capsys)
    needed = math.ceil(SIGNAL_MARGIN * (update_s + write_s) / 10) * 10
    assert (f"warning: the SLURM profile's signal_delay_s: 180 is shorter than point {key} needs to finish an update "
            f"(about {update_s:.0f} s at 10% MFU of 989 TFLOP/s on 1 GPU(s))") in rest
    assert f"set signal_delay_s: {needed} in the profile" in rest and needed > 180

"""A study's dry run sizes it: per point and in total, training tokens, FLOPs (exact and paper
conventions, `ltm.flops`) and GPU-hours at a stated MFU of a stated peak."""

import dataclasses
import math

import pytest

from ltm.config import DataConfig, RunConfig, run_preset
from ltm.data import load_tokenizer, planned_vocab_size
from ltm.flops import flops_per_token
from ltm.names import Exit
from studies.costs import DEFAULT_PEAK_TFLOPS, Cost, point_cost
from studies.generation import STUDY as GENERATION
from studies.inference_scaling import STUDY as INFERENCE_SCALING
from studies.launcher import main
from studies.messages import Point
from studies.plan import plan
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
            "--mfu", "0.5", "--peak-tflops", "100", "--gpus-per-trial", "1", "--max-concurrent", "2"]
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
        hours.append(flops / (0.5 * 100e12) / 3600)
        assert number(row["gpu_h"]) == pytest.approx(hours[-1], rel=ROUNDING)
        totals = [totals[0] + flops, totals[1] + paper]
    training, gpu_time, wall = rest.splitlines()[1:4]
    words = training.split()
    assert words[0] == "training:" and words[3] == "exact," and words[6:8] == ["paper", "convention"]
    assert number(words[1]) == pytest.approx(totals[0], rel=ROUNDING)
    assert number(words[4]) == pytest.approx(totals[1], rel=ROUNDING)
    assert number(gpu_time.split()[2]) == pytest.approx(sum(hours), rel=ROUNDING)
    assert "of exact FLOPs at 50% MFU of 100 TFLOP/s" in gpu_time
    wall_s = max(sum(hours) / 2, max(hours)) * 3600
    assert wall.startswith("wall time: about ") and "with 2 trials x 1 GPU at once (estimate" in wall
    assert number(wall.split()[3]) == pytest.approx(wall_s, rel=ROUNDING) and wall.split()[4] == "s"


def test_a_study_without_gpus_gets_no_wall_time_estimate(tmp_path, capsys):
    _, rest = dry_run(INFERENCE_SCALING, ["--preset", "smoke", "--runs-dir", str(tmp_path)], capsys)
    assert "at 40% MFU of 989 TFLOP/s" in rest  # the defaults
    assert "wall time: not estimated, the trials get no GPU (--gpus-per-trial)" in rest


def test_evaluating_a_given_checkpoint_trains_nothing():
    point = Point(key="k", config=run_preset("smoke").to_dict(), label={}, task={"name": "generation"},
                  source={"checkpoint": "/some/ckpt", "run_id": None})
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
    from ltm.train import _GPU_PEAKS

    assert DEFAULT_PEAK_TFLOPS * 1e12 == _GPU_PEAKS["NVIDIA H200"] == _GPU_PEAKS["NVIDIA H100 80GB HBM3"]


def test_slurm_requeues_needed_by_long_points_are_named():
    from studies.costs import Cost, cost_summary

    costs = [Cost(1, 0.4 * 989e12 * 3600 * h, 0.0) for h in (0.5, 25.0)]  # 0.5 and 25 GPU-hours
    lines = cost_summary(costs, 0.4, 989.0, 1, 2, {"time_min": 600, "max_num_timeout": 1})
    assert "note: 1 point(s) outlast one job (time_min=600)" in lines[-1] and "up to 3 jobs" in lines[-1]
    assert "more than the profile's max_num_timeout=1 requeues" in lines[-1]
    assert not any("outlast" in line for line in cost_summary(costs, 0.4, 989.0, 1, 2, {"time_min": 1600}))
    assert not any("outlast" in line for line in cost_summary(costs, 0.4, 989.0, 1, 2))  # not SLURM

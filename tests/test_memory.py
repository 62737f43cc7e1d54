"""The memory estimate of a training update (`ltm.memory`) against the peak measured on this CPU, and
the shortcuts that make it cheap (inner steps, micro-batch, depth and latents) against full traces."""

import pytest

from ltm.config import run_preset
from ltm.memory import measure_peak_bytes, precision_on, step_memory, trace_peak_bytes


def config(preset: str, **overrides):
    return run_preset(preset).with_overrides(overrides)


MEASURED = {  # name: (config, micro-batch); each at the precision its train.precision gives on a CPU
    "ltm dense window": (config("micro", **{"inference.steps": 4}), 8),
    "ar dense window": (config("micro", **{"model.kind": "ar"}), 8),
    "ltm chunked window": (config("micro-rf", **{"inference.steps": 2, "model.ctx": 512, "model.window": 64}), 2),
    "ltm causal": (config("micro-rf", **{"inference.steps": 1, "model.window": None}), 4),
    "ltm trajectory": (config("micro-rf", **{"inference.steps": 3, "inference.decoder_grad": "trajectory"}), 4),
    "ltm bf16 autocast": (config("micro", **{"inference.steps": 2, "train.precision": "bf16"}), 4),
    "ltm accumulating": (config("micro", **{"inference.steps": 2, "train.batch_size": 8}), 2),
    "ltm released-code options": (config("micro-rf", **{"inference.steps": 2, "model.latent_rope": True,
                                                         "inference.fixed_variance": True,
                                                         "inference.reuse_noise": True}), 4),
    # deeper than 2 layers: interpolated from the corner traces
    "ltm 4 layers, interpolated": (config("micro", **{"model.n_layers": 4, "inference.steps": 2}), 4),
    "ar 3 layers chunked, interpolated": (config("micro-rf", **{"model.kind": "ar", "model.n_layers": 3,
                                                                 "model.ctx": 512, "model.window": 64,
                                                                 "train.batch_size": 6}), 3),
}


@pytest.mark.parametrize("name", MEASURED)
def test_the_estimate_is_the_peak_measured_on_this_cpu(name):
    cfg, micro = MEASURED[name]
    cfg = cfg.with_overrides({"train.micro_batch_size": micro})
    memory = step_memory(cfg, "cpu")
    measured = measure_peak_bytes(cfg, micro, memory.precision)
    assert abs(memory.peak_bytes() / measured - 1) <= 0.15, (memory.peak_bytes(), measured)


@pytest.mark.parametrize("preset, n_latents, micro", [("ltm-l", 192, 32), ("ltm-m", 24, 5)])
def test_interpolating_the_corners_gives_the_full_trace_of_a_paper_shape(preset, n_latents, micro):
    """Affine in the micro-batch (traced at 1 and 2), the layers (1 and 2) and the latents per layer."""
    cfg = config(preset, **{"inference.steps": 1, "model.n_latents": n_latents})
    memory = step_memory(cfg, "cuda")  # bf16 autocast
    assert memory.precision == "bf16" and memory.micro_batch == 32 and memory.local_batch == 512
    full = trace_peak_bytes(cfg, micro, "bf16")
    assert memory.peak_bytes(micro) == pytest.approx(max(full.values()), rel=1e-3)


def test_an_ar_shape_interpolates_too():
    cfg = config("ltm-s", **{"model.kind": "ar", "train.micro_batch_size": 4})
    full = trace_peak_bytes(cfg, 4, "fp32")
    assert step_memory(cfg, "cpu").peak_bytes() == pytest.approx(max(full.values()), rel=1e-3)


@pytest.mark.parametrize("decoder_grad", ["final", "trajectory"])
def test_the_peak_does_not_grow_with_the_inference_steps_past_two(decoder_grad):
    """Each inner step frees the graph of the one before, so the estimate traces 2 steps; the loop only
    keeps 4 bytes per sequence and step more (its record of the objective)."""
    cfg = config("micro-rf", **{"inference.decoder_grad": decoder_grad})
    phases = {t: trace_peak_bytes(cfg.with_overrides({"inference.steps": t}), 4) for t in (1, 2, 5)}
    peak = {t: max(p.values()) for t, p in phases.items()}
    assert 0 <= peak[5] - peak[2] <= 4 * 4 * (5 - 2)
    if decoder_grad == "trajectory":  # the loop is the peak: step 2 also holds .grad, allocated by step 1
        assert peak[2] > peak[1]


def test_the_largest_micro_batch_that_fits_divides_the_batch():
    memory = step_memory(config("smoke", **{"train.batch_size": 12}), "cpu")
    peaks = {m: memory.peak_bytes(m) for m in (1, 2, 3, 4, 6, 12)}
    assert list(peaks.values()) == sorted(peaks.values())
    assert memory.largest_micro_batch(peaks[12]) == 12
    assert memory.largest_micro_batch(peaks[6] - 1) == 4  # 5 does not divide 12
    assert memory.largest_micro_batch((peaks[4] + peaks[6]) / 2) == 4
    assert memory.largest_micro_batch(peaks[1] - 1) == 0
    with pytest.raises(ValueError, match="divisible by the 5 processes"):
        step_memory(config("smoke"), "cpu", processes=5)


def test_a_gpu_runs_bf16_autocast_unless_told_otherwise():
    assert [precision_on("cuda", p) for p in ("auto", "bf16", "fp32")] == ["bf16", "bf16", "fp32"]
    assert [precision_on("cpu", p) for p in ("auto", "bf16", "fp32")] == ["fp32", "bf16", "fp32"]
    cfg = config("micro", **{"inference.steps": 2})
    gpu, cpu = step_memory(cfg, "cuda").peak_bytes(), step_memory(cfg, "cpu").peak_bytes()
    assert gpu == step_memory(cfg.with_overrides({"train.precision": "bf16"}), "cpu").peak_bytes()
    assert gpu < cpu  # bf16 activations, fp32 weights

import dataclasses

import pytest
import torch
import torch.nn.functional as F

import ltm
from ltm.flops import flop_counter_mode, flops_per_token


def test_paper_convention_reproduces_the_papers_tables():
    assert flops_per_token(ltm.model_preset("ltm-m"), 16, convention="paper") == pytest.approx(5.52e9, rel=0.01)
    assert flops_per_token(ltm.model_preset("ltm-l"), 64, convention="paper") == pytest.approx(3.22e10, rel=0.01)


def measured_training_step(model, tokens, cfg):
    """FLOPs per token of one real training step (inference loop + decoder update), counted by torch."""
    counter = flop_counter_mode()
    with counter:
        z = ltm.infer_posterior(model, tokens, cfg, seeds=range(len(tokens))).z if model.cfg.kind == "ltm" else None
        logits = model(tokens[:, :-1], z)
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
    return counter.get_total_flops() / tokens[:, 1:].numel()


@pytest.mark.parametrize("preset,kind,decoder_grad,window", [
    ("smoke", "ltm", "final", 16), ("smoke", "ltm", "trajectory", 16), ("smoke", "ar", "final", 16),
    ("micro-s", "ltm", "final", 64), ("micro-s", "ltm", "final", None),
])
def test_exact_convention_agrees_with_torchs_flop_counter(preset, kind, decoder_grad, window):
    cfg = ltm.model_preset(preset, kind=kind, window=window)
    model = ltm.build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (2, cfg.ctx + 1))
    inference = ltm.InferenceConfig(steps=3, decoder_grad=decoder_grad)
    measured = measured_training_step(model, tokens, inference)
    assert flops_per_token(cfg, 3, decoder_grad=decoder_grad) == pytest.approx(measured, rel=0.05)


def test_exact_convention_counts_the_windowed_kernels_keys():
    # ctx 512, window 128: each block of 128 queries sees 256 keys, half the dense mask's
    cfg = ltm.ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, ctx=512, window=100, n_latents=2)
    model = ltm.build_model(cfg)
    tokens = torch.randint(0, cfg.vocab_size, (1, cfg.ctx + 1))
    inference = ltm.InferenceConfig(steps=2)
    assert flops_per_token(cfg, 2) == pytest.approx(measured_training_step(model, tokens, inference), rel=0.05)
    model.attention = "dense"
    dense = measured_training_step(model, tokens, inference)
    assert flops_per_token(cfg, 2) < 0.9 * dense


def test_an_inner_step_costs_about_two_forward_passes():
    cfg = ltm.model_preset("micro-s")
    forward = flops_per_token(dataclasses.replace(cfg), 0, phase="eval")
    step = flops_per_token(cfg, 1, phase="eval") - forward
    assert 1.6 < step / forward < 2.3
    assert flops_per_token(cfg, 1, phase="eval", decoder_grad="trajectory") - forward > 2.8 * forward


def test_ar_costs_ignore_inference_steps_and_scale_with_training_passes():
    ar = ltm.model_preset("micro-s", kind="ar")
    assert flops_per_token(ar, 16) == flops_per_token(ar, 0)
    assert flops_per_token(ar, 0) == pytest.approx(3 * flops_per_token(ar, 0, phase="eval"), rel=0.05)


def test_bad_flops_arguments_are_rejected():
    cfg = ltm.model_preset("smoke")
    with pytest.raises(ValueError, match="convention must be 'exact' or 'paper'"):
        flops_per_token(cfg, 1, convention="chinchilla")
    with pytest.raises(ValueError, match="steps must be >= 0"):
        flops_per_token(cfg, -1)

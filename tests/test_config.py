import dataclasses

import pytest

import ltm
from ltm.config import ConfigError, InferenceConfig, ModelConfig


@pytest.mark.parametrize("name,n_params", [("ltm-s", 38_369_280), ("ltm-m", 51_005_952), ("ltm-l", 76_279_296)])
def test_paper_presets_have_the_papers_parameter_counts(name, n_params):
    import torch

    with torch.device("meta"):
        model = ltm.build_model(ltm.model_preset(name))
    assert model.num_params() == n_params


def test_swiglu_width_matches_the_paper():
    assert ltm.model_preset("ltm-s").mlp_hidden == 1376


def test_presets_are_dataclasses_that_replace_and_revalidate():
    cfg = ltm.model_preset("micro")
    assert dataclasses.replace(cfg, n_layers=4).n_layers == 4
    with pytest.raises(ConfigError, match="not divisible by model.n_layers=3"):
        dataclasses.replace(cfg, n_layers=3)


def test_unknown_preset_lists_the_known_ones():
    with pytest.raises(ConfigError, match="known presets: smoke, micro-s"):
        ltm.model_preset("gigantic")


@pytest.mark.parametrize("overrides,message", [
    (dict(n_latents=10, n_layers=4),
     r"n_latents=10 is not divisible by model.n_layers=4; use a multiple of 4, e.g. 8 or 12"),
    (dict(window=2048, ctx=1024), r"window=2048 must be between 1 and model.ctx=1024"),
    (dict(d_model=100, n_heads=8), r"d_model=100 is not divisible by model.n_heads=8"),
    (dict(kind="rnn"), r"model.kind must be 'ltm' or 'ar'"),
    (dict(n_latents=2, n_layers=4), r"n_latents=2 must be at least model.n_layers=4"),
])
def test_impossible_model_configs_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        ModelConfig(**overrides)


def test_ar_config_ignores_latent_divisibility():
    assert ModelConfig(kind="ar", n_latents=10, n_layers=4).latents_per_layer == 0


@pytest.mark.parametrize("overrides,message", [
    (dict(steps=-1), "inference.steps must be >= 0"),
    (dict(decoder_grad="all"), "decoder_grad must be 'final' or 'trajectory'"),
    (dict(lr_min=1.0, lr_max=0.1), "lr_min <= inference.lr_max"),
])
def test_impossible_inference_configs_say_what_to_change(overrides, message):
    with pytest.raises(ConfigError, match=message):
        InferenceConfig(**overrides)


def test_inner_learning_rate_is_a_cosine_from_max_to_min():
    cfg = InferenceConfig(steps=16)
    assert cfg.lr(0) == pytest.approx(0.34)
    assert cfg.lr(8) == pytest.approx((0.34 + 0.034) / 2)
    assert cfg.lr(15) > 0.034 and cfg.lr(15) < cfg.lr(14)


def test_receptive_field_of_a_windowed_stack():
    micro = ltm.model_preset("micro")  # 2 layers of window 64 in a 128-token context
    assert micro.receptive_field == 2 * 63 + 1
    assert dataclasses.replace(micro, window=8).receptive_field == 15
    assert dataclasses.replace(micro, n_layers=4, window=64).receptive_field == 128  # capped at ctx
    assert dataclasses.replace(micro, window=None).receptive_field == 128

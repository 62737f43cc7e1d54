"""The compiled inner loop and decoder update compute what the eager ones do, without recompiling."""

import dataclasses

import pytest
import torch

import ltm
from ltm.attention import plan_window
from ltm.config import ConfigError, run_preset
from ltm.posterior import frozen, infer_posterior
from ltm.objective import CPU_COMPILE_MIN_FLOPS, decoder_loss, use_compile


@pytest.fixture
def model():
    torch.manual_seed(0)
    return ltm.build_model(ltm.model_preset("smoke"))


def batch(cfg, seed):
    return torch.randint(0, cfg.vocab_size, (4, cfg.ctx + 1), generator=torch.Generator().manual_seed(seed))


WINDOWED = ltm.ModelConfig(vocab_size=64, n_layers=2, d_model=32, n_heads=2, ctx=512, window=128, n_latents=4)
"""A shape whose window runs as the chunked kernel (the smoke preset's runs as the dense mask)."""


@pytest.mark.parametrize("shape", ["smoke", "windowed"])
def test_compiled_and_eager_inference_and_decoder_update_agree_and_compile_once(model, shape):
    if shape == "windowed":
        torch.manual_seed(0)
        model = ltm.build_model(WINDOWED)
        assert plan_window(WINDOWED.ctx, WINDOWED.attn_window, WINDOWED.n_heads, torch.device("cpu")).kind == "chunked"
    torch._dynamo.reset()
    icfg = ltm.InferenceConfig(steps=4)
    for seed in (1, 2):  # a new batch of the same shape reuses the graphs
        # a second graph fails the test (torch's own patch: pytest 9's monkeypatch deletes the option on undo)
        with torch._dynamo.config.patch(error_on_recompile=True):
            tokens, seeds = batch(model.cfg, seed), [10 * seed + i for i in range(4)]
            grads, posts = [], []
            for compiled in (False, True):
                model.zero_grad(set_to_none=True)
                loss, kl = decoder_loss(model, tokens, icfg, seeds, compiled=compiled)
                loss.backward()
                posts.append(infer_posterior(model, tokens, icfg, seeds=seeds, compiled=compiled))
                grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
            eager, comp = posts
            torch.testing.assert_close(comp.mu, eager.mu, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(comp.logvar, eager.logvar, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(comp.trace, eager.trace, atol=1e-3, rtol=1e-4)
            for name in grads[0]:
                torch.testing.assert_close(grads[1][name], grads[0][name], atol=1e-5, rtol=1e-3, msg=name)
    assert all(p.requires_grad for p in model.parameters())  # the loop's freeze is undone


def test_the_inner_loop_leaves_the_decoder_untouched_in_final_mode_and_feeds_it_in_trajectory_mode(model):
    tokens = batch(model.cfg, 3)
    for compiled in (False, True):
        model.zero_grad(set_to_none=True)
        infer_posterior(model, tokens, ltm.InferenceConfig(steps=2), seeds=[0, 1, 2, 3], compiled=compiled)
        assert all(p.grad is None for p in model.parameters())
        # "trajectory" needs the weight gradients: it runs eager whatever `compiled` says
        infer_posterior(model, tokens, ltm.InferenceConfig(steps=2, decoder_grad="trajectory"), seeds=[0, 1, 2, 3],
                        compiled=compiled)
        assert all(p.grad is not None for p in model.parameters() if p.dim() == 2)


def test_frozen_restores_requires_grad_even_after_an_error(model):
    model.norm_out.weight.requires_grad_(False)  # what was frozen before stays frozen
    with pytest.raises(RuntimeError):
        with frozen(model):
            assert not any(p.requires_grad for p in model.parameters())
            raise RuntimeError
    assert not model.norm_out.weight.requires_grad
    assert all(p.requires_grad for n, p in model.named_parameters() if n != "norm_out.weight")


def test_compile_setting_is_validated_chosen_by_device_and_size_and_not_part_of_the_run():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert use_compile("auto", cuda, 1.0) and not use_compile("auto", cpu, CPU_COMPILE_MIN_FLOPS / 2)
    assert use_compile("auto", cpu, CPU_COMPILE_MIN_FLOPS) and use_compile("on", cpu, 1.0)
    assert not use_compile("off", cuda, 1e30)
    cfg = run_preset("smoke")
    assert cfg.with_overrides(["train.compile=off"]).run_key() == cfg.run_key()
    with pytest.raises(ConfigError, match="train.compile must be 'auto', 'on' or 'off'"):
        dataclasses.replace(cfg.train, compile="yes")


@pytest.mark.slow
def test_a_compiled_run_ends_where_the_eager_run_does(tmp_path):
    from ltm import train

    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=4096"])
    results = {mode: train.run(cfg.with_overrides([f"train.compile={mode}"]), runs_dir=tmp_path / mode, progress=False)
               for mode in ("off", "on")}
    assert results["on"].status == results["off"].status == "FINISHED"
    for name in ("train/loss", "val/ppl_bound", "val/kl", "val/ppl_iw"):
        assert results["on"].metrics[name] == pytest.approx(results["off"].metrics[name], rel=1e-3), name


def test_eager_flex_attention_compiles_once_per_grad_mode_and_not_per_batch():
    # The eager inner loop on CUDA: the stem runs without grad, the layers after it with grad enabled,
    # and FlexAttention's compiled kernel guards on the grad mode, so the first batch makes a graph
    # for each mode; every later batch must reuse them. (FlexAttention has no backward on a CPU: the
    # decoder is frozen and z needs no gradient, so the grad mode is on with no input needing one.)
    torch.manual_seed(0)
    model = ltm.build_model(WINDOWED)
    torch._dynamo.reset()
    with frozen(model):
        for seed in (1, 2):
            with torch._dynamo.config.patch(error_on_recompile=seed == 2):  # torch restores the option itself
                tokens = batch(WINDOWED, seed)[:, :-1]
                z = torch.randn(4, WINDOWED.n_latents, WINDOWED.d_model, generator=torch.Generator().manual_seed(seed))
                model.attention = "flex"
                with torch.no_grad():
                    stem = model.stem(tokens)
                with torch.enable_grad():
                    flex = model.forward_from_stem(stem, z)
                model.attention = "dense"
                with torch.no_grad():
                    dense = model(tokens, z)
                torch.testing.assert_close(flex, dense, atol=1e-5, rtol=1e-5)

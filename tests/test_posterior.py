import dataclasses

import pytest
import torch

import ltm
from ltm.model import token_nll
from ltm.posterior import NoiseSource, gaussian_kl


def reference_posterior(model, tokens, cfg, seeds):
    """docs/METHOD.md section 3 written literally: torch.optim.AdamW, a full forward every step."""
    noise = NoiseSource(seeds, (model.cfg.n_latents, model.cfg.d_model), tokens.device)
    mu = (cfg.init_mu_std * noise.draw()).requires_grad_()
    logvar = (cfg.init_logvar + cfg.init_logvar_std * noise.draw()).requires_grad_()
    opt = torch.optim.AdamW([mu, logvar], lr=cfg.lr_max, betas=cfg.betas, eps=cfg.eps, weight_decay=cfg.weight_decay)
    eps = noise.draw()
    for p in model.parameters():
        p.requires_grad_(False)
    for s in range(cfg.steps):
        if s > 0:
            eps = noise.draw()
        for group in opt.param_groups:
            group["lr"] = cfg.lr(s)
        z = mu + eps * torch.exp(logvar / 2)
        loss = token_nll(model(tokens[:, :-1], z), tokens[:, 1:]).sum() + gaussian_kl(mu, logvar).sum()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for p in model.parameters():
        p.requires_grad_(True)
    return mu.detach(), logvar.detach()


def test_inner_loop_matches_the_literal_method(smoke_model, tokens):
    cfg = ltm.InferenceConfig(steps=5)
    post = ltm.infer_posterior(smoke_model, tokens, cfg, seeds=[3, 4, 5])
    mu, logvar = reference_posterior(smoke_model, tokens, cfg, [3, 4, 5])
    torch.testing.assert_close(post.mu, mu, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(post.logvar, logvar, rtol=1e-4, atol=1e-5)


def test_inner_loop_lowers_the_bound_on_average(smoke_model, tokens):
    post = ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=8), seeds=[0, 1, 2])
    assert post.trace.shape == (8, 3)
    assert post.trace[-1].mean() < post.trace[0].mean()


def test_batched_inference_equals_one_by_one(smoke_model, tokens):
    cfg = ltm.InferenceConfig(steps=4)
    batched = ltm.infer_posterior(smoke_model, tokens, cfg, seeds=[7, 8, 9])
    for i, seed in enumerate([7, 8, 9]):
        single = ltm.infer_posterior(smoke_model, tokens[i:i + 1], cfg, seeds=[seed])
        torch.testing.assert_close(batched.mu[i:i + 1], single.mu, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.logvar[i:i + 1], single.logvar, rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(batched.z[i:i + 1], single.z, rtol=1e-4, atol=1e-5)


def test_default_mode_leaves_decoder_gradients_untouched(smoke_model, tokens):
    ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=3), seeds=[0, 1, 2])
    assert all(p.grad is None for p in smoke_model.parameters())


def test_trajectory_mode_accumulates_every_steps_decoder_gradient(smoke_model, tokens):
    seen = []  # the z of every inner step, captured on the way into the decoder
    hook = smoke_model.register_forward_pre_hook(lambda module, args: seen.append(args[1].detach().clone()))
    cfg = ltm.InferenceConfig(steps=3, decoder_grad="trajectory")
    ltm.infer_posterior(smoke_model, tokens, cfg, seeds=[0, 1, 2])
    hook.remove()
    accumulated = [p.grad.clone() for p in smoke_model.parameters()]
    assert len(seen) == 3 and all(g.abs().sum() > 0 for g in accumulated)
    expected = [torch.zeros_like(p) for p in smoke_model.parameters()]
    for z in seen:
        loss = token_nll(smoke_model(tokens[:, :-1], z), tokens[:, 1:]).sum()
        for total, g in zip(expected, torch.autograd.grad(loss, list(smoke_model.parameters()))):
            total += g
    for got, want in zip(accumulated, expected):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)


def test_inference_leaves_the_global_rng_alone(smoke_model, tokens):
    state = torch.get_rng_state()
    ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=2), seeds=[0, 1, 2])
    assert torch.equal(state, torch.get_rng_state())


def test_fixed_variance_freezes_logvar_and_returns_the_mean(smoke_model, tokens):
    post = ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=3, fixed_variance=True), seeds=[0, 1, 2])
    assert torch.all(post.logvar == -5.0)
    assert torch.equal(post.z, post.mu)


def test_reuse_noise_keeps_one_draw_for_the_whole_call(smoke_model, tokens):
    reuse = ltm.InferenceConfig(steps=3, reuse_noise=True)
    one, three = (ltm.infer_posterior(smoke_model, tokens, dataclasses.replace(reuse, steps=s), seeds=[0, 1, 2])
                  for s in (1, 3))
    assert torch.equal(one.eps, three.eps)
    fresh_one, fresh_three = (ltm.infer_posterior(smoke_model, tokens,
                                                  dataclasses.replace(reuse, steps=s, reuse_noise=False),
                                                  seeds=[0, 1, 2])
                              for s in (1, 3))
    assert not torch.equal(fresh_one.eps, fresh_three.eps)
    torch.testing.assert_close(three.z, three.mu + three.eps * (0.5 * three.logvar).exp())
    fresh = ltm.infer_posterior(smoke_model, tokens, dataclasses.replace(reuse, reuse_noise=False), seeds=[0, 1, 2])
    assert not torch.equal(fresh.eps, three.eps)


def test_zero_steps_returns_the_initialisation(smoke_model, tokens):
    post = ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=0), seeds=[0, 1, 2])
    assert post.trace.shape == (0, 3)
    assert post.mu.abs().max() < 0.1


def test_inference_rejects_ar_models_and_bad_inputs(smoke_cfg, smoke_model, tokens):
    ar = ltm.build_model(dataclasses.replace(smoke_cfg, kind="ar"))
    with pytest.raises(ValueError, match="needs an LTM"):
        ltm.infer_posterior(ar, tokens, ltm.InferenceConfig(steps=1))
    with pytest.raises(ValueError, match="one seed per sequence: 2 seeds for a batch of 3"):
        ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=1), seeds=[0, 1])


def test_inference_works_inside_no_grad(smoke_model, tokens):
    with torch.no_grad():
        post = ltm.infer_posterior(smoke_model, tokens, ltm.InferenceConfig(steps=2), seeds=[0, 1, 2])
    assert post.trace[-1].mean() < post.trace[0].mean()

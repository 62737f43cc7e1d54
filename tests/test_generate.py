import dataclasses

import pytest
import torch

import ltm
from ltm.generate import generate, posterior_latents, sample_prior


def greedy_without_cache(model, prompt, n, z):
    out = prompt
    for _ in range(n):
        window = out[:, -model.cfg.ctx:]
        out = torch.cat((out, model(window, z)[:, -1].argmax(-1, keepdim=True)), dim=1)
    return out


def test_cached_greedy_decoding_equals_recomputing_everything(smoke_model, smoke_cfg, tokens):
    z = sample_prior(smoke_cfg, 3, generator=torch.Generator().manual_seed(0))
    prompt = tokens[:, :5]
    # 20 new tokens cross the 16-token window, so the cache's trimming is exercised.
    cached = generate(smoke_model, prompt, 20, z=z, temperature=0)
    assert torch.equal(cached, greedy_without_cache(smoke_model, prompt, 20, z))


def test_ar_generation_runs_without_latents(smoke_cfg, tokens):
    torch.manual_seed(0)
    ar = ltm.build_model(dataclasses.replace(smoke_cfg, kind="ar"))
    out = generate(ar, tokens[:, :4], 6, temperature=0)
    assert torch.equal(out, greedy_without_cache(ar, tokens[:, :4], 6, None))


def test_seeded_sampling_is_deterministic(smoke_model, smoke_cfg, tokens):
    z = sample_prior(smoke_cfg, 3, temperature=0.5, generator=torch.Generator().manual_seed(0))

    def sample(seed):
        return generate(smoke_model, tokens[:, :4], 12, z=z, temperature=1.0, top_k=20, top_p=0.9,
                        generator=torch.Generator().manual_seed(seed))

    assert torch.equal(sample(1), sample(1))
    assert not torch.equal(sample(1), sample(2))


def test_top_k_one_is_greedy(smoke_model, smoke_cfg, tokens):
    z = sample_prior(smoke_cfg, 3, generator=torch.Generator().manual_seed(0))
    greedy = generate(smoke_model, tokens[:, :4], 8, z=z, temperature=0)
    assert torch.equal(generate(smoke_model, tokens[:, :4], 8, z=z, top_k=1), greedy)
    assert torch.equal(generate(smoke_model, tokens[:, :4], 8, z=z, top_p=1e-6), greedy)


def test_prior_temperature_scales_the_latents(smoke_cfg):
    z = sample_prior(smoke_cfg, 64, temperature=0.1, generator=torch.Generator().manual_seed(0))
    assert z.shape == (64, smoke_cfg.n_latents, smoke_cfg.d_model)
    assert z.std().item() == pytest.approx(0.1, rel=0.05)


def test_conditional_generation_uses_the_posterior_of_the_prompt(smoke_model, tokens):
    z = posterior_latents(smoke_model, tokens[:, :10], ltm.InferenceConfig(steps=3), seeds=[0, 1, 2])
    assert z.shape == (3, smoke_model.cfg.n_latents, smoke_model.cfg.d_model)
    out = generate(smoke_model, tokens[:, :10], 5, z=z, temperature=0)
    assert out.shape == (3, 15) and torch.equal(out[:, :10], tokens[:, :10])


def test_bad_generation_arguments_are_rejected(smoke_model, tokens):
    with pytest.raises(ValueError, match="temperature must be >= 0"):
        generate(smoke_model, tokens[:, :4], 2, z=torch.zeros(3, 4, 32), temperature=-1)
    with pytest.raises(ValueError, match="top_p must be in"):
        generate(smoke_model, tokens[:, :4], 2, z=torch.zeros(3, 4, 32), top_p=1.5)

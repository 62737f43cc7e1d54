import dataclasses
import math

import pytest
import torch

import ltm
from ltm.evaluate import evaluate_bounds, perplexity, perplexity_seqmean, sequence_bounds
from ltm.model import token_nll


def test_ar_bound_is_its_exact_nll(smoke_cfg, tokens):
    torch.manual_seed(0)
    ar = ltm.build_model(dataclasses.replace(smoke_cfg, kind="ar"))
    bounds = sequence_bounds(ar, tokens, ltm.InferenceConfig(steps=4), seeds=[0, 1, 2], iw_samples=4)
    exact = token_nll(ar(tokens[:, :-1]), tokens[:, 1:]).sum(1)
    torch.testing.assert_close(bounds.elbo, exact)
    torch.testing.assert_close(bounds.iw, exact)
    metrics = evaluate_bounds(ar, [tokens], ltm.InferenceConfig(steps=4))
    assert metrics["val/ppl_bound"] == pytest.approx(math.exp(exact.sum().item() / tokens[:, 1:].numel()), rel=1e-5)


def test_importance_weighted_bound_is_not_above_the_elbo_on_average(smoke_model, smoke_cfg):
    g = torch.Generator().manual_seed(5)
    tokens = torch.randint(0, smoke_cfg.vocab_size, (8, smoke_cfg.ctx + 1), generator=g)
    cfg = ltm.InferenceConfig(steps=6)
    bounds = sequence_bounds(smoke_model, tokens, cfg, seeds=list(range(8)), iw_samples=64)
    assert bounds.iw.mean() <= bounds.elbo.mean()
    # ... and it is a bound of the same quantity: close to the ELBO, not wildly below it.
    assert bounds.iw.mean() > bounds.elbo.mean() - bounds.kl.mean()


def test_evaluation_never_touches_training_state(smoke_model, tokens):
    for p in smoke_model.parameters():
        p.grad = torch.full_like(p, 0.5)
    rng = torch.get_rng_state()
    before = [p.detach().clone() for p in smoke_model.parameters()]
    # Even a trajectory-mode config must not leak into the decoder's gradients at evaluation.
    evaluate_bounds(smoke_model, [tokens], ltm.InferenceConfig(steps=3, decoder_grad="trajectory"), iw_samples=2)
    assert all(torch.all(p.grad == 0.5) for p in smoke_model.parameters())
    assert all(torch.equal(p, b) for p, b in zip(smoke_model.parameters(), before))
    assert torch.equal(rng, torch.get_rng_state())


def test_evaluation_does_not_depend_on_batching(smoke_model, tokens):
    cfg = ltm.InferenceConfig(steps=3)
    whole = evaluate_bounds(smoke_model, [tokens], cfg, seed=11, iw_samples=3)
    split = evaluate_bounds(smoke_model, [tokens[:1], tokens[1:]], cfg, seed=11, iw_samples=3)
    assert whole.keys() == split.keys()
    for key in whole:
        assert whole[key] == pytest.approx(split[key], rel=1e-4), key


def test_evaluation_is_reproducible_from_its_seed(smoke_model, tokens):
    cfg = ltm.InferenceConfig(steps=2)
    a = evaluate_bounds(smoke_model, [tokens], cfg, seed=3)
    b = evaluate_bounds(smoke_model, [tokens], cfg, seed=3)
    c = evaluate_bounds(smoke_model, [tokens], cfg, seed=4)
    assert a == b and a != c


def test_metric_names_follow_the_design(smoke_model, tokens):
    metrics = evaluate_bounds(smoke_model, [tokens], ltm.InferenceConfig(steps=1), iw_samples=2, prefix="val")
    assert set(metrics) == {"val/nll", "val/kl", "val/ppl_bound", "val/ppl_bound_seqmean", "val/ppl_reuse", "val/ppl_iw"}
    assert metrics["val/ppl_bound"] == pytest.approx(math.exp(metrics["val/nll"] + metrics["val/kl"]))


def test_token_weighted_and_sequence_mean_perplexities_differ_as_defined():
    bound = torch.tensor([10.0, 40.0])
    n = torch.tensor([10.0, 20.0])
    assert perplexity(bound, n) == pytest.approx(math.exp(50 / 30))
    assert perplexity_seqmean(bound, n) == pytest.approx((math.exp(1) + math.exp(2)) / 2)


def test_bad_evaluation_input_is_rejected(smoke_model, tokens):
    with pytest.raises(ValueError, match="no batches"):
        evaluate_bounds(smoke_model, [], ltm.InferenceConfig(steps=1))
    with pytest.raises(ValueError, match="iw_samples must be >= 0"):
        sequence_bounds(smoke_model, tokens, ltm.InferenceConfig(steps=1), seeds=[0, 1, 2], iw_samples=-1)

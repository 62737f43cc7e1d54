import dataclasses
import math

import pytest
import torch

import ltm
from ltm.evaluate import evaluate_bounds, sequence_bounds, sequence_nll
from ltm.kl_floor import kl_floor
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


def test_metric_names_follow_the_design(smoke_model, smoke_cfg, tokens):
    bounds = {"val/bound", "val/nll", "val/kl", "val/ppl_bound", "val/ppl_bound_seqmean", "val/ppl_reuse", "val/ppl_iw"}
    metrics = evaluate_bounds(smoke_model, [tokens], ltm.InferenceConfig(steps=1), iw_samples=2, prefix="val")
    # 3 blocks: no mixture
    assert set(metrics) == bounds | {"val/kl_floor", "val/kl_above_floor", "val/nll_other_z", "val/nll_prior"}
    assert metrics["val/ppl_bound"] == pytest.approx(math.exp(metrics["val/nll"] + metrics["val/kl"]))
    # the headline in nats/token, and the KL the posterior spends beyond its start's floor
    assert metrics["val/bound"] == pytest.approx(metrics["val/nll"] + metrics["val/kl"])
    assert metrics["val/kl_above_floor"] == pytest.approx(metrics["val/kl"] - metrics["val/kl_floor"])
    ar = ltm.build_model(dataclasses.replace(smoke_cfg, kind="ar"))
    ar_metrics = evaluate_bounds(ar, [tokens], ltm.InferenceConfig(steps=1), iw_samples=2)
    assert set(ar_metrics) == bounds and ar_metrics["val/bound"] == ar_metrics["val/nll"]  # an AR's bound: its NLL


def z_blind(model):
    """The same decoder with every cross-attention output zeroed: the NLL no longer depends on z."""
    for block in model.blocks:
        torch.nn.init.zeros_(block.cross.o.weight)
    return model


@pytest.mark.parametrize("steps", [1, 4, 16, 32, 64])
def test_kl_floor_is_what_the_inner_loop_reaches_when_z_carries_nothing(steps):
    cfg = ltm.model_preset("micro")
    torch.manual_seed(0)
    model = z_blind(ltm.build_model(cfg))
    tokens = torch.randint(0, cfg.vocab_size, (8, cfg.ctx + 1), generator=torch.Generator().manual_seed(0))
    icfg = ltm.InferenceConfig(steps=steps)
    kl = ltm.infer_posterior(model, tokens, icfg, seeds=range(8)).kl().mean().item()
    floor = kl_floor(icfg, cfg.n_latents, cfg.d_model)
    # within 1 %; at T=64 the floor is ~0.01 nats per sequence, so an absolute tolerance there
    assert kl == pytest.approx(floor, rel=0.01, abs=1e-3)


def test_kl_floor_follows_the_inner_loop_options():
    base = ltm.InferenceConfig(steps=16)
    per_dim = kl_floor(base, 1, 1)
    assert kl_floor(base, 8, 128) == pytest.approx(per_dim * 8 * 128)
    assert kl_floor(dataclasses.replace(base, steps=32), 1, 1) < per_dim  # more steps, lower floor
    assert kl_floor(dataclasses.replace(base, lr_max=0.034), 1, 1) > per_dim  # smaller steps, higher floor
    # fixed variance: logvar stays at -5, so its KL term (exp(-5) - 1 + 5) / 2 stays in full
    fixed = kl_floor(dataclasses.replace(base, fixed_variance=True), 1, 1)
    assert fixed >= 0.5 * (math.exp(-5) - 1 + 5)
    # the reuse-noise and decoder-gradient options do not touch the KL term
    assert kl_floor(dataclasses.replace(base, reuse_noise=True, decoder_grad="trajectory"), 1, 1) == per_dim
    with pytest.raises(ValueError, match="n_latents >= 1"):
        kl_floor(base, 0, 128)


def test_z_blind_decoder_takes_no_information_from_z(smoke_model, tokens):
    metrics = evaluate_bounds(z_blind(smoke_model), [tokens], ltm.InferenceConfig(steps=4))
    assert metrics["val/nll_other_z"] == pytest.approx(metrics["val/nll"], rel=1e-6)
    assert metrics["val/nll_prior"] == pytest.approx(metrics["val/nll"], rel=1e-6)
    assert metrics["val/kl"] == pytest.approx(metrics["val/kl_floor"], rel=0.05)  # 3 x 128 dimensions only


def test_swap_scores_each_sequence_with_another_sequences_sample(smoke_model, smoke_cfg):
    tokens = torch.randint(0, smoke_cfg.vocab_size, (5, smoke_cfg.ctx + 1), generator=torch.Generator().manual_seed(2))
    cfg = ltm.InferenceConfig(steps=3)
    metrics = evaluate_bounds(smoke_model, [tokens[:2], tokens[2:]], cfg, seed=7)
    z = torch.cat([sequence_bounds(smoke_model, part, cfg, seeds=seeds).z
                   for part, seeds in ((tokens[:2], [7, 8]), (tokens[2:], [9, 10, 11]))])
    partner = [(i + 2) % 5 for i in range(5)]  # i + N // 2: no sequence keeps its own
    expected = sequence_nll(smoke_model, tokens, z[partner]).sum().item() / tokens[:, 1:].numel()
    assert metrics["val/nll_other_z"] == pytest.approx(expected, rel=1e-5)
    # one sequence has no other to swap with
    assert "val/nll_other_z" not in evaluate_bounds(smoke_model, [tokens[:1]], cfg)


def test_reuse_score_is_a_reuse_noise_posterior_at_its_own_noise(smoke_model, tokens):
    cfg = ltm.InferenceConfig(steps=4)  # the default, fresh-noise inner loop
    bounds = sequence_bounds(smoke_model, tokens, cfg, seeds=[0, 1, 2])
    reused = ltm.infer_posterior(smoke_model, tokens, dataclasses.replace(cfg, reuse_noise=True), seeds=[0, 1, 2])
    torch.testing.assert_close(reused.z, reused.mu + reused.eps * (0.5 * reused.logvar).exp())
    expected = sequence_nll(smoke_model, tokens, reused.z) + reused.kl()
    torch.testing.assert_close(bounds.reuse, expected)
    assert not torch.allclose(bounds.reuse, bounds.elbo)
    # a reuse-noise run scores its own posterior
    own = sequence_bounds(smoke_model, tokens, dataclasses.replace(cfg, reuse_noise=True), seeds=[0, 1, 2])
    torch.testing.assert_close(own.reuse, expected)


class ReadsZ(torch.nn.Module):
    """A decoder whose every prediction is a linear read-out of z: the optimiser of a reuse-noise
    loop can tune z = mu + eps * sigma to its one draw of eps."""

    def __init__(self, vocab: int = 16, n_latents: int = 2, d: int = 8, gain: float = 20.0) -> None:
        super().__init__()
        self.cfg = ltm.ModelConfig(kind="ltm", vocab_size=vocab, n_layers=1, d_model=d, n_heads=2, ctx=32,
                                   window=None, n_latents=n_latents)
        self.readout = torch.randn(n_latents * d, vocab, generator=torch.Generator().manual_seed(0)) * gain

    def stem(self, tokens):
        return tokens

    def forward_from_stem(self, stem, z):
        return (z.flatten(1) @ self.readout)[:, None, :].expand(-1, stem.shape[1], -1)

    def forward(self, tokens, z):
        return self.forward_from_stem(tokens, z)


def test_reuse_scoring_is_optimistic_when_the_decoder_reads_z():
    model = ReadsZ()
    tokens = torch.randint(0, 16, (16, 33), generator=torch.Generator().manual_seed(1))

    def own_and_fresh(reuse_noise: bool):
        post = ltm.infer_posterior(model, tokens, ltm.InferenceConfig(steps=16, reuse_noise=reuse_noise),
                                   seeds=range(16))
        sigma = (0.5 * post.logvar).exp()
        own = sequence_nll(model, tokens, post.mu + post.eps * sigma)
        fresh = torch.stack([sequence_nll(model, tokens, post.mu + torch.randn(post.mu.shape, generator=g) * sigma)
                             for g in [torch.Generator().manual_seed(100 + k) for k in range(8)]]).mean(0)
        return own, fresh

    own, fresh = own_and_fresh(reuse_noise=True)
    assert (own < fresh).all() and own.mean() < 0.8 * fresh.mean()  # the artefact: tuned to its one draw
    own, fresh = own_and_fresh(reuse_noise=False)  # the default loop's z_T noise is a fresh draw: no edge
    assert 0.25 < (own < fresh).float().mean() < 0.75


def test_kl_floor_table_command(capsys):
    from ltm import kl_floor as floor_module

    assert floor_module.main(["--steps", "16,64"]) == 0
    rows = [line for line in capsys.readouterr().out.splitlines()
            if line.startswith("| 16 ") or line.startswith("| 64 ")]
    assert rows[0].split("|")[2].strip() == f"{floor_module.kl_floor_per_dim(ltm.InferenceConfig(steps=16)):.3f}"
    assert rows[1].split("|")[2].strip() == "0.000"
    with pytest.raises(SystemExit):
        floor_module.main(["--steps", "16,sixty-four"])
    assert "takes integers separated by commas" in capsys.readouterr().err

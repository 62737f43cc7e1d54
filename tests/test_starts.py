"""Where the posterior starts (`inference.start`): every start goes through the same evaluation, the
trained starts learn without touching the decoder's gradients, their costs are counted, and the paper's
start keeps every run key it had."""

import dataclasses
import math

import pytest
import torch

import ltm
import ltm.train
from ltm.checkpoint import load_model
from ltm.config import ConfigError, RunConfig, run_preset
from ltm.evaluate import evaluate_bounds, other_offsets, sequence_bounds, sequence_nll
from ltm.flops import flop_counter_mode, flops_per_token
from ltm.kl_floor import kl_floor, start_kl_floor
from ltm.posterior import infer_posterior, start_bound
from ltm.objective import decoder_loss, make_optimizer

STARTS = [("fixed", 3), ("learned", 3), ("encoder", 3), ("encoder", 0)]


def model_and_tokens(start: str, steps: int, preset: str = "smoke", n: int = 8):
    cfg = ltm.model_preset(preset)
    icfg = ltm.InferenceConfig(steps=steps, start=start)
    torch.manual_seed(0)
    tokens = torch.randint(0, cfg.vocab_size, (n, cfg.ctx + 1), generator=torch.Generator().manual_seed(1))
    return ltm.build_model(cfg, icfg), icfg, tokens


def test_the_paper_start_keeps_its_run_keys():
    # docs/RESULTS.md quotes these keys; a new option must not move them
    micro_rf = run_preset("micro-rf")
    assert micro_rf.run_key() == "6e9da349cadacd1c"
    assert micro_rf.with_overrides(["inference.steps=4"]).run_key() == "27385d6b4c4a1669"
    assert micro_rf.with_overrides(["model.kind=ar"]).run_key() == "2173298c07899d5d"
    fixed = micro_rf.with_overrides(["inference.start=fixed", "inference.encoder_layers=3"])
    assert fixed.run_key() == "6e9da349cadacd1c"
    learned = micro_rf.with_overrides(["inference.start=learned"])
    assert learned.with_overrides(["inference.start_kl_warmup=0.5"]).run_key() != learned.run_key()
    assert learned.run_key() not in {micro_rf.run_key(), learned.with_overrides(["inference.start=encoder"]).run_key()}
    encoder = micro_rf.with_overrides(["inference.start=encoder"])
    assert encoder.run_key() != encoder.with_overrides(["inference.encoder_layers=2"]).run_key()


def test_bad_start_options_say_what_to_change():
    with pytest.raises(ConfigError, match="inference.start must be 'fixed', 'learned' or 'encoder'"):
        ltm.InferenceConfig(start="amortised")
    with pytest.raises(ConfigError, match="encoder_layers must be >= 1"):
        ltm.InferenceConfig(start="encoder", encoder_layers=0)
    with pytest.raises(ConfigError, match="start_kl_warmup is a fraction of training"):
        ltm.InferenceConfig(start="encoder", start_kl_warmup=1.5)
    with pytest.raises(ConfigError, match="fixed_variance needs inference.start=fixed"):
        ltm.InferenceConfig(start="learned", fixed_variance=True)
    with pytest.raises(ConfigError, match="inference.start=encoder for a purely amortised posterior"):
        run_preset("smoke").with_overrides(["inference.steps=0"])
    assert run_preset("smoke").with_overrides(["inference.steps=0", "inference.start=encoder"]).inference.steps == 0


@pytest.mark.parametrize("start,steps", STARTS)
def test_every_start_gives_a_posterior_and_a_bound_through_the_same_evaluation(start, steps):
    model, icfg, tokens = model_and_tokens(start, steps)
    post = infer_posterior(model, tokens, icfg, seeds=range(len(tokens)))
    assert post.z.shape == (len(tokens), model.cfg.n_latents, model.cfg.d_model) and torch.isfinite(post.kl()).all()
    metrics = evaluate_bounds(model, [tokens[:3], tokens[3:]], icfg, iw_samples=2)
    common = {"val/nll", "val/kl", "val/ppl_bound", "val/ppl_iw", "val/nll_other_z", "val/z_info_lb", "val/nll_prior"}
    assert common <= set(metrics) and all(math.isfinite(v) for v in metrics.values())
    assert ("val/kl_floor" in metrics) == (start != "encoder")  # an x-dependent start has no floor
    assert ("val/amortisation_gap" in metrics) == (start != "fixed")
    if start != "fixed":
        gap = metrics["val/bound_start"] - metrics["val/nll"] - metrics["val/kl"]
        assert metrics["val/amortisation_gap"] == pytest.approx(gap)
        if steps == 0:  # no refinement: the posterior is the start, scored at other noise
            assert abs(metrics["val/amortisation_gap"]) < 0.05 * metrics["val/bound_start"]


def test_a_learned_start_at_its_initial_value_is_the_papers_start():
    fixed, icfg, tokens = model_and_tokens("fixed", 3)
    learned, licfg, _ = model_and_tokens("learned", 3)
    learned.load_state_dict(fixed.state_dict(), strict=False)
    a = infer_posterior(fixed, tokens, icfg, seeds=range(8))
    b = infer_posterior(learned, tokens, licfg, seeds=range(8))
    assert torch.equal(a.mu, b.mu) and torch.equal(a.logvar, b.logvar) and torch.equal(a.z, b.z)
    assert start_kl_floor(learned, licfg) == pytest.approx(kl_floor(icfg, 4, 32), rel=1e-9)


@pytest.mark.parametrize("start", ["learned", "encoder"])
def test_trained_starts_learn_and_leave_the_decoders_gradient_alone(start):
    model, icfg, tokens = model_and_tokens(start, 3)
    optimizer = make_optimizer(model, run_preset("smoke").train)
    for _ in range(2):  # the encoder's output layer starts at zero: its inner layers get gradients from the 2nd
        optimizer.zero_grad()
        loss, _ = decoder_loss(model, tokens, icfg, seeds=range(8))
        loss.backward()
        optimizer.step()
    optimizer.zero_grad()
    loss, _ = decoder_loss(model, tokens, icfg, seeds=range(8))
    loss.backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.start.parameters())
    # the decoder's gradient is that of the cross-entropy at z_T alone: the start's bound adds nothing to it
    decoder = {n: p for n, p in model.named_parameters() if not n.startswith("start.")}
    with_start = {n: p.grad.clone() for n, p in decoder.items()}
    optimizer.zero_grad()
    post = infer_posterior(model, tokens, icfg, seeds=range(8))
    assert all(p.grad is None for p in decoder.values())  # "final": the loop leaves the decoder's .grad alone
    torch.nn.functional.cross_entropy(model(tokens[:, :-1], post.z).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    for n, p in decoder.items():
        torch.testing.assert_close(p.grad, with_start[n], msg=n)
    # the centre of a learned start is a distribution's, not a weight: no decay pulls it to zero
    if start == "learned":
        decayed = {id(p) for g in optimizer.param_groups if g["weight_decay"] > 0 for p in g["params"]}
        assert id(model.start.mu) not in decayed and id(model.start.logvar) not in decayed


def test_the_start_bound_is_the_negative_elbo_at_the_start():
    model, icfg, tokens = model_and_tokens("encoder", 2)
    post = infer_posterior(model, tokens, icfg, seeds=range(8))
    z0 = post.start_mu + post.start_eps * (0.5 * post.start_logvar).exp()
    kl0 = 0.5 * (post.start_mu.square() + post.start_logvar.exp() - 1 - post.start_logvar).flatten(1).sum(1)
    torch.testing.assert_close(start_bound(model, tokens, post), sequence_nll(model, tokens, z0) + kl0)
    # annealing weighs the KL alone, and only in training: halfway through a warm-up over all of it, half the KL
    half = start_bound(model, tokens, post, kl_weight=0.5)
    torch.testing.assert_close(half, sequence_nll(model, tokens, z0) + 0.5 * kl0)
    annealed = dataclasses.replace(icfg, start_kl_warmup=1.0)
    loss_half, _ = decoder_loss(model, tokens, annealed, seeds=range(8), progress=0.5)
    loss_half.backward()
    grad_half = model.start.out.bias.grad.clone()
    model.zero_grad()
    loss_full, _ = decoder_loss(model, tokens, icfg, seeds=range(8))
    loss_full.backward()
    assert loss_half.item() == pytest.approx(loss_full.item())  # the logged loss is the CE either way
    assert not torch.allclose(grad_half, model.start.out.bias.grad)  # the start's gradient is not
    fixed, ficfg, _ = model_and_tokens("fixed", 2)
    with pytest.raises(ValueError, match="needs a posterior of a trained start"):
        start_bound(fixed, tokens, infer_posterior(fixed, tokens, ficfg, seeds=range(8)))


def test_the_kl_floor_follows_a_learned_start():
    model, icfg, tokens = model_and_tokens("learned", 6)
    with torch.no_grad():
        model.start.logvar.uniform_(-3, 0)
        model.start.mu.normal_(0, 0.5)
        for block in model.blocks:  # a decoder that ignores z: the loop sees the KL's gradient alone
            block.cross.o.weight.zero_()
    kl = infer_posterior(model, tokens, icfg, seeds=range(8)).kl().mean().item()
    floor = start_kl_floor(model, icfg)
    assert floor < kl_floor(icfg, 4, 32)  # these centres sit nearer the prior than logvar -5
    assert kl == pytest.approx(floor, rel=0.05)  # 8 sequences of 128 dimensions


def test_the_information_bound_scores_each_sequence_against_far_sequences_samples():
    model, icfg, tokens = model_and_tokens("fixed", 2, n=9)
    metrics = evaluate_bounds(model, [tokens], icfg, seed=5)
    bounds = sequence_bounds(model, tokens, icfg, seeds=[5 + i for i in range(9)])  # the sample the NLL is scored at
    offsets = other_offsets(9)
    assert offsets == [3, 4, 6] and all(3 <= d <= 6 for d in offsets)  # never a neighbour
    nll = torch.stack([bounds.nll] + [sequence_nll(model, tokens, bounds.z.roll(-d, dims=0)) for d in offsets]).double()
    per_block = -nll[0] - (torch.logsumexp(-nll, 0) - math.log(4))  # the own sample counts in the mixture
    assert metrics["val/z_info_lb"] == pytest.approx(per_block.sum().item() / tokens[:, 1:].numel(), rel=1e-5)
    assert metrics["val/z_info_cap"] == pytest.approx(9 * math.log(4) / tokens[:, 1:].numel())
    assert other_offsets(7) == [] and "val/z_info_lb" not in evaluate_bounds(model, [tokens[:7]], icfg)
    assert "val/nll_mixture" not in metrics  # retired: it read as information and exceeded the KL
    with torch.no_grad():  # a decoder that ignores z: other blocks' samples tell it as much as the own one
        for block in model.blocks:
            block.cross.o.weight.zero_()
    blind = evaluate_bounds(model, [tokens], icfg, seed=5)
    assert abs(blind["val/z_info_lb"]) < 1e-9 and blind["val/z_info_lb_ci"] < 1e-9


def test_an_encoder_start_under_bf16_autocast_leaves_the_loop_in_float32():
    model, icfg, tokens = model_and_tokens("encoder", 2)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # the CPU form of the GPU's bf16 autocast
        post = infer_posterior(model, tokens, icfg, seeds=range(8))
        loss, _ = decoder_loss(model, tokens, icfg, seeds=range(8))
    assert post.mu.dtype == post.logvar.dtype == post.start_mu.dtype == torch.float32
    loss.backward()
    assert model.start.out.bias.grad is not None and torch.isfinite(model.start.out.bias.grad).all()


@pytest.mark.parametrize("start,steps", [("learned", 3), ("encoder", 3), ("encoder", 0)])
@pytest.mark.parametrize("preset", ["smoke", "micro-rf"])
def test_the_starts_flops_agree_with_torchs_counter(start, steps, preset):
    model, icfg, tokens = model_and_tokens(start, steps, preset, n=2)
    counter = flop_counter_mode()
    with counter:
        loss, _ = decoder_loss(model, tokens, icfg, seeds=[0, 1])
        loss.backward()
    per_token = counter.get_total_flops() / tokens[:, 1:].numel()
    assert flops_per_token(model.cfg, steps, start=start) == pytest.approx(per_token, rel=0.03)
    counter = flop_counter_mode()
    with counter:  # an evaluation's inference and scoring pass
        model(tokens[:, :-1], infer_posterior(model, tokens, icfg, seeds=[0, 1]).z)
    per_token = counter.get_total_flops() / tokens[:, 1:].numel()
    assert flops_per_token(model.cfg, steps, start=start, phase="eval") == pytest.approx(per_token, rel=0.03)


def test_the_paper_convention_counts_the_start_pass_and_the_encoder():
    cfg = ltm.model_preset("ltm-m")
    fixed = flops_per_token(cfg, 16, convention="paper")
    per_pass = fixed / 17
    assert flops_per_token(cfg, 16, convention="paper", start="learned") == pytest.approx(18 * per_pass)
    encoder = flops_per_token(cfg, 16, convention="paper", start="encoder")
    assert 18 * per_pass < encoder < 19 * per_pass  # a one-layer encoder costs less than a 6-layer pass
    assert flops_per_token(cfg, 16, convention="paper", start="encoder", encoder_layers=3) > encoder
    with pytest.raises(ValueError, match="start must be"):
        flops_per_token(cfg, 16, start="amortised")


def test_a_trained_start_trains_checkpoints_and_reloads(tmp_path):
    cfg = run_preset("smoke").with_overrides([f"data.cache_dir={tmp_path / 'cache'}", "train.tokens=2048",
                                              "train.eval_every=0", "inference.start=encoder", "inference.steps=1"])
    result = ltm.train.run(cfg, runs_dir=tmp_path / "runs", progress=False)
    assert result.status == "FINISHED" and "val/amortisation_gap" in result.metrics
    model, loaded = load_model(result.run_dir)
    assert loaded == RunConfig.from_dict(cfg.to_dict()) and isinstance(model.start, torch.nn.Module)
    assert not torch.all(model.start.out.weight == 0)  # the trained encoder, not a fresh one
    assert flops_per_token(model.cfg, 1, start="encoder") > flops_per_token(model.cfg, 1)


def test_an_ar_model_has_no_start():
    cfg = dataclasses.replace(ltm.model_preset("smoke"), kind="ar")
    assert ltm.build_model(cfg, ltm.InferenceConfig(start="encoder")).start is None
    assert flops_per_token(cfg, 4, start="encoder") == flops_per_token(cfg, 0)


def test_the_bound_summary_reads_the_bound_into_its_parts():
    fixed = {"val/nll": 2.0, "val/kl": 0.5, "val/kl_floor": 0.4, "val/z_info_lb": 0.1, "val/z_info_lb_ci": 0.02,
             "val/z_info_cap": 0.3, "val/nll_other_z": 2.3, "val/nll_prior": 2.6, "val/ppl_bound": 12.18}
    lines = ltm.train.bound_summary(fixed).splitlines()
    assert lines[0] == "bound 2.500 nats/token = NLL given z 2.000 + KL above the floor 0.100 + KL floor 0.400"
    assert lines[1].startswith("z carries at least 0.100 +- 0.020 nats/token (val/z_info_lb, a lower bound")
    assert lines[1].endswith("it reads at most 0.300)")
    assert lines[2].startswith("one other block's z costs it 0.300") and lines[2].endswith("prior sample 2.600")
    encoder = {k.replace("val/", "zeroshot/c/"): v for k, v in fixed.items() if "kl_floor" not in k}
    encoder.update({"zeroshot/c/bound_start": 2.7, "zeroshot/c/amortisation_gap": 0.2})
    lines = ltm.train.bound_summary(encoder, prefix="zeroshot/c").splitlines()
    assert "KL 0.500 (an encoder's start has no floor)" in lines[0]
    assert "(zeroshot/c/z_info_lb, a lower bound" in lines[1]
    assert lines[3] == "bound at the start (T=0) 2.700: refinement gains 0.200 (the amortisation gap)"

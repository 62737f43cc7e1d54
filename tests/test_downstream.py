"""Zero-shot perplexity on another corpus and generation quality, for LTM and AR checkpoints."""

import math

import pytest
import torch

import ltm
from ltm.config import RunConfig, run_preset
from ltm.data import DataError, load_tokenizer
from ltm.downstream import (Samples, check_same_tokenizer, conditional_samples, corpus_label, generative_perplexity,
                            unconditional_samples, unigram_entropy, zero_shot)
from ltm.model import token_nll

WORDS = "the cat sat on a mat while dogs ran past old red barns near green hills and blue lakes".split()


def _text(path, n_words: int, seed: int) -> str:
    g = torch.Generator().manual_seed(seed)
    words = [WORDS[i] for i in torch.randint(0, len(WORDS), (n_words,), generator=g)]
    path.write_text("\n\n".join(" ".join(words[i:i + 50]) for i in range(0, n_words, 50)))
    return str(path)


@pytest.fixture
def text_run(tmp_path) -> tuple[RunConfig, str]:
    """A smoke config on a local text file with a small BPE, and another text file to evaluate on."""
    train = _text(tmp_path / "train.txt", 20_000, 0)
    (tmp_path / "other").mkdir()
    other = _text(tmp_path / "other" / "eval.txt", 3_000, 1)
    cfg = run_preset("smoke").with_overrides({"data.name": train, "data.tokenizer": "bpe", "data.bpe_vocab_size": 300,
                                             "data.cache_dir": str(tmp_path / "cache"), "model.ctx": 32})
    return cfg, other


def _build(cfg: RunConfig, kind: str) -> ltm.LatentThoughtModel:
    torch.manual_seed(0)
    vocab = load_tokenizer(cfg.data).vocab_size
    return ltm.build_model(ltm.ModelConfig(**{**cfg.model.__dict__, "vocab_size": vocab, "kind": kind,
                                              "n_latents": 4 if kind == "ltm" else 0}))


def test_corpus_labels_are_metric_safe():
    assert corpus_label("ptb") == "ptb"
    assert corpus_label("/data/wikitext-2/valid.txt") == "wikitext-2-valid"
    assert corpus_label("my corpus.jsonl") == "my-corpus"


def test_zero_shot_bounds_on_another_corpus(text_run):
    cfg, other = text_run
    model = _build(cfg, "ltm")
    told = []
    metrics = zero_shot(model, cfg, other, max_blocks=5, batch_size=2, iw_samples=2,
                        progress=lambda done, total: told.append((done, total)))
    assert told == [(2, 5), (4, 5), (5, 5)]  # after each batch is scored
    prefix = "zeroshot/other-eval"
    assert metrics[f"{prefix}/blocks"] == 5
    assert metrics[f"{prefix}/ppl_bound"] == pytest.approx(math.exp(metrics[f"{prefix}/nll"] + metrics[f"{prefix}/kl"]))
    assert metrics[f"{prefix}/kl"] > 0
    again = zero_shot(model, cfg, other, max_blocks=5, batch_size=5, iw_samples=2)
    assert again == pytest.approx(metrics)  # per-block seeds: batching does not change the result


def test_zero_shot_of_an_ar_model_is_its_exact_perplexity(text_run):
    cfg, other = text_run
    cfg = cfg.with_overrides({"model.kind": "ar", "inference.steps": 0, "model.n_latents": 0})
    metrics = zero_shot(_build(cfg, "ar"), cfg, other, max_blocks=3, iw_samples=2)
    p = "zeroshot/other-eval"
    assert metrics[f"{p}/kl"] == 0 and metrics[f"{p}/ppl_iw"] == pytest.approx(metrics[f"{p}/ppl_bound"])


def test_zero_shot_needs_a_text_checkpoint_and_an_existing_corpus(text_run, tmp_path):
    cfg, other = text_run
    with pytest.raises(DataError, match="synthetic corpus.*needs a checkpoint trained on text"):
        zero_shot(_build(cfg, "ltm"), run_preset("smoke"), other)
    with pytest.raises(FileNotFoundError, match="no such file or folder.*missing.txt"):
        zero_shot(_build(cfg, "ltm"), cfg, str(tmp_path / "missing.txt"))


def test_unigram_entropy():
    assert unigram_entropy(torch.tensor([[3, 3, 3, 3]])) == 0
    assert unigram_entropy(torch.tensor([[0, 1, 2, 3], [5, 5, 5, 5]])) == pytest.approx(math.log(4) / 2)


def test_samples_per_prior_temperature_are_seeded(smoke_model):
    sets = unconditional_samples(smoke_model, 1, n=3, length=5, prior_temperatures=[0.5, 2.0], seed=7)
    assert [s.name for s in sets] == ["uncond_s0.5", "uncond_s2"]
    assert all(s.tokens.shape == (3, 6) and (s.tokens[:, 0] == 1).all() for s in sets)
    again = unconditional_samples(smoke_model, 1, n=3, length=5, prior_temperatures=[0.5, 2.0], seed=7)
    assert all(torch.equal(a.tokens, b.tokens) for a, b in zip(sets, again))


def test_conditional_samples_keep_the_prefix(smoke_model, tokens):
    s = conditional_samples(smoke_model, ltm.InferenceConfig(steps=2), tokens[:, :6], length=4)
    assert s.tokens.shape == (3, 10) and torch.equal(s.tokens[:, :6], tokens[:, :6]) and s.prompt_length == 6


def test_generative_perplexity_scores_only_the_generated_tokens():
    torch.manual_seed(0)
    ref = ltm.build_model(ltm.model_preset("smoke", kind="ar", n_latents=0))
    seq = torch.randint(0, 64, (2, 12))
    got = generative_perplexity(ref, ltm.InferenceConfig(), Samples("cond", seq, prompt_length=5))
    with torch.no_grad():
        nll = token_nll(ref(seq[:, :-1]), seq[:, 1:])[:, 4:]  # predictions of tokens 5.. only
    assert got == pytest.approx(math.exp(nll.mean().item()), rel=1e-5)
    with pytest.raises(ValueError, match="exceed the reference model's context"):
        generative_perplexity(ref, ltm.InferenceConfig(), Samples("u", torch.zeros(1, 40, dtype=torch.long), 1))


def test_a_reference_with_another_tokenizer_is_refused():
    a, b = run_preset("smoke"), run_preset("smoke").with_overrides({"data.seed": 1})
    check_same_tokenizer(a, a.with_overrides({"seed": 3}))
    with pytest.raises(DataError, match="different tokenizer"):
        check_same_tokenizer(a, b)

"""Tests of ltm.data: sources, tokenizers, packing, the cache and the synthetic corpus."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from ltm.config import ConfigError, DataConfig
from ltm.data import (
    GPT2_ENV, DataError, DataNotFoundError, SyntheticCorpus, SyntheticSpec, check_data, gpt2_tokenizer,
    load_blocks, load_tokenizer, optimal_ppl, resolve_source,
)
from ltm.data.blocks import synthetic_spec
from ltm.data.sources import split_text_file

TINY = SyntheticSpec(vocab_size=10, n_slots=2, n_topics=2, branching=2, doc_len=8,
                     event_prob=0.4, copy_noise=0.3, seed=3)


def _cfg(tmp_path: Path, name: str, **kw) -> DataConfig:
    return DataConfig(name=name, tokenizer=kw.pop("tokenizer", "bpe"), bpe_vocab_size=kw.pop("bpe_vocab_size", 300),
                      cache_dir=str(tmp_path / "cache"), **kw)


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def _stories(n: int) -> list[str]:
    rng = np.random.default_rng(0)
    words = "the cat dog sat ran on a mat under big small red tree house".split()
    return [" ".join(rng.choice(words, size=rng.integers(20, 60))) + "." for _ in range(n)]


# ---------------------------------------------------------------------------- packing and blocks

def test_packing_adds_bos_and_eos(tmp_path):
    texts = ["hello world", "a second document"]
    cfg = _cfg(tmp_path, str(_write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in texts])), val_blocks=1)
    tok = load_tokenizer(cfg)
    expected = [tok.bos_id, *tok.encode(texts[0]), tok.eos_id, tok.bos_id, *tok.encode(texts[1]), tok.eos_id]
    train, val = load_blocks(cfg, 2, "train"), load_blocks(cfg, 2, "validation")
    assert list(train.tokens) + list(val.tokens) == expected
    assert tok.decode(expected[1:-1]).startswith("hello world")


def test_blocks_have_ctx_plus_one_tokens_and_share_one_token(tmp_path):
    cfg = DataConfig(synthetic_tokens=5000, cache_dir=str(tmp_path))
    blocks = load_blocks(cfg, 32, "train")
    assert len(blocks) == (5000 - 1) // 32
    assert blocks[0].shape == (33,) and blocks[0].dtype == torch.long
    assert torch.equal(blocks[0][-1], blocks[1][0])
    batch = blocks.batch([0, 3, len(blocks) - 1])
    assert batch.shape == (3, 33) and torch.equal(batch[1], blocks[3]) and torch.equal(blocks[-1], batch[2])
    assert blocks.n_tokens == 5000 and blocks.vocab_size == 512
    with pytest.raises(IndexError):
        blocks[len(blocks)]
    with pytest.raises(IndexError):
        blocks.batch([len(blocks)])


def test_cache_is_reused_and_keyed_by_source_and_tokenizer(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _stories(40)])
    cfg = _cfg(tmp_path, str(path), val_blocks=2)
    first = load_blocks(cfg, 16, "train")
    cached = Path(first.tokens.filename)
    mtime = cached.stat().st_mtime_ns
    again = load_blocks(cfg, 16, "train")
    assert Path(again.tokens.filename) == cached and cached.stat().st_mtime_ns == mtime
    other_tok = load_blocks(_cfg(tmp_path, str(path), val_blocks=2, bpe_vocab_size=320), 16, "train")
    assert Path(other_tok.tokens.filename) != cached
    _write_jsonl(path, [{"text": t} for t in _stories(41)])  # an edited source is a new source
    assert Path(load_blocks(cfg, 16, "train").tokens.filename) not in (cached, Path(other_tok.tokens.filename))
    assert len(list((tmp_path / "cache" / "tokens").glob("*.tmp"))) == 0


def test_held_out_validation_is_the_deterministic_tail_of_the_stream(tmp_path):
    path = _write_jsonl(tmp_path / "d.jsonl", [{"text": t} for t in _stories(60)])
    cfg = _cfg(tmp_path, str(path), val_blocks=3)
    train, val = load_blocks(cfg, 16, "train"), load_blocks(cfg, 16, "validation")
    assert len(val) == 3 and val.n_tokens == 3 * 16 + 1
    fresh = _cfg(tmp_path / "elsewhere", str(path), val_blocks=3)
    assert torch.equal(load_blocks(fresh, 16, "validation").batch(range(3)), val.batch(range(3)))
    stream = np.concatenate([train.tokens, val.tokens])
    assert len(stream) == len(load_blocks(_cfg(tmp_path, str(path), val_blocks=1), 16, "train").tokens) + 17


def test_synthetic_validation_stream_differs_from_train_and_is_fixed(tmp_path):
    cfg = DataConfig(synthetic_tokens=3000, val_blocks=4, cache_dir=str(tmp_path / "a"))
    val = load_blocks(cfg, 64, "validation")
    assert len(val) == 4
    assert not torch.equal(val.batch(range(4)), load_blocks(cfg, 64, "train").batch(range(4)))
    other_cfg = DataConfig(synthetic_tokens=9000, val_blocks=4, cache_dir=str(tmp_path / "b"))
    other = load_blocks(other_cfg, 64, "validation")
    assert torch.equal(val.batch(range(4)), other.batch(range(4)))


# ---------------------------------------------------------------------------- sources

def test_txt_documents_split_at_wikitext_headings_or_endoftext(tmp_path):
    wiki = " \n = First = \n \n Text one . \n \n = = Section = = \n more . \n = Second = \n Text two . \n"
    docs = split_text_file(wiki)
    assert len(docs) == 2 and docs[0].strip().startswith("= First =") and "= = Section = =" in docs[0]
    assert split_text_file("a story\n<|endoftext|>\nanother\n") == ["a story", "another"]
    assert split_text_file("just one\n\ndocument\n") == ["just one\n\ndocument\n"]


def test_local_txt_file_and_folder_sources(tmp_path):
    (tmp_path / "one.txt").write_text(" = A = \n alpha . \n = B = \n beta . \n")
    folder = tmp_path / "folder"
    (folder / "sub").mkdir(parents=True)
    (folder / "b.txt").write_text("second file")
    (folder / "sub" / "a.txt").write_text("first file")
    assert len(list(resolve_source(str(tmp_path / "one.txt")).documents("train"))) == 2
    assert list(resolve_source(str(folder)).documents("train")) == ["second file", "first file"]


def test_jsonl_source_reads_text_field_and_joins_question_answer(tmp_path):
    text = _write_jsonl(tmp_path / "t.jsonl", [{"body": "x y"}, {"body": "  "}, {"body": "z"}])
    assert list(resolve_source(str(text), "body").documents("train")) == ["x y", "z"]
    qa = _write_jsonl(tmp_path / "qa.jsonl", [{"question": "1+1?", "answer": "2\n#### 2"}])
    assert list(resolve_source(str(qa)).documents("train")) == ["Question: 1+1? Answer: 2\n#### 2"]
    with pytest.raises(DataError, match="no field 'text'.*fields: body.*data.text_field"):
        list(resolve_source(str(text)).documents("train"))


def test_parquet_source(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"text": ["first doc", "second doc"], "id": [1, 2]}), tmp_path / "d.parquet")
    assert list(resolve_source(str(tmp_path / "d.parquet")).documents("train")) == ["first doc", "second doc"]


def test_saved_dataset_source_uses_its_validation_split(tmp_path):
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"text": _stories(30)}),
        "validation": datasets.Dataset.from_dict({"text": ["held out story number one.", "and two."]}),
    }).save_to_disk(str(tmp_path / "saved"))
    source = resolve_source(str(tmp_path / "saved"))
    assert source.has_validation
    assert list(source.documents("validation")) == ["held out story number one.", "and two."]
    val = load_blocks(_cfg(tmp_path, str(tmp_path / "saved")), 4, "validation")
    assert val.decode(val.tokens).startswith("<|beginoftext|>held out story")


def test_val_name_gives_a_separate_validation_source(tmp_path):
    train = _write_jsonl(tmp_path / "train.jsonl", [{"text": t} for t in _stories(20)])
    val = _write_jsonl(tmp_path / "val.jsonl", [{"text": "completely different validation text here."}])
    cfg = _cfg(tmp_path, str(train), val_name=str(val))
    blocks = load_blocks(cfg, 4, "validation")
    assert "completely different validation" in blocks.decode(blocks.tokens)
    whole = load_blocks(cfg, 4, "train")
    assert whole.tokens[-1] == whole.eos_id  # nothing held out of the training stream


class _FakeHub:
    """Stands in for datasets.load_dataset: serves every hub load from a local .jsonl through the real
    function (streamed when asked) and records the keyword arguments; `breaks` makes it fail like a
    dropped connection: "on load", "on first read" or "mid-stream"."""

    def __init__(self, monkeypatch, path: Path) -> None:
        import datasets

        self.real, self.path, self.calls, self.breaks = datasets.load_dataset, path, [], None
        monkeypatch.setattr(datasets, "load_dataset", self)

    def __call__(self, *args, **kwargs):
        self.calls.append(kwargs)
        if self.breaks == "on load":
            raise ConnectionError("the hub is unreachable")
        ds = self.real("json", data_files=str(self.path), split="train", streaming=kwargs.get("streaming", False))
        return ds if self.breaks is None else self._broken(ds, 0 if self.breaks == "on first read" else 5)

    @staticmethod
    def _broken(records, n: int):
        yield from itertools.islice(records, n)
        raise ConnectionError("connection reset by peer")


def test_hub_corpora_are_streamed_and_read_like_the_same_local_file(tmp_path, monkeypatch):
    path = _stories_file(tmp_path)
    hub = _FakeHub(monkeypatch, path)
    assert list(resolve_source("openwebtext").documents("train")) == list(resolve_source(str(path)).documents("train"))
    for split in ("train", "validation"):
        from_hub = load_blocks(_cfg(tmp_path, "openwebtext", val_blocks=2), 16, split)
        local = load_blocks(_cfg(tmp_path, str(path), val_blocks=2), 16, split)
        assert np.array_equal(from_hub.tokens, local.tokens)
    hub.path = _write_jsonl(tmp_path / "wiki.jsonl", [{"text": line} for line in
                                                       [" = A = \n", " alpha . \n", " = B = \n", " beta . \n"]])
    assert list(resolve_source("wikitext-2").documents("validation")) == [" = A = \n alpha . \n", " = B = \n beta . \n"]
    assert hub.calls and all(kw["streaming"] is True for kw in hub.calls)
    assert hub.calls[-1]["split"] == "validation"


@pytest.mark.parametrize("breaks", ["on load", "on first read", "mid-stream"])
def test_a_failing_hub_stream_is_a_data_error_and_leaves_no_token_cache(tmp_path, monkeypatch, breaks):
    cfg = _cfg(tmp_path, "openwebtext", val_blocks=2)
    hub = _FakeHub(monkeypatch, _stories_file(tmp_path))
    load_tokenizer(cfg)  # the BPE trains on an unbroken stream; tokenising then fails
    hub.breaks = breaks
    with pytest.raises(DataError, match="could not stream 'openwebtext'.*ConnectionError.*pass a local path"):
        load_blocks(cfg, 16, "train")
    assert not list((tmp_path / "cache" / "tokens").glob("*"))  # no partial stream, temp file or metadata


def test_wikitext2_validation_has_60_articles(local_data):
    docs = list(resolve_source(str(local_data("wikitext-2/valid.txt"))).documents("train"))
    assert len(docs) == 60 and docs[0].strip().startswith("= Homarus gammarus =")


def test_gsm8k_records_become_question_and_answer(local_data):
    docs = list(resolve_source(str(local_data("gsm8k/test.jsonl"))).documents("train"))
    assert len(docs) == 1319 and all(d.startswith("Question: ") and " Answer: " in d and "\n#### " in d
                                     for d in docs)


# ---------------------------------------------------------------------------- errors

def test_missing_path_raises_file_not_found_naming_the_path(tmp_path):
    with pytest.raises(DataNotFoundError, match="no such file or folder.*nope.txt") as info:
        load_blocks(_cfg(tmp_path, str(tmp_path / "nope.txt")), 8, "train")
    assert isinstance(info.value, FileNotFoundError) and isinstance(info.value, ValueError)


def test_unknown_hub_name_lists_known_names(tmp_path):
    with pytest.raises(DataError, match="unknown dataset name 'wikitext2'; known names: synthetic, openwebtext, wiki"):
        check_data(DataConfig(name="wikitext2"))


def test_empty_corpus_is_an_error_before_a_tokenizer_is_trained(tmp_path, caplog):
    caplog.set_level(logging.INFO)
    path = _write_jsonl(tmp_path / "e.jsonl", [{"text": ""}, {"text": "   "}])
    with pytest.raises(DataError, match="no text in the train split.*data.text_field"):
        load_blocks(DataConfig(name=str(path), tokenizer="bpe", cache_dir=str(tmp_path)), 8, "train")
    assert "training a byte-level BPE" not in caplog.text
    assert not list(tmp_path.rglob("bpe*.json"))  # no tokenizer of no text cached for the next run


def test_corpus_shorter_than_one_block_is_an_error(tmp_path):
    path = _write_jsonl(tmp_path / "s.jsonl", [{"text": "tiny"}])
    with pytest.raises(DataError, match="too few to hold out.*data.val_blocks"):
        load_blocks(_cfg(tmp_path, str(path)), 64, "train")
    cfg = _cfg(tmp_path, str(_stories_file(tmp_path)), val_name=str(path))
    with pytest.raises(DataError, match="fewer than one block of ctx \\+ 1 = 65"):
        load_blocks(cfg, 64, "validation")


def _stories_file(tmp_path: Path) -> Path:
    return _write_jsonl(tmp_path / "stories.jsonl", [{"text": t} for t in _stories(20)])


def test_folder_without_text_files_is_an_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no .txt files"):
        resolve_source(str(tmp_path / "empty"))


def test_synthetic_config_errors_say_what_to_change():
    with pytest.raises(ConfigError, match="raise synthetic_vocab or lower synthetic_slots"):
        DataConfig(synthetic_vocab=16, synthetic_slots=4)
    with pytest.raises(ConfigError, match="synthetic_branching=40"):
        DataConfig(synthetic_vocab=64, synthetic_branching=40)
    with pytest.raises(ConfigError, match="synthetic_event_prob must be in"):
        DataConfig(synthetic_event_prob=1.0)
    with pytest.raises(ConfigError, match="synthetic_doc_len must be >= 4"):
        DataConfig(synthetic_doc_len=2)
    with pytest.raises(ConfigError, match="synthetic_topics must be >= 1"):
        DataConfig(synthetic_topics=0)


def test_every_synthetic_knob_reaches_the_corpus():
    cfg = DataConfig(synthetic_vocab=128, synthetic_slots=8, synthetic_topics=4, synthetic_branching=4,
                     synthetic_event_prob=0.2, synthetic_doc_len=120.0, seed=5)
    assert synthetic_spec(cfg) == SyntheticSpec(vocab_size=128, n_slots=8, n_topics=4, branching=4,
                                                event_prob=0.2, doc_len=120.0, seed=5)
    with pytest.raises(DataError, match="own vocabulary"):
        load_tokenizer(DataConfig(tokenizer="gpt2"))


# ---------------------------------------------------------------------------- tokenizers

def test_bpe_round_trips_text_and_is_reused_from_disk(tmp_path):
    cfg = _cfg(tmp_path, str(_stories_file(tmp_path)))
    tok = load_tokenizer(cfg)
    text = "the big cat — naïve café, 東京 ✓\n  spaces"
    assert tok.decode(tok.encode(text)) == text
    assert tok.vocab_size <= 300 and {tok.bos_id, tok.eos_id} <= set(range(tok.vocab_size)) and tok.bos_id != tok.eos_id
    (saved,) = (tmp_path / "cache" / "tokenizers").glob("bpe300-*.json")
    mtime = saved.stat().st_mtime_ns
    again = load_tokenizer(cfg)
    assert saved.stat().st_mtime_ns == mtime and again.cache_key == tok.cache_key
    assert again.encode(text) == tok.encode(text)


def test_training_a_bpe_says_so_in_plain_lines_and_loading_one_says_nothing(tmp_path, caplog):
    caplog.set_level(logging.INFO)  # its messages are logged at INFO (`ltm.data.tokenizer`'s logger)
    cfg = _cfg(tmp_path, str(_stories_file(tmp_path)))
    load_tokenizer(cfg)
    chars = sum(len(d) for d in _stories(20))
    assert re.fullmatch(r"training a byte-level BPE \(vocab 300\) on the first [\d,]+ characters of "
                        r"\S+stories.jsonl \.\.\.\n"
                        rf"BPE trained: vocab \d+, {chars:,} characters read in [\d.]+ s, "
                        r"saved to \S+bpe300-\S+\.json\n", "".join(f"{m}\n" for m in caplog.messages))
    assert {r.name for r in caplog.records} == {"ltm.data.tokenizer"}
    caplog.clear()
    load_tokenizer(cfg)
    assert "BPE" not in caplog.text


LIBRARY_USER = """
import logging, sys
from ltm.config import DataConfig
from ltm.data import load_tokenizer

def tokenizer(cache):
    load_tokenizer(DataConfig(name=sys.argv[1], tokenizer="bpe", bpe_vocab_size=300, cache_dir=cache))

tokenizer(sys.argv[2])  # logging as Python starts it: the library's INFO messages are not shown
print("---", file=sys.stderr)
logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s", stream=sys.stdout)
tokenizer(sys.argv[3])  # the program routes them (here to its stdout)
"""


def test_a_program_that_imports_ltm_decides_where_its_messages_go(tmp_path):
    """The library only logs (`logging.getLogger(__name__)`): unconfigured, its INFO messages print nowhere;
    configured by the program, they go where it says, under the module's name."""
    root = Path(__file__).resolve().parents[1]
    proc = subprocess.run([sys.executable, "-c", LIBRARY_USER, str(_stories_file(tmp_path)), str(tmp_path / "a"),
                           str(tmp_path / "b")], capture_output=True, text=True, cwd=root, timeout=300,
                          env={**os.environ, "PYTHONPATH": str(root)})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "BPE" not in proc.stderr  # nothing from the first call, on either stream (stdout: below)
    lines = proc.stdout.splitlines()  # the second call's messages, where the program sent them
    assert len(lines) == 2 and lines[0].startswith("ltm.data.tokenizer: training a byte-level BPE (vocab 300)")
    assert lines[1].startswith("ltm.data.tokenizer: BPE trained: vocab")


def test_gpt2_tokenizer_missing_gives_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setenv(GPT2_ENV, str(tmp_path / "missing" / "tokenizer.json"))
    with pytest.raises(FileNotFoundError, match=f"{GPT2_ENV}.*no tokenizer file.*data.tokenizer='bpe'"):
        load_tokenizer(DataConfig(name=str(_stories_file(tmp_path))))


def test_gpt2_tokenizer_adds_bos_50257_after_eos_50256(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {ch: i for i, ch in enumerate(sorted(alphabet))}
    vocab.update({f"filler{i}": i for i in range(len(vocab), 50256)})
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|endoftext|>"])
    tok.save(str(tmp_path / "tokenizer.json"))
    monkeypatch.setenv(GPT2_ENV, str(tmp_path))  # a folder holding tokenizer.json
    gpt2 = gpt2_tokenizer()
    assert (gpt2.vocab_size, gpt2.eos_id, gpt2.bos_id) == (50258, 50256, 50257)
    assert gpt2.decode(gpt2.encode("Hi there")) == "Hi there"


# ---------------------------------------------------------------------------- synthetic corpus

def test_synthetic_stream_is_deterministic_and_prefix_stable():
    corpus = SyntheticCorpus(SyntheticSpec(vocab_size=64, n_slots=4))
    long = corpus.stream(1_500_000, "train")  # more than one chunk
    assert np.array_equal(SyntheticCorpus(SyntheticSpec(vocab_size=64, n_slots=4)).stream(1000, "train"), long[:1000])
    assert not np.array_equal(SyntheticCorpus(SyntheticSpec(vocab_size=64, n_slots=4, seed=1)).stream(1000, "train"),
                              long[:1000])
    assert long[0] == corpus.bos_id and long.max() < 64
    ends = np.flatnonzero(long == corpus.eos_id)
    assert np.all(long[ends[:-1] + 1] == corpus.bos_id)


def test_synthetic_documents_average_a_few_hundred_tokens():
    corpus = SyntheticCorpus()
    stream = corpus.stream(600_000, "validation")
    mean_len = np.diff(np.flatnonzero(stream == corpus.eos_id)).mean()
    assert 270 < mean_len < 330


def test_synthetic_decode_encode_round_trip():
    corpus = SyntheticCorpus()
    ids = corpus.stream(200, "train").tolist()
    assert corpus.encode(corpus.decode(ids)) == ids
    with pytest.raises(ValueError, match="not a synthetic token name"):
        corpus.encode("w1 hello")


def _brute_force_log_probs(c: SyntheticCorpus, seqs: np.ndarray) -> np.ndarray:
    """log p(x_t | x_0..x_{t-1}) from the full joint chain (topic, pointer, plan, last token),
    built from the generative definition, started from its stationary distribution."""
    s = c.spec
    K, F, M, W, V = s.n_topics, c.n_slots, c.n_values, c.n_words, c.vocab_size
    eta, q, eps = s.eos_prob, s.event_prob, s.copy_noise
    plans = list(itertools.product(range(M), repeat=F))
    states = list(itertools.product(range(K), range(F), range(len(plans)), range(V)))
    index = {st: i for i, st in enumerate(states)}
    P = np.zeros((len(states), len(states)))

    def words(k, prev):
        r = prev if prev < W else (W + 1 if prev == c.bos_id else W)
        return zip(c.next_words[k, r].tolist(), c.next_probs[k, r])

    for (k, ptr, pi, x), i in index.items():
        if x == c.eos_id:
            P[i, index[(k, ptr, pi, c.bos_id)]] = 1
        elif x == c.bos_id:
            for k2, p2, pi2 in itertools.product(range(K), range(F), range(len(plans))):
                for w, p in words(k2, x):
                    P[i, index[(k2, p2, pi2, w)]] += c.topic_prior[k2] / F / len(plans) * p
        elif c.marker0 <= x < c.value0:
            for y in range(M):
                P[i, index[(k, ptr, pi, c.value0 + y)]] += (1 - eps) * (y == plans[pi][x - c.marker0]) + eps / M
        else:
            P[i, index[(k, ptr, pi, c.eos_id)]] += eta
            P[i, index[(k, (ptr + 1) % F, pi, c.marker0 + ptr)]] += (1 - eta) * q
            for w, p in words(k, x):
                P[i, index[(k, ptr, pi, w)]] += (1 - eta) * (1 - q) * p
    assert np.allclose(P.sum(1), 1)
    vals, vecs = np.linalg.eig(P.T)
    stationary = np.real(vecs[:, np.argmin(abs(vals - 1))])
    tok = np.array([st[3] for st in states])
    out = np.zeros((len(seqs), seqs.shape[1] - 1))
    for n, x in enumerate(seqs):
        a = stationary * (tok == x[0])
        a /= a.sum()
        for t in range(1, len(x)):
            a = (a @ P) * (tok == x[t])
            out[n, t - 1] = math.log(a.sum())
            a /= a.sum()
    return out


# A second tiny instance with every knob the DataConfig exposes moved: one topic, three slots
# cycling, shorter documents, rarer events (the shape of the regime corpus, in miniature).
TINY_VARIANT = SyntheticSpec(vocab_size=12, n_slots=3, n_topics=1, branching=3, doc_len=20,
                             event_prob=0.2, copy_noise=0.1, seed=4)


@pytest.mark.parametrize("spec", [TINY, TINY_VARIANT], ids=["tiny", "tiny-variant"])
def test_forward_algorithm_matches_brute_force_enumeration(spec):
    c = SyntheticCorpus(spec)
    stream = c.stream(4000, "train").astype(np.int64)
    seqs = np.stack([stream[i:i + 10] for i in range(0, 1200, 29)])
    first = seqs[:, 0]
    assert ((first >= c.value0) & (first < c.eos_id)).any() and ((first >= c.marker0) & (first < c.value0)).any()
    exact = _brute_force_log_probs(c, seqs)
    assert np.allclose(c.log_probs(torch.from_numpy(seqs)).numpy(), exact, atol=1e-7)
    for w in (1, 3):  # a window-w predictor is the full one applied to the last w tokens
        windows = np.stack([s[t - w:t + 1] for s in seqs[:8] for t in range(w + 1, len(s))])
        got = c.log_probs(torch.from_numpy(seqs[:8]), window=w)[:, w:].reshape(-1).numpy()
        assert np.allclose(got, _brute_force_log_probs(c, windows)[:, -1], atol=1e-7)


def test_forward_predictions_are_normalised():
    c = SyntheticCorpus(TINY)
    prefix = torch.from_numpy(c.stream(9, "validation").astype(np.int64))
    candidates = torch.cat([prefix.expand(c.vocab_size, -1), torch.arange(c.vocab_size)[:, None]], dim=1)
    total = torch.logsumexp(c.log_probs(candidates)[:, -1], dim=0)
    assert abs(total.item()) < 1e-9


@pytest.mark.parametrize("k", [1, 4])
def test_generator_matches_the_likelihood_it_is_scored_with(k):
    c = SyntheticCorpus(TINY)
    stream = c.stream(600_000, "train").astype(np.int64)
    windows = np.lib.stride_tricks.sliding_window_view(stream, k + 1)
    context_ids = windows[:, :k] @ (c.vocab_size ** np.arange(k))
    ids, inverse, counts = np.unique(context_ids, return_inverse=True, return_counts=True)
    frequent = np.flatnonzero(counts >= 300)
    assert len(frequent) >= 5
    for i in frequent:
        rows = windows[inverse == i]
        empirical = np.bincount(rows[:, k], minlength=c.vocab_size) / len(rows)
        candidates = torch.cat([torch.from_numpy(rows[0, :k]).expand(c.vocab_size, -1),
                                torch.arange(c.vocab_size)[:, None]], dim=1)
        exact = c.log_probs(candidates)[:, -1].exp().numpy()
        # binomial noise of each frequency (clipped: a certain token's probability can round to 1 + 1e-16)
        sigma = np.sqrt(np.clip(exact * (1 - exact), 0, None) / len(rows))
        assert np.all(np.abs(empirical - exact) <= 5 * sigma + 1e-3), (c.decode(rows[0, :k]), empirical, exact)


def test_windowed_optimum_is_worse_and_improves_with_the_window():
    c = SyntheticCorpus(SyntheticSpec(vocab_size=64, n_slots=4))
    blocks = torch.from_numpy(c.stream(128 * 32 + 1, "validation").astype(np.int64)).unfold(0, 33, 32)
    ppl = [c.optimal_ppl(blocks, w) for w in (1, 4, 16)] + [c.optimal_ppl(blocks)]
    assert all(a > b for a, b in zip(ppl, ppl[1:])), ppl


def test_latent_matters_on_the_default_corpus(tmp_path):
    val = load_blocks(DataConfig(synthetic_tokens=1000, cache_dir=str(tmp_path)), 128, "validation")
    full, window64, bigram = optimal_ppl(val), optimal_ppl(val, 64), optimal_ppl(val, 1)
    assert window64 > 1.15 * full and bigram > 3 * full, (full, window64, bigram)


def test_optimal_ppl_needs_the_synthetic_corpus(tmp_path):
    blocks = load_blocks(_cfg(tmp_path, str(_stories_file(tmp_path)), val_blocks=1), 8, "validation")
    with pytest.raises(DataError, match="only for the synthetic corpus"):
        optimal_ppl(blocks)


@pytest.mark.parametrize("damage", ["odd size", "empty", "random bytes", "no metadata"])
def test_a_damaged_token_cache_names_its_file_and_the_fix(tmp_path, damage):
    cfg = DataConfig(synthetic_tokens=5_000, synthetic_vocab=64, synthetic_slots=4, cache_dir=str(tmp_path))
    load_blocks(cfg, 32, "train")
    (path,) = (tmp_path / "tokens").glob("synthetic-train-*.uint16")
    if damage == "odd size":
        path.write_bytes(path.read_bytes()[:-1])
    elif damage == "empty":
        path.write_bytes(b"")
    elif damage == "random bytes":
        path.write_bytes(np.random.default_rng(0).integers(0, 256, path.stat().st_size, dtype=np.uint8).tobytes())
    else:
        path.with_suffix(".json").unlink()
    with pytest.raises(DataError, match="delete .* to tokenise again") as err:
        load_blocks(cfg, 32, "train")
    assert str(path) in str(err.value)

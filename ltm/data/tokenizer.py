"""Tokenizers with one small interface: GPT-2 BPE + BOS, a byte-level BPE trained on the data,
and the synthetic corpus's own vocabulary (`SyntheticCorpus` implements the same interface)."""

from __future__ import annotations

import hashlib
import itertools
import logging
import os
import time
from pathlib import Path
from typing import Iterable, Iterator, Protocol, Sequence

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers
from tqdm import tqdm

from ltm.data.errors import DataError, DataNotFoundError
from ltm.files import atomic_write

log = logging.getLogger(__name__)

GPT2_ENV = "LTM_GPT2_TOKENIZER"
"""Environment variable: path to GPT-2's tokenizer.json (or a folder holding it)."""
EOS_TOKEN = "<|endoftext|>"
BOS_TOKEN = "<|beginoftext|>"
BPE_TRAIN_CHARS = 200_000_000
"""Training text used for the BPE merges (a minute or so); more changes the merges little."""


class TextTokenizer(Protocol):
    """What the data pipeline and evaluation need from a tokenizer."""

    vocab_size: int
    bos_id: int
    eos_id: int
    cache_key: str
    """Identifies the vocabulary for the token cache."""

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class HFTokenizer:
    """A `tokenizers.Tokenizer` with BOS/EOS ids; special tokens are never added by encode."""

    def __init__(self, tokenizer: Tokenizer, cache_key: str) -> None:
        self.tokenizer = tokenizer
        self.cache_key = cache_key
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self.eos_id = tokenizer.token_to_id(EOS_TOKEN)
        self.bos_id = tokenizer.token_to_id(BOS_TOKEN)

    def encode(self, text: str) -> list[int]:
        """Token ids of text, without BOS/EOS."""
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        """Token ids of many texts at once (parallel in Rust)."""
        return [e.ids for e in self.tokenizer.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        """Text of ids; BOS/EOS appear as their token strings."""
        return self.tokenizer.decode([int(i) for i in ids], skip_special_tokens=False)


def _file_key(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()[:16]


def find_gpt2_tokenizer_file() -> Path:
    """GPT-2's tokenizer.json from $LTM_GPT2_TOKENIZER or the Hugging Face cache (never downloads)."""
    hint = (f"set {GPT2_ENV}=/path/to/tokenizer.json (GPT-2's, from huggingface.co/gpt2) "
            "or use data.tokenizer='bpe' to train a BPE on the training data")
    env = os.environ.get(GPT2_ENV)
    if env:
        path = Path(env).expanduser()
        path = path / "tokenizer.json" if path.is_dir() else path
        if not path.is_file():
            raise DataNotFoundError(f"{GPT2_ENV}={env!r}: no tokenizer file at {path}; {hint}")
        return path
    from huggingface_hub import try_to_load_from_cache

    for repo in ("gpt2", "openai-community/gpt2"):
        found = try_to_load_from_cache(repo, "tokenizer.json")
        if isinstance(found, str):
            return Path(found)
    raise DataNotFoundError(f"GPT-2 tokenizer not found ({GPT2_ENV} unset, not in the Hugging Face cache); {hint}")


def gpt2_tokenizer(path: Path | None = None) -> HFTokenizer:
    """GPT-2 BPE plus one added begin-of-text token: EOS 50256, BOS 50257, vocab 50,258."""
    path = path or find_gpt2_tokenizer_file()
    tok = Tokenizer.from_file(str(path))
    if tok.token_to_id(EOS_TOKEN) is None:
        raise DataError(f"{path} has no {EOS_TOKEN} token; is it GPT-2's tokenizer.json?")
    tok.add_special_tokens([AddedToken(BOS_TOKEN, special=True, normalized=False)])
    return HFTokenizer(tok, cache_key=f"gpt2+bos-{_file_key(path)}")


def bpe_tokenizer(path: Path, vocab_size: int, train_texts: Iterable[str] | None = None,
                  source: str = "the training text") -> HFTokenizer:
    """A byte-level BPE saved at path: loaded if it exists, else trained on train_texts (from source) and saved."""
    if not path.is_file():
        if train_texts is None:
            raise DataNotFoundError(f"no BPE tokenizer at {path} and no training text to build one")
        _train_bpe(path, vocab_size, train_texts, source)
    tok = Tokenizer.from_file(str(path))
    return HFTokenizer(tok, cache_key=f"bpe{tok.get_vocab_size()}-{_file_key(path)}")


def _train_bpe(path: Path, vocab_size: int, texts: Iterable[str], source: str) -> None:
    """Train on the first BPE_TRAIN_CHARS characters of texts and save at path, saying so in plain lines:
    the tokenizers library draws its progress only on a terminal, and a study's log is not one."""
    texts = iter(texts)
    first = next((t for t in texts if t.strip()), None)
    if first is None:  # say so before training: a BPE of no text would be cached and reused
        raise DataError(f"no text in the train split of {source} to train a BPE tokenizer on: every document is "
                        "empty; check the path and data.text_field")
    texts = itertools.chain([first], texts)
    log.info("training a byte-level BPE (vocab %d) on the first %s characters of %s ...", vocab_size,
             f"{BPE_TRAIN_CHARS:,}", source)
    start = time.monotonic()
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=[EOS_TOKEN, BOS_TOKEN],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    read = 0

    def first_texts() -> Iterator[str]:
        nonlocal read
        with tqdm(total=BPE_TRAIN_CHARS, desc="reading text for the BPE", unit=" chars", unit_scale=True,
                  disable=None, leave=False) as bar:
            for text in texts:
                if read >= BPE_TRAIN_CHARS:
                    return
                read += len(text)
                bar.update(len(text))
                yield text

    tok.train_from_iterator(first_texts(), trainer)
    _save(tok, path)
    log.info("BPE trained: vocab %d, %s characters read in %.1f s, saved to %s", tok.get_vocab_size(), f"{read:,}",
             time.monotonic() - start, path)


def _save(tok: Tokenizer, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, tok.to_str(pretty=True), mode=0o644)  # concurrent trainers never leave a partial file

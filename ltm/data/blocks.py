"""Packing documents into blocks of ctx + 1 tokens, with an on-disk token cache.

Each document becomes BOS + tokens + EOS; documents are concatenated into one stream per split,
tokenised once and cached as a flat uint16/uint32 file (memory-mapped when loaded). Block i is
stream[i * ctx : i * ctx + ctx + 1], so consecutive blocks share one token and every token but the
first is predicted exactly once. The model predicts block[1:] from block[:-1].

Validation: the source's own validation split when it has one (all of it), `data.val_name` when
given (all of it), else the last `val_blocks` blocks of the training stream; training then uses
the stream before them. The synthetic corpus generates a separate validation stream of exactly
`val_blocks` blocks from its own derived seed.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
from tqdm import tqdm

from ltm.config import GPT2_VOCAB, DataConfig
from ltm.data.errors import DataError
from ltm.data.sources import SPLITS, TextSource, resolve_source
from ltm.data.synthetic import SyntheticCorpus, SyntheticSpec
from ltm.data.tokenizer import HFTokenizer, TextTokenizer, bpe_tokenizer, gpt2_tokenizer
from ltm.files import atomic_file, atomic_write

log = logging.getLogger(__name__)

FORMAT_VERSION = 2
"""Part of every cache key; bump it when the packing format changes."""
_ENCODE_BATCH = 1024


@dataclass
class TokenBlocks:
    """Blocks of ctx + 1 tokens over a token stream (often a memory-mapped cache file)."""

    tokens: np.ndarray
    ctx: int
    tokenizer: TextTokenizer

    def __post_init__(self) -> None:
        if len(self.tokens) < self.ctx + 1:
            raise DataError(f"{len(self.tokens)} tokens do not fill one block of ctx + 1 = {self.ctx + 1}")

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.ctx

    def __getitem__(self, i: int) -> torch.Tensor:
        """Block i as a LongTensor of shape (ctx + 1,)."""
        n = len(self)
        if not -n <= i < n:
            raise IndexError(f"block {i} out of range for {n} blocks")
        start = (i % n) * self.ctx
        return torch.from_numpy(self.tokens[start:start + self.ctx + 1].astype(np.int64))

    def batch(self, indices: Sequence[int] | np.ndarray | torch.Tensor) -> torch.Tensor:
        """Blocks at indices as a LongTensor of shape (B, ctx + 1)."""
        idx = np.asarray(indices, dtype=np.int64)
        if idx.size and (idx.min() < 0 or idx.max() >= len(self)):
            raise IndexError(f"block indices must be in [0, {len(self)})")
        pos = idx[:, None] * self.ctx + np.arange(self.ctx + 1)
        return torch.from_numpy(self.tokens[pos].astype(np.int64))

    @property
    def n_tokens(self) -> int:
        """Tokens in the stream these blocks cover."""
        return len(self.tokens)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.vocab_size

    @property
    def bos_id(self) -> int:
        return self.tokenizer.bos_id

    @property
    def eos_id(self) -> int:
        return self.tokenizer.eos_id

    def decode(self, ids: Sequence[int] | torch.Tensor) -> str:
        """Text of token ids."""
        return self.tokenizer.decode([int(i) for i in ids])


def load_blocks(data_cfg: DataConfig, ctx: int, split: str) -> TokenBlocks:
    """The train or validation blocks of ctx + 1 tokens for a data configuration."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    if ctx < 1:
        raise ValueError(f"ctx must be >= 1, got {ctx}")
    tok = load_tokenizer(data_cfg)
    if isinstance(tok, SyntheticCorpus):
        n = data_cfg.synthetic_tokens if split == "train" else data_cfg.val_blocks * ctx + 1
        stream = _cached(data_cfg, "synthetic", split, {"n_tokens": n}, tok,
                         lambda: [tok.stream(n, split)])
        return _blocks(stream, ctx, tok, "synthetic", split, "data.synthetic_tokens")
    source = resolve_source(data_cfg.name, data_cfg.text_field)
    if data_cfg.val_name is not None:
        if split == "validation":
            val = resolve_source(data_cfg.val_name, data_cfg.text_field)
            stream = _text_stream(data_cfg, val, "validation" if val.has_validation else "train", tok)
            return _blocks(stream, ctx, tok, data_cfg.val_name, split, "data.val_name")
        return _blocks(_text_stream(data_cfg, source, "train", tok), ctx, tok, data_cfg.name, split, "data.name")
    if source.has_validation:
        return _blocks(_text_stream(data_cfg, source, split, tok), ctx, tok, data_cfg.name, split, "data.name")
    stream = _text_stream(data_cfg, source, "train", tok)
    held = data_cfg.val_blocks * ctx + 1
    if len(stream) < held + ctx + 1:
        raise DataError(
            f"{data_cfg.name} has {len(stream):,} tokens: too few to hold out data.val_blocks={data_cfg.val_blocks} "
            f"validation blocks of ctx={ctx} ({held:,} tokens) and keep one training block; lower "
            "data.val_blocks or ctx, add text, or give a separate validation source in data.val_name")
    part = stream[len(stream) - held:] if split == "validation" else stream[:len(stream) - held]
    return TokenBlocks(part, ctx, tok)


def load_tokenizer(data_cfg: DataConfig) -> TextTokenizer:
    """The tokenizer of a data configuration (trains and saves the BPE on first use)."""
    if data_cfg.name == "synthetic":
        if data_cfg.tokenizer != "auto":
            raise DataError(f"the synthetic corpus has its own vocabulary; data.tokenizer must be 'auto', "
                            f"got {data_cfg.tokenizer!r}")
        return SyntheticCorpus(synthetic_spec(data_cfg))
    if data_cfg.tokenizer in ("auto", "gpt2"):
        return gpt2_tokenizer()
    source = resolve_source(data_cfg.name, data_cfg.text_field)
    digest = hashlib.sha256(source.key.encode()).hexdigest()[:16]
    path = cache_dir(data_cfg) / "tokenizers" / f"bpe{data_cfg.bpe_vocab_size}-{_slug(data_cfg.name)}-{digest}.json"
    return bpe_tokenizer(path, data_cfg.bpe_vocab_size, source.documents("train"), data_cfg.name)


def planned_vocab_size(data_cfg: DataConfig) -> int:
    """The vocabulary `load_tokenizer` gives (the model's vocab_size), without reading text or files.

    For tokenizer="bpe" the configured size: a BPE trained on very little text can come out smaller.
    """
    if data_cfg.name == "synthetic":
        return data_cfg.synthetic_vocab
    return data_cfg.bpe_vocab_size if data_cfg.tokenizer == "bpe" else GPT2_VOCAB


def synthetic_spec(data_cfg: DataConfig) -> SyntheticSpec:
    """The synthetic process a data configuration describes."""
    d = data_cfg
    return SyntheticSpec(vocab_size=d.synthetic_vocab, n_slots=d.synthetic_slots, n_topics=d.synthetic_topics,
                         branching=d.synthetic_branching, event_prob=d.synthetic_event_prob,
                         doc_len=d.synthetic_doc_len, seed=d.seed)


def cache_dir(data_cfg: DataConfig) -> Path:
    """data.cache_dir, else $LTM_CACHE, else ~/.cache/ltm."""
    return Path(data_cfg.cache_dir or os.environ.get("LTM_CACHE") or "~/.cache/ltm").expanduser()


def check_data(data_cfg: DataConfig) -> None:
    """Fail fast on a missing path, unknown name or unavailable GPT-2 tokenizer; reads no text."""
    if data_cfg.name == "synthetic":
        load_tokenizer(data_cfg)
    else:
        resolve_source(data_cfg.name, data_cfg.text_field)
        if data_cfg.tokenizer in ("auto", "gpt2"):
            gpt2_tokenizer()
    if data_cfg.val_name is not None:
        resolve_source(data_cfg.val_name, data_cfg.text_field)


def optimal_ppl(blocks: TokenBlocks, window: int | None = None, n_blocks: int | None = None) -> float:
    """Bayes-optimal perplexity per predicted token of (the first n_blocks) synthetic blocks,
    with full block context or only the last `window` tokens (see `SyntheticCorpus.log_probs`)."""
    if not isinstance(blocks.tokenizer, SyntheticCorpus):
        raise DataError("the optimal perplexity is known only for the synthetic corpus (data.name='synthetic')")
    n = len(blocks) if n_blocks is None else min(n_blocks, len(blocks))
    return blocks.tokenizer.optimal_ppl(blocks.batch(range(n)), window)


def _blocks(stream: np.ndarray, ctx: int, tok: TextTokenizer, name: str, split: str, knob: str) -> TokenBlocks:
    if len(stream) < ctx + 1:
        raise DataError(f"the {split} split of {name} has {len(stream):,} tokens, fewer than one block of "
                        f"ctx + 1 = {ctx + 1}; use a smaller ctx or more text ({knob})")
    return TokenBlocks(stream, ctx, tok)


def _text_stream(data_cfg: DataConfig, source: TextSource, split: str, tok: TextTokenizer) -> np.ndarray:
    def produce() -> Iterable[np.ndarray]:
        docs = source.documents(split)
        encode = tok.encode_batch if isinstance(tok, HFTokenizer) else lambda b: [tok.encode(d) for d in b]
        bar = tqdm(desc=f"tokenising {source.name} ({split})", unit=" docs", disable=None, leave=False)
        batch: list[str] = []
        for doc in docs:
            batch.append(doc)
            if len(batch) == _ENCODE_BATCH:
                yield _pack(encode(batch), tok)
                bar.update(len(batch))
                batch = []
        if batch:
            yield _pack(encode(batch), tok)
            bar.update(len(batch))
        bar.close()

    return _cached(data_cfg, source.name, split, {"source": source.key}, tok, produce)


def _pack(docs: list[list[int]], tok: TextTokenizer) -> np.ndarray:
    """BOS + tokens + EOS for each document, concatenated."""
    return np.concatenate([np.array([tok.bos_id, *ids, tok.eos_id], dtype=np.int64) for ids in docs])


def _cached(data_cfg: DataConfig, name: str, split: str, key: dict, tok: TextTokenizer,
            produce: Callable[[], Iterable[np.ndarray]]) -> np.ndarray:
    """The token stream stored under a hash of (format, source, split, tokenizer), made on a miss."""
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.uint32
    full_key = {"format": FORMAT_VERSION, "split": split, "tokenizer": tok.cache_key, **key}
    digest = hashlib.sha256(json.dumps(full_key, sort_keys=True).encode()).hexdigest()[:16]
    folder = cache_dir(data_cfg) / "tokens"
    path = folder / f"{_slug(name)}-{split}-{digest}.{np.dtype(dtype).name}"
    if not path.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        n, started = 0, time.perf_counter()
        verb = "generating" if isinstance(tok, SyntheticCorpus) else "tokenising"
        log.info("%s the %s split of %s into the token cache %s (once; later runs read it)", verb, split, name, path)
        # The metadata first, each atomically: a reader that sees the tokens sees their metadata.
        meta = path.with_suffix(".json")
        try:
            with atomic_file(path, mode=0o644) as f:  # the cache may be shared
                for part in produce():
                    f.write(part.astype(dtype).tobytes())
                    n += len(part)
                if n == 0:
                    raise DataError(f"no text in the {split} split of {name}: every document is empty; check "
                                    "the path and data.text_field")
                atomic_write(meta, json.dumps({**full_key, "n_tokens": n}, indent=1))
            log.info("%s: %s tokens in %.0f s", path.name, f"{n:,}", time.perf_counter() - started)
        except OSError as err:  # a full disk, or a file over the size limit: name the file and the fix
            raise DataError(f"cannot write the token cache {path} ({err.strerror or err}, after "
                            f"{n * np.dtype(dtype).itemsize:,} bytes); free space or raise the file size limit "
                            "(ulimit -f), or point $LTM_CACHE (data.cache_dir) at a disk with room") from err
    return _checked_cache(path, dtype, tok.vocab_size)


_VERIFIED: set[tuple] = set()
"""Cache files already checked in this process, by path, size and the file's and its metadata's
modification times: each is scanned once unless one of them changes."""


def _checked_cache(path: Path, dtype, vocab_size: int) -> np.ndarray:
    """The cache file as a memmap, once its length matches its metadata and every id is < vocab."""
    stat, meta = path.stat(), path.with_suffix(".json")
    identity = (str(path), stat.st_size, stat.st_mtime_ns, meta.stat().st_mtime_ns if meta.exists() else None)
    if identity not in _VERIFIED:
        fix = f"delete {path} and {meta} to tokenise again"
        try:
            expected = json.loads(meta.read_text())["n_tokens"]
        except (OSError, ValueError, KeyError):
            raise DataError(f"token cache {path} has no readable metadata ({meta.name}); it may be left from an "
                            f"interrupted write: {fix}") from None
        itemsize = np.dtype(dtype).itemsize
        if stat.st_size % itemsize or stat.st_size // itemsize != expected or expected == 0:
            raise DataError(f"token cache {path} holds {stat.st_size} bytes, not the {expected:,} tokens of "
                            f"{itemsize} bytes its metadata records: the file is damaged; {fix}")
        tokens = np.memmap(path, dtype=dtype, mode="r")
        top = max(int(tokens[i:i + (1 << 24)].max()) for i in range(0, len(tokens), 1 << 24))
        if top >= vocab_size:
            raise DataError(f"token cache {path} holds token id {top}, outside the tokenizer's vocabulary of "
                            f"{vocab_size}: the file is damaged or from another tokenizer; {fix}")
        _VERIFIED.add(identity)
    return np.memmap(path, dtype=dtype, mode="r")


def _slug(name: str) -> str:
    stem = Path(name).name or "data"
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in stem)[:40]

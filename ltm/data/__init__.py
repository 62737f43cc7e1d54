"""Data: sources (hub names, local files, the built-in synthetic corpus), tokenizers, packing
into blocks of ctx + 1 tokens and an on-disk token cache."""

from ltm.config import GPT2_VOCAB
from ltm.data.blocks import (
    FORMAT_VERSION,
    TokenBlocks,
    cache_dir,
    check_data,
    load_blocks,
    load_tokenizer,
    optimal_ppl,
    planned_vocab_size,
    synthetic_spec,
)
from ltm.data.errors import DataError, DataNotFoundError
from ltm.data.sources import HUB_DATASETS, TextSource, resolve_source
from ltm.data.synthetic import SyntheticCorpus, SyntheticSpec
from ltm.data.tokenizer import BOS_TOKEN, EOS_TOKEN, GPT2_ENV, HFTokenizer, TextTokenizer, gpt2_tokenizer

__all__ = [
    "BOS_TOKEN", "EOS_TOKEN", "FORMAT_VERSION", "GPT2_ENV", "GPT2_VOCAB", "HUB_DATASETS",
    "DataError", "DataNotFoundError", "HFTokenizer", "SyntheticCorpus", "SyntheticSpec",
    "TextSource", "TextTokenizer", "TokenBlocks",
    "cache_dir", "check_data", "gpt2_tokenizer", "load_blocks", "load_tokenizer", "optimal_ppl",
    "planned_vocab_size", "resolve_source", "synthetic_spec",
]

"""Text sources: documents (strings) of a hub dataset or a local file/folder, by split.

Local formats and what a document is:

* ``.txt`` file: pieces between ``<|endoftext|>`` lines if the file has them (TinyStories'
  text release); else WikiText articles, split at top-level headings `` = Title = `` (the
  heading starts its article); else the whole file is one document.
* folder of ``.txt`` files (searched recursively, sorted by path): each file as above.
* ``.jsonl`` / ``.parquet``: one record per document, its ``text_field``; records with
  ``question`` and ``answer`` instead (GSM8K) become ``Question: q Answer: a``, the
  prompt format of the in-context evaluation (`ltm.gsm8k`), so a model trained on them
  reads its few-shot prompts in the format it was trained on.
* folder written by ``datasets.save_to_disk``: its ``train`` split and, if present, its
  ``validation`` split (records as for .jsonl).

Local files have only a training split unless saved with one; the pipeline then holds out the
last blocks of the training stream for validation (see `ltm.data.blocks`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Iterator

from ltm.data.errors import DataError, DataNotFoundError
from ltm.data.paths import expand


@dataclass(frozen=True)
class HubDataset:
    """A hub dataset: repository, configuration, and the split that serves as validation."""

    repo: str
    config: str | None
    validation: str | None
    """None: no validation split; it is held out from train (GSM8K's test split stays untouched).
    The zero-shot corpora (wikitext, ptb, lambada, lm1b) name their test split: it is the one evaluated."""
    text_field: str | None = None
    """The records' text field when it is not data.text_field's default."""


HUB_DATASETS: dict[str, HubDataset] = {
    "openwebtext": HubDataset("Skylion007/openwebtext", None, None),
    "wikitext-2": HubDataset("Salesforce/wikitext", "wikitext-2-raw-v1", "validation"),
    "wikitext-103": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "validation"),
    "tinystories": HubDataset("roneneldan/TinyStories", None, "validation"),
    "gsm8k": HubDataset("openai/gsm8k", "main", None),
    # zero-shot evaluation corpora of the paper (their test splits)
    "wikitext": HubDataset("Salesforce/wikitext", "wikitext-103-raw-v1", "test"),
    "ptb": HubDataset("ptb-text-only/ptb_text_only", "penn_treebank", "test", text_field="sentence"),
    "lambada": HubDataset("EleutherAI/lambada_openai", "default", "test"),
    "lm1b": HubDataset("dvruette/lm1b", None, "test"),
}
SPLITS = ("train", "validation")
_WIKITEXT_HEADING = re.compile(r"^ = [^=].* = $")
_LOCAL_SUFFIXES = (".txt", ".jsonl", ".parquet")


@dataclass(frozen=True)
class TextSource:
    """A resolved source: where its documents come from and an identity for caches."""

    name: str
    kind: str
    """"hub", "txt", "txt-folder", "jsonl", "parquet" or "saved"."""
    path: Path | None
    text_field: str
    key: str
    """Stable identity: the hub name, or the files' paths, sizes and modification times."""
    has_validation: bool

    def documents(self, split: str) -> Iterator[str]:
        """The non-empty documents of a split, in a fixed order."""
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        if split == "validation" and not self.has_validation:
            raise DataError(f"{self.name} has no validation split; hold out blocks of its training split")
        if self.kind == "hub":
            docs = _hub_documents(self.name, split, self.text_field)
        elif self.kind == "saved":
            docs = _saved_documents(self.path, split, self.text_field)
        elif self.kind == "jsonl":
            docs = (record_text(json.loads(line), self.text_field, self.path)
                    for line in _utf8_lines(self.path) if line.strip())
        elif self.kind == "parquet":
            docs = _parquet_documents(self.path, self.text_field)
        else:
            files = sorted(self.path.rglob("*.txt")) if self.kind == "txt-folder" else [self.path]
            docs = (doc for f in files for doc in split_text_file(_utf8_text(f)))
        return (d for d in docs if d.strip())


def _not_utf8(path: Path, err: UnicodeDecodeError, offset: int = 0) -> DataError:
    byte = err.object[err.start:err.start + 1].hex()
    return DataError(f"{path} is not UTF-8 text: byte 0x{byte} at offset {offset + err.start} ({err.reason}); "
                     "convert it (e.g. `iconv -f latin1 -t utf-8`) or move it out of the corpus")


def _utf8_text(path: Path) -> str:
    """A text file's content; a file that is not UTF-8 is named, with the offending byte's offset."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise _not_utf8(path, err) from None


def _utf8_lines(path: Path) -> Iterator[str]:
    """A file's lines, decoded as UTF-8; a line that is not is named by its file and byte offset."""
    offset = 0
    with open(path, "rb") as f:
        for raw in f:
            try:
                yield raw.decode("utf-8")
            except UnicodeDecodeError as err:
                raise _not_utf8(path, err, offset) from None
            offset += len(raw)


def resolve_source(name: str, text_field: str = "text") -> TextSource:
    """The source for a hub name or a local path (`data:NAME` in $LTM_DATA_DIR too); errors say what exists instead."""
    path = Path(expand(name)).expanduser()
    if path.exists():
        path = path.resolve()
        if path.is_dir():
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                key = _files_key(path, sorted(path.rglob("*")))
                return TextSource(name, "saved", path, text_field, key, "validation" in _saved_splits(path))
            files = sorted(path.rglob("*.txt"))
            if not files:
                raise DataError(f"folder {path} has no .txt files and is not a dataset saved with "
                                "datasets.save_to_disk; point data.name at a .txt/.jsonl/.parquet file "
                                "or such a folder")
            return TextSource(name, "txt-folder", path, text_field, _files_key(path, files), False)
        if path.suffix not in _LOCAL_SUFFIXES:
            raise DataError(f"{path}: unsupported file type {path.suffix!r}; use one of {', '.join(_LOCAL_SUFFIXES)}")
        return TextSource(name, path.suffix[1:], path, text_field, _files_key(path, [path]), False)
    if name in HUB_DATASETS:
        return TextSource(name, "hub", None, text_field, f"hub:{name}", HUB_DATASETS[name].validation is not None)
    known = ", ".join(["synthetic", *HUB_DATASETS])
    if "/" in name or "\\" in name or path.suffix in _LOCAL_SUFFIXES or name.startswith((".", "~")):
        raise DataNotFoundError(f"no such file or folder: {path.absolute()} (data.name={name!r}); "
                                f"fix the path, or use a built-in or hub name: {known}")
    raise DataError(f"unknown dataset name {name!r}; known names: {known}; or pass a local path "
                    "(.txt file or folder, .jsonl, .parquet, a folder from datasets.save_to_disk)")


def record_text(record: dict[str, Any], text_field: str, where: object = "record") -> str:
    """A record's document: its text field, or `Question: q Answer: a` (GSM8K records)."""
    if text_field in record:
        return str(record[text_field])
    if "question" in record and "answer" in record:
        return qa_text(record["question"], record["answer"])
    raise DataError(f"{where}: records have no field {text_field!r} (fields: {', '.join(record)}); "
                    "set data.text_field to the field holding the text")


def qa_text(question: str, answer: str | None = None) -> str:
    """GSM8K's format (docs/METHOD.md section 8), `Question: q Answer: a`; without an answer, the prompt for one."""
    prompt = f"Question: {question.strip()} Answer:"
    return prompt if answer is None else f"{prompt} {answer.strip()}"


def split_text_file(text: str) -> list[str]:
    """Documents of a .txt file: <|endoftext|>-separated pieces, WikiText articles, or the whole file."""
    if "<|endoftext|>" in text:
        return [piece.strip("\n") for piece in text.split("<|endoftext|>")]
    lines = text.splitlines(keepends=True)
    if any(_WIKITEXT_HEADING.match(line.rstrip("\n")) for line in lines):
        return list(wikitext_articles(lines))
    return [text]


def wikitext_articles(lines: Iterable[str]) -> Iterator[str]:
    """Group WikiText lines into articles, each starting at its ` = Title = ` heading."""
    article: list[str] = []
    for line in lines:
        if _WIKITEXT_HEADING.match(line.rstrip("\n")) and any(s.strip() for s in article):
            yield "".join(article)
            article = []
        article.append(line)
    if any(s.strip() for s in article):
        yield "".join(article)


def _files_key(root: Path, files: list[Path]) -> str:
    stats = [(str(f.relative_to(root.parent)), f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
    return json.dumps([str(root), stats])


def _parquet_documents(path: Path, text_field: str) -> Iterator[str]:
    import pyarrow.parquet as pq

    pf = pq.ParquetFile(path)
    columns = [text_field] if text_field in pf.schema_arrow.names else None
    for batch in pf.iter_batches(batch_size=4096, columns=columns):
        for record in batch.to_pylist():
            yield record_text(record, text_field, path)


def _saved_splits(path: Path) -> list[str]:
    if (path / "dataset_dict.json").is_file():
        return json.loads((path / "dataset_dict.json").read_text())["splits"]
    return ["train"]


def _saved_documents(path: Path, split: str, text_field: str) -> Iterator[str]:
    import datasets

    ds = datasets.load_from_disk(str(path))
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{path} has splits {list(ds)}, no {split!r}; save it with a 'train' split")
        ds = ds[split]
    for record in ds:
        yield record_text(record, text_field, path)


def _hub_documents(name: str, split: str, text_field: str) -> Iterator[str]:
    hub = HUB_DATASETS[name]
    records = _hub_records(name, hub, "train" if split == "train" else hub.validation)
    if name.startswith("wikitext"):  # one record per line; articles start at ` = Title = ` lines
        yield from wikitext_articles(r["text"] for r in records)
    else:
        for record in records:
            yield record_text(record, hub.text_field or text_field, hub.repo)


def _hub_records(name: str, hub: HubDataset, split: str) -> Iterator[dict[str, Any]]:
    """The split's records, streamed: read in one pass as they download, with no full download first.
    Streaming reads the hub, not the datasets cache; the token cache makes later runs offline."""
    import datasets

    try:
        records = iter(datasets.load_dataset(hub.repo, hub.config, split=split, streaming=True))
    except Exception as e:  # offline, hub changes: all mean "use a local copy"
        raise _hub_error(name, hub, split, e) from e
    while True:
        try:  # a stream fails on reading too; only the reading is guarded, not the consumer's work
            record = next(records)
        except StopIteration:
            return
        except Exception as e:
            raise _hub_error(name, hub, split, e) from e
        yield record


def _hub_error(name: str, hub: HubDataset, split: str, e: Exception) -> DataError:
    return DataError(
        f"could not stream {name!r} ({hub.repo}, {hub.config or 'default'}, split {split}) from the Hugging "
        f"Face hub: {type(e).__name__}: {e}. Download it where the hub is reachable and pass a local path "
        "as data.name (.txt/.jsonl/.parquet, or a datasets.save_to_disk folder)")

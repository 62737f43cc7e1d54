"""Rebuild every run key a results document quotes from the commands the document gives.

    python -m analysis.rebuild_keys [docs/RESULTS.md]

A run key is a hash of the run's identity (`RunConfig.run_key`), so a key is rebuilt when some command
documented in the file produces it. The commands it reads:

* `python -m ltm.train ...`, in an indented code block (backslash continuations joined) or in inline
  code, parsed by ltm.train's own parser (`--preset`, `--config` is not followed, `--data`, `--set`);
* `python studies/<name>.py [--preset P] [--seeds 0,1,2] [--set K=V]`: every point of that grid;
* a table under a paragraph whose inline command ends in `--set ...`, "with the options in the first
  columns": each row is that command plus its cells (start, T, inner lr (max), inner lr (min), KL
  warm-up; `TABLE_OPTIONS`).

It prints each key it rebuilt with the command that made it, and each quoted key it cannot rebuild
with its line; the exit status is 1 when any cannot be rebuilt.
"""

# ruff: noqa: E402 (the signal handler goes in before the imports, which load torch)
from __future__ import annotations

from ltm.signals import exit_on_signal

exit_on_signal(__name__)
import argparse
import dataclasses
import importlib
import re
import shlex
import sys
from collections.abc import Callable
from pathlib import Path

from ltm.config import ConfigError
from ltm.names import Exit, exit_help

KEY = re.compile(r"`([0-9a-f]{16})`")
INLINE = re.compile(r"`(python (?:-m ltm\.train|studies/\w+\.py)[^`]*)`")
TABLE_BASE = "--set ..."


@dataclasses.dataclass
class Found:
    """What the document's commands produce: each key with the command that made it, and the commands
    (or table rows) that could not be turned into a config, with why."""

    keys: dict[str, str] = dataclasses.field(default_factory=dict)
    broken: list[str] = dataclasses.field(default_factory=list)


def train_key(argv: list[str]) -> str:
    """The run key `python -m ltm.train <argv>` trains (its own parser and config)."""
    from ltm.train import build_parser, config_from_args

    args = build_parser().parse_args(argv)
    if args.config:
        raise ConfigError("--config names a file this document does not hold")
    return config_from_args(args).run_key()


def study_keys(name: str, argv: list[str]) -> list[str]:
    """The run keys of every point `python studies/<name>.py <argv>` trains."""
    from studies.points import build_points

    study = importlib.import_module(f"studies.{name}").STUDY
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--preset", default=study.default_preset)
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--set", dest="extra", action="append", default=[])
    args, _ = parser.parse_known_args(argv)
    return [p.key for p in build_points(study, args.preset, [int(s) for s in args.seeds.split(",")], None, args.extra)]


def _start(cell: str) -> list[str]:
    """The options a table's "start" cell stands for (`fixed, logvar 0`, `learned, from logvar -5`,
    `encoder (1 layer)`, `encoder`)."""
    match = re.fullmatch(r"(fixed|learned),(?: from)? logvar (-?[\d.]+)", cell)
    if match:
        return [f"inference.start={match[1]}", f"inference.init_logvar={match[2]}"]
    match = re.fullmatch(r"encoder(?: \((\d+) layers?\))?", cell)
    if match:
        return ["inference.start=encoder"] + ([f"inference.encoder_layers={match[1]}"] if match[1] else [])
    raise ConfigError(f"start {cell!r} is none of: fixed, logvar X / learned, from logvar X / encoder (N layers)")


TABLE_OPTIONS: dict[str, Callable[[str], list[str]]] = {
    "start": _start,
    "T": lambda v: [f"inference.steps={v}"],
    "inner lr (max)": lambda v: [f"inference.lr_max={v}"],
    "inner lr (min)": lambda v: [f"inference.lr_min={v}"],
    "KL warm-up": lambda v: [f"inference.start_kl_warmup={v}"],
}
"""How a cell of a table of runs becomes options of the command above the table."""


def _cells(line: str) -> list[str]:
    return [c.strip().strip("*").strip() for c in line.strip().strip("|").split("|")]


def table_row_key(base: list[str], header: list[str], row: list[str]) -> str:
    """The key of one table row: the base command's arguments plus the options of its cells."""
    sets = [opt for name, cell in zip(header, row) if cell and name in TABLE_OPTIONS
            for opt in TABLE_OPTIONS[name](cell)]
    return train_key(base + [arg for opt in sets for arg in ("--set", opt)])


def _command(text: str, found: Found, where: str) -> list[str] | None:
    """Record the keys of one documented command; the base arguments when it is a table's `--set ...`."""
    words = shlex.split(text.replace("\\\n", " "), comments=True)
    try:
        if words[:3] == ["python", "-m", "ltm.train"]:
            if text.rstrip().endswith(TABLE_BASE):
                return words[3:-2]
            found.keys.setdefault(train_key(words[3:]), f"{where}: {' '.join(words)}")
        elif len(words) >= 2 and words[1].startswith("studies/"):
            for key in study_keys(Path(words[1]).stem, words[2:]):
                found.keys.setdefault(key, f"{where}: {' '.join(words)}")
    except (ConfigError, ValueError, ModuleNotFoundError, AttributeError, SystemExit) as err:
        found.broken.append(f"{where}: {' '.join(words)}: {err}")
    return None


def _code_blocks(lines: list[str]) -> list[tuple[int, str]]:
    """(line number, command) of each command in an indented code block, continuations joined."""
    out, pending, start = [], "", 0
    for i, line in enumerate(lines, 1):
        if line.startswith("    ") and (pending or line.strip().startswith("python ")):
            start = start if pending else i
            pending += line.strip() + "\n"
            if not line.rstrip().endswith("\\"):
                out.append((start, pending))
                pending = ""
    return out


def documented_keys(text: str) -> Found:
    """Every key the document's commands and tables of runs produce."""
    lines, found = text.splitlines(), Found()
    for number, command in _code_blocks(lines):
        _command(command, found, f"line {number}")
    base, header = None, None
    for number, line in enumerate(lines, 1):
        for command in INLINE.findall(line):
            base = _command(command, found, f"line {number}") or base
        if base is not None and line.startswith("|"):
            cells = _cells(line)
            if header is None:
                header = cells
            elif not set("".join(cells)) <= set("-: ") and KEY.search(line):
                try:
                    found.keys.setdefault(table_row_key(base, header, cells), f"line {number}: table row")
                except (ConfigError, ValueError, SystemExit) as err:
                    found.broken.append(f"line {number}: table row: {err}")
        elif header is not None and not line.startswith("|"):
            base, header = None, None
    return found


def quoted_keys(text: str) -> dict[str, int]:
    """Each run key the document quotes, with the line it first appears on."""
    out: dict[str, int] = {}
    for number, line in enumerate(text.splitlines(), 1):
        for key in KEY.findall(line):
            out.setdefault(key, number)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m analysis.rebuild_keys", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog=exit_help("every key rebuilt", "some key cannot be rebuilt",
                                                      "never (it reads no run)"))
    parser.add_argument("document", nargs="?", default="docs/RESULTS.md")
    args = parser.parse_args(argv)
    path = Path(args.document)
    if not path.is_file():
        print(f"error: {path} is not a file; give the results document, e.g. docs/RESULTS.md", file=sys.stderr)
        return Exit.USAGE
    text = path.read_text()
    found, quoted = documented_keys(text), quoted_keys(text)
    missing = [key for key in quoted if key not in found.keys]
    for key in quoted:
        if key in found.keys:
            print(f"rebuilt {key}  ({found.keys[key]})")
    for key in missing:
        print(f"CANNOT rebuild {key} (line {quoted[key]}): no command documented in {path} produces it")
    for problem in found.broken:
        print(f"unreadable command {problem}")
    print(f"{len(quoted) - len(missing)} of {len(quoted)} run keys rebuilt from {path}")
    return Exit.FAILED if missing else Exit.OK


if __name__ == "__main__":
    sys.exit(main())

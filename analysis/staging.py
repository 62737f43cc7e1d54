"""An analysis's output written whole or not at all: its files are made in a staging folder beside the
output folder (the same file system, so moving one is a rename), then renamed into place together, so
an interrupted analysis leaves the output folder as it was, never with half its figures new."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def staging_folder(out: Path) -> Iterator[Path]:
    """A new, empty folder next to `out` (.<name>.partial-XXXX), removed on leaving with whatever is left in it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    folder = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-", dir=out.parent))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def move_into_place(paths: list[Path], out: Path) -> list[Path]:
    """Each staged file renamed to the same name in `out` (replacing an older one); their new paths.
    Run where no signal interrupts it (`ltm.signals.Interrupt` outside `stoppable`): a rename takes
    microseconds, so the output folder goes from the old set of files to the new one at once."""
    out.mkdir(parents=True, exist_ok=True)
    moved = []
    for path in paths:
        os.replace(path, out / path.name)
        moved.append(out / path.name)
    return moved

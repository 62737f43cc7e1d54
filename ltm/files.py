"""Atomic file writes: a reader sees the old file or the new one, never a part of either."""

from __future__ import annotations

import errno
import os
import shutil
import threading
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO, Iterator


@contextmanager
def atomic_file(path: str | Path, mode: int | None = None) -> Iterator[BinaryIO]:
    """A binary file that appears at `path` whole or not at all (`mode`: its permissions, else the umask's).

    Written to <name>.<pid>.<thread>.tmp in the same folder, flushed and fsynced, then renamed over
    `path`, and the folder fsynced where the system allows it, so the rename survives a crash too. A
    failed write (a full disk, an exception in the body) removes the temporary and leaves `path` as it
    was; a full disk is raised as OSError ENOSPC naming the file and the free space, whatever the writer's
    own error said (torch.save: "unexpected pos")."""
    path = Path(path)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    try:
        with open(tmp, "wb") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        if mode is not None:
            os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException as err:
        tmp.unlink(missing_ok=True)
        if isinstance(err, Exception) and no_space(err):  # not a signal's exception that met a full disk
            raise OSError(errno.ENOSPC, f"No space left on device writing {path}: {free_space(path.parent)} "
                                        "free on its filesystem") from err
        raise
    _fsync_folder(path.parent)


def atomic_write(path: str | Path, data: bytes | str, mode: int | None = None) -> None:
    """Write `data` (str as UTF-8) to `path` atomically and durably (`atomic_file`)."""
    with atomic_file(path, mode) as f:
        f.write(data.encode() if isinstance(data, str) else data)


def no_space(err: BaseException) -> bool:
    """Whether a failed write ran out of disk space: an OSError ENOSPC, itself or under the error a library
    raised instead (torch.save raises RuntimeError "unexpected pos", the OSError its context)."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        if isinstance(err, OSError) and err.errno == errno.ENOSPC:
            return True
        seen.add(id(err))
        err = err.__cause__ or err.__context__
    return False


def free_space(folder: str | Path) -> str:
    """The free space of the filesystem holding `folder`, in words ("unknown" when it cannot be asked)."""
    try:
        return f"{shutil.disk_usage(folder).free / 1e9:.2f} GB"
    except OSError:
        return "unknown space"


def _fsync_folder(folder: Path) -> None:
    """Make a rename in `folder` durable; skipped where folders cannot be opened (Windows, some file systems)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)

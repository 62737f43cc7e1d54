"""Names are data, never paths: the one place a user's name (an experiment, a study, a task) becomes a
folder name, so that no name reaches outside the folder it is put in, however it is spelled."""

from __future__ import annotations

import hashlib
import re

from ltm.config import ConfigError

MAX_CHARS = 500
"""The longest name taken: MLflow's limit for an experiment's name (it refuses a longer one)."""
MAX_BYTES = 100
"""The longest folder name `folder_name` gives: far below the 255 bytes file systems allow, with room
for what is added to it (`<run key>.<run id>`, `.lock`)."""

_UNSAFE = re.compile(r"[^A-Za-z0-9_.-]+")


def check_name(name: str, what: str) -> str:
    """`name`, when it can name something: not empty or blank (MLflow refuses those), no NUL character (the
    store and the file system would cut the name there), valid UTF-8, at most MAX_CHARS characters; else
    ConfigError naming `what` (the option that gave it, e.g. "--experiment") and the problem."""
    problem = None
    if not isinstance(name, str) or not name.strip():
        problem = "is empty"
    elif "\0" in name:
        problem = "holds a NUL character"
    elif len(name) > MAX_CHARS:
        problem = f"is {len(name)} characters long; at most {MAX_CHARS}"
    else:
        try:
            name.encode("utf-8")
        except UnicodeEncodeError:
            problem = "is not valid UTF-8"
    if problem:
        shown = name if not isinstance(name, str) or len(name) <= 60 else name[:60] + "..."
        raise ConfigError(f"{what} {shown!r} {problem}; choose another name")
    return name


def folder_name(name: str, what: str = "a name") -> str:
    """The folder that stands for `name` (`check_name`'s): `name` itself when it is a plain folder name (ASCII
    letters, digits, '-', '_' and '.', not starting with '.', at most MAX_BYTES), else its plain characters
    with '_' for the others, cut to fit, then '-' and 12 hex digits of the name's sha256, so that two names
    never share a folder and '..', '/', an absolute path or a long or non-ASCII name stay one folder inside
    the parent they are put in."""
    check_name(name, what)
    if not _UNSAFE.search(name) and not name.startswith(".") and len(name) <= MAX_BYTES:
        return name
    digest = hashlib.sha256(name.encode("utf-8")).hexdigest()[:12]
    slug = _UNSAFE.sub("_", name).lstrip(".")[:MAX_BYTES - len(digest) - 1] or "_"
    return f"{slug}-{digest}"

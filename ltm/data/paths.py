"""The one folder of local data sets: `$LTM_DATA_DIR`, the folder that holds `gsm8k/`, `wikitext-2/`
and `chinchilla/` (the tests, GSM8K in-context learning and the Chinchilla replication read them).

Without the variable it is `DEFAULT` from the repository root: the team's read-only copy beside the
checkout. A clone elsewhere sets the variable (or passes paths). Options that name data take a file or
folder in it as `data:NAME` (`--data data:gsm8k`, `--set data.val_name=data:wikitext-2/valid.txt`), and
a missing one is an error that names the variable.
"""

from __future__ import annotations

import os
from pathlib import Path

from ltm.data.errors import DataError, DataNotFoundError

DATA_DIR_ENV = "LTM_DATA_DIR"
DEFAULT = "../shared/data"
"""The data folder when $LTM_DATA_DIR is unset or empty, relative to the repository root."""
PREFIX = "data:"
"""A data source written `data:NAME` is the file or folder NAME of the data folder."""
REPOSITORY = Path(__file__).resolve().parents[2]


def data_dir() -> Path:
    """The data folder, absolute: $LTM_DATA_DIR, else `DEFAULT` from the repository root (not checked)."""
    configured = os.environ.get(DATA_DIR_ENV)
    if configured:
        return Path(configured).expanduser().absolute()
    return Path(os.path.normpath(REPOSITORY / DEFAULT))


def data_path(name: str) -> Path:
    """The file or folder `name` (e.g. "gsm8k", "wikitext-2/valid.txt") of the data folder; DataNotFoundError,
    naming $LTM_DATA_DIR and its value, when it does not exist."""
    if not name or Path(name).is_absolute():
        raise DataError(f"{PREFIX}{name} must name a file or folder inside ${DATA_DIR_ENV}, e.g. {PREFIX}gsm8k")
    path = data_dir() / name
    if not path.exists():
        configured = os.environ.get(DATA_DIR_ENV)
        where = (f"{DATA_DIR_ENV}={configured}" if configured
                 else f"{DATA_DIR_ENV} is unset, so the data folder is {DEFAULT} from the repository root {REPOSITORY}")
        raise DataNotFoundError(f"{path} does not exist ({where}); set {DATA_DIR_ENV} to the folder that holds "
                                "gsm8k/, wikitext-2/ and chinchilla/, or pass the file's own path")
    return path


def expand(source: str) -> str:
    """`source` with `data:NAME` replaced by the path of NAME in the data folder (checked to exist);
    any other source unchanged."""
    return str(data_path(source[len(PREFIX):])) if source.startswith(PREFIX) else source

"""Where data sets are read from and where decoded copies are cached.

The shared data sets are read in place (never copied into the repository). Their folder is
`LID_DATA_DIR` when set, else `../shared/data` next to the project root. Decoded arrays that
are slow to rebuild (CIFAR-10's JPEGs) are cached under `LID_CACHE_DIR`, else
`~/.cache/lid-verifier`.
"""

from __future__ import annotations

import os
from pathlib import Path

from verifier.errors import DataError

DATA_DIR_ENV = "LID_DATA_DIR"
CACHE_DIR_ENV = "LID_CACHE_DIR"


def default_data_dir() -> Path:
    """The folder of the shared data sets.

    Returns:
        `$LID_DATA_DIR` if that variable is set and non-empty, else `<project root>/../shared/data`
        where the project root is the folder that holds the `verifier` package.
    """
    env = os.environ.get(DATA_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    project_root = Path(__file__).resolve().parents[2]
    return project_root.parent / "shared" / "data"


def default_cache_dir() -> Path:
    """The folder for decoded-data caches: `$LID_CACHE_DIR` or `~/.cache/lid-verifier`."""
    env = os.environ.get(CACHE_DIR_ENV, "")
    if env:
        return Path(env).expanduser()
    return Path.home() / ".cache" / "lid-verifier"


def require_file(data_dir: Path, relative: str, *, data_name: str) -> Path:
    """The path of one file of a shared data set, checked to exist.

    Args:
        data_dir: the data folder.
        relative: the file's path inside the data folder.
        data_name: the data set's name, for the message.

    Returns:
        `data_dir / relative`.

    Raises:
        DataError: the file does not exist; the message says where it looked.
    """
    path = data_dir / relative
    if not path.is_file():
        raise DataError(
            f"data set '{data_name}': file not found: {path} (looked in the data folder "
            f"{data_dir}; point LID_DATA_DIR or --data-dir at the folder that holds {relative})"
        )
    return path

"""Where data sets are read from and where decoded copies are cached.

The shared data sets are read in place (never copied into the repository). Their folder is
`LID_DATA_DIR` when set, else `../shared/data` next to the project root. Decoded arrays that
are slow to rebuild (CIFAR-10's JPEGs) are cached under `LID_CACHE_DIR`, else
`~/.cache/lid-verifier`.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path

import numpy as np

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


def file_sha256(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` to `path` as .npy via a temporary file in the same folder and a rename.

    A reader therefore sees either no file or the complete one, even when two processes fill
    the same cache at once.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            np.save(handle, array, allow_pickle=False)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise

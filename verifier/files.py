"""Files written and hashed the same way everywhere: sha256 of a file's bytes, and atomic writes.

Every output (LID files, certificates, reports, feature caches) is written to a temporary file in
the destination's folder and then renamed into place, so a reader, or a run that is interrupted,
sees either no file or the complete one.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import tempfile
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from verifier.errors import OutputError

LOCK_FILE = ".lock"
"""The file in an output folder whose exclusive lock a writing run holds."""


def file_sha256(path: Path, *, chunk_bytes: int = 1 << 20) -> str:
    """Hex sha256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with Path(path).open("rb") as handle:
        while chunk := handle.read(chunk_bytes):
            digest.update(chunk)
    return digest.hexdigest()


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path) on a temporary file in path's folder, then rename it into place.

    The temporary file is removed if `write` raises; the destination is then left as it was.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        write(Path(tmp))
        # mkstemp creates the file 0600; give it the mode a plain open() would (umask applies)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a UTF-8 text file atomically."""
    write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def save_npy_atomic(path: Path, array: np.ndarray) -> None:
    """Write `array` as .npy atomically (no pickles)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.save(handle, array, allow_pickle=False)

    write_atomic(path, write)


def save_npz_atomic(path: Path, arrays: Mapping[str, np.ndarray]) -> None:
    """Write an uncompressed .npz atomically (no pickles)."""

    def write(tmp: Path) -> None:
        with tmp.open("wb") as handle:
            np.savez(handle, allow_pickle=False, **arrays)  # type: ignore[arg-type]

    write_atomic(path, write)


@contextmanager
def folder_lock(folder: Path) -> Iterator[None]:
    """Hold an exclusive lock on `folder` (created if needed) while writing into it.

    Two runs writing the same output folder cannot interleave: the second fails at once. The
    lock is an advisory `flock` on `folder/.lock`, released when the block ends or the process
    dies.

    Raises:
        OutputError: another process holds the lock.
    """
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / LOCK_FILE).open("a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError as err:
            raise OutputError(
                f"{folder}: another run is writing this output folder; wait for it to finish "
                "or choose another folder (-o)"
            ) from err
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)

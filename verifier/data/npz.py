"""User data from a numpy .npz archive, loaded without pickle and checked once.

Layout of the archive (as written by `numpy.savez(path, x=..., y=...)`):

* `x`, `y`: the file's default split. It answers a request for split "default", and for split
  "test" (the default everywhere) when the file has no `x_test`.
* `x_<split>`, `y_<split>`: a named split, e.g. `x_train`/`y_train`, `x_test`/`y_test`.
* `n_classes` (optional): an integer scalar giving the number of classes; without it, the
  number is the largest label of the loaded split plus one.

`x` holds one sample per leading index, shape (n, *sample_shape), any real dtype (converted to
float32 as stored: no scaling); `y` holds integer class labels, shape (n,).
"""

from __future__ import annotations

import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np

from verifier.errors import DataError

DEFAULT_SPLIT: Final = "default"
# requests answered by the plain x/y pair when the file has no x_<split> for them
_DEFAULT_ALIASES: Final = ("default", "test")


@dataclass(frozen=True)
class NpzArrays:
    """Checked arrays of one split of an .npz archive.

    Attributes:
        x: float32, shape (n, *sample_shape), finite.
        y: int64, shape (n,), non-negative.
        n_classes: from the file's `n_classes` array, else max(y) + 1.
        keys: the names of the two arrays read, e.g. ("x_test", "y_test").
    """

    x: np.ndarray
    y: np.ndarray
    n_classes: int
    keys: tuple[str, str]


def _splits(names: list[str]) -> dict[str, tuple[str, str]]:
    """Every split whose x or y array is present -> the names of its (x, y) arrays."""
    splits: dict[str, tuple[str, str]] = {}
    if "x" in names or "y" in names:
        splits[DEFAULT_SPLIT] = ("x", "y")
    for name in names:
        for prefix in ("x_", "y_"):
            if name.startswith(prefix) and len(name) > 2:
                split = name[2:]
                splits[split] = (f"x_{split}", f"y_{split}")
    return splits


def _describe_splits(splits: dict[str, tuple[str, str]]) -> str:
    return ", ".join(f"{split} ({x_key}, {y_key})" for split, (x_key, y_key) in splits.items())


def _choose_keys(path: Path, names: list[str], split: str) -> tuple[str, str]:
    splits = _splits(names)
    found = ", ".join(names) if names else "no arrays"
    if not splits:
        raise DataError(
            f"{path}: expected arrays 'x' and 'y' (or 'x_{split}' and 'y_{split}'); found {found}"
        )
    if split in splits:
        keys = splits[split]
    elif split in _DEFAULT_ALIASES and DEFAULT_SPLIT in splits:
        keys = splits[DEFAULT_SPLIT]
    else:
        raise DataError(
            f"{path}: no split '{split}' (expected arrays 'x_{split}' and 'y_{split}'); "
            f"splits in the file: {_describe_splits(splits)}"
        )
    for key, partner in (keys, keys[::-1]):
        if key not in names:
            raise DataError(
                f"{path}: array '{key}' is missing; it must come with '{partner}' "
                f"(arrays in the file: {found})"
            )
    return keys


_ZIP_ERRORS: Final = (OSError, EOFError, zipfile.BadZipFile, zlib.error, NotImplementedError)
"""What reading a damaged zip member raises (an unknown compression method: NotImplementedError)."""


def _one_line(err: BaseException) -> str:
    text = " ".join(str(err).split()) or type(err).__name__
    return text[:200]


MAX_ARRAY_BYTES: Final = 8 * 1024**3
"""The largest array an .npz may hold (8 GiB); larger ones are refused before allocating."""


def _check_declared_size(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> None:
    """Refuse, before numpy allocates it, an array whose header declares more bytes than the
    file stores or than MAX_ARRAY_BYTES (a crafted header must not exhaust memory)."""
    member = f"{key}.npy"
    zip_file = archive.zip
    if zip_file is None or member not in zip_file.namelist():
        return
    try:
        with zip_file.open(member) as handle:
            try:
                version = np.lib.format.read_magic(handle)
                reader = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = reader(handle)
            except ValueError:
                return  # not a plain array header: numpy's own loader reports it
            header_bytes = handle.tell()
    except _ZIP_ERRORS as err:  # a damaged member: its local header, its compressed bytes
        raise DataError(f"{path}: cannot read array '{key}' ({_one_line(err)})") from None
    if dtype.hasobject:
        return  # refused as pickled objects by the loader
    declared = int(np.prod(shape, dtype=object)) * dtype.itemsize
    stored = zip_file.getinfo(member).file_size - header_bytes
    if declared > MAX_ARRAY_BYTES or declared > stored:
        raise DataError(
            f"{path}: array '{key}' declares shape {tuple(shape)} of {dtype} ({declared:,} "
            f"bytes) but the file stores {stored:,} bytes (limit {MAX_ARRAY_BYTES:,}); "
            "re-save it with np.savez"
        )


def _read_array(archive: np.lib.npyio.NpzFile, path: Path, key: str) -> np.ndarray:
    _check_declared_size(archive, path, key)
    try:
        value = archive[key]
    except ValueError as err:
        if "allow_pickle" in str(err):
            raise DataError(
                f"{path}: array '{key}' holds pickled Python objects, which are never loaded; "
                "expected a numeric array (save e.g. np.asarray(values, dtype=np.float32))"
            ) from err
        raise DataError(f"{path}: cannot read array '{key}' ({err})") from err
    except _ZIP_ERRORS as err:
        raise DataError(f"{path}: cannot read array '{key}' ({_one_line(err)})") from err
    if not isinstance(value, np.ndarray):
        raise DataError(f"{path}: member '{key}' is not a numpy .npy array")
    return value


def _check_x(path: Path, key: str, x: np.ndarray) -> np.ndarray:
    if x.dtype.kind not in "biuf":
        raise DataError(f"{path}: array '{key}' must be real numbers; found dtype {x.dtype}")
    if x.ndim < 2:
        raise DataError(
            f"{path}: array '{key}' must have shape (n_samples, *sample_shape) with at least 2 "
            f"dimensions; found shape {x.shape}"
        )
    if x.shape[0] == 0:
        raise DataError(f"{path}: array '{key}' is empty (shape {x.shape}); expected >= 1 sample")
    if 0 in x.shape[1:]:
        raise DataError(f"{path}: array '{key}' has empty samples (shape {x.shape})")
    with np.errstate(over="ignore", invalid="ignore"):
        x32 = np.ascontiguousarray(x, dtype=np.float32)
    finite = np.isfinite(x32.reshape(x32.shape[0], -1)).all(axis=1)
    if not finite.all():
        index = int(np.flatnonzero(~finite)[0])
        where = "" if x.dtype == np.float32 else " after conversion to float32"
        raise DataError(
            f"{path}: array '{key}' has NaN or Inf values{where} (in {int((~finite).sum())} of "
            f"{x32.shape[0]} samples, first at index {index}); expected finite numbers"
        )
    return x32


def _check_y(path: Path, key: str, y: np.ndarray, n_samples: int, x_key: str) -> np.ndarray:
    if y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: array '{key}' must hold integer class labels; found dtype {y.dtype} "
            "(if the values are whole numbers, save y.astype(np.int64))"
        )
    if y.ndim != 1:
        raise DataError(f"{path}: array '{key}' must have shape (n_samples,); found {y.shape}")
    if y.shape[0] != n_samples:
        raise DataError(
            f"{path}: arrays '{x_key}' and '{key}' must have the same length; "
            f"found {n_samples} samples and {y.shape[0]} labels"
        )
    if y.dtype.kind == "i" and (y < 0).any():
        index = int(np.flatnonzero(y < 0)[0])
        raise DataError(
            f"{path}: array '{key}' must hold class indices >= 0; found {int(y[index])} at "
            f"index {index}"
        )
    if y.dtype == np.uint64 and int(y.max()) > np.iinfo(np.int64).max:
        index = int(np.argmax(y))
        raise DataError(f"{path}: array '{key}' has label {int(y[index])} at index {index}")
    return y.astype(np.int64)


def _n_classes(archive: np.lib.npyio.NpzFile, path: Path, y: np.ndarray) -> int:
    largest = int(y.max()) + 1
    if "n_classes" not in archive.files:
        return largest
    value = _read_array(archive, path, "n_classes")
    if value.dtype.kind not in "iu" or value.size != 1:
        raise DataError(
            f"{path}: array 'n_classes' must be one integer; found dtype {value.dtype} "
            f"shape {value.shape}"
        )
    n_classes = int(value.reshape(()))
    if n_classes < largest:
        raise DataError(
            f"{path}: n_classes is {n_classes} but the labels go up to {largest - 1}; "
            f"expected n_classes >= {largest}"
        )
    return n_classes


def npz_arrays(path: Path, split: str) -> NpzArrays:
    """Load and check one split of an .npz archive (layout in the module docstring).

    Args:
        path: the .npz file.
        split: the split to load ("test" also finds the default x/y pair).

    Returns:
        The checked arrays.

    Raises:
        DataError: missing file, not an .npz archive, pickled object arrays, missing x or y,
            unknown split, unequal lengths, non-integer or negative labels, NaN/Inf in x,
            empty data. The message names the file and the array.
    """
    if not path.exists():
        raise DataError(f"{path}: file not found; expected an .npz archive with arrays x and y")
    if not path.is_file():
        raise DataError(f"{path}: not a file; expected an .npz archive with arrays x and y")
    if not zipfile.is_zipfile(path):
        with path.open("rb") as handle:
            is_npy = handle.read(6) == b"\x93NUMPY"
        found = "a single .npy array" if is_npy else "a file that is not a zip archive"
        raise DataError(
            f"{path}: not an .npz archive (expected a zip archive as written by "
            f"numpy.savez(path, x=..., y=...); found {found})"
        )
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: cannot open the .npz archive ({err})") from err
    if not isinstance(archive, np.lib.npyio.NpzFile):
        raise DataError(f"{path}: expected an .npz archive; found a single .npy array")
    with archive:
        x_key, y_key = _choose_keys(path, list(archive.files), split)
        x = _check_x(path, x_key, _read_array(archive, path, x_key))
        y = _check_y(path, y_key, _read_array(archive, path, y_key), x.shape[0], x_key)
        n_classes = _n_classes(archive, path, y)
    return NpzArrays(x=x, y=y, n_classes=n_classes, keys=(x_key, y_key))

"""Held-out sets larger than memory, read chunk by chunk (issue 22).

A stream is a folder holding either

* `x.npy` and `y.npy`: one array pair, read slice by slice with plain file reads (only the
  chunk being read is in memory; a memory map would keep every page it touched resident);
  `x` has shape (n, *sample_shape), any real dtype; `y` integer labels, shape (n,); or
* `*.npz` shards, taken in name order, each with arrays `x` and `y` as above (one shard in
  memory at a time).

Chunks have a fixed size whatever the shard boundaries, so chunk i holds samples
[i * size, (i + 1) * size) of the concatenation: the same rows an in-memory run would see. Each
chunk is converted to float32 / int64 and checked (finite samples, labels >= 0) before it is
handed on; a bad value is reported with its file and index.
"""

from __future__ import annotations

import hashlib
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from torch import Tensor

from verifier.errors import DataError

StreamKind = Literal["npy", "npz"]


def is_stream_folder(ref: str | Path) -> bool:
    """Whether a data reference names a stream folder (a directory) rather than a data set."""
    return Path(ref).expanduser().is_dir()


def _npz_member(path: Path, key: str) -> np.ndarray:
    try:
        with np.load(path, allow_pickle=False) as archive:
            if key not in archive.files:
                raise DataError(f"{path}: shard has no array '{key}'; expected arrays x and y")
            return np.asarray(archive[key])
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz shard ({err})") from err


def _npz_header(path: Path, key: str) -> np.ndarray:
    """An empty stand-in with the dtype and shape a shard member declares (nothing is read)."""
    try:
        with zipfile.ZipFile(path) as archive, archive.open(f"{key}.npy") as member:
            version = np.lib.format.read_magic(member)
            read = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read(member)
    except KeyError as err:
        raise DataError(f"{path}: shard has no array '{key}'; expected arrays x and y") from err
    except (OSError, ValueError, zipfile.BadZipFile) as err:
        raise DataError(f"{path}: not a readable .npz shard ({err})") from err
    return np.lib.stride_tricks.as_strided(np.zeros(1, dtype=dtype), shape, [0] * len(shape))


class _NpyFile:
    """An .npy file read slice by slice with plain file reads: nothing stays mapped or cached
    in this process between slices, so resident memory does not grow with the file."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with path.open("rb") as handle:
                version = np.lib.format.read_magic(handle)
                read = (
                    np.lib.format.read_array_header_1_0
                    if version == (1, 0)
                    else np.lib.format.read_array_header_2_0
                )
                shape, fortran, dtype = read(handle)
                self.offset = handle.tell()
        except (OSError, ValueError) as err:
            raise DataError(f"{path}: not a readable .npy array ({err})") from err
        if dtype.hasobject:
            raise DataError(f"{path}: object arrays are not read (no pickle); save numbers")
        if fortran and len(shape) > 1:
            raise DataError(f"{path}: Fortran-ordered array; save it with np.ascontiguousarray")
        self.shape: tuple[int, ...] = tuple(shape)
        self.dtype: np.dtype = dtype
        self.ndim = len(shape)
        self.row = int(np.prod(shape[1:], dtype=np.int64))

    def __getitem__(self, rows: slice) -> np.ndarray:
        start, stop, _ = rows.indices(self.shape[0] if self.shape else 0)
        count = max(stop - start, 0)
        with self.path.open("rb") as handle:
            handle.seek(self.offset + start * self.row * self.dtype.itemsize)
            flat = np.fromfile(handle, dtype=self.dtype, count=count * self.row)
        if flat.size != count * self.row:
            raise DataError(f"{self.path}: file ends early; the header declares {self.shape}")
        return flat.reshape(count, *self.shape[1:])


def _npy(path: Path) -> _NpyFile:
    return _NpyFile(path)


@dataclass(frozen=True)
class _Part:
    """One file pair of the stream: where its samples start and how many it holds."""

    x_path: Path
    y_path: Path
    start: int
    n: int


class SampleStream:
    """A held-out set read chunk by chunk (module docstring); open one with `open_stream`.

    Attributes:
        folder: the stream's folder.
        kind: "npy" (a memory-mapped pair) or "npz" (shards).
        n: number of samples.
        sample_shape: shape of one sample.
    """

    def __init__(self, folder: Path, kind: StreamKind, parts: list[_Part], shape: tuple[int, ...]):
        self.folder, self.kind, self._parts = folder, kind, parts
        self.n = sum(p.n for p in parts)
        self.sample_shape = shape

    def _arrays(self, part: _Part) -> tuple[np.ndarray | _NpyFile, np.ndarray | _NpyFile]:
        if self.kind == "npy":
            return _npy(part.x_path), _npy(part.y_path)
        return _npz_member(part.x_path, "x"), _npz_member(part.y_path, "y")

    def _check(self, part: _Part, x: np.ndarray, y: np.ndarray, offset: int) -> None:
        flat = x.reshape(x.shape[0], -1)
        finite = np.isfinite(flat).all(axis=1)
        if not finite.all():
            index = part.start + offset + int(np.flatnonzero(~finite)[0])
            raise DataError(
                f"{part.x_path}: sample {index} of the stream has NaN or Inf values; "
                "expected finite numbers"
            )
        if (y < 0).any():
            index = int(np.flatnonzero(y < 0)[0])
            raise DataError(
                f"{part.y_path}: label {int(y[index])} at sample {part.start + offset + index} "
                "of the stream; expected class indices >= 0"
            )

    def chunks(self, size: int) -> Iterator[tuple[Tensor, Tensor]]:
        """The samples in order, `size` at a time (the last chunk may be shorter).

        Yields:
            (x float32 of shape (m, *sample_shape), y int64 of shape (m,)), m <= size.

        Raises:
            DataError: a sample with NaN or Inf, or a negative label (file and index named).
        """
        xs: list[np.ndarray] = []
        ys: list[np.ndarray] = []
        held = 0
        for part in self._parts:
            x_all, y_all = self._arrays(part)
            offset = 0
            while offset < part.n:
                take = min(size - held, part.n - offset)
                x = np.array(x_all[offset : offset + take], dtype=np.float32, order="C")
                y = np.asarray(y_all[offset : offset + take]).astype(np.int64)
                self._check(part, x, y, offset)
                xs.append(x)
                ys.append(y)
                held += take
                offset += take
                if held == size:
                    yield _tensors(xs, ys)
                    xs, ys, held = [], [], 0
            del x_all, y_all  # one part's arrays at a time
        if held:
            yield _tensors(xs, ys)

    def labels(self, size: int = 1 << 20) -> Iterator[np.ndarray]:
        """The labels in order (int64), `size` at a time per file: a cheap second pass."""
        for part in self._parts:
            y_all = _npy(part.y_path) if self.kind == "npy" else _npz_member(part.y_path, "y")
            for start in range(0, part.n, size):
                yield np.asarray(y_all[start : start + size]).astype(np.int64)


def _tensors(xs: list[np.ndarray], ys: list[np.ndarray]) -> tuple[Tensor, Tensor]:
    x = xs[0] if len(xs) == 1 else np.concatenate(xs)
    y = ys[0] if len(ys) == 1 else np.concatenate(ys)
    return torch.from_numpy(x), torch.from_numpy(y)


def _check_pair(
    x_path: Path, y_path: Path, x: np.ndarray | _NpyFile, y: np.ndarray | _NpyFile
) -> None:
    if x.dtype.kind not in "biuf" or x.ndim < 2 or x.shape[0] == 0:
        raise DataError(
            f"{x_path}: expected real samples of shape (n, *sample_shape) with n >= 1; found "
            f"dtype {x.dtype} shape {x.shape}"
        )
    if y.dtype.kind not in "iu" or y.shape != (x.shape[0],):
        raise DataError(
            f"{y_path}: expected {x.shape[0]} integer labels, shape ({x.shape[0]},); found "
            f"dtype {y.dtype} shape {y.shape}"
        )


def open_stream(folder: str | Path) -> SampleStream:
    """Open a stream folder (module docstring) and check its shapes and dtypes.

    Raises:
        DataError: not a folder, neither x.npy/y.npy nor .npz shards, or arrays of the wrong
            dtype or shape, or shards whose samples differ in shape (file named).
    """
    path = Path(folder).expanduser()
    if not path.is_dir():
        raise DataError(f"{path}: not a folder; a stream is a folder with x.npy and y.npy")
    if (path / "x.npy").is_file() and (path / "y.npy").is_file():
        x_file, y_file = _npy(path / "x.npy"), _npy(path / "y.npy")
        _check_pair(path / "x.npy", path / "y.npy", x_file, y_file)
        part = _Part(path / "x.npy", path / "y.npy", 0, int(x_file.shape[0]))
        return SampleStream(path, "npy", [part], tuple(int(d) for d in x_file.shape[1:]))
    shards = sorted(path.glob("*.npz"))
    if not shards:
        raise DataError(
            f"{path}: no x.npy/y.npy pair and no .npz shards; a stream folder holds one of the two"
        )
    parts, shape, start = [], None, 0
    for shard in shards:
        x, y = _npz_header(shard, "x"), _npz_header(shard, "y")
        _check_pair(shard, shard, x, y)
        found = tuple(int(d) for d in x.shape[1:])
        if shape is not None and found != shape:
            raise DataError(f"{shard}: samples of shape {found}; the earlier shards have {shape}")
        shape = found
        parts.append(_Part(shard, shard, start, int(x.shape[0])))
        start += int(x.shape[0])
    assert shape is not None
    return SampleStream(path, "npz", parts, shape)


def stream_sha256(stream: SampleStream, x_digest: hashlib._Hash) -> str:
    """Finish the stream's content hash: `x_digest` has seen every chunk's float32 bytes in
    order; the labels follow as int64. Equals `verifier.data.data_sha256` of the whole set."""
    for y in stream.labels():
        x_digest.update(np.ascontiguousarray(y, dtype="<i8").data)
    return x_digest.hexdigest()

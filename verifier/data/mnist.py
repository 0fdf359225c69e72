"""MNIST from the four gzipped idx files of the shared data folder, read in place."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path
from typing import Final

import numpy as np

from verifier.data.locations import require_file
from verifier.errors import DataError

MNIST_SPLITS: Final = ("train", "test")
_FILES: Final = {
    "train": ("mnist/train-images-idx3-ubyte.gz", "mnist/train-labels-idx1-ubyte.gz"),
    "test": ("mnist/t10k-images-idx3-ubyte.gz", "mnist/t10k-labels-idx1-ubyte.gz"),
}
_IMAGE_MAGIC: Final = 2051
_LABEL_MAGIC: Final = 2049


def _read_idx(path: Path, *, magic: int, n_dims: int) -> np.ndarray:
    """The uint8 payload of one idx file, shaped by its header."""
    try:
        with gzip.open(path, "rb") as handle:
            raw = handle.read()
    except (OSError, EOFError) as err:
        raise DataError(f"{path}: cannot decompress the idx file ({err})") from err
    header_bytes = 4 + 4 * n_dims
    if len(raw) < header_bytes:
        raise DataError(f"{path}: expected an idx header of {header_bytes} bytes; file too short")
    found_magic, *dims = struct.unpack(f">{1 + n_dims}I", raw[:header_bytes])
    if found_magic != magic:
        raise DataError(f"{path}: expected idx magic {magic:#x}; found {found_magic:#x}")
    expected = int(np.prod(dims))
    if len(raw) - header_bytes != expected:
        raise DataError(
            f"{path}: header promises {expected} bytes of data for shape {tuple(dims)}; "
            f"found {len(raw) - header_bytes}"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_bytes).reshape(dims)


def mnist_arrays(data_dir: Path, split: str) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one MNIST split.

    Args:
        data_dir: the shared data folder (holds `mnist/*.gz`).
        split: "train" (60,000 images) or "test" (10,000).

    Returns:
        x of shape (n, 1, 28, 28), float32 in [0, 1] (pixel / 255), and y of shape (n,), int64.

    Raises:
        DataError: unknown split, missing or malformed files.
    """
    if split not in MNIST_SPLITS:
        raise DataError(
            f"data set 'mnist' has no split '{split}'; known splits: {', '.join(MNIST_SPLITS)}"
        )
    image_rel, label_rel = _FILES[split]
    image_path = require_file(data_dir, image_rel, data_name="mnist")
    label_path = require_file(data_dir, label_rel, data_name="mnist")
    images = _read_idx(image_path, magic=_IMAGE_MAGIC, n_dims=3)
    labels = _read_idx(label_path, magic=_LABEL_MAGIC, n_dims=1)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"mnist {split}: {image_path.name} has {images.shape[0]} images but "
            f"{label_path.name} has {labels.shape[0]} labels"
        )
    x = (images.astype(np.float32) / np.float32(255.0))[:, None, :, :]
    return np.ascontiguousarray(x), labels.astype(np.int64)

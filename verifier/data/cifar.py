"""CIFAR-10 from the shared tar.gz of JPEGs, with a cache of the decoded arrays.

Decoding all 60,000 JPEGs takes about 10 s, so the first load writes the decoded uint8 arrays
as .npy files to `<cache dir>/cifar10-v1-<first 16 hex digits of the tar's sha256>/`; later
loads read those (well under a second). The cache is keyed by the archive's content, so a
changed archive never reads a stale cache. Files are written atomically (temporary file and
rename); a cache folder that cannot be written only costs the speed-up.

Order: inside each split, samples are sorted by class index and then by file name, so they are
grouped by class; shuffle (or take a stratified subset) before using a prefix.
"""

from __future__ import annotations

import io
import logging
import tarfile
import warnings
from pathlib import Path
from typing import Final

import numpy as np

from verifier.data.locations import require_file
from verifier.errors import DataError
from verifier.files import file_sha256, save_npy_atomic

logger = logging.getLogger(__name__)

CIFAR10_SPLITS: Final = ("train", "test")
CIFAR10_CLASSES: Final = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
ARCHIVE: Final = "cifar10/cifar10-images.tar.gz"
_CACHE_VERSION: Final = "v1"


def _decode_archive(path: Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Decode every JPEG of the archive: split -> (uint8 (n, 3, 32, 32), int64 (n,))."""
    from PIL import Image

    members: dict[str, list[tuple[int, str, bytes]]] = {split: [] for split in CIFAR10_SPLITS}
    try:
        with tarfile.open(path, "r:gz") as tar:
            for member in tar:
                if not (member.isfile() and member.name.endswith(".jpg")):
                    continue
                parts = member.name.split("/")
                if len(parts) != 3 or parts[0] not in members or parts[1] not in CIFAR10_CLASSES:
                    raise DataError(
                        f"{path}: unexpected member '{member.name}'; "
                        "expected <train|test>/<class>/<name>.jpg"
                    )
                handle = tar.extractfile(member)
                if handle is None:
                    raise DataError(f"{path}: cannot read member '{member.name}'")
                label = CIFAR10_CLASSES.index(parts[1])
                members[parts[0]].append((label, parts[2], handle.read()))
    except (tarfile.TarError, OSError, EOFError) as err:
        raise DataError(f"{path}: cannot read the CIFAR-10 archive ({err})") from err

    decoded: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split, items in members.items():
        if not items:
            raise DataError(f"{path}: no JPEG images under '{split}/'")
        items.sort(key=lambda item: (item[0], item[1]))
        x = np.empty((len(items), 32, 32, 3), dtype=np.uint8)
        for i, (label, name, payload) in enumerate(items):
            with Image.open(io.BytesIO(payload)) as image:
                pixels = np.asarray(image.convert("RGB"))
            if pixels.shape != (32, 32, 3):
                raise DataError(
                    f"{path}: {split}/{CIFAR10_CLASSES[label]}/{name}: expected a 32x32 RGB "
                    f"image; found shape {pixels.shape}"
                )
            x[i] = pixels
        y = np.array([label for label, _, _ in items], dtype=np.int64)
        decoded[split] = (np.ascontiguousarray(x.transpose(0, 3, 1, 2)), y)
    return decoded


def _read_cache(folder: Path, split: str) -> tuple[np.ndarray, np.ndarray] | None:
    x_path, y_path = folder / f"{split}_x.npy", folder / f"{split}_y.npy"
    if not (x_path.is_file() and y_path.is_file()):
        return None
    try:
        x = np.load(x_path, allow_pickle=False)
        y = np.load(y_path, allow_pickle=False)
    except (OSError, ValueError) as err:
        logger.info("ignoring unreadable CIFAR-10 cache %s: %s", folder, err)
        return None
    if (
        x.dtype != np.uint8
        or x.ndim != 4
        or x.shape[1:] != (3, 32, 32)
        or y.dtype != np.int64
        or y.shape != (x.shape[0],)
    ):
        logger.info("ignoring malformed CIFAR-10 cache %s", folder)
        return None
    return x, y


def _write_cache(folder: Path, decoded: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    try:
        for split, (x, y) in decoded.items():
            save_npy_atomic(folder / f"{split}_x.npy", x)
            save_npy_atomic(folder / f"{split}_y.npy", y)
    except OSError as err:
        warnings.warn(
            f"cannot write the CIFAR-10 cache to {folder} ({err}); the next load decodes the "
            "JPEGs again. Set LID_CACHE_DIR to a writable folder to avoid that.",
            stacklevel=3,
        )


def cifar10_arrays(data_dir: Path, split: str, cache_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """Images and labels of one CIFAR-10 split, decoded once and then read from the cache.

    Args:
        data_dir: the shared data folder (holds `cifar10/cifar10-images.tar.gz`).
        split: "train" (50,000 images) or "test" (10,000).
        cache_dir: the cache folder (see the module docstring).

    Returns:
        x of shape (n, 3, 32, 32), float32 in [0, 1] (pixel / 255), and y of shape (n,), int64
        with the class index (0 airplane ... 9 truck).

    Raises:
        DataError: unknown split, missing or unreadable archive.
    """
    if split not in CIFAR10_SPLITS:
        raise DataError(
            f"data set 'cifar10' has no split '{split}'; known splits: {', '.join(CIFAR10_SPLITS)}"
        )
    archive = require_file(data_dir, ARCHIVE, data_name="cifar10")
    folder = cache_dir / f"cifar10-{_CACHE_VERSION}-{file_sha256(archive)[:16]}"
    cached = _read_cache(folder, split)
    if cached is None:
        decoded = _decode_archive(archive)
        _write_cache(folder, decoded)
        cached = decoded[split]
    images, labels = cached
    x = images.astype(np.float32) / np.float32(255.0)
    return x, labels

"""scikit-learn's bundled 8x8 digits with a fixed, library-independent stratified split.

`load_digits` ships 1,797 greyscale images of 8x8 pixels with values 0..16. We scale them to
[0, 1] (divide by 16) and flatten each to 64 features. The split is seeded and stratified:

* per class c with count n_c, the train share is n_c * 1000 / 1797, rounded down, and the
  remaining train places go to the classes with the largest fractional parts (ties: lower
  class first), so the train split has exactly 1,000 samples and the test split 797;
* inside a class, samples are ranked by sha256(f"{seed}:{index}") of their index in
  `load_digits` order (seed 0) and the first ones go to train;
* both splits keep `load_digits` order.

Ranking by a hash rather than by a random generator keeps the split identical across numpy
and scikit-learn versions.
"""

from __future__ import annotations

import functools
import hashlib
from typing import Final

import numpy as np

from verifier.errors import DataError

DIGITS_SPLITS: Final = ("train", "test", "all")
N_TRAIN: Final = 1000
N_TEST: Final = 797
SPLIT_SEED: Final = 0


def _rank_key(index: int) -> bytes:
    return hashlib.sha256(f"{SPLIT_SEED}:{index}".encode()).digest()


def digits_train_mask(y: np.ndarray) -> np.ndarray:
    """The boolean mask of the train split over the 1,797 samples (see the module docstring)."""
    classes, counts = np.unique(y, return_counts=True)
    shares = counts * N_TRAIN / len(y)
    quota = np.floor(shares).astype(np.int64)
    short = N_TRAIN - int(quota.sum())
    fraction = shares - quota
    # stable sort on -fraction keeps the lower class first on ties
    for position in np.argsort(-fraction, kind="stable")[:short]:
        quota[position] += 1
    mask = np.zeros(len(y), dtype=bool)
    for cls, n_train in zip(classes, quota, strict=True):
        members = np.flatnonzero(y == cls)
        ranked = sorted(members.tolist(), key=_rank_key)
        mask[ranked[:n_train]] = True
    return mask


def digits_arrays(split: str) -> tuple[np.ndarray, np.ndarray]:
    """Features and labels of one split of the digits data set.

    Args:
        split: "train" (1,000 samples), "test" (797) or "all" (1,797).

    Returns:
        x of shape (n, 64), float32 in [0, 1], and y of shape (n,), int64 in 0..9.

    Raises:
        DataError: unknown split.
    """
    if split not in DIGITS_SPLITS:
        raise DataError(
            f"data set 'digits' has no split '{split}'; known splits: {', '.join(DIGITS_SPLITS)}"
        )
    x, y, train_mask = _digits_all()
    if split == "all":
        return x.copy(), y.copy()
    mask = train_mask if split == "train" else ~train_mask
    return np.ascontiguousarray(x[mask]), np.ascontiguousarray(y[mask])


@functools.cache
def _digits_all() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """All samples, labels and the train mask; cached, so callers must copy before handing out."""
    from sklearn.datasets import load_digits

    bunch = load_digits()
    x = (np.asarray(bunch.data, dtype=np.float64) / 16.0).astype(np.float32)
    y = np.asarray(bunch.target, dtype=np.int64)
    return x, y, digits_train_mask(y)

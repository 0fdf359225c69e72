"""Labelled samples as the rest of the package sees them: a `Dataset` (float32 samples, int64
labels) and the sha256 of its exact bytes, so a certificate can name the data it was computed on.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch
from torch import Tensor

from verifier.errors import DataError

if TYPE_CHECKING:
    pass


def data_sha256(x: Tensor | np.ndarray, y: Tensor | np.ndarray) -> str:
    """The content hash of a data set: sha256 of x's bytes followed by y's bytes.

    x is taken as C-ordered little-endian float32 and y as little-endian int64, exactly as a
    `Dataset` holds them; shapes are not hashed (a reshape keeps the hash).

    Args:
        x: samples, any shape, float32 values.
        y: labels, int64 values.

    Returns:
        The hex digest.
    """
    x_np = x.detach().cpu().numpy() if isinstance(x, Tensor) else x
    y_np = y.detach().cpu().numpy() if isinstance(y, Tensor) else y
    digest = hashlib.sha256()
    digest.update(np.ascontiguousarray(x_np, dtype="<f4").data)
    digest.update(np.ascontiguousarray(y_np, dtype="<i8").data)
    return digest.hexdigest()


def _as_tensor(array: Tensor | np.ndarray) -> Tensor:
    if isinstance(array, Tensor):
        return array
    if not array.flags.writeable:  # torch cannot share read-only memory
        array = array.copy()
    return torch.from_numpy(np.ascontiguousarray(array))


@dataclass(frozen=True, eq=False)
class Dataset:
    """Labelled samples for a classifier, with the hash of their exact bytes.

    Build one with `Dataset.from_arrays` (which computes the hash) or `load_dataset`.

    Attributes:
        name: the data set's name ("digits", ...) or the .npz path as given.
        split: the split's name ("train", "test", ...).
        x: samples, float32, shape (n, *input_shape), on the CPU.
        y: labels, int64, shape (n,), in [0, n_classes).
        n_classes: number of classes.
        source_sha256: `data_sha256(x, y)`.
    """

    name: str
    split: str
    x: Tensor
    y: Tensor
    n_classes: int
    source_sha256: str

    def __post_init__(self) -> None:
        if self.x.dtype != torch.float32 or self.x.dim() < 2:
            raise DataError(
                f"data set '{self.name}' [{self.split}]: x must be float32 with shape "
                f"(n, *input_shape); found {self.x.dtype} {tuple(self.x.shape)}"
            )
        if self.y.dtype != torch.int64 or self.y.shape != (self.x.shape[0],):
            raise DataError(
                f"data set '{self.name}' [{self.split}]: y must be int64 with shape "
                f"({self.x.shape[0]},); found {self.y.dtype} {tuple(self.y.shape)}"
            )

    @classmethod
    def from_arrays(
        cls,
        name: str,
        split: str,
        x: Tensor | np.ndarray,
        y: Tensor | np.ndarray,
        n_classes: int,
    ) -> Dataset:
        """A data set from samples and labels, converted to float32/int64 and hashed.

        Args:
            name: the data set's name.
            split: the split's name.
            x: samples, shape (n, *input_shape).
            y: integer labels, shape (n,).
            n_classes: number of classes.

        Returns:
            The data set, with `source_sha256` computed from the converted tensors. x and y may
            share memory with the arguments when they already have the right dtype: do not
            change those arrays afterwards.
        """
        x_t = _as_tensor(x)
        y_t = _as_tensor(y)
        x_t = x_t.detach().to(device="cpu", dtype=torch.float32).contiguous()
        y_t = y_t.detach().to(device="cpu", dtype=torch.int64).contiguous()
        return cls(name, split, x_t, y_t, n_classes, data_sha256(x_t, y_t))

    def __len__(self) -> int:
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Per-sample shape of x (no batch axis)."""
        return tuple(self.x.shape[1:])

    def subset(self, indices: Sequence[int] | Tensor | np.ndarray) -> Dataset:
        """The samples at `indices`, in that order, with a fresh hash.

        Args:
            indices: integer positions in [0, len(self)); repeats are allowed.

        Returns:
            A new data set with the same name, split and n_classes.

        Raises:
            DataError: indices not a 1-D integer sequence, or out of range.
        """
        index = torch.as_tensor(indices)
        if index.numel() == 0:
            index = index.reshape(0).to(torch.int64)
        if index.dim() != 1 or index.dtype.is_floating_point or index.dtype == torch.bool:
            raise DataError(
                f"data set '{self.name}' [{self.split}]: subset indices must be a 1-D sequence of "
                f"integers; found {index.dtype} with shape {tuple(index.shape)}"
            )
        index = index.to(torch.int64)
        bad = (index < 0) | (index >= len(self))
        if bad.any():
            position = int(torch.nonzero(bad)[0])
            raise DataError(
                f"data set '{self.name}' [{self.split}]: subset index {int(index[position])} "
                f"(position {position}) is out of range for {len(self)} samples"
            )
        return Dataset.from_arrays(
            self.name, self.split, self.x[index], self.y[index], self.n_classes
        )

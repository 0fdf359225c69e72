"""Labelled tensor data sets: the built-in ones, user .npz files, and the check against a model.

`load_dataset` is the one door for tensor data: a built-in name (`digits`, `mnist`, `cifar10`)
or a path ending in `.npz`. Every `Dataset` records the sha256 of the exact bytes it holds, so a
certificate can name the data it was computed on.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Final

import torch

from verifier.data.cifar import cifar10_arrays
from verifier.data.digits import digits_arrays
from verifier.data.locations import default_cache_dir, default_data_dir
from verifier.data.mnist import mnist_arrays
from verifier.data.npz import npz_arrays
from verifier.errors import DataError

if TYPE_CHECKING:
    from verifier.graph import Graph
from verifier.data.embeddings import cached_embeddings
from verifier.data.samples import Dataset

BUILTIN_DATASETS: Final = ("digits", "mnist", "cifar10")


_TEXT_PREFIXES: Final = ("xlmt_sentiment", "tweeteval", "hatecheck", "hatemoji")


def _unknown_name(ref: str) -> DataError:
    if ref.split("/")[0] in _TEXT_PREFIXES:
        return DataError(
            f"'{ref}' is a text corpus, not a tensor data set; embed it once with "
            f"`verifier embed {ref} --encoder minilm` and name it '{ref}@minilm'"
        )
    return DataError(
        f"unknown data set '{ref}'; known: {', '.join(BUILTIN_DATASETS)}, "
        "or a path to an .npz file with arrays x and y"
    )


def load_dataset(ref: str, *, split: str = "test", data_dir: Path | None = None) -> Dataset:
    """Load a built-in data set or a user .npz file.

    Built-in names:

    * `digits`: scikit-learn's 8x8 digits, 64 features in [0, 1]; a fixed seeded stratified
      split, "train" 1,000 / "test" 797 samples, and "all" 1,797 (see `verifier.data.digits`).
    * `mnist`: (n, 1, 28, 28) in [0, 1]; "train" 60,000 / "test" 10,000; read in place from
      `<data_dir>/mnist/*.gz`.
    * `cifar10`: (n, 3, 32, 32) in [0, 1]; "train" 50,000 / "test" 10,000; decoded from
      `<data_dir>/cifar10/cifar10-images.tar.gz` once and then cached (see
      `verifier.data.cifar`; cache folder `LID_CACHE_DIR` or `~/.cache/lid-verifier`).

    A ref ending in `.npz` is a user file: arrays `x`/`y` (the default split, also served for
    "test") and `x_<split>`/`y_<split>`; see `verifier.data.npz`.

    A ref `<source>@<encoder>` (e.g. `tweeteval/offensive@minilm`, `cifar10@efficientnet-lite0`)
    is the frozen-encoder features of a text corpus or of CIFAR-10, read from the embedding cache
    that `verifier embed` fills (see `verifier.data.embeddings`); it is never computed here.

    Args:
        ref: a built-in name or a path to an .npz file.
        split: which split to load.
        data_dir: the shared data folder; default `default_data_dir()` (env LID_DATA_DIR).

    Returns:
        The data set with its content hash.

    Raises:
        DataError: unknown name or split, missing or malformed files (one line naming the file
            or array, what was expected and what was found).
    """
    if ref.lower().endswith(".npz"):
        path = Path(ref).expanduser()
        arrays = npz_arrays(path, split)
        return Dataset.from_arrays(ref, split, arrays.x, arrays.y, arrays.n_classes)
    folder = default_data_dir() if data_dir is None else Path(data_dir)
    if "@" in ref:  # issue 11: cached encoder features, e.g. "tweeteval/offensive@minilm"
        x_np, y_np, n_classes = cached_embeddings(ref, split=split, data_dir=folder)
        return Dataset.from_arrays(ref, split, x_np, y_np, n_classes)
    if ref == "digits":
        x, y = digits_arrays(split)
    elif ref == "mnist":
        x, y = mnist_arrays(folder, split)
    elif ref == "cifar10":
        x, y = cifar10_arrays(folder, split, default_cache_dir())
    else:
        raise _unknown_name(ref)
    return Dataset.from_arrays(ref, split, x, y, 10)


def validate_for_model(data: Dataset, graph: Graph) -> Dataset:
    """Check that `data` fits the model's input and classes; reshape flat samples if needed.

    When the per-sample shape differs from `graph.input_shape` but one of the two is a flat
    vector (one dimension) of the same total size, the samples are reshaped in row-major (C)
    order, the order of `torch.flatten` and ONNX Flatten: (n, 64) data for a (1, 8, 8) input,
    or MNIST's (n, 1, 28, 28) for a 784-input MLP. The bytes, and so the hash, are unchanged.

    For a `verifier.onnx.prefix.PrefixedGraph` (a model cut at its first boxed parameter), raw
    samples are first mapped to features by the frozen prefix (cached per data set); the result
    keeps the raw data's `source_sha256`.

    Args:
        data: the data set.
        graph: the model.

    Returns:
        The data set with x of shape (n, *graph.input_shape) and n_classes = graph.n_classes.

    Raises:
        DataError: the sample shape does not fit, or a label is outside [0, graph.n_classes)
            (the message names the first bad label and its index).
    """
    # issue 11 (frozen prefix): a graph cut from a larger model maps raw samples through its
    # prefix (onnxruntime) first; samples already shaped like the cut tensor pass as features
    data = graph.prepare_data(data)
    where = f"data set '{data.name}' [{data.split}]"
    expected = tuple(graph.input_shape)
    found = data.sample_shape
    x = data.x
    if found != expected:
        flat = len(found) == 1 or len(expected) == 1
        if not (flat and math.prod(found) == math.prod(expected)):
            flat_too = "" if len(expected) == 1 else f" or a flat {math.prod(expected)}"
            raise DataError(
                f"{where}: samples have shape {found}; the model's input "
                f"'{graph.input_name}' expects {expected}{flat_too}"
            )
        x = x.reshape(len(data), *expected)
    bad = (data.y < 0) | (data.y >= graph.n_classes)
    if bad.any():
        index = int(torch.nonzero(bad)[0])
        raise DataError(
            f"{where}: label {int(data.y[index])} at index {index} is outside the model's "
            f"classes 0..{graph.n_classes - 1} ({int(bad.sum())} bad labels in all)"
        )
    if x is data.x and data.n_classes == graph.n_classes:
        return data
    return Dataset(data.name, data.split, x, data.y, graph.n_classes, data.source_sha256)

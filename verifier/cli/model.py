"""`verifier inspect`: the op graph, parameters and clean accuracy of a model."""

from __future__ import annotations

from pathlib import Path

import click

from verifier.cli.conventions import data_dir_option, emit_json, input_errors_exit_2


@click.command()
@click.argument("model_path", type=click.Path(path_type=Path))
@click.option(
    "--data", "data_ref", default=None, help="Data set name (digits, mnist, ...) or .npz."
)
@click.option("--split", default="test", show_default=True, help="Split of the data set to use.")
@data_dir_option
@click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON on stdout.")
@input_errors_exit_2
def inspect(
    model_path: Path, data_ref: str | None, split: str, data_dir: Path | None, as_json: bool
) -> None:
    """Show the op graph and parameters of MODEL_PATH and, with --data, its clean accuracy."""
    from verifier.report.inspection import inspect_model, render_inspection

    summary = inspect_model(model_path, data_ref=data_ref, split=split, data_dir=data_dir)
    if as_json:
        emit_json(summary)
    else:
        click.echo(render_inspection(summary))

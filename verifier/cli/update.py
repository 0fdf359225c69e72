"""`verifier project`: project an updated ONNX model onto one of several LIDs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click

from verifier.cli.conventions import (
    JSON_OPT,
    BadInput,
    ExitCode,
    data_dir_option,
    emit_json,
    input_errors_exit_2,
)


@click.command()
@click.argument("updated", type=click.Path(path_type=Path))
@click.option(
    "--lid",
    "lids",
    type=click.Path(path_type=Path),
    multiple=True,
    required=True,
    help="A LID file (repeat for several: checkpoints, earlier runs).",
)
@click.option(
    "-o",
    "--out",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the safe model (atomically; may be UPDATED itself).",
)
@click.option(
    "--choose",
    type=click.Choice(["closest", "size-weighted", "loss"]),
    default="closest",
    show_default=True,
    help="Rule when the update lies in none of the LIDs: Euclidean distance to the LID, that "
    "distance divided by the LID's half-diagonal, or cross-entropy after projection on --data.",
)
@click.option(
    "--base",
    "bases",
    type=click.Path(path_type=Path),
    multiple=True,
    help="The model a LID was computed for (found by sha256), when its certificate.json does "
    "not name it. Repeatable.",
)
@click.option("--data", "data_ref", default=None, help="Data set for --choose loss.")
@click.option("--split", default="test", show_default=True, help="Split of --data.")
@data_dir_option
@JSON_OPT
@click.pass_context
@input_errors_exit_2
def project(
    ctx: click.Context,
    updated: Path,
    lids: tuple[Path, ...],
    out: Path,
    choose: str,
    bases: tuple[Path, ...],
    data_ref: str | None,
    split: str,
    data_dir: Path | None,
    as_json: bool,
) -> None:
    """Make UPDATED.onnx safe: project its weights onto a LID and write the result.

    UPDATED must be the LID's network (same graph, initializer names and shapes) with any
    weights. Parameters the LID boxes are clamped into the box; all others are reset to the
    LID's model. If the weights already lie in a LID they are kept. The written file is read
    back and checked to lie in the LID (float64, exact), so the LID's certificate applies.
    Exit 0 when that certificate holds (or none was found), 1 when it does not, 2 on bad input.
    """
    from verifier.update.onnx_projection import project_model

    if data_ref is not None and choose != "loss":
        raise BadInput("--data is only used with --choose loss")
    data = None
    if data_ref is not None:
        from verifier.data import load_dataset

        data = load_dataset(data_ref, split=split, data_dir=data_dir)
    result = project_model(
        updated,
        list(lids),
        out,
        rule=choose,  # type: ignore[arg-type]
        bases=list(bases),
        data=data,
    )
    doc = result.to_json()
    if as_json:
        emit_json(doc)
    else:
        click.echo(render_projection(doc))
    ctx.exit(ExitCode.SPEC_NOT_MET if doc["verdict"] == "not met" else ExitCode.OK)


def render_projection(doc: dict[str, Any]) -> str:
    """A short human summary of a projection document."""
    chosen, moved, cert = doc["chosen"], doc["moved"], doc["certificate"]
    lines = [f"verdict: {doc['verdict']}"]
    if doc["kept"]:
        lines.append(f"the update already lies in LID {chosen['lid']}: weights kept")
    else:
        how = "" if len(doc["candidates"]) == 1 else f", chosen by rule '{doc['rule']}'"
        lines.append(
            f"projected onto LID {chosen['lid']}{how}: moved {moved['distance']:.4g} (L2), "
            f"clipped {moved['n_clipped']}/{moved['n_boxed']} "
            f"({moved['fraction_clipped']:.2%}) boxed parameters"
        )
    if len(doc["candidates"]) > 1:
        for c in doc["candidates"]:
            loss = "" if c["loss"] is None else f", loss {c['loss']:.4g}"
            mark = "*" if c["index"] == chosen["index"] else " "
            lines.append(
                f" {mark} #{c['index']} {c['lid']}: inside {c['inside']}, distance "
                f"{c['distance']:.4g}, size {c['size']:.4g}, score {c['score']:.4g}{loss}"
            )
    lines.append(f"{'tensor':<24} {'boxed':>5} {'n':>8} {'changed':>8} {'L2':>10} {'max|d|':>10}")
    for t in doc["tensors"]:
        lines.append(
            f"{t['name']:<24} {'yes' if t['boxed'] else 'reset':>5} {t['n']:>8} "
            f"{t['fraction_changed']:>8.2%} {t['l2']:>10.4g} {t['max_abs']:>10.4g}"
        )
    applies = "; the LID's certificate applies" if cert["tasks"] else ""
    lines.append(f"inside the LID: checked on the written file in float64 (exact){applies}")
    if cert["path"] is not None:
        lines.append(f"certificate: {cert['path']} (sha256 {cert['sha256']})")
    elif cert["tasks"]:
        lines.append("certificate: the one stored in the LID file's metadata")
    else:
        lines.append("certificate: none found beside or inside the LID file")
    if cert["note"]:
        lines.append(f"  note: {cert['note']}")
    for task in cert["tasks"]:
        lines.append(
            f"  task {task['task']}: {task['metric']} >= {task['lower_bound']:.4f} "
            f"({task['bound_kind']}, beta={task['beta']}, certified {task['k']}/{task['n']}), "
            f"target {task['target']:.4f} -> {'holds' if task['holds'] else 'NOT MET'}"
        )
    lines.append(f"written: {doc['output']['path']} (sha256 {doc['output']['sha256']})")
    return "\n".join(lines)

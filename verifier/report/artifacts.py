"""The output folder of a run (OUT/): its file names and reading them with clear errors.

A run writes `lid.safetensors`, `history.jsonl` and `certificate.json`; `verifier crosscheck`
adds `crosscheck.json`; `verifier report` writes `report.html` (and `report.pdf`). This module
is the one place that knows those names. Reading functions raise `InputError` subclasses with
one line naming the file, so the CLI can turn them into exit code 2.

A folder may have moved since the run (issue 23): `find_model` and `locate_spec` find the files
a certificate names from the certificate's own folder (the paths it records are relative to
it), and, for a model, by its sha256 among the .onnx files beside the folder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

from verifier.errors import InputError
from verifier.files import file_sha256
from verifier.spec import DataSection, Spec, resolve_paths

CERTIFICATE_FILE: Final = "certificate.json"
LID_FILE: Final = "lid.safetensors"
HISTORY_FILE: Final = "history.jsonl"
CROSSCHECK_FILE: Final = "crosscheck.json"
REPORT_FILE: Final = "report.html"
PDF_FILE: Final = "report.pdf"


class ArtifactError(InputError):
    """An output folder or one of its files is missing, unreadable or malformed."""


def check_out_dir(out_dir: Path) -> Path:
    """The certificate path of an output folder, after checking that both exist.

    Raises:
        ArtifactError: the folder or its certificate.json is missing.
    """
    if not out_dir.exists():
        raise ArtifactError(f"{out_dir}: no such folder")
    if not out_dir.is_dir():
        raise ArtifactError(f"{out_dir}: not a folder (expected a run's output folder)")
    path = out_dir / CERTIFICATE_FILE
    if not path.is_file():
        raise ArtifactError(
            f"{path}: missing; expected the output folder of `verifier run` or `verifier lid`"
        )
    return path


def _json_problem(err: BaseException) -> str:
    if isinstance(err, RecursionError):
        return "nested too deeply"
    return " ".join(str(err).split())[:160]


def read_json_object(path: Path) -> dict[str, Any]:
    """Decode a JSON file whose top level is an object.

    Raises:
        ArtifactError: unreadable, not JSON, or not an object at the top level.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    try:
        document = json.loads(text)
    except json.JSONDecodeError as err:
        raise ArtifactError(
            f"{path}: not valid JSON at line {err.lineno}, column {err.colno}: {err.msg}"
        ) from None
    except (ValueError, RecursionError) as err:  # a 5000-digit number, nesting too deep
        raise ArtifactError(f"{path}: not readable JSON ({_json_problem(err)})") from None
    if not isinstance(document, dict):
        raise ArtifactError(f"{path}: expected a JSON object at the top level")
    return document


def load_certificate(out_dir: Path) -> dict[str, Any]:
    """The decoded certificate.json of an output folder (structure not yet checked).

    Raises:
        ArtifactError: missing folder or file, or malformed JSON.
    """
    return read_json_object(check_out_dir(out_dir))


def load_history(out_dir: Path) -> list[dict[str, Any]]:
    """The per-iteration search log (history.jsonl), or [] when the file is absent.

    Raises:
        ArtifactError: a line is not a JSON object.
    """
    path = out_dir / HISTORY_FILE
    if not path.is_file():
        return []
    steps = []
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise ArtifactError(f"{path}: cannot be read ({err.__class__.__name__})") from None
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path}: line {number} is not valid JSON: {err.msg}") from None
        except (ValueError, RecursionError) as err:
            raise ArtifactError(f"{path}: line {number}: {_json_problem(err)}") from None
        if not isinstance(step, dict):
            raise ArtifactError(f"{path}: line {number} is not a JSON object")
        steps.append(step)
    return steps


def load_crosscheck(out_dir: Path) -> dict[str, Any] | None:
    """The decoded crosscheck.json, or None when no cross-check was run.

    Raises:
        ArtifactError: the file exists but is malformed JSON.
    """
    path = out_dir / CROSSCHECK_FILE
    return read_json_object(path) if path.is_file() else None


MAX_MODEL_CANDIDATES: Final = 64
"""At most this many .onnx files beside an output folder are hashed when looking for its model."""


@dataclass(frozen=True)
class FoundModel:
    """A certificate's model: `path` and its `sha256` (None when not found, `problem` says why),
    and a `note` when it is not the file at the recorded path."""

    path: Path | None
    sha256: str | None
    problem: str | None = None
    note: str | None = None


def find_model(out_dir: Path, recorded: str, sha256: str, *, given: Path | None) -> FoundModel:
    """The model a certificate names: `given` (it must have the recorded sha256), else the
    recorded path (relative to the certificate's folder, or absolute in schema version 2), else
    the first .onnx file in the folder or its parent whose sha256 is the recorded one.

    Args:
        out_dir: the certificate's folder.
        recorded: the certificate's `model.path`.
        sha256: the certificate's `model.sha256`.
        given: the model the user named (`verify --model`), or None.

    Returns:
        The model found, or a `problem` in one line. A file at the recorded path is returned
        whatever its hash (a changed model is then reported by the hash check).
    """
    path = (out_dir / recorded).resolve()
    if given is not None:
        note = None if given.resolve() == path else f"using --model {given} (recorded: {path})"
        if not given.is_file():
            return FoundModel(None, None, f"{given}: --model file not found", note)
        found = file_sha256(given)
        if found != sha256:
            return FoundModel(
                None,
                None,
                f"--model {given} is not the model of this certificate: its sha256 is {found}; "
                f"{CERTIFICATE_FILE} model.sha256 records {sha256}",
                note,
            )
        return FoundModel(given, found, None, note)
    if path.is_file():
        return FoundModel(path, file_sha256(path))
    folders = [out_dir, out_dir.parent] if out_dir.resolve() != out_dir.parent.resolve() else []
    candidates = sorted(p for folder in folders for p in folder.glob("*.onnx") if p.is_file())
    for candidate in candidates[:MAX_MODEL_CANDIDATES]:
        if file_sha256(candidate) == sha256:
            note = f"using {candidate}, found by its sha256 (recorded path {path} is missing)"
            return FoundModel(candidate, sha256, None, note)
    return FoundModel(
        None,
        None,
        f"{path}: model file not found, and no .onnx file in {out_dir} or its parent folder has "
        f"the recorded sha256 {sha256[:16]}...; pass --model PATH",
    )


def _locate_data(data: DataSection | None, out_dir: Path, notes: list[str]) -> DataSection | None:
    if data is None:
        return None
    updates: dict[str, Any] = {}
    name = Path(data.name)
    if data.name.endswith(".npz") and not name.is_file() and (out_dir / name.name).is_file():
        updates["name"] = str(out_dir / name.name)
        notes.append(f"data {name} not found; using {out_dir / name.name} (same file name)")
    if data.data_dir is not None and not Path(data.data_dir).is_dir():
        updates["data_dir"] = None
        notes.append(f"data folder {data.data_dir} not found; using the default data folder")
    return data.model_copy(update=updates) if updates else data


def locate_spec(recorded: Spec, out_dir: Path) -> tuple[Spec, list[str]]:
    """The spec a certificate records, its paths resolved against the certificate's folder.

    An .npz that is not at its recorded path but lies in the folder under its file name is used
    from there, and a data folder that does not exist here gives way to the default one (the
    data's sha256, recorded per task, still decides); each such change adds a note.

    Returns:
        The spec with absolute paths, and the notes.
    """
    spec = resolve_paths(recorded, out_dir)
    notes: list[str] = []
    tasks = tuple(
        t.model_copy(update={"data": _locate_data(t.data, out_dir, notes)}) for t in spec.tasks
    )
    importance = spec.search.importance
    importance = importance.model_copy(
        update={"lookahead": _locate_data(importance.lookahead, out_dir, notes)}
    )
    located = spec.model_copy(
        update={
            "data": _locate_data(spec.data, out_dir, notes),
            "tasks": tasks,
            "search": spec.search.model_copy(update={"importance": importance}),
        }
    )
    return located, notes

"""The output folder of a run (OUT/): its file names and reading them with clear errors.

A run writes `lid.safetensors`, `history.jsonl` and `certificate.json`; `verifier crosscheck`
adds `crosscheck.json`; `verifier report` writes `report.html` (and `report.pdf`). This module
is the one place that knows those names. Reading functions raise `InputError` subclasses with
one line naming the file, so the CLI can turn them into exit code 2.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Final

from verifier.errors import InputError

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
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            step = json.loads(line)
        except json.JSONDecodeError as err:
            raise ArtifactError(f"{path}: line {number} is not valid JSON: {err.msg}") from None
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

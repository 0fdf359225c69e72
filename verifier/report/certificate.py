"""The certificate document (certificate.json), its JSON Schema and the cross-check section.

`build_certificate` turns what a run produced into the document; `task_entry` and `lid_entry`
are the parts that `verifier verify` recomputes from the artifacts and compares field by field.
The layout is pinned by `certificate.schema.json` beside this module (schema version 3).

An output folder is relocatable (issue 23): from version 3 on, every path the certificate
records (the model, the LID, the working directory, the paths in the normalised spec) is
relative to the certificate's own folder, so the recorded spec reads like a spec file saved
there, and `spec_sha256` is the hash of that recorded spec. Version 2 recorded absolute paths;
`resolve_recorded` reads both.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Final, Literal

import torch

from verifier.certify import TaskCertificate
from verifier.domains.box import Box, width_summary
from verifier.domains.zonotope import Zonotope
from verifier.files import file_sha256, write_text_atomic
from verifier.report.artifacts import (
    CERTIFICATE_FILE,
    CROSSCHECK_FILE,
    HISTORY_FILE,
    ArtifactError,
    load_certificate,
    load_crosscheck,
)
from verifier.search import SearchResult
from verifier.spec import DataSection, Spec, map_paths, spec_hash

if TYPE_CHECKING:
    from verifier.pipeline import PreparedTask

SCHEMA_VERSION: Final = "3"
READABLE_SCHEMA_VERSIONS: Final = ("2", "3")
"""Versions `verifier verify` and `verifier report` read (2: paths absolute; 3: relative)."""
SCHEMA_RESOURCE: Final = "certificate.schema.json"

STATEMENT: Final = (
    "With probability at least 1 - beta over the draw of the held-out certification sample "
    "(i.i.d. from the data distribution), every network whose parameters lie in the LID has "
    "the task's metric at least lower_bound."
)
ASSUMPTIONS: Final = (
    "The certification samples are drawn i.i.d. from the distribution the model is deployed "
    "on, and were never used to build the LID (their sha256 is recorded per task).",
    "Confidence 1 - beta: the statement fails for at most a fraction beta of the possible "
    "draws of the certification sample.",
    "The bound method is sound: for every weight vector in the LID and every certified sample, "
    "the true margin is at least the computed lower bound (exact interval arithmetic for ibp "
    "and midrad, linear bounds back-substituted over the box for linear, the tighter of the two "
    "per sample and class for best, and for bab the better of best and branch and bound over "
    "ReLU splits, the minimum over a partition of the box; auto_LiRPA's CROWN-IBP is trusted "
    "for crown-ibp).",
    "Proofs are computed in float64 and a sample counts as certified only when each margin "
    "bound exceeds its propagated float64 rounding allowance; the statement concerns the "
    "network evaluated in exact arithmetic (float32 inference rounding is not covered).",
    "Samples whose bounds are NaN or Inf count as not certified (n_nonfinite per task).",
)
ROUNDING_ALLOWANCE: Final = (
    "float64 interval propagation with a bound on the float64 rounding error of every entry "
    "(Higham's gamma_n per layer, verifier/bounds/ibp.py) or of the linear bounds' products "
    "(verifier/bounds/linear.py); a margin counts only above it. auto_LiRPA bounds get 1000 "
    "times the interval pass's allowance plus 1e-9."
)
CrosscheckStatus = Literal["absent", "attached", "unchanged", "stale"]


@functools.cache
def load_schema() -> dict[str, Any]:
    """The certificate's JSON Schema (draft 2020-12), shipped as package data."""
    text = resources.files("verifier.report").joinpath(SCHEMA_RESOURCE).read_text("utf-8")
    schema: dict[str, Any] = json.loads(text)
    return schema


def _json_path(parts: Sequence[str | int]) -> str:
    out = ""
    for part in parts:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out or "(top level)"


def schema_errors(document: Any, *, definition: str | None = None) -> list[str]:
    """Schema violations of a document, each `at <path>: <message>`, sorted by path.

    Args:
        document: the decoded JSON.
        definition: check against `$defs/<definition>` of the schema instead of the whole.

    Returns:
        The messages; empty when the document is valid.
    """
    from jsonschema import Draft202012Validator

    schema = load_schema()
    if definition is not None:
        schema = {"$defs": schema["$defs"], "$ref": f"#/$defs/{definition}"}
    validator = Draft202012Validator(schema)
    errors = sorted(validator.iter_errors(document), key=lambda e: [str(p) for p in e.path])
    return [f"at {_json_path(list(e.absolute_path))}: {e.message}" for e in errors]


def relative_path(path: str | Path, folder: Path) -> str:
    """`path` relative to `folder` (POSIX separators), as certificates record paths.

    A relative `path` is kept as given; one on another drive (Windows) stays absolute.
    """
    target = Path(path)
    if not target.is_absolute():
        return target.as_posix()
    try:
        return Path(os.path.relpath(target, folder.resolve())).as_posix()
    except ValueError:
        return str(target)


def resolve_recorded(recorded: str, folder: Path) -> Path:
    """A path recorded in a certificate, resolved against the certificate's folder (absolute
    paths, as schema version 2 recorded them, stay as they are)."""
    return folder / recorded


def portable_spec(spec: Spec, folder: Path) -> Spec:
    """The spec with its paths relative to `folder`: the spec as a file saved there would read.

    The inverse of `verifier.spec.resolve_paths`: `resolve_paths(portable_spec(s, f), f)`
    names the same files as `s` (whose paths are absolute, as `load_spec` makes them).
    """
    return map_paths(spec, lambda value: relative_path(value, folder))


def software_extras() -> dict[str, str]:
    """Versions of numpy and scipy (scipy computes the Clopper-Pearson bound)."""
    from importlib.metadata import version

    return {"numpy": version("numpy"), "scipy": version("scipy")}


def lid_entry(domain: Box | Zonotope, lid_path: Path, content_sha256: str) -> dict[str, Any]:
    """The `lid` section: file, hashes and size statistics (mean and total width per tensor).

    For a zonotope the widths are those of its interval hull (sizes only; the hull is a
    superset of the LID), and the section adds k (`n_generators`), a summary of the
    generators' Euclidean norms and the isotropic width (`Zonotope.size("isotropic_width")`).

    Args:
        domain: the LID as saved (a `Box` or a `Zonotope`).
        lid_path: where it was saved (recorded by file name: the certificate lies beside it).
        content_sha256: the content hash stored in the LID file's metadata.
    """
    widths = width_summary(domain)
    entry: dict[str, Any] = {
        "file": lid_path.name,
        "path": lid_path.name,
        "sha256": file_sha256(lid_path),
        "content_sha256": content_sha256,
        "domain": "zonotope" if isinstance(domain, Zonotope) else "box",
        "n_parameters": domain.n_parameters(),
        "mean_width": domain.size("mean_width"),
        "mean_log_width": domain.size("mean_log_width"),
        "total_width": sum(w["total_width"] for w in widths.values()),
        "per_tensor": widths,
    }
    if isinstance(domain, Zonotope):
        entry["n_generators"] = domain.n_generators
        entry["generator_norms"] = generator_norm_summary(domain)
        entry["isotropic_width"] = domain.size("isotropic_width")
    return entry


def generator_norm_summary(zonotope: Zonotope) -> dict[str, float]:
    """min, mean, max and total of the generators' Euclidean norms over all parameters, in
    float64 (all 0 when k = 0)."""
    k = zonotope.n_generators
    if k == 0:
        return {"min": 0.0, "mean": 0.0, "max": 0.0, "total": 0.0}
    squares = torch.zeros(k, dtype=torch.float64)
    for g in zonotope.generators.values():
        squares += g.detach().to("cpu", torch.float64).flatten(start_dim=1).pow(2).sum(dim=1)
    norms = squares.sqrt()
    return {
        "min": float(norms.min()),
        "mean": float(norms.mean()),
        "max": float(norms.max()),
        "total": float(norms.sum()),
    }


def lid_content_sha256(lid_path: Path) -> str:
    """The content hash recorded in a LID file's metadata (no tensor is loaded)."""
    from safetensors import safe_open

    with safe_open(str(lid_path), framework="pt") as handle:
        return str((handle.metadata() or {}).get("content_sha256", ""))


def task_entry(task: PreparedTask, cert: TaskCertificate, data: DataSection) -> dict[str, Any]:
    """One task's certificate with its data hashes and sizes.

    Args:
        task: the prepared task (targets, data parts and their hashes).
        cert: its held-out certificate.
        data: the data section it was drawn from (the task's own or the spec's).
    """
    return {
        **cert.to_json(),
        "certified_fraction": cert.k / cert.n if cert.n else 0.0,
        "clean_metric": task.clean,
        "search_target": task.search_target,
        "n_optimisation": int(task.search.x.shape[0] + task.search.x_val.shape[0]),
        "optimisation_data_sha256": task.opt_sha256,
        "certification_data_sha256": task.cert_sha256,
        "data": {"name": data.name, "split": data.split, "classes": data.classes},
    }


def search_entry(result: SearchResult, history_path: Path, seconds: float) -> dict[str, Any]:
    """The `search` section: how the LID was chosen, checkpoints, and the history file's hash."""
    last = result.history[-1] if result.history else None
    return {
        "iterations": len(result.history),
        "chosen": result.chosen,
        "optimisation_hard_metric": list(result.hard),
        "feasible_on_optimisation_data": result.feasible,
        "checkpoints": [
            {"iteration": c.iteration, "hard": list(c.hard), "mean_width": c.mean_width}
            for c in result.checkpoints
        ],
        "final_step": None
        if last is None
        else {
            "iteration": last.iteration,
            "mean_width": last.mean_width,
            "soft": list(last.soft),
            "hard": list(last.hard),
            "lam": list(last.lam),
        },
        "history_file": history_path.name,
        "history_sha256": file_sha256(history_path) if history_path.is_file() else None,
        "seconds": seconds,
    }


def crosscheck_entry(
    out_dir: Path, *, model_sha256: str, lid_sha256: str
) -> tuple[dict[str, Any] | None, CrosscheckStatus]:
    """The `crosscheck` section from OUT/crosscheck.json, when present and for this LID.

    Returns:
        (section, "attached"), or (None, "absent") without the file, or (None, "stale") when
        it was computed for another model or LID file.

    Raises:
        ArtifactError: the file is malformed or lacks a required key.
    """
    document = load_crosscheck(out_dir)
    if document is None:
        return None, "absent"
    errors = schema_errors(document, definition="crosscheck_file")
    if errors:
        raise ArtifactError(f"{out_dir / CROSSCHECK_FILE}: {errors[0]}")
    if document["model_sha256"] != model_sha256 or document["lid_sha256"] != lid_sha256:
        return None, "stale"
    return {
        "file": CROSSCHECK_FILE,
        "sha256": file_sha256(out_dir / CROSSCHECK_FILE),
        "schema_version": document["schema_version"],
        "model_sha256": document["model_sha256"],
        "lid_sha256": document["lid_sha256"],
        "summary": document["summary"],
    }, "attached"


def build_certificate(
    *,
    spec: Spec,
    model_path: Path,
    model_sha: str,
    lid_path: Path,
    box: Box | Zonotope,
    tasks: Sequence[PreparedTask],
    certificates: Sequence[TaskCertificate],
    result: SearchResult,
    seconds: float,
    command: str,
    software: Mapping[str, str],
) -> dict[str, Any]:
    """The certificate document (schema version 3) of a run whose LID is saved at lid_path.

    The history (history.jsonl) and, when present and matching, crosscheck.json are read from
    the LID's folder. Paths are recorded relative to that folder (`portable_spec`), and
    `spec_sha256` is the hash of the spec so recorded.

    Args:
        spec: the normalised spec.
        model_path: the ONNX model.
        model_sha: its sha256.
        lid_path: the saved LID file.
        box: the LID (a `Box` or a `Zonotope`).
        tasks: the prepared tasks, in spec order.
        certificates: their held-out certificates.
        result: the search result.
        seconds: wall time of the run so far.
        command: the command line that produced the run.
        software: versions of ours, torch, onnx, auto_LiRPA, python.

    Returns:
        The JSON-able document.
    """
    out_dir = lid_path.parent
    recorded_spec = portable_spec(spec, out_dir)
    holds = all(c.holds for c in certificates)
    lid = lid_entry(box, lid_path, lid_content_sha256(lid_path))
    crosscheck, _ = crosscheck_entry(out_dir, model_sha256=model_sha, lid_sha256=lid["sha256"])
    return {
        "schema_version": SCHEMA_VERSION,
        "verdict": "holds" if holds else "not met",
        "holds": holds,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "software": {**software, **software_extras()},
        "command": command,
        "working_directory": relative_path(Path.cwd(), out_dir),
        "model": {"path": relative_path(model_path.resolve(), out_dir), "sha256": model_sha},
        "lid": lid,
        "spec": recorded_spec.model_dump(mode="json"),
        "spec_sha256": spec_hash(recorded_spec),
        "proof": {
            "method": spec.certify.method,
            "bound_kind": spec.certify.bound,
            "beta": spec.certify.beta,
            "arithmetic": "float64",
            "rounding_allowance": ROUNDING_ALLOWANCE,
        },
        "statement": STATEMENT,
        "assumptions": list(ASSUMPTIONS),
        "tasks": [
            task_entry(task, cert, section.data or recorded_spec.data)
            for task, cert, section in zip(tasks, certificates, recorded_spec.tasks, strict=True)
        ],
        "search": search_entry(result, out_dir / HISTORY_FILE, seconds),
        "crosscheck": crosscheck,
    }


def attach_crosscheck(out_dir: Path) -> CrosscheckStatus:
    """Fold OUT/crosscheck.json into the `crosscheck` section of OUT/certificate.json.

    The certificate is rewritten (atomically) only when the section changes. A cross-check of
    another model or LID file ("stale") is left out.

    Returns:
        "attached" (section written), "unchanged", "absent" (no crosscheck.json) or "stale".

    Raises:
        ArtifactError: missing or malformed certificate.json or crosscheck.json.
    """
    document = load_certificate(out_dir)
    try:
        model_sha, lid_sha = document["model"]["sha256"], document["lid"]["sha256"]
    except (KeyError, TypeError):
        raise ArtifactError(
            f"{out_dir / CERTIFICATE_FILE}: lacks model.sha256 or lid.sha256"
        ) from None
    entry, status = crosscheck_entry(out_dir, model_sha256=model_sha, lid_sha256=lid_sha)
    if status != "attached":
        return status
    if document.get("crosscheck") == entry:
        return "unchanged"
    document["crosscheck"] = entry
    write_text_atomic(out_dir / CERTIFICATE_FILE, json.dumps(document, indent=2) + "\n")
    return "attached"

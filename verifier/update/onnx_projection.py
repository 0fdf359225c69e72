"""`verifier project`: make an updated ONNX model safe by projecting it onto a LID.

For each LID the model it was computed for (its *base*) is found: a `--base` file or the model
named by the LID's certificate.json, in either case only when its sha256 is the one the LID
records. The updated model must be the same network as the base (`compatibility`), holding
every boxed parameter with the LID's shape. The update is projected onto each LID (boxed
tensors clamped into a box LID, or projected jointly onto a zonotope LID; every other float
tensor reset to the base's value, since the certificate is about that network), one LID is kept
or chosen (`selection`), and the base model is written with the projected values. Before the
file is renamed into place it is read back and every boxed value is checked to lie in the LID,
in float64, exactly; every other tensor must equal the base's and the graph must be the base's.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from verifier.data import Dataset, validate_for_model
from verifier.domains.box import Box
from verifier.domains.io import LidFile, check_lid_matches, load_lid
from verifier.domains.zonotope import Zonotope
from verifier.errors import DataError, DomainError, GraphError, SoundnessError
from verifier.files import file_sha256
from verifier.onnx.export import save_with_parameters
from verifier.onnx.importer import check_model, load_graph, read_model
from verifier.update.compatibility import StoredTensor, stored_tensors, structure_difference
from verifier.update.projection import Projection, project_parameters, representable_box
from verifier.update.selection import Rule, Selection, cross_entropy, select_lid


@dataclass(frozen=True)
class CertificateInfo:
    """The certificate that applies to a LID.

    Attributes:
        path: the certificate.json beside the LID, or None when read from the LID's metadata.
        sha256: sha256 of that file (None for metadata).
        verdict: "holds", "not met", or "unknown" (no certificate found).
        tasks: per task: task, metric, target, k, n, beta, bound_kind, lower_bound, holds.
        note: why certificate.json was not used, if it was not.
    """

    path: str | None
    sha256: str | None
    verdict: str
    tasks: tuple[dict[str, Any], ...]
    note: str | None = None


_TASK_KEYS = ("task", "metric", "target", "k", "n", "beta", "bound_kind", "lower_bound", "holds")


def find_certificate(lid_path: Path, lid: LidFile) -> CertificateInfo:
    """certificate.json beside the LID when it names this LID file (by sha256), else the
    certificate stored in the LID's metadata."""
    note = None
    cert_path = lid_path.parent / "certificate.json"
    if cert_path.is_file():
        try:
            doc = json.loads(cert_path.read_text(encoding="utf-8"))
            named = doc["lid"]["sha256"]
            tasks = [{k: t.get(k) for k in _TASK_KEYS} for t in doc["tasks"]]
            _check_tasks(tasks)
        except (ValueError, KeyError, TypeError, AttributeError, RecursionError):
            note = f"{cert_path} is not a readable certificate"
        else:
            if named == file_sha256(lid_path):
                return CertificateInfo(
                    str(cert_path), file_sha256(cert_path), _verdict(tasks), tuple(tasks)
                )
            note = f"{cert_path} belongs to another LID file (sha256 differs)"
    try:
        stored = json.loads(lid.metadata.get("certificate", "[]"))
        tasks = [{k: t.get(k) for k in _TASK_KEYS} for t in stored]
        _check_tasks(tasks)
    except (ValueError, AttributeError, TypeError, RecursionError):
        tasks = []
        note = note or f"{lid_path}: the certificate in its metadata is malformed"
    return CertificateInfo(None, None, _verdict(tasks), tuple(tasks), note)


def _check_tasks(tasks: Sequence[dict[str, Any]]) -> None:
    """Raise TypeError unless every task entry has the types a report prints (issue 23)."""
    for task in tasks:
        numbers = [task[k] for k in ("target", "beta", "lower_bound")]
        counts = [task[k] for k in ("k", "n")]
        if not all(isinstance(v, int | float) and not isinstance(v, bool) for v in numbers):
            raise TypeError("target, beta and lower_bound must be numbers")
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in counts):
            raise TypeError("k and n must be integers")
        if not isinstance(task["holds"], bool):
            raise TypeError("holds must be true or false")


def _verdict(tasks: Sequence[dict[str, Any]]) -> str:
    if not tasks:
        return "unknown"
    return "holds" if all(t.get("holds") is True for t in tasks) else "not met"


def locate_base(lid_path: Path, lid: LidFile, bases: Sequence[Path], updated: Path) -> Path:
    """The model file a LID was computed for, recognised by the sha256 the LID records.

    Looks at `bases`, then the model named in certificate.json beside the LID, then the updated
    model itself. A LID that records no model hash accepts a single `bases` entry.

    Raises:
        DomainError: no candidate file has the LID's model hash.
    """
    want = lid.model_sha256
    if not want:
        if len(bases) == 1:
            return bases[0]
        raise DomainError(
            f"{lid_path}: the LID records no model sha256; pass exactly one --base MODEL.onnx "
            "(the model it was computed for)"
        )
    candidates = list(bases)
    cert_path = lid_path.parent / "certificate.json"
    with contextlib.suppress(ValueError, KeyError, TypeError, OSError):
        named = Path(json.loads(cert_path.read_text(encoding="utf-8"))["model"]["path"])
        candidates += [named, lid_path.parent / named]
    candidates.append(updated)
    for path in candidates:
        if path.is_file() and file_sha256(path) == want:
            return path
    raise DomainError(
        f"{lid_path}: cannot find the model the LID was computed for (sha256 {want[:16]}...); "
        "pass it with --base MODEL.onnx"
    )


@dataclass(frozen=True, eq=False)
class Candidate:
    """One LID with everything needed to project onto it."""

    path: Path
    lid: LidFile
    base: Path
    certificate: CertificateInfo
    projection: Projection


@dataclass(frozen=True, eq=False)
class ModelProjection:
    """The result of `project_model`."""

    updated: Path
    out: Path
    out_sha256: str
    candidates: tuple[Candidate, ...]
    selection: Selection

    @property
    def chosen(self) -> Candidate:
        """The LID the written model lies in."""
        return self.candidates[self.selection.index]

    @property
    def verdict(self) -> str:
        """ "holds", "not met" or "unknown": the chosen LID's certificate verdict."""
        return self.chosen.certificate.verdict

    def to_json(self) -> dict[str, Any]:
        """A JSON-able document (the `--json` output)."""
        chosen = self.chosen
        proj = chosen.projection
        return {
            "verdict": self.verdict,
            "inside_lid": True,
            "membership_check": "every boxed value of the written file lies in the LID "
            "(float64, exact); every other tensor and the graph equal the LID's model",
            "updated": {"path": str(self.updated), "sha256": file_sha256(self.updated)},
            "output": {"path": str(self.out), "sha256": self.out_sha256},
            "kept": self.selection.kept,
            "rule": self.selection.rule,
            "chosen": {
                "index": self.selection.index,
                "lid": str(chosen.path),
                "lid_sha256": file_sha256(chosen.path),
                "base_model": str(chosen.base),
                "base_model_sha256": chosen.lid.model_sha256 or file_sha256(chosen.base),
            },
            "certificate": asdict(chosen.certificate),
            "moved": {
                "distance": proj.distance,
                "n_boxed": proj.n_boxed,
                "n_clipped": proj.n_clipped,
                "fraction_clipped": proj.n_clipped / proj.n_boxed if proj.n_boxed else 0.0,
            },
            "tensors": [{**asdict(m), "fraction_changed": m.fraction_changed} for m in proj.moves],
            "candidates": [
                {
                    **asdict(score),
                    "lid": str(c.path),
                    "verdict": c.certificate.verdict,
                }
                for score, c in zip(self.selection.candidates, self.candidates, strict=True)
            ],
        }


def project_model(
    updated: Path,
    lids: Sequence[Path],
    out: Path,
    *,
    rule: Rule = "closest",
    bases: Sequence[Path] = (),
    data: Dataset | None = None,
) -> ModelProjection:
    """Project the weights of an updated ONNX model onto a LID and write the safe model.

    Args:
        updated: the updated (fine-tuned) model, same graph as the LIDs' model.
        lids: one or more LID files.
        out: where to write the safe model (atomically; may equal `updated`).
        rule: how to choose among several LIDs when the update lies in none.
        bases: model files the LIDs were computed for, when certificate.json does not name them.
        data: the batch for the loss rule.

    Returns:
        What was chosen, moved and written.

    Raises:
        GraphError: a model is missing, unreadable, or has NaN/Inf weights.
        DomainError: a LID is unreadable, its model cannot be found, or the updated model is
            not that network (other graph, initializer names or shapes).
        DataError: the loss rule without data, or data that do not fit the model.
        SoundnessError: the written file failed the membership check (a bug; nothing written).
    """
    if not lids:
        raise DomainError("give at least one LID file")
    if rule == "loss" and data is None:
        raise DataError("--choose loss needs a data batch: give --data (and --split)")
    for base in bases:
        if not Path(base).is_file():
            raise GraphError(
                f"--base {base}: no such file; give the model the LID was computed for"
            )
    updated_model = read_model(updated)
    check_model(updated_model, updated)
    theta = stored_tensors(updated_model, source=updated)
    values = {n: s.value for n, s in theta.items()}
    models: dict[Path, Any] = {}
    candidates = []
    for lid_path in lids:
        lid = load_lid(lid_path)
        base = locate_base(lid_path, lid, bases, updated)
        if base not in models:
            model = read_model(base)
            models[base] = (model, stored_tensors(model, source=base))
        base_model, base_tensors = models[base]
        check_lid_matches(lid, {n: s.value for n, s in base_tensors.items()}, source=str(lid_path))
        domain = lid.domain
        _check_compatible(updated, updated_model, theta, lid_path, domain, base, base_model)
        dtypes = {n: theta[n].dtype for n in domain.names}
        reference = {n: s.value for n, s in base_tensors.items() if n not in domain.lower}
        if isinstance(domain, Zonotope):
            # ε is shared by all tensors: one joint projection, computed in the storage dtypes
            projection = project_parameters(values, domain, reference=reference, dtypes=dtypes)
        else:
            box = representable_box(domain, dtypes)
            projection = project_parameters(values, box, reference=reference)
        candidates.append(
            Candidate(lid_path, lid, base, find_certificate(lid_path, lid), projection)
        )
    losses = None
    if rule == "loss" and data is not None and not any(c.projection.inside for c in candidates):
        losses = [_loss(c, data) for c in candidates]
    selection = select_lid(
        [c.projection for c in candidates], [c.lid.domain for c in candidates], rule, losses=losses
    )
    chosen = candidates[selection.index]
    base_model, base_tensors = models[chosen.base]
    domain = chosen.lid.domain
    boxed = {n: chosen.projection.theta[n] for n in domain.names}
    out_sha = _write_checked(chosen.base, base_model, base_tensors, domain, boxed, out)
    return ModelProjection(updated, out, out_sha, tuple(candidates), selection)


def _check_compatible(
    updated: Path,
    updated_model: Any,
    theta: dict[str, StoredTensor],
    lid_path: Path,
    box: Box | Zonotope,
    base: Path,
    base_model: Any,
) -> None:
    for name, lo in box.lower.items():
        if name not in theta:
            raise DomainError(
                f"{updated}: has no float initializer '{name}', which the LID {lid_path} boxes; "
                "the model must keep the initializer names of the model the LID was computed for"
            )
        if tuple(theta[name].value.shape) != tuple(lo.shape):
            raise DomainError(
                f"{updated}: initializer '{name}' has shape {tuple(theta[name].value.shape)}, "
                f"but the LID {lid_path} has {tuple(lo.shape)}"
            )
    difference = structure_difference(base_model, updated_model)
    if difference is not None:
        raise DomainError(
            f"{updated}: not the network the LID {lid_path} was computed for ({base}): {difference}"
        )


def _loss(candidate: Candidate, data: Dataset) -> float:
    graph = load_graph(candidate.base)
    data = validate_for_model(data, graph)
    theta = {n: candidate.projection.theta[n] for n in graph.parameters}
    return cross_entropy(graph, theta, data.x, data.y)


def _write_checked(
    base: Path,
    base_model: Any,
    base_tensors: dict[str, StoredTensor],
    box: Box | Zonotope,
    boxed: dict[str, torch.Tensor],
    out: Path,
) -> str:
    """Write base with the boxed values to a temporary file, check it, rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{secrets.token_hex(6)}.tmp"
    try:
        save_with_parameters(base, boxed, tmp)
        written = read_model(tmp)
        tensors = stored_tensors(written, source=tmp)
        if not box.contains({n: tensors[n].value for n in box.names}):
            raise SoundnessError(f"{out}: the written values are not inside the LID; not written")
        for name, stored in base_tensors.items():
            if name not in box.lower and not torch.equal(tensors[name].value, stored.value):
                raise SoundnessError(f"{out}: tensor '{name}' differs from the LID's model")
        if structure_difference(base_model, written) is not None:
            raise SoundnessError(f"{out}: the written graph differs from the LID's model")
        sha = file_sha256(tmp)
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
    return sha

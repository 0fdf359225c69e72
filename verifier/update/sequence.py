"""Task sequences: LID_t inside LID_{t-1}, so every earlier certificate stays valid.

A certificate of LID_{t-1} says: every network whose boxed parameters lie in LID_{t-1} and
whose other parameters equal the values they had when LID_{t-1} was computed meets that
earlier task's target (with the stated confidence). LID_t ⊆ LID_{t-1} on those parameters, with
the other parameters unchanged, is therefore covered by it. This module loads the outer LID,
checks the current weights against it, checks the new LID lies inside it (float64, exact
comparisons) and carries the earlier certificates forward, each marked with whether it was
shown to apply.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.domains.io import check_lid_matches, load_lid
from verifier.domains.zonotope import Zonotope
from verifier.errors import DomainError, SoundnessError, VerifierError
from verifier.files import file_sha256


@dataclass(frozen=True, eq=False)
class OuterLid:
    """The previous LID of a sequence and the certificates it carries forward."""

    path: Path
    sha256: str
    box: Box
    inherited: list[dict[str, Any]] = field(default_factory=list)


def load_outer(
    path: str | Path, parameters: Mapping[str, Tensor], names: Sequence[str]
) -> OuterLid:
    """Load the outer LID and check the current model against it.

    Args:
        path: the previous LID file (lid.safetensors).
        parameters: the current model's parameters, keyed by initializer name.
        names: the parameters the new LID will box.

    Returns:
        The outer LID with the certificates it carries (its own and those it inherited).

    Raises:
        DomainError: the LID does not fit the model, boxes fewer parameters than the new LID,
            or the current weights lie outside it (project them first: `verifier project`).
    """
    path = Path(path)
    lid = load_lid(path)
    check_lid_matches(lid, parameters, source=str(path))
    box = lid.box
    extra = [n for n in names if n not in box.lower]
    if extra:
        raise DomainError(
            f"{path}: the new LID boxes {extra[:3]}, which the outer LID keeps fixed; box a "
            "subset of the outer LID's parameters so its certificates stay valid"
        )
    for name, lo in box.lower.items():
        value = parameters[name].to(torch.float64)
        inside = (lo.to(torch.float64) <= value) & (value <= box.upper[name].to(torch.float64))
        if not bool(inside.all()):
            raise DomainError(
                f"{path}: parameter '{name}' of the model lies outside the outer LID "
                f"({int((~inside).sum())} entries); project the model onto it first "
                "(verifier project)"
            )
    sha = file_sha256(path)
    applies, reason = _fixed_parameters_unchanged(path, lid.metadata, parameters, box)
    inherited = []
    for entry in _json_list(lid.metadata.get("certificate")):
        inherited.append(
            {
                **entry,
                "lid_path": str(path),
                "lid_sha256": sha,
                "applies": applies,
                "applies_reason": reason,
            }
        )
    for entry in _json_list(lid.metadata.get("inherited")):
        inherited.append(
            {
                **entry,
                "applies": bool(entry.get("applies")) and applies,
                "applies_reason": reason if not applies else entry.get("applies_reason", ""),
            }
        )
    return OuterLid(path, sha, box, inherited)


def check_inside(domain: Box | Zonotope, outer: OuterLid) -> None:
    """Fail loudly unless the new LID lies inside the outer box (float64, exact).

    A zonotope is checked through its interval hull (a superset, so the check is sufficient).

    Raises:
        SoundnessError: some parameter interval leaves the outer box.
    """
    box = domain.interval_hull()
    for name, lo in box.lower.items():
        up = box.upper[name]
        if name not in outer.box.lower:
            raise SoundnessError(f"new LID boxes '{name}', which the outer LID keeps fixed")
        o_lo = outer.box.lower[name].to(torch.float64)
        o_up = outer.box.upper[name].to(torch.float64)
        if not bool((lo.to(torch.float64) >= o_lo).all() and (up.to(torch.float64) <= o_up).all()):
            raise SoundnessError(f"new LID leaves the outer LID at parameter '{name}'")


def _fixed_parameters_unchanged(
    path: Path, metadata: Mapping[str, str], parameters: Mapping[str, Tensor], box: Box
) -> tuple[bool, str]:
    """Whether the parameters the outer LID keeps fixed still have their values then.

    The earlier model is found through certificate.json beside the outer LID (its model path,
    checked against the sha256 recorded in the LID).
    """
    fixed = [n for n in parameters if n not in box.lower]
    if not fixed:
        return True, "the outer LID boxes every parameter"
    certificate = path.parent / "certificate.json"
    try:
        document = json.loads(certificate.read_text())
        # relative to the certificate's folder (schema version 3); version 2 was absolute
        model_path = certificate.parent / str(document["model"]["path"])
    except (OSError, ValueError, KeyError, TypeError):
        return False, f"cannot read the earlier model's path from {certificate}"
    if not model_path.is_file() or file_sha256(model_path) != metadata.get("model_sha256"):
        return False, f"the earlier model {model_path} is missing or changed"
    from verifier.onnx.importer import load_graph

    try:
        earlier = load_graph(model_path).parameters
    except VerifierError as err:
        return False, f"cannot load the earlier model: {err}"
    for name in fixed:
        if name in earlier and not torch.equal(earlier[name], parameters[name].to(earlier[name])):
            return False, f"parameter '{name}', fixed by the outer LID, has changed"
    return True, f"fixed parameters equal those of {model_path}"


def _json_list(text: str | None) -> list[dict[str, Any]]:
    if not text:
        return []
    try:
        value = json.loads(text)
    except ValueError:
        return []
    return [v for v in value if isinstance(v, dict)] if isinstance(value, list) else []

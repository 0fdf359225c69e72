"""LID files: safetensors with `<initializer>.lower` / `.upper` tensors and string metadata.

A zonotope LID (`domain` "zonotope") stores its box part the same way (`.lower` / `.upper`,
float64 corners) plus `<initializer>.generators`, float64 of shape (k, *shape), and the metadata
key `n_generators` (k). Loading returns a `LidFile` whose `.domain` is a `Box` or a `Zonotope`.

Metadata keys: `schema_version`, `domain` ("box" or "zonotope"), `model_sha256`, `theta0_sha256`,
`spec_sha256`, `parameters` (JSON list of names), `content_sha256` (sha256 of the tensors'
bytes, so a tampered file is detected) and free-form `certificate` JSON. Files are written
to a temporary file in the same folder and renamed into place. Nothing is unpickled.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_bytes
from safetensors.torch import save_file
from torch import Tensor

from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.errors import DomainError
from verifier.files import write_atomic

SCHEMA_VERSION = "1"


@dataclass(frozen=True, eq=False)
class LidFile:
    """A loaded LID and its metadata.

    `domain` is the LID itself: a `Box`, or a `Zonotope`. `box` is the same `Box` for a box
    LID; for a zonotope LID it raises, because no box stands in for a zonotope everywhere: its
    interval hull is larger (projecting onto it leaves the LID) and its box part is smaller.
    """

    domain: Box | Zonotope
    metadata: dict[str, str]

    @property
    def kind(self) -> str:
        """ "box" or "zonotope"."""
        return "zonotope" if isinstance(self.domain, Zonotope) else "box"

    @property
    def box(self) -> Box:
        """The LID as a `Box` (box LIDs only).

        Raises:
            DomainError: the LID is a zonotope; use `.domain` (its `project` / `contains` are
                exact), or `.domain.interval_hull()` where a superset is sound (bounds).
        """
        if isinstance(self.domain, Zonotope):
            raise DomainError(
                f"this LID is a zonotope (k = {self.domain.n_generators} generators); this "
                "operation supports box LIDs only. Use `.domain` (Zonotope.project / contains "
                "are exact), or `.domain.interval_hull()` only where a superset of the LID is "
                "sound"
            )
        return self.domain

    @property
    def model_sha256(self) -> str:
        """sha256 of the ONNX model the LID was computed for."""
        return self.metadata.get("model_sha256", "")


def tensors_sha256(tensors: Mapping[str, Tensor]) -> str:
    """sha256 over names, shapes, dtypes and bytes of tensors, in sorted name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().to("cpu").contiguous()
        digest.update(f"{name}|{tuple(t.shape)}|{t.dtype}|".encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def save_lid(path: Path, box: Box | Zonotope, metadata: Mapping[str, str]) -> None:
    """Write a box or zonotope LID as safetensors (float64 tensors), atomically."""
    tensors: dict[str, Tensor] = {}
    for name in box.names:
        tensors[f"{name}.lower"] = box.lower[name].detach().to("cpu", torch.float64).contiguous()
        tensors[f"{name}.upper"] = box.upper[name].detach().to("cpu", torch.float64).contiguous()
    meta = {str(k): str(v) for k, v in metadata.items()}
    meta.pop("n_generators", None)
    if isinstance(box, Zonotope):
        for name in box.names:
            tensors[f"{name}.generators"] = (
                box.generators[name].detach().to("cpu", torch.float64).contiguous()
            )
        meta["n_generators"] = str(box.n_generators)
    meta.update(
        schema_version=SCHEMA_VERSION,
        domain="zonotope" if isinstance(box, Zonotope) else "box",
        parameters=json.dumps(box.names),
        content_sha256=tensors_sha256(tensors),
    )
    write_atomic(path, lambda p: save_file(tensors, str(p), metadata=meta))


def _header_metadata(data: bytes) -> dict[str, str]:
    """The string metadata of a safetensors file's header (already validated by the loader)."""
    size = int.from_bytes(data[:8], "little")
    header = json.loads(data[8 : 8 + size].decode("utf-8"))
    metadata = header.get("__metadata__") or {}
    if not isinstance(metadata, dict):
        raise ValueError("the header's __metadata__ is not a mapping")
    return {str(k): str(v) for k, v in metadata.items()}


def load_lid(path: str | Path) -> LidFile:
    """Read a LID file and check its structure and content hash.

    Raises:
        DomainError: missing, malformed or tampered file, or an unsupported schema.
    """
    path = Path(path)
    if not path.is_file():
        raise DomainError(f"{path}: LID file not found")
    try:
        # one read: tensors and metadata come from the same bytes, so a run that replaces the
        # file meanwhile (an atomic rename) yields the old LID or the new one, never a mix
        data = path.read_bytes()
        tensors = load_bytes(data)
        metadata = _header_metadata(data)
    except (SafetensorError, OSError, ValueError) as err:
        raise DomainError(f"{path}: not a valid LID (safetensors) file: {err}") from None
    if metadata.get("schema_version") != SCHEMA_VERSION:
        found = metadata.get("schema_version")
        raise DomainError(f"{path}: LID schema version {found!r}; expected {SCHEMA_VERSION!r}")
    kind = metadata.get("domain")
    if kind not in ("box", "zonotope"):
        raise DomainError(f"{path}: domain {kind!r} is not supported (expected box or zonotope)")
    if tensors_sha256(tensors) != metadata.get("content_sha256"):
        raise DomainError(f"{path}: content hash mismatch: the LID tensors were modified")
    try:
        names = json.loads(metadata["parameters"])
    except (KeyError, ValueError, RecursionError):
        names = None
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise DomainError(
            f"{path}: metadata 'parameters' is missing or malformed (expected a JSON list of "
            "parameter names)"
        )
    lower, upper = {}, {}
    for name in names:
        if f"{name}.lower" not in tensors or f"{name}.upper" not in tensors:
            raise DomainError(f"{path}: parameter '{name}' lacks its .lower/.upper tensors")
        lower[name], upper[name] = tensors[f"{name}.lower"], tensors[f"{name}.upper"]
    if kind == "box":
        return LidFile(Box(lower, upper), metadata)
    generators = {}
    for name in names:
        if f"{name}.generators" not in tensors:
            raise DomainError(f"{path}: zonotope parameter '{name}' lacks its .generators tensor")
        generators[name] = tensors[f"{name}.generators"]
    zonotope = Zonotope(lower, upper, generators)
    if metadata.get("n_generators") != str(zonotope.n_generators):
        raise DomainError(
            f"{path}: metadata n_generators {metadata.get('n_generators')!r} does not match the "
            f"{zonotope.n_generators} generators stored"
        )
    return LidFile(zonotope, metadata)


def check_lid_matches(lid: LidFile, parameters: Mapping[str, Tensor], *, source: str) -> None:
    """Check that every boxed parameter exists in the model with the same shape.

    Raises:
        DomainError: naming the parameter.
    """
    for name, lo in lid.domain.lower.items():
        if name not in parameters:
            raise DomainError(f"{source}: LID parameter '{name}' is not a parameter of the model")
        if tuple(parameters[name].shape) != tuple(lo.shape):
            raise DomainError(
                f"{source}: parameter '{name}' has shape {tuple(parameters[name].shape)} in the "
                f"model but {tuple(lo.shape)} in the LID"
            )

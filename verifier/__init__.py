"""lid-verifier: locally invariant domains for provably safe model updates.

The public entry points are `load_model` (an ONNX classifier as a callable graph) and
`load_lid` (a LID file). Importing the package has no side effects: no logging handlers, no warning
filters, no patches.

The package is layered (`LAYERS`, lowest first): a module imports only from its own package or
module and from packages of lower layers, never from a sibling of its own layer or from above, so
there are no import cycles (imports under `TYPE_CHECKING` aside). `tests/test_layers.py` keeps it
so. This root module is the public facade above every layer; nothing inside the package imports it.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING, Final

if TYPE_CHECKING:
    from verifier.domains.io import LidFile
    from verifier.graph import Graph

LAYERS: Final[tuple[tuple[str, ...], ...]] = (
    ("errors",),  # the exception hierarchy
    ("rounding", "files", "runtime"),  # float error bounds; atomic writes, locks; allocator
    ("graph",),  # the typed op graph every engine walks
    ("data",),  # data sets, encoders, feature caches
    ("onnx", "domains", "spec"),  # ONNX in/out; Box and Zonotope; spec files
    ("bounds",),  # IBP, zonotope, auto_LiRPA bounds
    ("certify",),  # certified samples, Clopper-Pearson / Hoeffding
    ("ladder",),  # nested scales of a LID certified at beta / m; what held-out data can certify
    ("search",),  # primal-dual LID search
    ("update", "crosscheck"),  # projection and safe training; falsifiers and exact solvers
    ("distributed",),  # Ray: certification, cross-checks and grids as tasks; streaming
    ("report", "cl"),  # certificate JSON and HTML; continual-learning experiments
    ("pipeline",),  # spec -> LID -> certificate -> report
    ("verification",),  # recompute a run's certificate from its artifacts
    ("cli",),  # click commands
)
"""The layer order of the package's modules and subpackages, lowest first (module docstring)."""

try:
    __version__ = version("lid-verifier")
except PackageNotFoundError:  # running from a source tree without installing
    __version__ = "0+unknown"


def load_model(path: str | Path) -> Graph:
    """Load an ONNX classifier as a typed op graph that can be called on a batch.

    Args:
        path: path to an .onnx file.

    Returns:
        The graph; `graph(x)` returns logits of shape (batch, n_classes) and
        `graph.parameter_shapes()` lists the parameters by initializer name.

    Raises:
        GraphError: the file is missing, malformed or uses unsupported ops.
    """
    from verifier.onnx.importer import load_graph

    return load_graph(Path(path))


def load_lid(path: str | Path) -> LidFile:
    """Load a LID file (safetensors corners + metadata) written by `verifier lid`.

    Args:
        path: path to a lid.safetensors file.

    Returns:
        The LID: `.box` (a `Box` keyed by initializer name), `.metadata` (schema version,
        domain kind, model / θ0 / spec sha256) and `.model_sha256`.

    Raises:
        DomainError: the file is missing, malformed or fails its content hash.
    """
    from verifier.domains.io import load_lid as _load_lid

    return _load_lid(path)


__all__ = ["__version__", "load_lid", "load_model"]

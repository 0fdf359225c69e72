"""lid-verifier: locally invariant domains for provably safe model updates.

The public entry points are `load_model` (an ONNX classifier as a callable graph) and, once
built, `load_lid`. Importing the package has no side effects: no logging handlers, no warning
filters, no patches.
"""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from verifier.graph import Graph

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
    from verifier.onnx_import import load_graph

    return load_graph(Path(path))


__all__ = ["__version__", "load_model"]

"""Constant folding for the ONNX front end: which tensors are constants, and what they hold.

A tensor is a constant when it is an initializer, the output of a Constant node, or the output
of a node whose inputs are all constants (random ops excepted). `ConstantFolder` evaluates such
nodes with onnx's reference evaluator and remembers, for each constant, the initializers its
value depends on (`roots`) and, when it is a mere view of one initializer (Identity, a float
Cast, a 2-D Transpose), which one (`sources`): that is how a weight reached through a Transpose
keeps its initializer's name. `constant_roots` gives the same dependency map symbolically, with
no evaluation, for splitting large graphs cheaply.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
from onnx import GraphProto, NodeProto, TensorProto, numpy_helper
from onnx.reference import ReferenceEvaluator

from verifier.errors import GraphError
from verifier.onnx.limits import check_fold_size, folded_limit
from verifier.onnx.reading import node_attributes, one_line

SHAPE_SOURCES: Final = frozenset({"Shape", "Size"})
RANDOM_OPS: Final = frozenset(
    {"RandomNormal", "RandomUniform", "RandomNormalLike", "RandomUniformLike", "Bernoulli"}
)


def is_foldable(node: NodeProto, constants: Mapping[str, object]) -> bool:
    """True when `node` computes a constant from the tensors named in `constants`.

    Args:
        node: an ONNX node.
        constants: the names of the tensors known to be constant (values are not read).

    Returns:
        True for a Constant node, a CastLike of a constant (it reads only the type of its
        second input), and a non-random node whose inputs are all constants.
    """
    inputs = [i for i in node.input if i]
    if node.op_type == "Constant":
        return True
    if node.op_type == "CastLike":
        return bool(node.input) and node.input[0] in constants
    return bool(inputs) and node.op_type not in RANDOM_OPS and all(i in constants for i in inputs)


def constant_roots(graph: GraphProto) -> dict[str, frozenset[str]]:
    """Every constant tensor of a graph and the initializers (or Constant outputs) it comes from.

    Symbolic: no value is computed, so this is cheap on large graphs.

    Args:
        graph: a topologically sorted ONNX graph.

    Returns:
        Tensor name -> the initializer and Constant-node outputs its value depends on; Shape
        and Size outputs depend on none (they read no values).
    """
    roots: dict[str, frozenset[str]] = {i.name: frozenset({i.name}) for i in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            roots[node.output[0]] = frozenset({node.output[0]})
        elif is_foldable(node, roots):
            used = [] if node.op_type in SHAPE_SOURCES else [i for i in node.input if i]
            if node.op_type == "CastLike":
                used = used[:1]
            value = frozenset().union(*(roots[i] for i in used))
            roots.update((out, value) for out in node.output if out)
    return roots


class ConstantFolder:
    """The constants of one graph: their values, root initializers and initializer views.

    Attributes:
        values: tensor name -> value, for every constant met so far.
        sources: tensor -> (initializer or Constant output it is a view of, transposed?).
        roots: tensor -> every initializer or Constant output its value depends on.
    """

    def __init__(self, path: Path, opset: int, names: dict[int, str]) -> None:
        """Start an empty table.

        Args:
            path: the model file, for messages.
            opset: the default-domain opset, for the reference evaluator.
            names: id(node) -> the node's display name, for messages (shared, extended by
                folded helper nodes).
        """
        self.path = path
        self.opset = opset
        self.names = names
        self.values: dict[str, np.ndarray] = {}
        self.sources: dict[str, tuple[str, bool]] = {}
        self.roots: dict[str, frozenset[str]] = {}
        self.initializer_bytes = 0  # what the file stores: computed constants stay near it

    def where(self, node: NodeProto) -> str:
        """'<file>: node '<name>' (<op>)', the start of a message about `node`."""
        return f"{self.path}: node '{self.names[id(node)]}' ({node.op_type})"

    def fail(self, node: NodeProto, what: str) -> GraphError:
        """A GraphError about `node`."""
        return GraphError(f"{self.where(node)}: {what}")

    def add_initializers(self, graph: GraphProto) -> None:
        """Record every initializer of `graph` as a constant that is its own source.

        Raises:
            GraphError: an initializer holds NaN or Inf.
        """
        for init in graph.initializer:
            try:
                value = numpy_helper.to_array(init)
            except Exception as err:  # noqa: BLE001 - any failure on untrusted bytes is bad input
                raise GraphError(
                    f"{self.path}: initializer '{init.name}' cannot be read ({one_line(err)}); "
                    "re-export the model"
                ) from err
            self.initializer_bytes += value.nbytes
            self.add(init.name, value, origin=f"initializer '{init.name}'")
            self.sources[init.name] = (init.name, False)
            self.roots[init.name] = frozenset({init.name})

    def add(self, name: str, value: np.ndarray, *, origin: str) -> None:
        """Record a constant value.

        Raises:
            GraphError: a floating-point value holds NaN or Inf (the message names `origin`).
        """
        if value.dtype.kind == "f" or value.dtype.name == "bfloat16":
            finite = np.isfinite(value if value.dtype.kind == "f" else value.astype(np.float32))
            if not finite.all():
                raise GraphError(
                    f"{self.path}: {origin} contains NaN or Inf ({int((~finite).sum())} of "
                    f"{value.size} entries); fix the weights or re-train the model"
                )
        self.values[name] = value

    def try_fold(self, node: NodeProto, inferred: Mapping[str, onnx.ValueInfoProto]) -> bool:
        """Fold `node` when it computes a constant; say whether it did.

        Args:
            node: the next node in topological order.
            inferred: inferred value infos by tensor name (CastLike reads its target type).

        Raises:
            GraphError: the constant computation fails or yields NaN/Inf.
        """
        if not is_foldable(node, self.values):
            return False
        limit = folded_limit(self.initializer_bytes)  # issue 23: no constant out of nothing
        check_fold_size(node, self.values, inferred, self.where(node), limit=limit)
        if node.op_type == "Constant":
            self._fold_constant_node(node)
        elif node.op_type == "CastLike":
            self._fold_cast_like(node, inferred)
        else:
            self._fold(node)
        return True

    def _fold_constant_node(self, node: NodeProto) -> None:
        attrs = node_attributes(node)
        out = node.output[0]
        if "value" in attrs:
            value = numpy_helper.to_array(attrs["value"])
        elif "value_float" in attrs:
            value = np.array(attrs["value_float"], dtype=np.float32)
        elif "value_floats" in attrs:
            value = np.array(attrs["value_floats"], dtype=np.float32)
        elif "value_int" in attrs:
            value = np.array(attrs["value_int"], dtype=np.int64)
        elif "value_ints" in attrs:
            value = np.array(attrs["value_ints"], dtype=np.int64)
        else:
            raise self.fail(node, "only dense tensor, float and int Constant values are supported")
        self.add(out, value, origin=f"Constant node '{self.names[id(node)]}'")
        self.sources[out] = (out, False)
        self.roots[out] = frozenset({out})

    def _fold_cast_like(self, node: NodeProto, inferred: Mapping[str, onnx.ValueInfoProto]) -> None:
        """CastLike(constant, t) only reads t's element type: fold it as a Cast."""
        target = inferred.get(node.input[1])
        elem_type = target.type.tensor_type.elem_type if target is not None else 0
        if not elem_type:
            raise self.fail(node, f"the element type of '{node.input[1]}' is unknown")
        cast = onnx.helper.make_node(
            "Cast", [node.input[0]], [node.output[0]], name=node.name, to=elem_type
        )
        self.names[id(cast)] = self.names[id(node)]
        self._fold(cast)

    def _fold(self, node: NodeProto) -> None:
        feeds = {i: self.values[i] for i in node.input if i}
        values = self.evaluate(node, feeds)
        # Shape and Size read no values, so the result does not depend on the tensor's entries
        value_inputs = [] if node.op_type in SHAPE_SOURCES else list(feeds)
        roots = frozenset().union(*(self.roots.get(i, frozenset()) for i in value_inputs))
        for out, value in zip(node.output, values, strict=False):
            if not out:
                continue
            self.add(
                out, np.asarray(value), origin=f"constant output '{out}' of {self.where(node)}"
            )
            self.roots[out] = roots
        source = self.sources.get(node.input[0]) if node.input else None
        if source is None:
            return
        op = node.op_type
        to_float = node_attributes(node).get("to") in (TensorProto.FLOAT, TensorProto.DOUBLE)
        if op == "Identity" or (op == "Cast" and to_float):
            self.sources[node.output[0]] = source
        elif op == "Transpose" and self.values[node.input[0]].ndim == 2:
            if list(node_attributes(node).get("perm", [1, 0])) == [1, 0]:
                self.sources[node.output[0]] = (source[0], not source[1])

    def evaluate(self, node: NodeProto, feeds: dict[str, np.ndarray]) -> list[Any]:
        """Run one node on constant inputs with onnx's reference evaluator.

        Raises:
            GraphError: the evaluator fails, naming the node.
        """
        try:
            return list(ReferenceEvaluator(node, opsets={"": self.opset}).run(None, feeds))
        except Exception as err:  # noqa: BLE001 - the reference evaluator raises many types
            raise self.fail(
                node, f"cannot evaluate this constant computation ({one_line(err)})"
            ) from err

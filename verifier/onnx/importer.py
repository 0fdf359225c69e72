"""ONNX classifier -> `verifier.graph.Graph`: the ONNX front end.

`load_graph` reads the file, runs `onnx.checker` and strict shape inference, folds every
constant-only subgraph, then walks from the single graph input to the single graph output and
maps each node onto an op of `verifier.graph`. The result must be a chain: each node consumes
the tensor the previous node produced, plus constants.

Choices worth knowing:

- **Parameters** are the weights and biases of Gemm, MatMul(+Add) and Conv, keyed by the name of
  the initializer (or Constant node output) they come from and kept in its layout. A weight may
  reach its node through Identity, Cast or a 2-D Transpose (a Transpose flips the Linear layout).
  They are float32 torch tensors: a float16, bfloat16 or float64 initializer is converted to
  float32 and a `UserWarning` says so, because the bound engine works in float32 (search) and
  float64 (proofs) and a float32 copy keeps the search cheap; `verifier.onnx.export` writes
  values back in the initializer's own dtype.
- **Constants** (normalisation, folded BatchNormalization, Gemm alpha/beta, biases computed from
  constants) are float64 tensors: exact for float32 sources and never a parameter. An initializer
  used both as a parameter and as such a constant (e.g. deduplicated by an exporter) is refused,
  since changing the parameter would silently change the constant too.
- **BatchNormalization** right after a Conv, or after a Linear on (batch, features), is folded
  into that op's `AffineScale`; anywhere else it becomes an Elementwise mul and add.
- **Reshape-like nodes** (Flatten, Reshape, Squeeze, Unsqueeze) are accepted when they keep every
  sample apart: the output shape is evaluated for several batch sizes (also through Shape-based
  subgraphs such as `x.view(x.size(0), -1)`) and must be (batch, *fixed).
- **Not supported**: Softmax/LogSoftmax (export logits instead), branches and skip connections,
  several inputs or outputs, Pad, Transpose of computed tensors, 1-D/3-D conv and pooling, dilated
  average pooling, quantised (integer) weights, non-default domains.

Reading and checking the file live in `verifier.onnx.reading`, constant folding in
`verifier.onnx.folding`, reshape arithmetic in `verifier.onnx.shapes`; cutting a larger model
at its first boxed parameter (a frozen prefix run by onnxruntime) in `verifier.onnx.prefix`.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import NodeProto

from verifier.errors import GraphError
from verifier.graph import (
    Activation,
    Graph,
    Linear,
    Op,
    Pool,
    Reshape,
    apply_op,
)
from verifier.onnx.converters import (
    ACTIVATIONS,
    ELEMENTWISE,
    FLOAT_TYPES,
    POOLS,
    RESHAPES,
    SUPPORTED_OPS,
    affine_scale,
    batchnorm_ops,
    bias_parameter,
    check_pass_through,
    conv_op,
    elementwise_op,
    gemm_op,
    pool_op,
    weight_parameter,
)
from verifier.onnx.folding import SHAPE_SOURCES, ConstantFolder
from verifier.onnx.reading import (
    check_model,
    load_checked_model,
    node_attributes,
    one_line,
    read_model,
)
from verifier.onnx.shapes import reshape_rule

__all__ = ["SUPPORTED_OPS", "check_model", "graph_from_model", "load_graph", "read_model"]

_CUT_HINT = (
    ' (or box only parameters after it, e.g. `parameters: ["head.*"]` in the spec, so that '
    "the part before them runs frozen in onnxruntime)"
)
_HINTS = {"Pad": "fold the padding into the following Conv (padding=... in torch)"}


def load_graph(path: Path) -> Graph:
    """Load an ONNX classifier as a chain of typed ops whose forward pass matches onnxruntime.

    Args:
        path: path to an .onnx file (external data is read relative to it).

    Returns:
        The graph; parameters are float32 tensors keyed by initializer name. A `UserWarning`
        is issued for each parameter stored in another floating-point dtype.

    Raises:
        GraphError: the file is missing, empty, truncated or not ONNX; the checker or shape
            inference rejects it; it has NaN/Inf constants, an unsupported op, a branch, several
            inputs or outputs, an input shape other than (batch, *fixed), or an output other
            than (batch, n_classes).
    """
    path = Path(path)
    return graph_from_model(load_checked_model(path), path, stacklevel=3)


def graph_from_model(model: onnx.ModelProto, path: Path, *, stacklevel: int = 2) -> Graph:
    """Map a checked, shape-inferred model (see `load_checked_model`) onto a chain of ops.

    Args:
        model: the model, local functions inlined, inferred shapes in `graph.value_info`.
        path: the file it came from, for messages.
        stacklevel: passed to `warnings.warn` for the dtype-conversion notes.

    Returns:
        The graph, as `load_graph` describes it.

    Raises:
        GraphError: as `load_graph`.
    """
    builder = ChainBuilder(path, model)
    graph = builder.build()
    for note in builder.notes:
        warnings.warn(note, stacklevel=stacklevel)
    return graph


def _prod(dims: Iterable[int]) -> int:
    return math.prod(dims)


class ChainBuilder:
    """State of one `load_graph` call: constants, producers, consumers and the chain walk."""

    def __init__(self, path: Path, model: onnx.ModelProto) -> None:
        self.path = path
        self.model = model
        self.graph = model.graph
        self.opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), 1)
        # protobuf hands out a new wrapper object on every access: keep one list of nodes so that
        # id(node) is stable for this builder
        self.nodes = list(self.graph.node)
        self.names = {id(n): n.name or f"{n.op_type}_{i}" for i, n in enumerate(self.nodes)}
        self.folder = ConstantFolder(path, self.opset, self.names)
        # shared with the folder: constant values, initializer views and root initializers
        self.constants = self.folder.values
        self.sources = self.folder.sources
        self.roots = self.folder.roots
        self.producer: dict[str, NodeProto] = {}
        self.consumers: dict[str, list[tuple[NodeProto, int]]] = {}
        self.shape_tensors: set[str] = set()
        self.chain_shapes: dict[str, tuple[int, ...]] = {}
        self.inferred = {
            v.name: v for v in [*self.graph.value_info, *self.graph.output, *self.graph.input]
        }
        self.parameters: dict[str, torch.Tensor] = {}
        self.parameter_roots: dict[str, str] = {}
        self.constant_roots: dict[str, str] = {}
        self.visited: set[int] = set()
        self.notes: list[str] = []
        self.trust_inference = True

    # ----------------------------------------------------------------- messages
    def where(self, node: NodeProto) -> str:
        return self.folder.where(node)

    def fail(self, node: NodeProto, what: str) -> GraphError:
        return self.folder.fail(node, what)

    # ----------------------------------------------------------------- top level
    def build(self) -> Graph:
        if self.graph.sparse_initializer:
            raise GraphError(f"{self.path}: sparse initializers are not supported; densify them")
        self.folder.add_initializers(self.graph)
        input_name, input_shape, fixed_batch = self._graph_input()
        output_name = self._graph_output()
        self.batches = (fixed_batch,) if fixed_batch else (1, 2, 3)
        self._classify_nodes()
        ops = self._walk(input_name, input_shape, output_name)
        self._check_all_visited()
        self._check_untied()
        shape = self.chain_shapes[output_name]
        if len(shape) != 1:
            raise GraphError(
                f"{self.path}: output '{output_name}' has shape (batch, "
                f"{', '.join(map(str, shape))}); a classifier must output (batch, n_classes)"
            )
        return Graph(
            ops=tuple(ops),
            parameters=self.parameters,
            input_name=input_name,
            input_shape=input_shape,
            output_name=output_name,
            n_classes=shape[0],
        )

    def _graph_input(self) -> tuple[str, tuple[int, ...], int | None]:
        inits = {i.name for i in self.graph.initializer}
        inputs = [i for i in self.graph.input if i.name not in inits]
        if len(inputs) != 1:
            names = ", ".join(f"'{i.name}'" for i in inputs) or "none"
            raise GraphError(
                f"{self.path}: the graph must have exactly one input, found {len(inputs)} "
                f"({names}); export a single-input classifier"
            )
        value = inputs[0]
        what = f"{self.path}: input '{value.name}'"
        ttype = value.type.tensor_type
        if not value.type.HasField("tensor_type") or ttype.elem_type not in FLOAT_TYPES:
            raise GraphError(f"{what}: must be a floating-point tensor")
        if not ttype.HasField("shape") or len(ttype.shape.dim) < 2:
            raise GraphError(
                f"{what}: its shape is unknown or has rank < 2; export with a declared input "
                "shape (batch, *sample_shape)"
            )
        dims = list(ttype.shape.dim)
        sample: list[int] = []
        for axis, dim in enumerate(dims[1:], start=1):
            if not dim.HasField("dim_value") or dim.dim_value <= 0:
                shown = dim.dim_param or "unknown"
                raise GraphError(
                    f"{what}: axis {axis} is '{shown}', not a fixed size; only the batch axis "
                    "(axis 0) may be symbolic, fix the others when exporting"
                )
            sample.append(dim.dim_value)
        fixed = dims[0].dim_value if dims[0].HasField("dim_value") else None
        return value.name, tuple(sample), fixed or None

    def _graph_output(self) -> str:
        outputs = list(self.graph.output)
        if len(outputs) != 1:
            names = ", ".join(f"'{o.name}'" for o in outputs) or "none"
            raise GraphError(
                f"{self.path}: the graph must have exactly one output (the logits), found "
                f"{len(outputs)} ({names}); export only the logits"
            )
        dims = outputs[0].type.tensor_type.shape.dim
        if outputs[0].type.tensor_type.HasField("shape") and len(dims) != 2:
            raise GraphError(
                f"{self.path}: output '{outputs[0].name}' has rank {len(dims)}; a classifier "
                "must output (batch, n_classes)"
            )
        return outputs[0].name

    # ----------------------------------------------------------------- constants
    def _classify_nodes(self) -> None:
        """Fold constant-only nodes; index the others by producer and consumer."""
        for node in self.nodes:
            if node.domain not in ("", "ai.onnx"):
                raise self.fail(
                    node, f"ops of domain '{node.domain}' are not supported; export standard ONNX"
                )
            if self.folder.try_fold(node, self.inferred):
                continue
            for out in node.output:
                if out:
                    self.producer[out] = node
            for index, name in enumerate(node.input):
                if name and name not in self.constants:
                    self.consumers.setdefault(name, []).append((node, index))
            dynamic = [i for i in node.input if i and i not in self.constants]
            if node.op_type in SHAPE_SOURCES or (
                dynamic and all(i in self.shape_tensors for i in dynamic)
            ):
                self.shape_tensors.update(o for o in node.output if o)
            elif node.op_type not in SUPPORTED_OPS:
                raise self.fail(node, self._unsupported(node))

    def _unsupported(self, node: NodeProto) -> str:
        what = f"op type '{node.op_type}' is not supported"
        if node.op_type in ("Softmax", "LogSoftmax"):
            if node.output[0] == self.graph.output[0].name:
                return f"{what}; the bound engine needs logits: export without the final Softmax"
            return (
                f"{what} inside the network; only a chain of the supported ops can be bounded"
                f"{_CUT_HINT}"
            )
        hint = _HINTS.get(node.op_type, "rewrite the model with supported ops")
        return f"{what}; {hint}{_CUT_HINT}"

    def constant(self, node: NodeProto, name: str) -> np.ndarray:
        """A constant used as a constant (not a parameter); remember where it came from."""
        for root in self.roots.get(name, frozenset()):
            self.constant_roots.setdefault(root, self.names[id(node)])
        return self.constants[name]

    def parameter(self, node: NodeProto, name: str, role: str) -> tuple[str, bool]:
        """Register the initializer behind input `name` of `node` as a parameter."""
        if name not in self.sources:
            raise self.fail(
                node,
                f"its {role} '{name}' is computed from constants; store it as an initializer "
                "(export with constant folding)",
            )
        source, transposed = self.sources[name]
        if source not in self.parameters:
            raw = self.constants[source]
            if raw.dtype.kind != "f" and raw.dtype.name != "bfloat16":
                raise self.fail(
                    node,
                    f"{role} '{source}' has dtype {raw.dtype}; quantised weights are "
                    "not supported, export float weights",
                )
            if raw.dtype != np.float32:
                self.notes.append(
                    f"{self.path}: parameter '{source}' is stored as {raw.dtype}; "
                    "it is converted to float32"
                )
            self.parameters[source] = torch.from_numpy(raw.astype(np.float32))
        self.parameter_roots.setdefault(source, self.names[id(node)])
        return source, transposed

    def _check_untied(self) -> None:
        for root, user in self.parameter_roots.items():
            if root in self.constant_roots:
                raise GraphError(
                    f"{self.path}: '{root}' is a parameter of node '{user}' and also a constant "
                    f"of node '{self.constant_roots[root]}'; store them as separate initializers "
                    "(e.g. export without constant deduplication)"
                )

    # ----------------------------------------------------------------- the chain
    def _users(self, tensor: str) -> list[NodeProto]:
        users: list[NodeProto] = []
        for node, _ in self.consumers.get(tensor, []):
            if node.op_type not in SHAPE_SOURCES and all(node is not u for u in users):
                users.append(node)
        return users

    def _walk(self, cur: str, shape: tuple[int, ...], output: str) -> list[Op]:
        ops: list[Op] = []
        self.chain_shapes[cur] = shape
        while cur != output:
            users = self._users(cur)
            if not users:
                raise GraphError(
                    f"{self.path}: tensor '{cur}' is used by no node and is not the graph output "
                    f"'{output}'; the output must be reached by a chain of nodes from the input"
                )
            if len(users) > 1:
                names = ", ".join(f"'{self.names[id(u)]}'" for u in users)
                raise GraphError(
                    f"{self.path}: tensor '{cur}' feeds several nodes ({names}); only chains are "
                    "supported (no branches or skip connections)"
                )
            node = users[0]
            self._check_inputs(node, cur)
            self.visited.add(id(node))
            new_ops, out = self._map(node, cur, shape, ops, output)
            for op in new_ops:
                shape = self._probe(node, op, shape)
                if isinstance(op, Pool) and op.ceil_mode:
                    # onnx shape inference keeps ceil_mode windows that start in the end padding;
                    # onnxruntime and torch drop them (see graph.pool_output_size): from here on
                    # the inferred shapes may be off, so stop comparing with them
                    self.trust_inference = False
            ops.extend(new_ops)
            self._check_inferred(node, out, shape)
            self.chain_shapes[out] = shape
            cur = out
        return ops

    def _check_inputs(self, node: NodeProto, cur: str) -> None:
        if sum(1 for i in node.input if i == cur) != 1:
            raise self.fail(node, f"uses tensor '{cur}' more than once; not supported")
        for index, name in enumerate(node.input):
            if not name or name == cur or name in self.constants:
                continue
            if name in self.shape_tensors and node.op_type == "Reshape" and index == 1:
                continue
            other = self.producer.get(name)
            origin = f"node '{self.names[id(other)]}'" if other is not None else "a graph input"
            raise self.fail(
                node,
                f"combines '{cur}' with the computed tensor '{name}' (from {origin}); only "
                "chains whose side inputs are constants are supported",
            )
        for out in node.output[1:]:
            if out and (out in self.consumers or out == self.graph.output[0].name):
                raise self.fail(node, f"its extra output '{out}' is used; only the first may be")

    def _map(
        self, node: NodeProto, cur: str, shape: tuple[int, ...], ops: list[Op], output: str
    ) -> tuple[list[Op], str]:
        op = node.op_type
        index = list(node.input).index(cur)
        name = self.names[id(node)]
        if op == "MatMul":
            return self._matmul(node, index, shape, output)
        if index != 0 and op not in ELEMENTWISE:
            raise self.fail(node, f"takes '{cur}' as input {index}; it must be input 0")
        if op == "Gemm":
            return [gemm_op(self, node, shape)], node.output[0]
        if op == "Conv":
            return [conv_op(self, node, shape)], node.output[0]
        if op == "BatchNormalization":
            return batchnorm_ops(self, node, shape, ops), node.output[0]
        if op in ACTIVATIONS:
            return [Activation(name, ACTIVATIONS[op])], node.output[0]  # type: ignore[arg-type]
        if op in ELEMENTWISE:
            return [elementwise_op(self, node, index, shape)], node.output[0]
        if op in RESHAPES:
            new_shape = self._reshaped(node, shape)
            ops_out = [] if new_shape == shape else [Reshape(name, new_shape)]
            return ops_out, node.output[0]  # type: ignore[return-value]
        if op in POOLS:
            return [pool_op(self, node, shape)], node.output[0]
        check_pass_through(self, node)
        return [], node.output[0]

    def _probe(self, node: NodeProto, op: Op, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample output shape of `op`, computed on a meta tensor (no arithmetic)."""
        try:
            out = apply_op(op, torch.empty((1, *shape), device="meta"), self.parameters)
        except Exception as err:  # noqa: BLE001 - torch reports shape errors in several types
            raise self.fail(
                node, f"cannot be applied to a sample of shape {shape} ({one_line(err)})"
            ) from err
        return tuple(out.shape[1:])

    def _check_inferred(self, node: NodeProto, out: str, shape: tuple[int, ...]) -> None:
        value = self.inferred.get(out)
        if (
            not self.trust_inference
            or value is None
            or not value.type.tensor_type.HasField("shape")
        ):
            return
        dims = value.type.tensor_type.shape.dim
        onnx_dims = [d.dim_value if d.HasField("dim_value") else None for d in dims[1:]]
        if len(dims) != len(shape) + 1 or any(
            d is not None and d != s for d, s in zip(onnx_dims, shape, strict=True)
        ):
            shown = ", ".join("?" if d is None else str(d) for d in onnx_dims)
            raise self.fail(
                node,
                f"ONNX infers per-sample shape ({shown}) but this op maps to {shape}; "
                "this configuration is not supported",
            )

    def _check_all_visited(self) -> None:
        for node in self.nodes:
            if node.output and node.output[0] in self.producer and id(node) not in self.visited:
                if node.output[0] in self.shape_tensors:
                    continue
                raise self.fail(
                    node,
                    "is not on the chain from the graph input to the graph output; "
                    "only single-path graphs are supported",
                )

    # ----------------------------------------------------------------- affine ops

    def _matmul(
        self, node: NodeProto, index: int, shape: tuple[int, ...], output: str
    ) -> tuple[list[Op], str]:
        if index != 0:
            raise self.fail(node, "the computed tensor must be the left operand (x @ W)")
        if self.constants.get(node.input[1], np.zeros(0)).ndim != 2:
            raise self.fail(node, f"its right operand '{node.input[1]}' must be a 2-D constant")
        source, transposed = weight_parameter(self, node, node.input[1])
        n_out = self.constants[node.input[1]].shape[1]
        layout = "out_in" if transposed else "in_out"
        out = node.output[0]
        users = self._users(out) if out != output else []
        bias, scale = None, None
        if len(users) == 1 and users[0].op_type == "Add" and not self._shape_users(out):
            add = users[0]
            others = [i for i in add.input if i != out]
            value = self.constants.get(others[0]) if len(others) == 1 else None
            if value is not None and value.size == n_out and value.shape[-1:] == (n_out,):
                if value.ndim <= len(shape) + 1:
                    self._check_inputs(add, out)
                    self.visited.add(id(add))
                    bias, shift = bias_parameter(self, add, others[0], n_out)
                    scale = affine_scale(n_out, 1.0, 1.0, shift)
                    out = add.output[0]
        op = Linear(self.names[id(node)], source, bias, layout, scale)  # type: ignore[arg-type]
        return [op], out

    def _shape_users(self, tensor: str) -> bool:
        return any(n.op_type in SHAPE_SOURCES for n, _ in self.consumers.get(tensor, []))

    # ----------------------------------------------------------------- other ops

    # ----------------------------------------------------------------- reshapes
    def _reshaped(self, node: NodeProto, shape: tuple[int, ...]) -> tuple[int, ...]:
        """Per-sample output shape of a reshape-like node, proven to keep samples apart."""
        results: dict[int, tuple[int, ...]] = {}
        problems: list[str] = []
        for batch in self.batches:
            full = (batch, *shape)
            try:
                results[batch] = reshape_rule(node, self._shape_value)(full, batch)
            except ValueError as err:
                problems.append(f"input {full}: {err}")
            else:
                if results[batch][:1] != (batch,):
                    problems.append(f"input {full} -> {results[batch]}")
        rests = {out[1:] for out in results.values()}
        if problems or len(rests) != 1 or _prod(next(iter(rests))) != _prod(shape):
            seen = "; ".join(problems or [f"{(b, *shape)} -> {o}" for b, o in results.items()])
            raise self.fail(
                node,
                f"does not keep the batch axis ({seen}); reshape to (batch, ...) with -1 or 0 "
                "in the first place",
            )
        return next(iter(rests))

    def _shape_value(self, name: str, batch: int) -> list[int]:
        """Value of a shape tensor for a given batch size (constant or Shape-derived)."""
        if name in self.constants:
            return [int(v) for v in np.asarray(self.constants[name]).reshape(-1)]
        return [int(v) for v in np.asarray(self._eval_shape(name, batch, {})).reshape(-1)]

    def _eval_shape(self, name: str, batch: int, memo: dict[str, np.ndarray]) -> np.ndarray:
        if name in self.constants:
            return self.constants[name]
        if name in memo:
            return memo[name]
        node = self.producer[name]
        if node.op_type in SHAPE_SOURCES:
            source = node.input[0]
            if source not in self.chain_shapes:
                raise self.fail(node, f"takes the shape of '{source}', which is not yet computed")
            full = np.array([batch, *self.chain_shapes[source]], dtype=np.int64)
            if node.op_type == "Size":
                values = [np.array(_prod(full), dtype=np.int64)]
            else:
                attrs = node_attributes(node)
                start, end = attrs.get("start", 0), attrs.get("end")
                values = [full[start:end]]
        else:
            feeds = {i: self._eval_shape(i, batch, memo) for i in node.input if i}
            values = self.folder.evaluate(node, feeds)
        for out, value in zip(node.output, values, strict=False):
            memo[out] = np.asarray(value)
        return memo[name]

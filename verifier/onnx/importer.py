"""ONNX classifier -> `verifier.graph.Graph`: the ONNX front end.

`load_graph` reads the file, runs `onnx.checker` and shape inference, folds every constant-only
subgraph, drops the nodes the graph output does not depend on, then walks the remaining nodes
in topological order and maps each onto ops of `verifier.graph`. The result is a DAG: op inputs
and outputs are the ONNX tensor names (an ONNX node that becomes several ops, such as a
BatchNormalization after a Relu, writes fresh intermediate names `<tensor>:<k>`).

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
- **Folds.** A MatMul whose only reader is an Add of a bias becomes one Linear; a
  BatchNormalization right after a Conv, or after a Linear on (batch, features), is folded into
  that op's `AffineScale` when nothing else reads the op's output (anywhere else it becomes an
  Elementwise mul and add); a zero constant Pad of the spatial axes whose only reader is a Conv
  is folded into the Conv's pads; a Transpose right after a Transpose becomes one (none when
  they cancel, as in the NHWC <-> NCHW pairs tf2onnx writes around convolutions), and so does
  a reshape right after a reshape.
- **Branches.** Add, Sub and Mul of two computed tensors become `Binary` ops (ONNX broadcasting,
  as long as the batch axes line up); Concat, Transpose, Slice, Split and constant-mode Pad move
  values along per-sample axes only; ReduceMean over the two spatial axes is global average
  pooling. Nodes the graph output does not depend on are dropped before anything is checked.
- **Reshape-like nodes** (Flatten, Reshape, Squeeze, Unsqueeze) are accepted when they keep every
  sample apart: the output shape is evaluated for several batch sizes (also through Shape-based
  subgraphs such as `x.view(x.size(0), -1)`) and must be (batch, *fixed).
- **Inputs without a batch axis.** A model whose input has rank 1 (e.g. (784,) -> MatMul ->
  (10,)), or whose output has rank 1 while the input's first axis has a fixed size (a single
  (3, 32, 32) image -> (10,)), describes one sample. The graph serves it as a batch anyway: its
  `input_shape` is the whole declared input shape, every op works on a batch axis prepended to
  the ONNX shapes (so ONNX axis k is graph axis k + 1), and the output is (batch, n_classes). An
  Unsqueeze of axis 0 that such a model makes before a Conv, Gemm, pooling or BatchNormalization
  becomes the batch axis, and the Squeeze of it afterwards gives it back.
- **Not supported**: Softmax/LogSoftmax (export logits instead), several inputs or outputs,
  MatMul or Div of two computed tensors, reflect/edge padding, negative slice steps, other
  reductions, 1-D/3-D conv and pooling, dilated average pooling, quantised (integer) weights,
  non-default domains.

Reading and checking the file live in `verifier.onnx.reading`, the first pass over the nodes
(which matter, in what order, who reads what) in `verifier.onnx.index`, constant folding in
`verifier.onnx.folding`, reshape arithmetic in `verifier.onnx.shapes`, batch-axis bookkeeping
and the value-moving nodes in `verifier.onnx.layout`; cutting a larger model at its first boxed
parameter (a frozen prefix run by onnxruntime) in `verifier.onnx.prefix`.
"""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

import numpy as np
import onnx
import torch
from onnx import NodeProto

from verifier.errors import GraphError
from verifier.graph import (
    Graph,
    Linear,
    Op,
    Pool,
    Reshape,
    apply_node,
)
from verifier.onnx.combine import (
    map_batchnorm,
    map_binary,
    map_pad,
    map_split,
    map_transpose,
)
from verifier.onnx.converters import (
    ACTIVATIONS,
    ELEMENTWISE,
    PASS_THROUGH,
    POOLS,
    RESHAPES,
    SUPPORTED_OPS,
    activation_op,
    affine_scale,
    bias_parameter,
    check_pass_through,
    conv_op,
    gemm_op,
    pool_op,
    weight_parameter,
)
from verifier.onnx.folding import ConstantFolder
from verifier.onnx.index import NodeIndex
from verifier.onnx.layout import (
    TensorValue,
    concat_op,
    graph_ends,
    reduce_mean_ops,
    slice_ops,
)
from verifier.onnx.limits import check_sample_size
from verifier.onnx.reading import (
    check_model,
    load_checked_model,
    one_line,
    read_model,
)
from verifier.onnx.shape_values import int_input, reshaped

__all__ = ["SUPPORTED_OPS", "check_model", "graph_from_model", "load_graph", "read_model"]


def load_graph(path: Path) -> Graph:
    """Load an ONNX classifier as a DAG of typed ops whose forward pass matches onnxruntime.

    Args:
        path: path to an .onnx file (external data is read relative to it).

    Returns:
        The graph; parameters are float32 tensors keyed by initializer name. A `UserWarning`
        is issued for each parameter stored in another floating-point dtype.

    Raises:
        GraphError: the file is missing, empty, truncated or not ONNX; the checker or shape
            inference rejects it; it has NaN/Inf constants, an unsupported op, a cycle, several
            inputs or outputs, an output no node produces, an input shape other than
            (batch, *fixed) or fixed without a batch axis, a shape that cannot be resolved, or
            an output other than (batch, n_classes).
    """
    path = Path(path)
    return graph_from_model(load_checked_model(path), path, stacklevel=3)


def graph_from_model(model: onnx.ModelProto, path: Path, *, stacklevel: int = 2) -> Graph:
    """Map a checked, shape-inferred model (see `load_checked_model`) onto a DAG of ops.

    Args:
        model: the model, local functions inlined, inferred shapes in `graph.value_info`.
        path: the file it came from, for messages.
        stacklevel: passed to `warnings.warn` for the dtype-conversion notes.

    Returns:
        The graph, as `load_graph` describes it.

    Raises:
        GraphError: as `load_graph`.
    """
    builder = GraphBuilder(path, model)
    graph = builder.build()
    for note in builder.notes:
        warnings.warn(note, stacklevel=stacklevel)
    return graph


class GraphBuilder:
    """State of one `load_graph` call: constants, producers, consumers and the DAG walk."""

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
        self.inferred = {
            v.name: v for v in [*self.graph.value_info, *self.graph.output, *self.graph.input]
        }
        self.parameters: dict[str, torch.Tensor] = {}
        self.parameter_roots: dict[str, str] = {}
        self.constant_roots: dict[str, str] = {}
        self.notes: list[str] = []
        self.trust_inference = True
        # the DAG being built: ONNX tensor -> its graph value; ops; graph tensor -> op index
        self.values: dict[str, TensorValue] = {}
        self.ops: list[Op] = []
        self.writer: dict[str, int] = {}
        self.shape_of: dict[str, tuple[int, ...]] = {}
        self.skip: set[int] = set()
        self.conv_pads: dict[str, tuple[int, int, int, int]] = {}
        self.taken = {name for n in self.nodes for name in [*n.input, *n.output]}
        self.taken |= {v.name for v in [*self.graph.input, *self.graph.output]}
        self.index: NodeIndex
        self.batched_model = True
        self.batches: tuple[int, ...] = (1, 2, 3)

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
        self.taken |= set(self.constants)
        ends = graph_ends(self.path, self.graph)
        input_value, output_name = ends.input, ends.output_name
        self.batched_model, self.batches = input_value.batched, ends.batches
        self.index = NodeIndex(
            self.path, self.nodes, self.folder, self.inferred, input_value.name, output_name
        )
        check_sample_size(input_value.shape, f"{self.path}: input '{input_value.name}'")
        self.values[input_value.name] = input_value
        self.shape_of[input_value.name] = input_value.shape
        for node in self.index.computed:
            if id(node) not in self.skip:
                self._map(node)
        logits = self._logits(output_name)
        self._check_untied()
        return Graph(
            ops=tuple(self.ops),
            parameters=self.parameters,
            input_name=input_value.name,
            input_shape=input_value.shape,
            output_name=output_name,
            n_classes=logits.shape[0],
        )

    def _logits(self, output: str) -> TensorValue:
        """The output value as (batch, n_classes), written by an op named after the output."""
        value = self.values[output]
        if not value.batched and len(value.shape) == 2 and value.shape[0] == 1:
            value = self.as_batched(self.index.producer[output], value)
        if len(value.shape) != 1:
            raise GraphError(
                f"{self.path}: output '{output}' has shape (batch, "
                f"{', '.join(map(str, value.shape))}); a classifier must output (batch, n_classes)"
            )
        if value.name not in self.writer:
            raise GraphError(
                f"{self.path}: output '{output}' is the graph input passed through; there is "
                "nothing to bound, export a classifier"
            )
        if value.name != output:
            self._rename(value.name, output)
        needed = {output}
        kept: list[Op] = []
        for op in reversed(self.ops):
            if op.output in needed:  # ops the output does not depend on (cancelled Transposes)
                kept.append(op)
                needed.update(op.inputs)
        self.ops = kept[::-1]
        return value

    def _rename(self, old: str, new: str) -> None:
        def swap(name: str) -> str:
            return new if name == old else name

        self.ops = [
            replace(op, inputs=tuple(swap(i) for i in op.inputs), output=swap(op.output))
            for op in self.ops
        ]

    def exclusive(self, node: NodeProto, tensor: str) -> bool:
        """Whether `node` is the only reader of the values of graph tensor behind `tensor`,
        also through the pass-through nodes (Identity, Dropout, Cast) in between."""
        while True:
            if self.index.sole_user(tensor) is not node:
                return False
            made = self.index.producer.get(tensor)
            if made is None or made.op_type not in PASS_THROUGH:
                return self.values[tensor].name == tensor
            node, tensor = made, made.input[0]

    # ----------------------------------------------------------------- constants
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

    def int_input(self, node: NodeProto, index: int) -> list[int]:
        """The integers of input `index` of `node` (see `verifier.onnx.shapes.int_input`)."""
        return int_input(self, node, index)

    def _check_untied(self) -> None:
        for root, user in self.parameter_roots.items():
            if root in self.constant_roots:
                raise GraphError(
                    f"{self.path}: '{root}' is a parameter of node '{user}' and also a constant "
                    f"of node '{self.constant_roots[root]}'; store them as separate initializers "
                    "(e.g. export without constant deduplication)"
                )

    # ----------------------------------------------------------------- emitting ops
    def fresh(self, base: str) -> str:
        k = 1
        while f"{base}:{k}" in self.taken:
            k += 1
        self.taken.add(f"{base}:{k}")
        return f"{base}:{k}"

    def emit(
        self,
        node: NodeProto,
        ops: list[Op],
        inputs: list[TensorValue],
        out: str,
        *,
        batched: bool | None = None,
    ) -> TensorValue:
        """Append a chain of unwired ops (the first reads `inputs`), the last writing `out`.

        Returns:
            The value of the last op (or the first input when `ops` is empty).
        """
        if not ops:
            return inputs[0]
        names = [v.name for v in inputs]
        shapes = [v.shape for v in inputs]
        target = names[0]
        for k, op in enumerate(ops):
            target = out if k == len(ops) - 1 else self.fresh(out)
            wired = replace(op, inputs=tuple(names), output=target)
            shape = self._probe(node, wired, shapes)
            if isinstance(op, Pool) and op.ceil_mode:
                # onnx shape inference keeps ceil_mode windows that start in the end padding;
                # onnxruntime and torch drop them (see graph.pool_output_size): from here on
                # the inferred shapes may be off, so stop comparing with them
                self.trust_inference = False
            self.writer[target] = len(self.ops)
            self.shape_of[target] = shape
            self.ops.append(wired)
            names, shapes = [target], [shape]
        flag = inputs[0].batched if batched is None else batched
        return TensorValue(target, shapes[0], flag)

    def set_output(
        self, node: NodeProto, tensor: str, value: TensorValue, *, check: bool = True
    ) -> None:
        """Record the graph value of ONNX tensor `tensor`, checked against shape inference."""
        self.values[tensor] = value
        if check:
            self._check_inferred(node, tensor, value)

    def _probe(self, node: NodeProto, op: Op, shapes: list[tuple[int, ...]]) -> tuple[int, ...]:
        """Per-sample output shape of `op`, computed on meta tensors (no arithmetic)."""
        try:
            inputs = [torch.empty((1, *s), device="meta") for s in shapes]
            out = apply_node(op, inputs, self.parameters)
        except Exception as err:  # noqa: BLE001 - torch reports shape errors in several types
            shown = " and ".join(map(str, shapes))
            raise self.fail(
                node, f"cannot be applied to a sample of shape {shown} ({one_line(err)})"
            ) from err
        shape = tuple(out.shape[1:])
        check_sample_size(shape, self.where(node))  # issue 23: before anything allocates it
        return shape

    def _check_inferred(self, node: NodeProto, tensor: str, value: TensorValue) -> None:
        info = self.inferred.get(tensor)
        if not self.trust_inference or info is None or not info.type.tensor_type.HasField("shape"):
            return
        dims = list(info.type.tensor_type.shape.dim)
        onnx_dims = [d.dim_value if d.HasField("dim_value") else None for d in dims]
        if value.batched:
            onnx_dims = onnx_dims[1:]
        if len(dims) != value.onnx_rank or any(
            d is not None and d != s for d, s in zip(onnx_dims, value.shape, strict=True)
        ):
            shown = ", ".join("?" if d is None else str(d) for d in onnx_dims)
            what = "per-sample shape" if value.batched else "shape"
            raise self.fail(
                node,
                f"ONNX infers {what} ({shown}) but this op maps to {value.shape}; "
                "this configuration is not supported",
            )

    def as_batched(self, node: NodeProto, value: TensorValue) -> TensorValue:
        """`value` with the batch axis first: a tensor without one must start with an axis of
        size 1 (a model of one sample unsqueezes it before a Conv or Gemm), which becomes the
        batch axis."""
        if value.batched:
            return value
        if value.shape[:1] != (1,):
            raise self.fail(
                node,
                f"needs its input as (N, ...), but the model has no batch axis and the input "
                f"has shape {value.shape}; only N = 1 (one sample) is supported",
            )
        name = self.names[id(node)]
        return self.emit(
            node, [Reshape(name, value.shape[1:])], [value], self.fresh(value.name), batched=True
        )

    # ----------------------------------------------------------------- the walk
    def _map(self, node: NodeProto) -> None:
        op = node.op_type
        if op != "Split":
            for out in node.output[1:]:
                if out and (self.index.users(out) or out == self.index.output_name):
                    raise self.fail(
                        node, f"its extra output '{out}' is used; only the first may be"
                    )
        out = node.output[0]
        if op in PASS_THROUGH:
            check_pass_through(self, node)
            self.set_output(node, out, self.values[node.input[0]])
        elif op == "MatMul":
            self._matmul(node)
        elif op in ELEMENTWISE:
            map_binary(self, node)
        elif op == "BatchNormalization":
            map_batchnorm(self, node)
        elif op == "Transpose":
            map_transpose(self, node)
        elif op == "Pad":
            map_pad(self, node)
        elif op == "Split":
            map_split(self, node)
        elif op == "Concat":
            values = [self.values[i] for i in node.input if i in self.values]
            concat = concat_op(self, node, values)
            self.set_output(node, out, self.emit(node, [concat], values, out))
        else:
            value = self.values[node.input[0]]
            ops: list[Op]
            if op == "Gemm":
                value = self.as_batched(node, value)
                ops = [gemm_op(self, node, value.shape)]
            elif op == "Conv":
                extra = self.conv_pads.get(node.input[0])
                value = self.as_batched(node, value)
                ops = [conv_op(self, node, value.shape, extra)]
            elif op in POOLS:
                value = self.as_batched(node, value)
                ops = [pool_op(self, node, value.shape)]
            elif op in ACTIVATIONS:
                ops = [activation_op(self, node)]
            elif op in RESHAPES:
                shape, batched = (result := reshaped(self, node, value)).shape, result.batched
                index = self.writer.get(value.name)
                if index is not None and isinstance(self.ops[index], Reshape):
                    # one reshape instead of two (the first is dropped if nothing else reads it)
                    source = self.ops[index].inputs[0]
                    value = TensorValue(source, self.shape_of[source], value.batched)
                ops = [] if shape == value.shape else [Reshape(self.names[id(node)], shape)]
                result = self.emit(node, ops, [value], out)
                self.set_output(node, out, TensorValue(result.name, shape, batched))
                return
            elif op == "Slice":
                ops = slice_ops(self, node, value)
            else:  # ReduceMean
                ops = reduce_mean_ops(self, node, value)
            self.set_output(node, out, self.emit(node, ops, [value], out))

    def _matmul(self, node: NodeProto) -> None:
        if node.input[0] in self.constants:
            raise self.fail(node, "the computed tensor must be the left operand (x @ W)")
        if node.input[1] not in self.constants:
            raise self.fail(
                node,
                f"multiplies two computed tensors ('{node.input[0]}' @ '{node.input[1]}'); "
                "only x @ W with a constant W is supported",
            )
        if self.constants[node.input[1]].ndim != 2:
            raise self.fail(node, f"its right operand '{node.input[1]}' must be a 2-D constant")
        value = self.values[node.input[0]]
        source, transposed = weight_parameter(self, node, node.input[1])
        n_out = self.constants[node.input[1]].shape[1]
        layout = "out_in" if transposed else "in_out"
        out = node.output[0]
        add = self.index.sole_user(out)
        bias, scale, final = None, None, out
        if add is not None and add.op_type == "Add":
            others = [i for i in add.input if i != out]
            constant = self.constants.get(others[0]) if len(others) == 1 else None
            if constant is not None and constant.size == n_out and constant.shape[-1:] == (n_out,):
                if constant.ndim <= value.onnx_rank:
                    self.skip.add(id(add))
                    bias, shift = bias_parameter(self, add, others[0], n_out)
                    scale = affine_scale(n_out, 1.0, 1.0, shift)
                    final = add.output[0]
        linear = Linear(self.names[id(node)], source, bias, layout, scale)  # type: ignore[arg-type]
        result = self.emit(node, [linear], [value], final)
        self.set_output(
            node, out, result
        )  # the product has the shape of the sum (read by Shape only)
        if final != out:
            self.set_output(node, final, result)

"""Cutting an exported classifier at its first boxed parameter: a frozen prefix and a suffix.

A user may export a whole classifier (a transformer encoder and its head, say) and box only the
head. Only the part of the graph from the first boxed parameter on needs bounds, so the model is
cut there:

- the **cut tensor** is the computed input of the first node (in topological order) that uses a
  boxed parameter, directly or through constant-only nodes such as a Transpose;
- the **frozen prefix** is every node the cut tensor depends on. It runs in onnxruntime, so it
  may use any op; it must have one graph input, fed from the data set's samples;
- the **suffix** is every node that depends on the cut tensor. It is parsed by
  `verifier.onnx.importer` into a `Graph` whose input is the cut tensor, so it must use only ops
  the bound engine supports. It may branch and join again (residual blocks), but the cut tensor
  must be the only computed tensor that crosses the cut: a node after it that also reads a
  tensor computed before it (a skip connection across the cut) is refused, naming the node.
  A model whose input has no batch axis (see `verifier.onnx.importer`) is not cut.

`load_split_model` returns a `PrefixedGraph`: the suffix `Graph` (what search, bounds and
certificates see: its parameters are the suffix's) plus the `FrozenPrefix`.
`verifier.data.validate_for_model` maps raw samples through the prefix once (batched, cached per
data set, progress through a callback) and hands the features on; samples that already have
the cut tensor's shape (an .npz of features) are taken as features directly.
`load_bounded_graph` is the pipeline's door: it keeps the whole model when the bound engine
supports all of it, and cuts only when it does not.
"""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final

import numpy as np
import onnx
import torch
from onnx import NodeProto, TensorProto
from torch import Tensor

from verifier.data.samples import Dataset
from verifier.errors import DataError, GraphError
from verifier.graph import Graph
from verifier.onnx.folding import SHAPE_SOURCES, constant_roots
from verifier.onnx.importer import SUPPORTED_OPS, graph_from_model, load_graph
from verifier.onnx.layout import declared_dims, lacks_batch_axis
from verifier.onnx.reading import load_checked_model, one_line

OnBatch = Callable[[int, int], None]
"""Progress of a feature computation: called with (samples done, samples in all)."""

_ORT_TYPES: Final = {
    "tensor(float)": np.float32,
    "tensor(double)": np.float64,
    "tensor(float16)": np.float16,
    "tensor(int64)": np.int64,
    "tensor(int32)": np.int32,
    "tensor(bool)": np.bool_,
}
_FLOAT_TYPES: Final = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16}


class FrozenPrefix:
    """The frozen part of a model before the cut, run by onnxruntime, one graph input.

    Attributes:
        source: the model file it was cut from.
        input_name: the prefix's (and the whole model's) graph input.
        input_shape: per-sample input shape; None marks a symbolic axis (e.g. sequence length).
        cut_tensor: the name of the tensor it produces, the suffix's input.
        feature_shape: per-sample shape of the cut tensor.
    """

    def __init__(
        self,
        model: onnx.ModelProto,
        *,
        source: Path,
        cut_tensor: str,
        feature_shape: tuple[int, ...],
        batch_size: int = 256,
        threads: int = 0,
        on_batch: OnBatch | None = None,
    ) -> None:
        """Open an onnxruntime session on the prefix model.

        Args:
            model: the prefix model, its only output the cut tensor.
            source: the model file it was cut from, for messages.
            cut_tensor: the name of the cut tensor.
            feature_shape: per-sample shape of the cut tensor.
            batch_size: samples per onnxruntime call.
            threads: onnxruntime intra-op threads (0: its default).
            on_batch: progress callback, called after each batch with (done, total).

        Raises:
            GraphError: onnxruntime cannot load the prefix, or it has several inputs.
        """
        import onnxruntime as ort

        self.source = source
        self.cut_tensor = cut_tensor
        self.feature_shape = feature_shape
        self.batch_size = batch_size
        self.on_batch = on_batch
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        try:
            self._session = ort.InferenceSession(
                model.SerializeToString(), options, providers=["CPUExecutionProvider"]
            )
        except Exception as err:  # noqa: BLE001 - onnxruntime raises its own error types
            raise GraphError(
                f"{source}: onnxruntime cannot run the frozen prefix before tensor "
                f"'{cut_tensor}' ({one_line(err)}); check the model with onnxruntime"
            ) from err
        inputs = self._session.get_inputs()
        if len(inputs) != 1:
            names = ", ".join(f"'{i.name}'" for i in inputs)
            raise GraphError(
                f"{source}: the frozen prefix before tensor '{cut_tensor}' takes {len(inputs)} "
                f"inputs ({names}); the data loaders feed one array: export a single-input "
                "model, or compute the features yourself and give an .npz of features with "
                "the head's ONNX"
            )
        self.input_name: str = inputs[0].name
        self._input_dtype = _ORT_TYPES.get(inputs[0].type)
        if self._input_dtype is None:
            raise GraphError(
                f"{source}: the model input '{self.input_name}' has type {inputs[0].type}; "
                f"supported: {', '.join(_ORT_TYPES)}"
            )
        self.input_shape: tuple[int | None, ...] = tuple(
            d if isinstance(d, int) and d > 0 else None for d in inputs[0].shape[1:]
        )
        self._cache: dict[tuple[str, tuple[int, ...]], Tensor] = {}

    def accepts(self, sample_shape: tuple[int, ...]) -> bool:
        """True when samples of this shape fit the prefix input (symbolic axes match any size)."""
        return len(sample_shape) == len(self.input_shape) and all(
            d is None or d == s for d, s in zip(self.input_shape, sample_shape, strict=True)
        )

    def features(self, x: Tensor | np.ndarray, *, on_batch: OnBatch | None = None) -> Tensor:
        """The cut tensor for every sample, computed by onnxruntime in batches.

        Args:
            x: samples, shape (n, *input_shape), converted to the input's element type (float
                samples holding token ids become int64 ids).
            on_batch: progress callback (default: the one given at construction).

        Returns:
            float32 features, shape (n, *feature_shape), on the CPU.

        Raises:
            DataError: the prefix yields NaN/Inf, or features of another shape.
        """
        report = on_batch or self.on_batch
        array = x.detach().cpu().numpy() if isinstance(x, Tensor) else np.asarray(x)
        n = int(array.shape[0])
        parts: list[np.ndarray] = []
        for start in range(0, n, self.batch_size):
            batch = np.ascontiguousarray(array[start : start + self.batch_size], self._input_dtype)
            (out,) = self._session.run([self.cut_tensor], {self.input_name: batch})
            parts.append(np.asarray(out, dtype=np.float32))
            if report is not None:
                report(min(start + self.batch_size, n), n)
        if parts:
            feats = np.concatenate(parts)
        else:
            feats = np.zeros((0, *self.feature_shape), np.float32)
        if tuple(feats.shape[1:]) != self.feature_shape:
            raise DataError(
                f"{self.source}: the frozen prefix gives features of shape "
                f"{tuple(feats.shape[1:])} for tensor '{self.cut_tensor}'; the suffix expects "
                f"{self.feature_shape} (export with fixed non-batch axes)"
            )
        bad = ~np.isfinite(feats.reshape(n, -1)).all(axis=1) if n else np.zeros(0, bool)
        if bad.any():
            raise DataError(
                f"{self.source}: the frozen prefix gives NaN or Inf features for "
                f"{int(bad.sum())} of {n} samples (first at index {int(np.flatnonzero(bad)[0])})"
            )
        return torch.from_numpy(feats)

    def map_dataset(self, data: Dataset) -> Dataset:
        """The data set with samples replaced by their features, computed once per data set.

        The result keeps the name, split, labels and `source_sha256` of the raw data (the
        data the features come from).

        Raises:
            DataError: the samples do not fit the prefix input, or the prefix output is bad.
        """
        x = data.x
        if not self.accepts(data.sample_shape):
            wanted = tuple("?" if d is None else d for d in self.input_shape)
            flat = [d for d in self.input_shape if d is not None]
            if len(self.input_shape) == 1 or len(flat) != len(self.input_shape):
                raise self._shape_error(data, wanted)
            if len(data.sample_shape) != 1 or math.prod(data.sample_shape) != math.prod(flat):
                raise self._shape_error(data, wanted)
            x = x.reshape(len(data), *flat)
        key = (data.source_sha256, tuple(x.shape))
        if key not in self._cache:
            self._cache[key] = self.features(x)
        return Dataset(
            data.name, data.split, self._cache[key], data.y, data.n_classes, data.source_sha256
        )

    def _shape_error(self, data: Dataset, wanted: tuple[object, ...]) -> DataError:
        return DataError(
            f"data set '{data.name}' [{data.split}]: samples have shape {data.sample_shape}; "
            f"the model input '{self.input_name}' expects {wanted}, or features of the cut "
            f"tensor '{self.cut_tensor}' with shape {self.feature_shape}"
        )


@dataclass(frozen=True, eq=False)
class PrefixedGraph(Graph):
    """The suffix of a cut model as a `Graph`, with the frozen prefix that feeds it.

    Every `Graph` method works on the suffix: `input_shape` is the cut tensor's shape and
    `parameters` are the suffix's. `verifier.data.validate_for_model` maps raw samples through
    `prefix` first.

    Attributes:
        prefix: the frozen prefix (onnxruntime).
        cut_node: the first node that uses a boxed parameter, whose input is the cut tensor.
    """

    prefix: FrozenPrefix | None = field(default=None, kw_only=True)
    cut_node: str = field(default="", kw_only=True)

    def prepare_data(self, data: Dataset) -> Dataset:
        """Raw samples through the prefix; samples already shaped like the cut tensor stay."""
        if self.prefix is None:
            return data
        if self.prefix.accepts(data.sample_shape) or data.sample_shape != self.input_shape:
            return self.prefix.map_dataset(data)
        return data

    def forward_raw(self, x: Tensor) -> Tensor:
        """Logits of the whole model: the prefix in onnxruntime, then the suffix (float32)."""
        if self.prefix is None:
            return self.forward(x)
        return self.forward(self.prefix.features(x).to(x.device))


def prefix_progress(on_phase: Callable[[str], None] | None) -> OnBatch | None:
    """A feature-progress callback that reports through phase messages at 0, 25, 50, 75, 100 %.

    Args:
        on_phase: the pipeline's phase callback, or None (then no progress is reported).

    Returns:
        An `OnBatch` callback, or None.
    """
    if on_phase is None:
        return None
    shown: dict[int, int] = {}

    def on_batch(done: int, total: int) -> None:
        quarter = 4 * done // max(total, 1)
        if shown.get(total, -1) < quarter or done == total:
            if shown.get(total) == 4:
                return
            shown[total] = quarter
            on_phase(f"frozen prefix (onnxruntime): features of {done}/{total} samples")

    return on_batch


def load_bounded_graph(
    path: Path,
    parameters: str | Sequence[str],
    *,
    on_batch: OnBatch | None = None,
    batch_size: int = 256,
) -> Graph:
    """The graph the bound engine works on: the whole model, or its suffix after a cut.

    The whole model is used when the bound engine supports all of it (the behaviour of
    `load_graph`) or when every parameter is boxed ("all"); otherwise the model is cut at its
    first boxed parameter (see the module docstring).

    Args:
        path: the ONNX model.
        parameters: "all", or names / glob patterns of the boxed initializers.
        on_batch: progress of the prefix's feature computation.
        batch_size: samples per onnxruntime call of the prefix.

    Returns:
        A `Graph`, or a `PrefixedGraph` when the model was cut.

    Raises:
        GraphError: the model cannot be read, or the part from the first boxed parameter on is
            not a graph the bound engine supports (the message names the ops).
        SpecError: a pattern matches no initializer.
    """
    try:
        return load_graph(path)
    except GraphError:
        if isinstance(parameters, str):
            raise
    return load_split_model(path, parameters, on_batch=on_batch, batch_size=batch_size)


def load_split_model(
    path: Path,
    boxed: Sequence[str],
    *,
    on_batch: OnBatch | None = None,
    batch_size: int = 256,
    threads: int = 0,
) -> Graph:
    """Cut an ONNX classifier at its first boxed parameter (see the module docstring).

    Args:
        path: the ONNX model.
        boxed: names or glob patterns (fnmatch) of the boxed initializers.
        on_batch: progress of the prefix's feature computation.
        batch_size: samples per onnxruntime call of the prefix.
        threads: onnxruntime intra-op threads for the prefix (0: its default).

    Returns:
        A `PrefixedGraph`; a plain `Graph` of the whole model when the first boxed parameter
        is used on the graph input itself (nothing to cut off).

    Raises:
        SpecError: a pattern matches no initializer.
        GraphError: the cut tensor has no fixed per-sample shape, the suffix has unsupported
            ops or reads another tensor computed before the cut, a boxed parameter is used
            before the cut, the input has no batch axis, or the prefix cannot run in
            onnxruntime.
    """
    path = Path(path)
    model = load_checked_model(path)
    cut = _Cut(path, model, boxed)
    if cut.tensor in cut.graph_inputs:
        return graph_from_model(model, path, stacklevel=3)
    cut.check_batch_axis()
    suffix_model = cut.suffix_model()
    try:
        suffix = graph_from_model(suffix_model, path, stacklevel=3)
    except GraphError as err:
        raise GraphError(f"{err} ({cut.describe()})") from err
    prefix = FrozenPrefix(
        cut.prefix_model(),
        source=path,
        cut_tensor=cut.tensor,
        feature_shape=suffix.input_shape,
        batch_size=batch_size,
        threads=threads,
        on_batch=on_batch,
    )
    return PrefixedGraph(
        ops=suffix.ops,
        parameters=suffix.parameters,
        input_name=suffix.input_name,
        input_shape=suffix.input_shape,
        output_name=suffix.output_name,
        n_classes=suffix.n_classes,
        prefix=prefix,
        cut_node=cut.node_name,
    )


class _Cut:
    """Where one model is cut, and the two models either side (symbolic: nothing is run)."""

    def __init__(self, path: Path, model: onnx.ModelProto, boxed: Sequence[str]) -> None:
        self.path = path
        self.model = model
        self.graph = model.graph
        self.nodes = list(self.graph.node)
        self.names = [n.name or f"{n.op_type}_{i}" for i, n in enumerate(self.nodes)]
        self.roots = constant_roots(self.graph)
        initializers = {i.name for i in self.graph.initializer}
        self.graph_inputs = [i.name for i in self.graph.input if i.name not in initializers]
        self.inferred = {
            v.name: v for v in [*self.graph.value_info, *self.graph.output, *self.graph.input]
        }
        self.boxed = self._match(boxed)
        self.index, self.parameter = self._first_boxed_node()
        node = self.nodes[self.index]
        self.node_name = self.names[self.index]
        dynamic = [i for i in node.input if i and i not in self.roots]
        if len(dynamic) != 1:
            raise GraphError(
                f"{path}: node '{self.node_name}' ({node.op_type}), the first to use boxed "
                f"parameter '{self.parameter}', combines {len(dynamic)} computed tensors "
                f"({', '.join(dynamic)}); the model can only be cut where one tensor flows"
            )
        self.tensor = dynamic[0]

    def check_batch_axis(self) -> None:
        """Refuse to cut a model whose input has no batch axis: the prefix runs on batches.

        Raises:
            GraphError: the model's input has no batch axis.
        """
        inputs = [i for i in self.graph.input if i.name in self.graph_inputs]
        if len(inputs) != 1 or len(self.graph.output) != 1:
            return
        dims = declared_dims(inputs[0])
        if dims and lacks_batch_axis(dims, declared_dims(self.graph.output[0])):
            raise GraphError(
                f"{self.path}: input '{inputs[0].name}' has no batch axis, so the model cannot be "
                f"cut ({self.describe()}); box every parameter (`parameters: all`), or export "
                "the model with a batch axis first"
            )

    def describe(self) -> str:
        node = self.nodes[self.index]
        return (
            f"boxing '{self.parameter}' cuts the model at tensor '{self.tensor}', the input of "
            f"node '{self.node_name}' ({node.op_type})"
        )

    def _match(self, patterns: Sequence[str]) -> set[str]:
        from verifier.errors import SpecError

        candidates = [i.name for i in self.graph.initializer] + [
            n.output[0] for n in self.nodes if n.op_type == "Constant"
        ]
        chosen: set[str] = set()
        for pattern in patterns:
            matches = [c for c in candidates if fnmatch.fnmatchcase(c, pattern)]
            if not matches:
                known = [i.name for i in self.graph.initializer]
                shown = ", ".join(known[:20]) + (", ..." if len(known) > 20 else "")
                raise SpecError(
                    f"parameters: '{pattern}' matches no initializer of {self.path}; known: {shown}"
                )
            chosen.update(matches)
        return chosen

    def _uses(self, node: NodeProto) -> set[str]:
        used: set[str] = set()
        for name in node.input:
            used |= self.roots.get(name, frozenset()) & self.boxed
        return used

    def _is_dynamic(self, node: NodeProto) -> bool:
        return not all(out in self.roots for out in node.output if out)

    def _first_boxed_node(self) -> tuple[int, str]:
        for index, node in enumerate(self.nodes):
            if self._is_dynamic(node):
                used = self._uses(node)
                if used:
                    return index, sorted(used)[0]
        raise GraphError(
            f"{self.path}: no node computes with the boxed parameters "
            f"({', '.join(sorted(self.boxed))}); box the weights of a layer"
        )

    def _suffix_indices(self) -> list[int]:
        produced: set[str] = {self.tensor}
        chosen: list[int] = []
        for index, node in enumerate(self.nodes):
            if not self._is_dynamic(node):
                continue
            dynamic = [i for i in node.input if i and i not in self.roots]
            if any(i in produced for i in dynamic):
                chosen.append(index)
                produced.update(o for o in node.output if o)
        self._check_supported(chosen)
        inside = set(chosen)
        for index in chosen:
            node = self.nodes[index]
            for name in node.input:
                if name and name not in self.roots and name not in produced:
                    raise GraphError(
                        f"{self.path}: node '{self.names[index]}' ({node.op_type}) after the cut "
                        f"also reads '{name}', computed before it (a skip connection across the "
                        f"cut); {self.describe()}; box parameters from a point that only one "
                        "computed tensor crosses (e.g. the start of a residual block)"
                    )
        for index, node in enumerate(self.nodes):
            if self._is_dynamic(node) and index not in inside and self._uses(node):
                raise GraphError(
                    f"{self.path}: boxed parameter '{sorted(self._uses(node))[0]}' is used by "
                    f"node '{self.names[index]}' ({node.op_type}), which does not follow the "
                    f"cut ({self.describe()}); box parameters that all come after the cut"
                )
        output = self.graph.output[0].name if self.graph.output else ""
        if output not in produced:
            raise GraphError(
                f"{self.path}: the graph output '{output}' does not depend on the cut tensor "
                f"({self.describe()}); box parameters on the path to the logits"
            )
        return chosen

    def _check_supported(self, chosen: Iterable[int]) -> None:
        shape_tensors: set[str] = set()
        unsupported: list[str] = []
        for index in chosen:
            node = self.nodes[index]
            dynamic = [i for i in node.input if i and i not in self.roots]
            if node.op_type in SHAPE_SOURCES or (
                dynamic and all(i in shape_tensors for i in dynamic)
            ):
                shape_tensors.update(o for o in node.output if o)
            elif node.op_type not in SUPPORTED_OPS or node.domain not in ("", "ai.onnx"):
                unsupported.append(f"{node.op_type} (node '{self.names[index]}')")
        if unsupported:
            shown = ", ".join(unsupported[:6]) + (", ..." if len(unsupported) > 6 else "")
            raise GraphError(
                f"{self.path}: {self.describe()}; the bound engine must handle every node from "
                f"there on, but these ops are not supported: {shown}; box only parameters after "
                "the last of them (e.g. the classification head) so that the rest runs frozen "
                "in onnxruntime"
            )

    def _cut_value_info(self) -> onnx.ValueInfoProto:
        value = self.inferred.get(self.tensor)
        ttype = value.type.tensor_type if value is not None else None
        if ttype is None or not ttype.HasField("shape") or ttype.elem_type not in _FLOAT_TYPES:
            raise GraphError(
                f"{self.path}: the type or shape of tensor '{self.tensor}' is unknown after shape "
                f"inference ({self.describe()}); export with fixed non-batch axes"
            )
        dims = list(ttype.shape.dim)
        sample = [d.dim_value if d.HasField("dim_value") else 0 for d in dims[1:]]
        if len(dims) < 2 or any(s <= 0 for s in sample):
            shown = ", ".join(str(s) if s > 0 else "?" for s in sample)
            raise GraphError(
                f"{self.path}: tensor '{self.tensor}' has per-sample shape ({shown}), not fixed "
                f"({self.describe()}); export with fixed non-batch axes (e.g. a fixed sequence "
                "length, or pool before the head)"
            )
        batch: Any = dims[0].dim_value if dims[0].HasField("dim_value") else "batch"
        return onnx.helper.make_tensor_value_info(self.tensor, ttype.elem_type, [batch, *sample])

    def _model(
        self,
        indices: Sequence[int],
        inputs: list[onnx.ValueInfoProto],
        outputs: list[onnx.ValueInfoProto],
        name: str,
    ) -> onnx.ModelProto:
        """A model of the given nodes plus every constant node and initializer they need."""
        keep = set(indices)
        needed = {i for index in indices for i in self.nodes[index].input if i}
        for index in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[index]
            if index not in keep and not self._is_dynamic(node):
                if any(o in needed for o in node.output if o):
                    keep.add(index)
                    needed.update(i for i in node.input if i)
        nodes = [self.nodes[i] for i in sorted(keep)]
        ends = {v.name for v in [*inputs, *outputs]}
        tensors = (needed | {o for n in nodes for o in n.output}) - ends
        graph = onnx.helper.make_graph(
            nodes,
            name,
            inputs,
            outputs,
            initializer=[i for i in self.graph.initializer if i.name in needed],
            value_info=[v for v in self.graph.value_info if v.name in tensors],
        )
        model = onnx.helper.make_model(
            graph, opset_imports=list(self.model.opset_import), ir_version=self.model.ir_version
        )
        return model

    def suffix_model(self) -> onnx.ModelProto:
        """The part from the cut tensor to the logits, its input the cut tensor."""
        indices = self._suffix_indices()
        return self._model(
            indices, [self._cut_value_info()], list(self.graph.output), f"{self.graph.name}_head"
        )

    def prefix_model(self) -> onnx.ModelProto:
        """Every node the cut tensor depends on, its only output the cut tensor."""
        wanted = {self.tensor}
        indices: list[int] = []
        for index in range(len(self.nodes) - 1, -1, -1):
            node = self.nodes[index]
            if any(o in wanted for o in node.output if o):
                indices.append(index)
                wanted.update(i for i in node.input if i)
        inputs = [i for i in self.graph.input if i.name in wanted and i.name in self.graph_inputs]
        output = self.inferred[self.tensor]
        return self._model(sorted(indices), inputs, [output], f"{self.graph.name}_frozen_prefix")

"""Is an updated ONNX file the same network as the one a LID was computed for?

Two models are *compatible* when they differ only in the values of their floating-point
constants (initializers and Constant-node values): same opset, inputs, outputs, nodes with
their attributes, initializer names, shapes and dtypes, and the same non-float constants
(reshape targets, axes). Node names, doc strings, producer fields and shape-inference value
infos are ignored, since they do not change what the network computes.

`stored_tensors` reads every floating-point constant as an exact float64 copy together with
the dtype it is stored in, so membership in a LID can be decided in float64 on the very values
a runtime will use.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from onnx import AttributeProto, NodeProto, TensorProto, numpy_helper
from torch import Tensor

from verifier.errors import GraphError

_TORCH_DTYPES: dict[int, torch.dtype] = {
    TensorProto.FLOAT: torch.float32,
    TensorProto.DOUBLE: torch.float64,
    TensorProto.FLOAT16: torch.float16,
    TensorProto.BFLOAT16: torch.bfloat16,
}


@dataclass(frozen=True, eq=False)
class StoredTensor:
    """A floating-point constant of an ONNX model.

    Attributes:
        value: its exact value as a float64 tensor.
        dtype: the torch dtype it is stored in (float32, float64, float16 or bfloat16).
    """

    value: Tensor
    dtype: torch.dtype


def stored_tensors(model: onnx.ModelProto, *, source: Path | str) -> dict[str, StoredTensor]:
    """Every floating-point initializer and Constant-node value of `model`, keyed by name.

    Args:
        model: the decoded model (external data loaded).
        source: the file it came from, for messages.

    Returns:
        Exact float64 copies with their storage dtypes; an initializer wins over a Constant
        output of the same name, as in `verifier.onnx.export`.

    Raises:
        GraphError: a floating-point constant holds NaN or Inf.
    """
    out: dict[str, StoredTensor] = {}
    for name, data_type, array in _float_constants(model):
        value = torch.from_numpy(np.asarray(array, dtype=np.float64).copy())
        if not bool(torch.isfinite(value).all()):
            raise GraphError(
                f"{source}: tensor '{name}' contains NaN or Inf; the update diverged, so there "
                "is nothing to project: re-train it or start from the original model"
            )
        out[name] = StoredTensor(value, _TORCH_DTYPES[data_type])
    return out


def _float_constants(model: onnx.ModelProto) -> Iterator[tuple[str, int, np.ndarray[Any, Any]]]:
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                if attr.t.data_type in _TORCH_DTYPES:
                    yield node.output[0], attr.t.data_type, numpy_helper.to_array(attr.t)
            elif attr.name == "value_float":
                yield node.output[0], TensorProto.FLOAT, np.asarray(attr.f, np.float32)
            elif attr.name == "value_floats":
                yield node.output[0], TensorProto.FLOAT, np.asarray(attr.floats, np.float32)
    for init in model.graph.initializer:
        if init.data_type in _TORCH_DTYPES:
            yield init.name, init.data_type, numpy_helper.to_array(init)


def structure_difference(reference: onnx.ModelProto, other: onnx.ModelProto) -> str | None:
    """The first difference between two models outside their floating-point values.

    Args:
        reference: the model a LID was computed for.
        other: the updated model.

    Returns:
        None when the models compute the same function of their floating-point constants;
        otherwise a short description of the first difference found.
    """
    ref, oth = _skeleton(reference), _skeleton(other)
    if ref.SerializeToString(deterministic=True) == oth.SerializeToString(deterministic=True):
        return None
    opsets = (_opsets(ref), _opsets(oth))
    if opsets[0] != opsets[1]:
        return f"opset imports {opsets[1]} instead of {opsets[0]}"
    for what, ref_io, oth_io in (
        ("inputs", ref.graph.input, oth.graph.input),
        ("outputs", ref.graph.output, oth.graph.output),
    ):
        if [_text(v) for v in ref_io] != [_text(v) for v in oth_io]:
            return f"graph {what} differ: {_names(oth_io)} instead of {_names(ref_io)}"
    ref_init = {t.name: t for t in ref.graph.initializer}
    oth_init = {t.name: t for t in oth.graph.initializer}
    if set(ref_init) != set(oth_init):
        extra, missing = (
            sorted(set(oth_init) - set(ref_init)),
            sorted(set(ref_init) - set(oth_init)),
        )
        return f"initializers differ: new {extra}, missing {missing}"
    for name, tensor in ref_init.items():
        if tensor.SerializeToString(deterministic=True) != oth_init[name].SerializeToString(
            deterministic=True
        ):
            return (
                f"initializer '{name}' differs in shape, dtype or (non-float) value: "
                f"{_describe(oth_init[name])} instead of {_describe(tensor)}"
            )
    if len(ref.graph.node) != len(oth.graph.node):
        return f"{len(oth.graph.node)} nodes instead of {len(ref.graph.node)}"
    for index, (a, b) in enumerate(zip(ref.graph.node, oth.graph.node, strict=True)):
        if a.SerializeToString(deterministic=True) != b.SerializeToString(deterministic=True):
            return f"node {index} is {_node_text(b)} instead of {_node_text(a)}"
    return "the graphs differ outside their floating-point values (functions or training info)"


def _skeleton(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy with float values blanked and everything that does not compute removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for field in ("producer_name", "producer_version", "doc_string", "domain", "model_version"):
        out.ClearField(field)  # type: ignore[arg-type]
    del out.metadata_props[:]
    graph = out.graph
    for field in ("name", "doc_string"):
        graph.ClearField(field)  # type: ignore[arg-type]
    del graph.value_info[:]
    for init in graph.initializer:
        init.CopyFrom(_blank(init))
    for node in graph.node:
        node.ClearField("name")
        node.ClearField("doc_string")
        if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
            for attr in node.attribute:
                if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                    attr.t.CopyFrom(_blank(attr.t))
                elif attr.name == "value_float":
                    attr.f = 0.0
                elif attr.name == "value_floats":
                    attr.floats[:] = [0.0] * len(attr.floats)
    return out


def _blank(tensor: TensorProto) -> TensorProto:
    """Float tensors keep name, shape and dtype only; others are re-encoded canonically."""
    if tensor.data_type in _TORCH_DTYPES:
        out = TensorProto()
        out.name = tensor.name
        out.dims.extend(tensor.dims)
        out.data_type = tensor.data_type
        return out
    if tensor.data_type == TensorProto.STRING:
        return tensor
    return numpy_helper.from_array(numpy_helper.to_array(tensor), name=tensor.name)


def _opsets(model: onnx.ModelProto) -> list[tuple[str, int]]:
    return sorted((o.domain or "ai.onnx", o.version) for o in model.opset_import)


def _text(message: onnx.ValueInfoProto) -> bytes:
    return message.SerializeToString(deterministic=True)


def _names(values: object) -> list[str]:
    return [v.name for v in values]  # type: ignore[attr-defined]


def _describe(tensor: TensorProto) -> str:
    return f"{TensorProto.DataType.Name(tensor.data_type)}{list(tensor.dims)}"


def _node_text(node: NodeProto) -> str:
    attrs = ", ".join(a.name for a in node.attribute)
    return f"{node.op_type}({', '.join(node.input)}) [{attrs}]"

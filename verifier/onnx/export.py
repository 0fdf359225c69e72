"""Write an ONNX model with new parameter values: the way back from a LID to a deployable file.

`save_with_parameters` copies the source model and replaces the values of the named
initializers (or Constant-node outputs, for models whose weights are Constant nodes). Every
replaced tensor keeps its name, shape and dtype (a float16 weight is written back as float16,
rounding the new value); everything else in the file is left as it was.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper, numpy_helper
from torch import Tensor

from verifier.errors import DomainError
from verifier.onnx.importer import check_model, read_model

_FLOAT_TYPES = {TensorProto.FLOAT, TensorProto.DOUBLE, TensorProto.FLOAT16, TensorProto.BFLOAT16}


def save_with_parameters(
    source_path: Path, parameters: Mapping[str, Tensor], out_path: Path
) -> None:
    """Write `source_path` to `out_path` with the given parameter values, atomically.

    Args:
        source_path: the ONNX model whose structure is kept.
        parameters: new values keyed by initializer (or Constant output) name; any subset of the
            model's floating-point constants, each with the shape stored in the model.
        out_path: where to write; written through a temporary file in the same folder and
            renamed into place, so a half-written model never exists. May equal source_path.

    Raises:
        GraphError: the source model cannot be read or fails the ONNX checker.
        DomainError: a name is not a floating-point initializer or Constant output of the
            model, or a value has the wrong shape or is not finite.
    """
    source_path, out_path = Path(source_path), Path(out_path)
    model = read_model(source_path)
    targets = _named_tensors(model)
    for name, value in parameters.items():
        if name not in targets:
            raise DomainError(
                f"parameter '{name}' is not an initializer or Constant output of {source_path}; "
                "use the names listed by `verifier inspect`"
            )
        target = targets[name]
        shape, data_type = _shape_and_type(target)
        if data_type not in _FLOAT_TYPES:
            raise DomainError(
                f"parameter '{name}' of {source_path} is not a floating-point tensor "
                f"(ONNX type {TensorProto.DataType.Name(data_type)})"
            )
        array = value.detach().cpu().numpy()
        if tuple(array.shape) != shape:
            raise DomainError(
                f"parameter '{name}': expected shape {shape} as in {source_path}, "
                f"got {tuple(array.shape)}"
            )
        if not np.isfinite(array).all():
            raise DomainError(f"parameter '{name}': the new value contains NaN or Inf")
        array = array.astype(onnx.helper.tensor_dtype_to_np_dtype(data_type))
        if isinstance(target, TensorProto):
            target.CopyFrom(numpy_helper.from_array(array, name=target.name))
        elif target.type == AttributeProto.FLOAT:
            target.f = float(array)
        else:
            target.floats[:] = array.tolist()
    check_model(model, out_path)
    _write_atomically(model.SerializeToString(), out_path)


def _named_tensors(model: onnx.ModelProto) -> dict[str, TensorProto | AttributeProto]:
    """Initializers and Constant-node values by name: the protos themselves, to edit in place.

    A Constant given as `value` maps to its TensorProto; one given as `value_float` or
    `value_floats` maps to that attribute.
    """
    targets: dict[str, TensorProto | AttributeProto] = {}
    for node in model.graph.node:
        if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
            continue
        for attr in node.attribute:
            if attr.name == "value" and attr.type == AttributeProto.TENSOR:
                targets[node.output[0]] = attr.t
            elif attr.name in ("value_float", "value_floats"):
                targets[node.output[0]] = attr
    for init in model.graph.initializer:
        targets[init.name] = init
    return targets


def _shape_and_type(target: TensorProto | AttributeProto) -> tuple[tuple[int, ...], int]:
    if isinstance(target, TensorProto):
        return tuple(target.dims), target.data_type
    if target.type == AttributeProto.FLOAT:
        return (), TensorProto.FLOAT
    return (len(target.floats),), TensorProto.FLOAT


def _write_atomically(data: bytes, out_path: Path) -> None:
    out_path.parent.mkdir(parents=True, exist_ok=True)
    # mkstemp creates the file private (0600); give the result the mode a plain write would
    mode = out_path.stat().st_mode & 0o777 if out_path.exists() else 0o644
    fd, tmp_name = tempfile.mkstemp(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent)
    try:
        os.fchmod(fd, mode)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp_name, out_path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp_name)
        raise


def linear_head_model(
    weight: np.ndarray, bias: np.ndarray, *, prefix: str, name: str = "head"
) -> onnx.ModelProto:
    """A checked ONNX model (graph `name`) of one linear head: features (batch, dim) -> logits
    (batch, classes) by a Gemm with initializers `<prefix>.weight` (classes, dim) and
    `<prefix>.bias`."""
    n_classes, dim = weight.shape
    graph = helper.make_graph(
        [
            helper.make_node(
                "Gemm", ["features", f"{prefix}.weight", f"{prefix}.bias"], ["logits"], transB=1
            )
        ],
        name,
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, ["batch", dim])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", n_classes])],
        initializer=[
            numpy_helper.from_array(weight.astype(np.float32), f"{prefix}.weight"),
            numpy_helper.from_array(bias.astype(np.float32), f"{prefix}.bias"),
        ],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model

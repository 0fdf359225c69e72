"""Resource limits on the tensors an ONNX file declares, checked before anything is allocated.

An ONNX file says how large each tensor is (`dims` and `data_type`) separately from the bytes it
stores (`raw_data`, a typed field such as `float_data`, or a reference into an external file).
A crafted file can declare 10^10 elements and store four bytes, or point its external data at a
file outside the model's folder. `check_tensor_storage` walks every tensor of a model read
without its external data (initializers, sparse initializers, attribute tensors of every node,
in subgraphs and local functions too) and refuses, with one `GraphError` naming the file and the
tensor:

* a tensor that declares more than `MAX_TENSOR_BYTES` (8 GiB, the limit `.npz` data has too);
* declared dims whose size disagrees with the bytes or values the tensor stores;
* external data whose location is absolute, a symbolic link or leaves the model's folder (after
  resolving `..` and linked folders), names a missing file, or reaches beyond that file's end.

`check_fold_size` limits a constant that the importer would compute from constants (a
ConstantOfShape, Range or Expand can ask for 10^10 elements in a few bytes): to `folded_limit`,
twice the bytes of all the model's initializers plus 64 MiB, and never above MAX_TENSOR_BYTES.
Real models compute constants that are views, casts or reshapes of their weights, or shapes.
`check_sample_size` limits one sample of any tensor, the input and every op's output (shapes
come from meta tensors, so nothing is allocated), to `MAX_SAMPLE_ELEMENTS`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Final

import numpy as np
import onnx
from onnx import AttributeProto, GraphProto, TensorProto

from verifier.errors import GraphError

MAX_TENSOR_BYTES: Final = 8 * 1024**3
"""The largest tensor an ONNX model may declare (8 GiB); larger ones are refused unread."""
FOLDED_SLACK_BYTES: Final = 64 * 1024**2
"""What a computed constant may hold beyond twice the model's initializers (64 MiB)."""

# packed two to a byte in raw_data
_FOUR_BIT: Final = frozenset(
    getattr(TensorProto, name)
    for name in ("INT4", "UINT4", "FLOAT4E2M1", "INT2", "UINT2")
    if hasattr(TensorProto, name)
)
# typed fields that hold exactly one entry per element (two for complex numbers)
_ONE_PER_ELEMENT: Final = frozenset(
    {
        TensorProto.FLOAT,
        TensorProto.DOUBLE,
        TensorProto.INT32,
        TensorProto.INT64,
        TensorProto.INT8,
        TensorProto.UINT8,
        TensorProto.INT16,
        TensorProto.UINT16,
        TensorProto.UINT32,
        TensorProto.UINT64,
        TensorProto.BOOL,
        TensorProto.FLOAT16,
        TensorProto.BFLOAT16,
        TensorProto.STRING,
    }
)
_COMPLEX: Final = frozenset({TensorProto.COMPLEX64, TensorProto.COMPLEX128})
_DIGITS: Final = re.compile(r"[0-9]{1,19}")


def _graph_tensors(graph: GraphProto) -> Iterator[tuple[TensorProto, int | None]]:
    """Every tensor of a graph with its dense element count when it is a sparse value."""
    for tensor in graph.initializer:
        yield tensor, None
    for sparse in graph.sparse_initializer:
        yield from _sparse_tensors(sparse)
    for node in graph.node:
        for attribute in node.attribute:
            yield from _attribute_tensors(attribute)


def _sparse_tensors(sparse: onnx.SparseTensorProto) -> Iterator[tuple[TensorProto, int | None]]:
    _check_dims(sparse.values.name, list(sparse.dims))
    dense = math.prod(sparse.dims)
    yield sparse.values, dense
    yield sparse.indices, None


def _attribute_tensors(attribute: AttributeProto) -> Iterator[tuple[TensorProto, int | None]]:
    if attribute.HasField("t"):
        yield attribute.t, None
    for tensor in attribute.tensors:
        yield tensor, None
    if attribute.HasField("sparse_tensor"):
        yield from _sparse_tensors(attribute.sparse_tensor)
    for sparse in attribute.sparse_tensors:
        yield from _sparse_tensors(sparse)
    if attribute.HasField("g"):
        yield from _graph_tensors(attribute.g)
    for graph in attribute.graphs:
        yield from _graph_tensors(graph)


def model_tensors(model: onnx.ModelProto) -> Iterator[tuple[TensorProto, int | None]]:
    """Every tensor a model holds, with the dense element count of sparse values (else None)."""
    yield from _graph_tensors(model.graph)
    for function in model.functions:
        for node in function.node:
            for attribute in node.attribute:
                yield from _attribute_tensors(attribute)


class _Refusal(Exception):
    """A tensor breaks a limit; `check_tensor_storage` adds the file name and the advice."""

    def __init__(self, message: str, advice: str = "re-export the model") -> None:
        super().__init__(message)
        self.advice = advice


def _check_dims(name: str, dims: list[int]) -> None:
    if any(d < 0 for d in dims):
        raise _Refusal(f"tensor '{name}' declares negative dims {dims}")


def _type_name(data_type: int) -> str:
    try:
        return onnx.helper.tensor_dtype_to_string(data_type).removeprefix("TensorProto.")
    except (KeyError, ValueError):
        return f"data type {data_type}"


def declared_bytes(tensor: TensorProto, elements: int) -> int | None:
    """Bytes that `elements` values of the tensor's data type take when stored raw.

    Returns:
        The byte count, or None for strings and unknown data types (the ONNX checker names the
        latter).
    """
    if tensor.data_type == TensorProto.STRING:
        return None
    if tensor.data_type in _FOUR_BIT:
        return (elements + 1) // 2
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type).itemsize
    except (KeyError, ValueError, TypeError):
        return None
    return elements * itemsize


def _external_file(name: str, location: str, folder: Path) -> int:
    """The size of the file an external location names, after checking where it points."""
    base = folder.resolve()
    if (base / location).is_symlink():  # onnx refuses them too
        raise _Refusal(
            f"tensor '{name}': external data location '{location}' is a symbolic link",
            "copy the weight file itself next to the model",
        )
    target = (base / location).resolve()
    if not target.is_relative_to(base):
        raise _Refusal(
            f"tensor '{name}': external data location '{location}' points outside the model's "
            f"folder {base}"
        )
    if not target.is_file():
        raise _Refusal(
            f"tensor '{name}': external data file '{location}' not found in the model's folder",
            "keep the weight files next to the model",
        )
    return target.stat().st_size


def _external_bytes(tensor: TensorProto, folder: Path) -> int:
    """The bytes a tensor's external data reference covers, after checking where it points."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    name = tensor.name
    if not location:
        raise _Refusal(f"tensor '{name}' is stored externally but names no location")
    if Path(location).is_absolute() or Path(location).drive:
        raise _Refusal(
            f"tensor '{name}': external data location '{location}' is an absolute path; it "
            "must be a file inside the model's folder"
        )
    try:
        size = _external_file(name, location, folder)
    except (OSError, ValueError) as err:  # a name too long, a NUL byte, no permission
        raise _Refusal(
            f"tensor '{name}': external data location {location[:80]!r} cannot be opened "
            f"({type(err).__name__}: {str(err)[:80]})"
        ) from None
    numbers: dict[str, int] = {}
    for key in ("offset", "length"):
        if key in entries:
            text = entries[key]
            if _DIGITS.fullmatch(text) is None:
                raise _Refusal(
                    f"tensor '{name}': external data {key} {text!r} is not a non-negative integer"
                )
            numbers[key] = int(text)
    offset = numbers.get("offset", 0)
    length = numbers.get("length", size - offset)
    if offset + length > size or length < 0:
        raise _Refusal(
            f"tensor '{name}': external data asks for {max(length, 0):,} bytes at offset "
            f"{offset:,} of '{location}', which holds {size:,} bytes (beyond the file's end)"
        )
    return length


def _check_tensor(tensor: TensorProto, dense: int | None, folder: Path) -> None:
    name = tensor.name
    dims = list(tensor.dims)
    _check_dims(name, dims)
    if tensor.data_type != TensorProto.STRING:
        try:
            onnx.helper.tensor_dtype_to_np_dtype(tensor.data_type)
        except (KeyError, ValueError, TypeError):
            raise _Refusal(
                f"tensor '{name}' has data type {tensor.data_type}, which onnx "
                f"{onnx.__version__} does not know"
            ) from None
    elements = math.prod(dims)
    kind = _type_name(tensor.data_type)
    for count in (elements, dense):
        declared = None if count is None else declared_bytes(tensor, count)
        if declared is not None and declared > MAX_TENSOR_BYTES:
            shape = f"dims {dims}" if count == elements else f"a dense {count:,} elements"
            raise _Refusal(
                f"tensor '{name}' declares {shape} of {kind} ({declared:,} bytes), over the "
                f"limit of {MAX_TENSOR_BYTES:,} bytes per tensor"
            )
    declared = declared_bytes(tensor, elements)
    if tensor.data_location == TensorProto.EXTERNAL:
        stored = _external_bytes(tensor, folder)
        where = "its external data holds"
    elif tensor.HasField("raw_data"):
        stored = len(tensor.raw_data)
        where = "it stores"
    else:
        _check_typed_values(tensor, elements, kind)
        return
    if declared is not None and stored != declared:
        raise _Refusal(
            f"tensor '{name}' declares dims {dims} of {kind} ({declared:,} bytes) but {where} "
            f"{stored:,} bytes"
        )


def _check_typed_values(tensor: TensorProto, elements: int, kind: str) -> None:
    if tensor.data_type not in _ONE_PER_ELEMENT | _COMPLEX:
        return  # packed and 8-bit float layouts: the ONNX checker judges them
    field = onnx.helper.tensor_dtype_to_field(tensor.data_type)
    found = len(getattr(tensor, field))
    expected = 2 * elements if tensor.data_type in _COMPLEX else elements
    if found != expected:
        raise _Refusal(
            f"tensor '{tensor.name}' declares dims {list(tensor.dims)} of {kind} ({expected:,} "
            f"values) but stores {found:,} in {field}"
        )


def check_tensor_storage(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a model whose tensors declare too much or disagree with what they store.

    Call it on a model read with `load_external_data=False`; it reads no tensor data, only the
    sizes of the external files.

    Args:
        model: the decoded model, external data not loaded.
        path: the .onnx file (external locations are relative to its folder).

    Raises:
        GraphError: naming the file, the tensor and the limit or mismatch (see module doc).
    """
    try:
        for tensor, dense in model_tensors(model):
            _check_tensor(tensor, dense, path.parent)
    except _Refusal as err:
        raise GraphError(f"{path}: {err}; {err.advice}") from None


# ops whose output broadcasts their inputs' shapes (numpy rules)
_BROADCASTING: Final = frozenset(
    {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Mean", "Sum", "Where", "Equal", "Less"}
    | {"Greater", "LessOrEqual", "GreaterOrEqual", "And", "Or", "Xor", "Mod", "PRelu"}
)


def _inferred_elements(value: onnx.ValueInfoProto | None) -> tuple[int, int] | None:
    """(elements, itemsize) of a fully known inferred shape, else None."""
    if value is None or not value.type.HasField("tensor_type"):
        return None
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    dims = [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]
    if any(d is None for d in dims):
        return None
    try:
        itemsize = onnx.helper.tensor_dtype_to_np_dtype(tensor_type.elem_type).itemsize
    except (KeyError, ValueError, TypeError):
        itemsize = 8
    return math.prod(d for d in dims if d is not None), itemsize


def _predicted_elements(node: onnx.NodeProto, values: Mapping[str, np.ndarray]) -> int | None:
    """Elements of the first output of a constant node, from its inputs (growth ops only)."""
    inputs = [values[name] for name in node.input if name in values]
    op = node.op_type
    if not inputs:
        return None
    first = inputs[0]
    if op == "ConstantOfShape":
        return math.prod(int(d) for d in first.reshape(-1))
    if op == "Expand" and len(inputs) > 1:
        shape = tuple(int(d) for d in inputs[1].reshape(-1))
        return math.prod(np.broadcast_shapes(first.shape, shape))
    if op == "Tile" and len(inputs) > 1:
        repeats = [int(r) for r in inputs[1].reshape(-1)]
        return math.prod(s * r for s, r in zip(first.shape, repeats, strict=False))
    if op == "Range" and len(inputs) == 3:
        start, limit, delta = (float(v.reshape(-1)[0]) for v in inputs)
        return max(math.ceil((limit - start) / delta), 0) if delta else None
    if op in _BROADCASTING:
        return math.prod(np.broadcast_shapes(*(v.shape for v in inputs)))
    if op in ("MatMul", "Gemm") and len(inputs) > 1 and first.ndim and inputs[1].ndim:
        rows = first.shape[-2] if first.ndim > 1 else 1
        return rows * inputs[1].shape[-1] * math.prod(first.shape[:-2])
    return None


def folded_limit(initializer_bytes: int) -> int:
    """The most bytes one computed constant may hold in a model storing `initializer_bytes`."""
    return min(2 * initializer_bytes + FOLDED_SLACK_BYTES, MAX_TENSOR_BYTES)


def check_fold_size(
    node: onnx.NodeProto,
    values: Mapping[str, np.ndarray],
    inferred: Mapping[str, onnx.ValueInfoProto],
    where: str,
    *,
    limit: int = MAX_TENSOR_BYTES,
) -> None:
    """Refuse to compute a constant node whose output would hold more than `limit` bytes.

    The size comes from the inferred shape of each output when shape inference knows it, else
    from the node's constant inputs for the ops that grow tensors (ConstantOfShape, Expand,
    Tile, Range, broadcasting and matrix products).

    Args:
        node: a node about to be evaluated on constants.
        values: the constants known so far, by name.
        inferred: inferred value infos by tensor name.
        where: how messages name the node (`<file>: node '<name>' (<op>)`).
        limit: bytes; `folded_limit` of the model's initializers.

    Raises:
        GraphError: naming the node, the size and the limit.
    """
    for i, out in enumerate(node.output):
        known = _inferred_elements(inferred.get(out))
        if known is None and i == 0:
            try:
                predicted = _predicted_elements(node, values)
            except (ValueError, TypeError, OverflowError, IndexError):
                predicted = None
            itemsize = max((values[n].itemsize for n in node.input if n in values), default=8)
            known = None if predicted is None else (predicted, itemsize)
        if known is not None and known[0] * known[1] > limit:
            elements, itemsize = known
            raise GraphError(
                f"{where}: would compute a constant of {elements:,} elements "
                f"({elements * itemsize:,} bytes), over the limit of {limit:,} bytes for a "
                "computed constant (twice the model's weights plus 64 MiB); re-export the model"
            )


MAX_SAMPLE_ELEMENTS: Final = 2**26
"""The most elements one sample may have in any tensor of a model (2^26: 256 MiB in float32),
the input included; a larger declared input or op output is refused before anything runs."""


def check_sample_size(shape: tuple[int, ...], where: str) -> None:
    """Refuse a per-sample tensor shape above `MAX_SAMPLE_ELEMENTS`.

    Args:
        shape: the shape of one sample (the batch axis left out).
        where: what the message names first (`<file>: input 'x'`, `<file>: node 'n' (Op)`).

    Raises:
        GraphError: naming the shape and the limit.
    """
    elements = math.prod(shape)
    if elements > MAX_SAMPLE_ELEMENTS:
        raise GraphError(
            f"{where}: one sample would have shape {tuple(shape)} ({elements:,} elements), over "
            f"the limit of {MAX_SAMPLE_ELEMENTS:,} elements per sample and tensor; re-export the "
            "model with the sizes it really uses"
        )

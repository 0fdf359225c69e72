"""Reading an ONNX file into a checked, shape-inferred `onnx.ModelProto`.

Every way an untrusted file can fail (missing, empty, truncated, not ONNX, tensors too large or
inconsistent with their bytes, missing or escaping external weights, rejected by
`onnx.checker`, inconsistent shapes) becomes one `GraphError` that names
the file and says what to do. `verifier.onnx.importer` and `verifier.onnx.prefix` start here.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import onnx
import onnx.inliner
from onnx import NodeProto
from onnx.external_data_helper import load_external_data_for_model

from verifier.errors import GraphError
from verifier.onnx.limits import check_tensor_storage


def load_checked_model(path: Path) -> onnx.ModelProto:
    """Read, check, inline and shape-infer an ONNX model.

    Args:
        path: path to an .onnx file (external data is read relative to it).

    Returns:
        The model with local functions inlined and inferred shapes in `graph.value_info`.

    Raises:
        GraphError: the file is unreadable, the checker rejects it or shape inference fails.
    """
    model = read_model(path)
    check_model(model, path)
    if model.functions:
        model = onnx.inliner.inline_local_functions(model)
    # not strict: onnx's inference disagrees with onnxruntime on some ceil_mode pools (see
    # graph.pool_output_size), so an inference error is not proof of a bad model; our own shape
    # propagation through the mapped ops catches real mismatches, naming the node
    try:
        return onnx.shape_inference.infer_shapes(
            model, check_type=True, strict_mode=False, data_prop=True
        )
    except Exception as err:  # noqa: BLE001 - any failure on untrusted bytes is bad input
        raise GraphError(
            f"{path}: ONNX shape inference fails ({one_line(err)}); "
            "the model is inconsistent, re-export it"
        ) from err


def read_model(path: Path) -> onnx.ModelProto:
    """Read an ONNX file, turning every way it can be unreadable into one GraphError.

    Args:
        path: path to an .onnx file.

    Returns:
        The decoded model, external data loaded.

    Raises:
        GraphError: the file is missing, not a file, empty, truncated or not ONNX, or one of its
            tensors breaks a limit of `verifier.onnx.limits` (too large, dims that disagree
            with the bytes stored, external data outside the model's folder, missing or short).
    """
    try:
        exists, is_file = path.exists(), path.is_file()
    except (OSError, ValueError) as err:  # a name too long, a NUL byte
        raise GraphError(f"{path}: cannot be opened ({one_line(err, 120)})") from None
    if not exists:
        raise GraphError(f"{path}: no such file; check the model path")
    if not is_file:
        raise GraphError(f"{path}: not a file; give the path of an .onnx model")
    if path.stat().st_size == 0:
        raise GraphError(f"{path}: the file is empty; re-export the model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as err:  # noqa: BLE001 - protobuf decode errors vary by version
        raise GraphError(
            f"{path}: not a readable ONNX model ({type(err).__name__}: {one_line(err)}); "
            "the file is truncated or not ONNX; re-export it"
        ) from err
    if not model.HasField("graph"):
        raise GraphError(f"{path}: the file holds no ONNX graph; it is not an ONNX model")
    # sizes and external references are checked before any tensor data is read (issue 23)
    check_tensor_storage(model, path)
    try:
        load_external_data_for_model(model, str(path.parent))
    except Exception as err:  # noqa: BLE001 - OSError, onnx's ValidationError, ValueError
        raise GraphError(
            f"{path}: cannot read the model's external data ({one_line(err)}); keep the "
            "weight files next to the model"
        ) from err
    return model


def check_model(model: onnx.ModelProto, path: Path) -> None:
    """Run `onnx.checker.check_model`, turning a rejection into a GraphError naming the file.

    Args:
        model: the decoded model.
        path: the file it came from (or goes to), for the message.

    Raises:
        GraphError: the checker rejects the model.
    """
    check_opset(model, path)
    try:
        onnx.checker.check_model(model)
    except Exception as err:  # noqa: BLE001 - the checker raises several types
        raise GraphError(
            f"{path}: the ONNX checker rejects the model ({one_line(err)}); "
            "re-export it or repair the file"
        ) from err


def check_opset(model: onnx.ModelProto, path: Path) -> None:
    """Refuse a default-domain opset this installation does not know (it would load with ops
    whose meaning may have changed since).

    Raises:
        GraphError: naming the declared opset and the supported range.
    """
    newest = onnx.defs.onnx_opset_version()
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx") and not 1 <= entry.version <= newest:
            raise GraphError(
                f"{path}: the model declares ONNX opset {entry.version}; this installation "
                f"supports opsets 1 to {newest} (onnx {onnx.__version__}); re-export it with "
                f"opset_version <= {newest}"
            )


def one_line(err: BaseException, limit: int = 300) -> str:
    """The message of `err` on one line, cut to `limit` characters."""
    text = " ".join(str(err).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def node_attributes(node: NodeProto) -> dict[str, Any]:
    """The attributes of an ONNX node as Python values (bytes decoded to str)."""
    out: dict[str, Any] = {}
    for attr in node.attribute:
        value = onnx.helper.get_attribute_value(attr)
        out[attr.name] = value.decode() if isinstance(value, bytes) else value
    return out

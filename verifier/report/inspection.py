"""A JSON-able summary of an ONNX classifier (ops, parameters) and, with data, its accuracy.

`inspect_model` builds the summary; `render_inspection` turns it into a terminal table. Both
back `verifier inspect`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from verifier.data import Dataset, load_dataset, validate_for_model
from verifier.files import file_sha256
from verifier.graph import (
    Activation,
    Binary,
    Concat,
    Conv,
    Elementwise,
    Graph,
    Linear,
    Op,
    Pad,
    Reshape,
    Slice,
    Transpose,
    evaluate,
)
from verifier.onnx.importer import load_graph

DEFAULT_BATCH_SIZE = 1024


def _shape(t: torch.Tensor) -> list[int]:
    return [int(d) for d in t.shape]


def _op_details(op: Op, graph: Graph) -> dict[str, Any]:
    """The kind-specific facts of one op, as JSON values."""
    shapes = graph.parameter_shapes()
    if isinstance(op, Linear | Conv):
        details: dict[str, Any] = {
            "weight": op.weight,
            "weight_shape": list(shapes[op.weight]),
            "bias": op.bias,
            "bias_shape": None if op.bias is None else list(shapes[op.bias]),
            "scaled": op.scale is not None,
        }
        if isinstance(op, Linear):
            details["weight_layout"] = op.weight_layout
        else:
            details.update(
                strides=list(op.strides),
                pads=list(op.pads),
                dilations=list(op.dilations),
                groups=op.groups,
            )
        return details
    if isinstance(op, Activation):
        if op.function == "leaky_relu":
            return {"function": op.function, "alpha": op.alpha}
        if op.function == "clip":
            return {"function": op.function, "low": op.low, "high": op.high}
        return {"function": op.function}
    if isinstance(op, Elementwise):
        return {
            "op": op.op,
            "constant_shape": _shape(op.constant),
            "constant_first": op.constant_first,
        }
    if isinstance(op, Reshape):
        return {"shape": list(op.shape)}
    if isinstance(op, Binary):
        return {"op": op.op, "inputs": list(op.inputs)}
    if isinstance(op, Concat):
        return {"axis": op.axis, "inputs": list(op.inputs)}
    if isinstance(op, Transpose):
        return {"perm": list(op.perm)}
    if isinstance(op, Pad):
        return {"pads": list(op.pads), "value": op.value}
    if isinstance(op, Slice):
        return {"axis": op.axis, "start": op.start, "stop": op.stop, "step": op.step}
    return {
        "function": op.function,
        "kernel": list(op.kernel),
        "strides": list(op.strides),
        "pads": list(op.pads),
        "dilations": list(op.dilations),
        "ceil_mode": op.ceil_mode,
        "count_include_pad": op.count_include_pad,
    }


def describe_ops(graph: Graph) -> list[dict[str, Any]]:
    """One JSON entry per op: index, node name, kind, per-sample output shape and details.

    Output shapes come from a forward pass of one zero sample in float32.
    """
    entries: list[dict[str, Any]] = []
    x = torch.zeros((1, *graph.input_shape), dtype=torch.float32)
    with torch.no_grad():
        values = evaluate(graph, x, graph.parameters)
        for index, op in enumerate(graph.ops):
            h = values[op.output]
            entries.append(
                {
                    "index": index,
                    "node": op.node,
                    "kind": op.kind,
                    "output_shape": _shape(h)[1:],
                    "details": _op_details(op, graph),
                }
            )
    return entries


def count_correct(graph: Graph, data: Dataset, *, batch_size: int = DEFAULT_BATCH_SIZE) -> int:
    """Number of samples whose arg-max logit (float32 forward) is the label.

    Args:
        graph: the model.
        data: a data set already checked with `validate_for_model`.
        batch_size: samples per forward pass.

    Returns:
        The count; a sample with a NaN logit counts as wrong.
    """
    correct = 0
    with torch.no_grad():
        for start in range(0, len(data), batch_size):
            logits = graph.forward(data.x[start : start + batch_size].to(torch.float32))
            predicted = logits.argmax(dim=1)
            ok = (predicted == data.y[start : start + batch_size]) & ~logits.isnan().any(dim=1)
            correct += int(ok.sum())
    return correct


def summarise_graph(graph: Graph) -> dict[str, Any]:
    """The model part of the summary: input, output, ops and parameters, as JSON values.

    Args:
        graph: the model.

    Returns:
        input_name, input_shape (per sample), output_name, n_classes, ops (see
        `describe_ops`), parameters (name, shape, count, dtype) and n_parameters.
    """
    return {
        "input_name": graph.input_name,
        "input_shape": list(graph.input_shape),
        "output_name": graph.output_name,
        "n_classes": graph.n_classes,
        "ops": describe_ops(graph),
        "parameters": [
            {
                "name": name,
                "shape": _shape(tensor),
                "count": int(tensor.numel()),
                "dtype": str(tensor.dtype).removeprefix("torch."),
            }
            for name, tensor in graph.parameters.items()
        ],
        "n_parameters": graph.n_parameters(),
    }


def inspect_model(
    model_path: Path,
    *,
    data_ref: str | None = None,
    split: str = "test",
    data_dir: Path | None = None,
) -> dict[str, Any]:
    """Summarise a model and, with a data set, its clean accuracy.

    Args:
        model_path: the .onnx file.
        data_ref: a data set name or .npz path (see `verifier.data.load_dataset`), or None.
        split: the split of the data set.
        data_dir: the shared data folder (default: `verifier.data.default_data_dir()`).

    Returns:
        A JSON-able dict: model_path, model_sha256, input_name, input_shape (per sample),
        output_name, n_classes, ops (index, node, kind, output_shape, details), parameters
        (name, shape, count, dtype), n_parameters, and data (None without `data_ref`; else
        ref, name, split, n_samples, sample_shape as stored, sha256, n_correct, accuracy).

    Raises:
        GraphError: the model file is missing or cannot be loaded.
        DataError: the data set is missing, malformed or does not fit the model.
    """
    path = Path(model_path)
    graph = load_graph(path)  # says what is wrong with the path: missing, a folder, unopenable
    summary: dict[str, Any] = {
        "model_path": str(path),
        "model_sha256": file_sha256(path),
        **summarise_graph(graph),
        "data": None,
    }
    if data_ref is not None:
        loaded = load_dataset(data_ref, split=split, data_dir=data_dir)
        data = validate_for_model(loaded, graph)
        n_correct = count_correct(graph, data)
        summary["data"] = {
            "ref": data_ref,
            "name": data.name,
            "split": data.split,
            "n_samples": len(data),
            "sample_shape": list(loaded.sample_shape),
            "sha256": data.source_sha256,
            "n_correct": n_correct,
            "accuracy": n_correct / len(data),
        }
    return summary


def _fmt_shape(shape: list[int] | None) -> str:
    if shape is None:
        return ""
    return "(" + ", ".join(str(d) for d in shape) + ("," if len(shape) == 1 else "") + ")"


def _fmt_details(kind: str, details: dict[str, Any]) -> str:
    if kind in ("linear", "conv"):
        text = f"{details['weight']} {_fmt_shape(details['weight_shape'])}"
        if details["bias"] is not None:
            text += f" + {details['bias']} {_fmt_shape(details['bias_shape'])}"
        if kind == "conv":
            text += (
                f"; stride {'x'.join(map(str, details['strides']))}"
                f", pads {','.join(map(str, details['pads']))}"
            )
            if details["groups"] != 1:
                text += f", groups {details['groups']}"
        if details["scaled"]:
            text += " (scaled)"
        return text
    if kind == "activation":
        return str(details["function"])
    if kind == "elementwise":
        constant = f"constant {_fmt_shape(details['constant_shape'])}"
        if details["constant_first"]:
            return f"{constant} {details['op']} x"
        return f"x {details['op']} {constant}"
    if kind == "reshape":
        return f"to {_fmt_shape(details['shape'])}"
    if kind == "pool":
        return (
            f"{details['function']} {'x'.join(map(str, details['kernel']))}"
            f", stride {'x'.join(map(str, details['strides']))}"
        )
    return ""


def _table(header: list[str], rows: list[list[str]], right: set[int]) -> list[str]:
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(row: list[str]) -> str:
        cells = [
            cell.rjust(width) if i in right else cell.ljust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        ]
        return "  ".join(cells).rstrip()

    return [line(header), line(["-" * w for w in widths]), *(line(row) for row in rows)]


def render_inspection(summary: dict[str, Any]) -> str:
    """A readable multi-line table of a summary from `inspect_model`."""
    lines = [
        f"model       {summary['model_path']}",
        f"sha256      {summary['model_sha256']}",
        f"input       {summary['input_name']} {_fmt_shape(summary['input_shape'])}",
        f"output      {summary['output_name']} ({summary['n_classes']} classes)",
        f"parameters  {summary['n_parameters']:,}",
        "",
    ]
    op_rows = [
        [
            str(op["index"]),
            op["node"],
            op["kind"],
            _fmt_shape(op["output_shape"]),
            _fmt_details(op["kind"], op["details"]),
        ]
        for op in summary["ops"]
    ]
    lines += _table(["#", "node", "kind", "output", "details"], op_rows, right={0})
    lines.append("")
    param_rows = [
        [p["name"], _fmt_shape(p["shape"]), f"{p['count']:,}", p["dtype"]]
        for p in summary["parameters"]
    ]
    param_rows.append(["total", "", f"{summary['n_parameters']:,}", ""])
    lines += _table(["parameter", "shape", "count", "dtype"], param_rows, right={2})
    data = summary.get("data")
    if data is not None:
        n_samples = data["n_samples"]
        lines += [
            "",
            f"data        {data['ref']} [{data['split']}]: {n_samples:,} samples "
            f"{_fmt_shape(data['sample_shape'])}",
            f"data sha256 {data['sha256']}",
            f"accuracy    {data['accuracy']:.4f} ({data['n_correct']:,} / {n_samples:,} correct)",
        ]
    return "\n".join(lines)

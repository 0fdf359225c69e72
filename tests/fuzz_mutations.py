"""Seeded mutations of the files `verifier` reads, for the fuzzer (`tests.fuzzing`).

Each function takes a `random.Random` and returns mutated content plus a short description.
They cover what issue 23 lists: ONNX files (flipped bytes, truncation, dtypes, attribute
values, shapes, opsets, node order, external-data references), spec YAML (types, keys, values,
nesting), data files (.npz dtypes, shapes, NaN/Inf, object arrays, pickles, huge declared
shapes), LID files and certificate.json (truncated, edited, mismatched).
"""

from __future__ import annotations

import io
import json
import math
import pickle
import random
import struct
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import AttributeProto, TensorProto, helper

# ---------------------------------------------------------------------- generic values

INTERESTING: tuple[Any, ...] = (
    None,
    True,
    False,
    0,
    -1,
    1,
    2,
    7,
    2**31,
    2**63,
    10**30,
    -(10**30),
    0.5,
    -0.5,
    1e-300,
    1e308,
    float("nan"),
    float("inf"),
    -float("inf"),
    "",
    "x",
    "acc - 0.1",
    "acc - -5",
    "acc-",
    "auto",
    "all",
    "digits",
    "mnist",
    "\x00",
    "é" * 50,
    "x" * 5000,
    "../../etc/passwd",
    "/dev/zero",
    [],
    [1, 2],
    ["a", None],
    [[[]]],
    {},
    {"a": 1},
    {"name": {"name": "digits"}},
)


def interesting(rng: random.Random) -> Any:
    """A value of a random type, chosen to break validators (copied, so callers may mutate)."""
    value = rng.choice(INTERESTING)
    return json.loads(json.dumps(value)) if isinstance(value, list | dict) else value


def flip_bytes(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Flip, truncate, insert or zero bytes of a file."""
    if not data:
        return bytes(rng.randrange(256) for _ in range(8)), "random bytes (was empty)"
    out = bytearray(data)
    kind = rng.choice(["flip", "truncate", "insert", "zero", "duplicate"])
    if kind == "flip":
        for _ in range(rng.randint(1, 8)):
            out[rng.randrange(len(out))] ^= 1 << rng.randrange(8)
    elif kind == "truncate":
        del out[rng.randrange(len(out)) :]
    elif kind == "insert":
        at = rng.randrange(len(out) + 1)
        out[at:at] = bytes(rng.randrange(256) for _ in range(rng.randint(1, 16)))
    elif kind == "zero":
        at = rng.randrange(len(out))
        out[at : at + rng.randint(1, 64)] = bytes(min(64, len(out) - at))
    else:
        at = rng.randrange(len(out))
        chunk = out[at : at + rng.randint(1, 256)]
        out[at:at] = chunk
    return bytes(out), f"bytes: {kind}"


def _paths(node: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Every key path of a JSON-like document (dicts and lists), the root excluded."""
    out: list[tuple[Any, ...]] = []
    if isinstance(node, dict):
        items: list[tuple[Any, Any]] = list(node.items())
    elif isinstance(node, list):
        items = list(enumerate(node))
    else:
        return out
    for key, value in items:
        out.append((*prefix, key))
        out.extend(_paths(value, (*prefix, key)))
    return out


def _parent(doc: Any, path: tuple[Any, ...]) -> Any:
    node = doc
    for key in path[:-1]:
        node = node[key]
    return node


def mutate_document(doc: Any, rng: random.Random) -> str:
    """Edit a JSON-like document in place: delete, retype, nest, add a key; returns what."""
    paths = _paths(doc)
    if not paths:
        return "nothing to edit"
    path = rng.choice(paths)
    parent, key = _parent(doc, path), path[-1]
    where = ".".join(map(str, path))
    kind = rng.choice(["delete", "retype", "retype", "nest", "add", "listify", "deep"])
    if kind == "delete":
        del parent[key]
    elif kind == "retype":
        parent[key] = interesting(rng)
    elif kind == "nest":
        parent[key] = {"value": parent[key]} if rng.random() < 0.5 else [parent[key]]
    elif kind == "add":
        target = parent if isinstance(parent, dict) else doc
        if isinstance(target, dict):
            target[rng.choice(["extra", "name", "model", "x" * 300, "tasks", ""])] = interesting(
                rng
            )
    elif kind == "listify":
        parent[key] = list(parent[key].values()) if isinstance(parent[key], dict) else {}
    else:
        nested: Any = interesting(rng)
        for _ in range(rng.randint(5, 60)):
            nested = [nested] if rng.random() < 0.5 else {"k": nested}
        parent[key] = nested
    return f"{kind} {where[:60]}"


# ---------------------------------------------------------------------- ONNX

ALL_DTYPES = sorted(TensorProto.DataType.values()) + [99, 10**6]
OP_TYPES = (
    "Relu",
    "Softmax",
    "Conv",
    "MatMul",
    "Gemm",
    "Add",
    "Mul",
    "Div",
    "Reshape",
    "Identity",
    "Flatten",
    "Transpose",
    "LSTM",
    "If",
    "Loop",
    "ConstantOfShape",
    "Range",
    "Expand",
    "Tile",
    "Resize",
    "Unknown",
    "",
)


def _initializer(model: onnx.ModelProto, rng: random.Random) -> TensorProto | None:
    inits = list(model.graph.initializer)
    return rng.choice(inits) if inits else None


def _dtype(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    init = _initializer(model, rng)
    if init is None:
        return "no initializer"
    init.data_type = rng.choice(ALL_DTYPES)
    return f"dtype of {init.name} -> {init.data_type}"


def _dims(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    init = _initializer(model, rng)
    if init is None:
        return "no initializer"
    dims = list(init.dims)
    kind = rng.choice(["set", "append", "drop", "huge"])
    if kind == "set" and dims:
        dims[rng.randrange(len(dims))] = rng.choice([0, 1, -1, 2, 3, 10**5, 2**31, dims[0] + 1])
    elif kind == "append":
        dims.append(rng.choice([1, 2, 0]))
    elif kind == "drop" and dims:
        dims.pop(rng.randrange(len(dims)))
    else:
        dims = [rng.choice([10**5, 10**6, 2**32, 2**62])] * rng.randint(1, 3)
    init.dims[:] = dims
    return f"dims of {init.name} -> {dims}"


def _raw(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    init = _initializer(model, rng)
    if init is None:
        return "no initializer"
    kind = rng.choice(["truncate", "extend", "typed", "clear", "nonfinite"])
    raw = init.raw_data
    if kind == "truncate":
        init.raw_data = raw[: rng.randrange(len(raw) + 1)]
    elif kind == "extend":
        init.raw_data = raw + bytes(rng.randint(1, 64))
    elif kind == "typed":
        init.ClearField("raw_data")
        init.float_data.extend([rng.uniform(-1, 1) for _ in range(rng.randint(0, 40))])
    elif kind == "clear":
        init.ClearField("raw_data")
    elif init.data_type == TensorProto.FLOAT and len(raw) >= 4:
        at = 4 * rng.randrange(len(raw) // 4)
        value = rng.choice([math.nan, math.inf, -math.inf, 3e38])
        init.raw_data = raw[:at] + struct.pack("<f", value) + raw[at + 4 :]
    return f"{kind} data of {init.name}"


def _attribute(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    nodes = [n for n in model.graph.node]
    if not nodes:
        return "no node"
    node = rng.choice(nodes)
    if not node.attribute or rng.random() < 0.3:
        name = rng.choice(["axis", "transB", "transA", "alpha", "perm", "pads", "mode", "junk"])
        value = rng.choice([0, 1, -1, 2**40, 1.5, [0, 1], "reflect", b"\xff"])
        node.attribute.append(helper.make_attribute(name, value))
        return f"attribute {name} added to {node.name}"
    attr = rng.choice(list(node.attribute))
    kind = rng.choice(["value", "value", "type", "delete"])
    if kind == "delete":
        node.attribute.remove(attr)
    elif kind == "type":
        attr.type = rng.choice(list(AttributeProto.AttributeType.values()))
    elif attr.type == AttributeProto.INT:
        attr.i = rng.choice([0, 1, -1, 2, 3, -(2**63), 2**63 - 1, 10**9])
    elif attr.type == AttributeProto.FLOAT:
        attr.f = rng.choice([0.0, -1.0, math.nan, math.inf, 1e38, 1e-45])
    elif attr.type == AttributeProto.INTS:
        attr.ints[:] = rng.choice([[], [0], [-1, -1], [2**40, 1], [1, 0, 2, 3], [0] * 50])
    elif attr.type == AttributeProto.STRING:
        attr.s = rng.choice([b"", b"reflect", b"edge", b"\xff\xfe", b"x" * 1000])
    elif attr.type == AttributeProto.TENSOR:
        attr.t.dims[:] = [rng.choice([0, 2, 10**6])]
    else:
        attr.ClearField("ints")
    return f"attribute {attr.name} of {node.name}: {kind}"


def _shape(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    values = list(model.graph.input) + list(model.graph.output) + list(model.graph.value_info)
    if not values:
        return "no value info"
    value = rng.choice(values)
    tensor_type = value.type.tensor_type
    kind = rng.choice(["dim", "dim", "rank", "elem", "clear"])
    dims = tensor_type.shape.dim
    if kind == "dim" and len(dims):
        dim = dims[rng.randrange(len(dims))]
        choice = rng.choice([0, 1, 5, 63, 65, 10**9, -1, "batch", "n", ""])
        if isinstance(choice, int):
            dim.dim_value = choice
        else:
            dim.dim_param = choice
    elif kind == "rank":
        if len(dims) and rng.random() < 0.5:
            del dims[rng.randrange(len(dims))]
        else:
            dims.add().dim_value = rng.choice([1, 2, 8])
    elif kind == "elem":
        tensor_type.elem_type = rng.choice(ALL_DTYPES)
    else:
        value.ClearField("type")
    return f"shape of {value.name}: {kind}"


def _opset(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    kind = rng.choice(["version", "version", "domain", "drop", "ir"])
    if kind == "ir":
        model.ir_version = rng.choice([0, 1, 3, 7, 11, 99, 2**40])
        return f"ir_version -> {model.ir_version}"
    if not model.opset_import:
        model.opset_import.add(domain="", version=17)
    entry = model.opset_import[0]
    if kind == "version":
        entry.version = rng.choice([0, 1, 5, 7, 9, 11, 13, 17, 21, 23, 24, 99, -1, 2**62])
    elif kind == "domain":
        entry.domain = rng.choice(["ai.onnx.ml", "com.microsoft", "x", "ai.onnx"])
    else:
        del model.opset_import[:]
    return f"opset: {kind}"


def _order(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    nodes = list(model.graph.node)
    kind = rng.choice(["shuffle", "reverse", "drop", "duplicate", "rewire", "op_type"])
    if not nodes:
        return "no node"
    if kind == "shuffle":
        rng.shuffle(nodes)
    elif kind == "reverse":
        nodes.reverse()
    elif kind == "drop":
        nodes.pop(rng.randrange(len(nodes)))
    elif kind == "duplicate":
        nodes.insert(rng.randrange(len(nodes) + 1), rng.choice(nodes))
    elif kind == "rewire":
        node = rng.choice(nodes)
        names = [n for m in nodes for n in (*m.input, *m.output)] + ["undefined", ""]
        if node.input and rng.random() < 0.6:
            node.input[rng.randrange(len(node.input))] = rng.choice(names)
        elif node.output:
            node.output[rng.randrange(len(node.output))] = rng.choice(names)
    else:
        node = rng.choice(nodes)
        node.op_type = rng.choice(OP_TYPES)
    del model.graph.node[:]
    model.graph.node.extend(nodes)
    return f"nodes: {kind}"


def _external(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    init = _initializer(model, rng)
    if init is None:
        return "no initializer"
    raw = init.raw_data
    (folder / "weights.bin").write_bytes(raw if rng.random() < 0.7 else raw[: len(raw) // 2])
    (folder / "sub").mkdir(exist_ok=True)
    location = rng.choice(
        [
            "weights.bin",
            "weights.bin",
            "../weights.bin",
            "sub/../weights.bin",
            "/etc/hostname",
            "missing.bin",
            "sub",
            "",
            ".",
            "weights.bin\x00.txt",
            "a" * 300,
        ]
    )
    init.ClearField("raw_data")
    init.data_location = TensorProto.EXTERNAL
    init.external_data.add(key="location", value=location)
    offset = rng.choice([None, 0, 0, 4, len(raw), -1, 2**40, "x"])
    length = rng.choice([None, len(raw), len(raw), 0, len(raw) + 4, 2**62, "1e3"])
    if offset is not None:
        init.external_data.add(key="offset", value=str(offset))
    if length is not None:
        init.external_data.add(key="length", value=str(length))
    if rng.random() < 0.1:
        init.external_data.add(key=rng.choice(["checksum", "junk"]), value="0")
    return f"external {init.name}: {location[:20]!r} offset {offset} length {length}"


def _huge_node(model: onnx.ModelProto, rng: random.Random, folder: Path) -> str:
    """A node whose output would be huge (ConstantOfShape / Expand / Range / Tile)."""
    if not model.graph.node or not model.graph.node[0].input:
        return "no node"
    first = model.graph.node[0]
    source = first.input[0]
    kind = rng.choice(["ConstantOfShape", "Expand", "Range", "Tile"])
    big = rng.choice([10**5, 10**9, 2**40])
    name = f"fuzz_{kind.lower()}"
    shape = helper.make_tensor(f"{name}_shape", TensorProto.INT64, [2], [big, big])
    model.graph.initializer.append(shape)
    if kind == "ConstantOfShape":
        node = helper.make_node(kind, [shape.name], [f"{name}_out"], name=name)
    elif kind == "Expand":
        node = helper.make_node(kind, [source, shape.name], [f"{name}_out"], name=name)
    elif kind == "Tile":
        node = helper.make_node(kind, [source, shape.name], [f"{name}_out"], name=name)
    else:
        for part, value in (("start", 0), ("limit", big), ("delta", 1)):
            model.graph.initializer.append(
                helper.make_tensor(f"{name}_{part}", TensorProto.FLOAT, [], [value])
            )
        node = helper.make_node(
            kind, [f"{name}_start", f"{name}_limit", f"{name}_delta"], [f"{name}_out"], name=name
        )
    add = helper.make_node("Add", [source, f"{name}_out"], [f"{name}_sum"], name=f"{name}_add")
    first.input[0] = f"{name}_sum"
    model.graph.node.insert(0, add)
    model.graph.node.insert(0, node)
    return f"huge {kind} ({big})"


ONNX_MUTATIONS: dict[str, Callable[[onnx.ModelProto, random.Random, Path], str]] = {
    "dtype": _dtype,
    "dims": _dims,
    "raw": _raw,
    "attribute": _attribute,
    "shape": _shape,
    "opset": _opset,
    "order": _order,
    "external": _external,
    "huge_node": _huge_node,
}


def mutate_onnx(source: bytes, rng: random.Random, folder: Path) -> tuple[bytes, str]:
    """Mutate a serialized ONNX model: at the byte level, or 1-3 edits of its protobuf.

    External weight files the mutation needs are written into `folder`.
    """
    if rng.random() < 0.3:
        return flip_bytes(source, rng)
    model = onnx.ModelProto()
    try:
        model.ParseFromString(source)
    except Exception:  # noqa: BLE001 - a bad seed (random bytes, truncated): damage it more
        return flip_bytes(source, rng)
    done = []
    for _ in range(rng.choice([1, 1, 2, 3])):
        name = rng.choice(sorted(ONNX_MUTATIONS))
        done.append(ONNX_MUTATIONS[name](model, rng, folder))
    data = model.SerializeToString()
    if rng.random() < 0.1:
        data, what = flip_bytes(data, rng)
        done.append(what)
    return data, "; ".join(done)


# ---------------------------------------------------------------------- spec YAML

SPEC_CHOICES: dict[tuple[str, ...], tuple[Any, ...]] = {
    ("domain",): ("box", "zonotope", "zonotope", "sphere"),
    ("parameters",): ("all", ["fc1.weight"], ["nope"], [], "fc1.*", ["fc3.bias", "fc3.bias"]),
    ("search", "bound"): ("ibp", "midrad", "linear", "crown"),
    ("search", "size"): ("mean_width", "mean_log_width", "layer_log_width", "x"),
    ("search", "target_slack"): ("auto", 0.0, 0.99, 1.0, -0.1),
    ("search", "shrink"): (True, False, "yes"),
    ("search", "max_width"): (None, 1e-9, 0.0, 1e9),
    ("search", "validation_fraction"): (0.0, 0.9, 1.0),
    ("search", "importance"): (
        {"kind": "fisher", "fraction": 0.5},
        {"kind": "si", "fraction": 0.9},
        {"kind": "fisher", "fraction": 0.5, "lookahead": {"name": "digits"}},
    ),
    ("search", "linear"): ({"intermediate": "crown", "slopes": "optimized"}, {"classes": 1}),
    ("certify", "method"): ("ibp", "midrad", "linear", "crown-ibp", "best", "exact"),
    ("certify", "bound"): ("clopper-pearson", "hoeffding", "wilson"),
    ("certify", "beta"): (1e-300, 0.49, 0.5, 0.0),
    ("certify", "certification_fraction"): (1e-9, 0.999, 0.5),
    ("certify", "n_samples"): (1, 2, 5, None),
    ("certify", "ladder"): (
        {"scales": [1.0], "targets": 1},
        {"scales": [2.0, 0.5]},
        {"scales": []},
        {"scales": [0.0]},
        {"scales": [1e9, math.nan]},
        {"targets": 2, "step": 5.0},
        [1.0, 0.5],
    ),
    ("zonotope",): ({"k": 2, "init": "fisher"}, {"k": 0}, {"k": 3, "init": "lookahead"}),
    ("device",): ("cpu", "cuda", "cuda:7", "tpu"),
}
# keys that scale the run's cost: a valid spec keeps them small (each case stays cheap)
COST_CAPS: dict[tuple[str, ...], int] = {
    ("search", "iterations"): 3,
    ("zonotope", "iterations"): 3,
    ("zonotope", "k"): 3,
    ("search", "importance", "n_samples"): 64,
    ("certify", "ladder", "targets"): 2,
}


def cap_cost(doc: Any) -> None:
    """Keep the keys that scale a run's cost small where they hold numbers (in place); a search
    section without `iterations` gets the cap."""
    if not isinstance(doc, dict):
        return
    search = doc.setdefault("search", {})
    if isinstance(search, dict):  # a deleted `iterations` would mean the default, 300
        search.setdefault("iterations", COST_CAPS[("search", "iterations")])
    for path, cap in COST_CAPS.items():
        node: Any = doc
        for key in path[:-1]:
            node = node.get(key) if isinstance(node, dict) else None
        if isinstance(node, dict) and isinstance(node.get(path[-1]), int | float):
            value = node[path[-1]]
            if not isinstance(value, bool) and (math.isnan(value) or value > cap):
                node[path[-1]] = cap
    certify = doc.get("certify")
    ladder = certify.get("ladder") if isinstance(certify, dict) else None
    if isinstance(ladder, list):
        certify["ladder"] = ladder[:4]
    elif isinstance(ladder, dict) and isinstance(ladder.get("scales"), list):
        ladder["scales"] = ladder["scales"][:4]
    tasks = doc.get("tasks")
    if isinstance(tasks, list):
        doc["tasks"] = tasks[:4]


def _set_path(doc: dict[str, Any], path: tuple[str, ...], value: Any) -> None:
    node = doc
    for key in path[:-1]:
        if not isinstance(node.get(key), dict):
            node[key] = {}
        node = node[key]
    node[path[-1]] = value


def mutate_spec(doc: dict[str, Any], rng: random.Random, files: dict[str, str]) -> tuple[str, str]:
    """Mutate a spec document; returns the YAML text and what was done.

    Args:
        doc: a valid spec (copied, not changed).
        files: names -> paths the spec may point to instead (other models, data, folders).
    """
    doc = json.loads(json.dumps(doc))
    done = []
    gentle = rng.random() < 0.5  # one change that keeps the spec valid more often than not
    for _ in range(1 if gentle else rng.choice([1, 2, 3])):
        kinds = ["choice", "path"] if gentle else ["choice", "document", "path", "tasks"]
        kind = rng.choice(kinds)
        if kind == "choice":
            path = rng.choice(sorted(SPEC_CHOICES))
            _set_path(doc, path, rng.choice(SPEC_CHOICES[path]))
            done.append(f"{'.'.join(path)} changed")
        elif kind == "document":
            done.append(mutate_document(doc, rng))
        elif kind == "path":
            key = rng.choice(["model", "data", "outer_box", "task_data"])
            target = rng.choice(sorted(files.values()) + ["missing.onnx", "x.npz", "", "digits"])
            if key == "model":
                doc["model"] = target
            elif key == "outer_box":
                doc["outer_box"] = target
            elif key == "data":
                doc["data"] = {"name": target, "split": rng.choice(["test", "train", "nope"])}
            else:
                doc.setdefault("tasks", [{}])
                if isinstance(doc["tasks"], list) and doc["tasks"]:
                    task = doc["tasks"][0]
                    if isinstance(task, dict):
                        task["data"] = {"name": target, "classes": rng.choice([None, [0, 1], [99]])}
            done.append(f"{key} -> {Path(str(target)).name!r}")
        else:
            doc["tasks"] = rng.choice(
                [
                    [],
                    [{"name": "a"}, {"name": "a"}],
                    [{"name": "a", "metric": "balanced_accuracy", "target": "acc - 0.2"}],
                    [{"name": "a", "target": 1.0}, {"name": "b", "target": 0.01}],
                    {"name": "a"},
                ]
            )
            done.append("tasks replaced")
    cap_cost(doc)
    text = _yaml(doc)
    if not gentle and rng.random() < 0.3:
        text, what = _mutate_text(text, rng)
        done.append(what)
    return text, "; ".join(done)


def _yaml(doc: Any) -> str:
    import yaml

    return yaml.safe_dump(doc, allow_unicode=True, sort_keys=False)


def _mutate_text(text: str, rng: random.Random) -> tuple[str, str]:
    kind = rng.choice(["truncate", "insert", "alias_bomb", "tag", "documents", "bytes"])
    if kind == "truncate":
        return text[: rng.randrange(len(text) + 1)], "yaml truncated"
    if kind == "insert":
        at = rng.randrange(len(text) + 1)
        piece = rng.choice([":", "{", "[", "\t", "&a ", "*a", "- ", "'", '"', "\n  x: 1\n", "%"])
        return text[:at] + piece + text[at:], f"yaml insert {piece!r}"
    if kind == "alias_bomb":
        lines = ["a0: &a0 [x, x, x, x, x, x, x, x, x]"]
        for i in range(1, rng.randint(6, 12)):
            refs = ", ".join([f"*a{i - 1}"] * 9)
            lines.append(f"a{i}: &a{i} [{refs}]")
        key = rng.choice(["parameters", "tasks", "search", "model"])
        return text + "\n".join(lines) + f"\n{key}: *a{len(lines) - 1}\n", "yaml alias bomb"
    if kind == "tag":
        tag = rng.choice(["!!python/object:os.system", "!!binary", "!!set", "!!timestamp", "!x"])
        return text.replace("model:", f"model: {tag}", 1), f"yaml tag {tag}"
    if kind == "documents":
        return text + "\n---\n" + text, "two yaml documents"
    raw = bytearray(text.encode("utf-8"))
    if raw:
        raw[rng.randrange(len(raw))] = rng.choice([0xFF, 0xC3, 0x00, 0x80])
    return raw.decode("latin-1"), "yaml bytes"


# ---------------------------------------------------------------------- .npz data


def _npy_member(header_shape: tuple[int, ...], dtype: str, payload: bytes) -> bytes:
    header = repr({"descr": dtype, "fortran_order": False, "shape": header_shape}).encode()
    header += b" " * (63 - (len(header) + 10) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header + payload


def mutate_npz(x: np.ndarray, y: np.ndarray, rng: random.Random) -> tuple[bytes, str]:
    """A mutated .npz archive built from valid arrays x (n, 64) float32 and y (n,) int64."""
    kind = rng.choice(
        [
            "x_dtype",
            "y_dtype",
            "shape",
            "nonfinite",
            "labels",
            "n_classes",
            "keys",
            "object",
            "pickle",
            "huge_header",
            "bytes",
            "splits",
        ]
    )
    arrays: dict[str, Any] = {"x": x.copy(), "y": y.copy()}
    if kind == "x_dtype":
        dtype = rng.choice(
            ["float16", "float64", "int8", "uint8", "int64", "bool", "complex64", "U5", "S3"]
            + ["datetime64[s]", "V8", "object"]
        )
        arrays["x"] = x.astype(dtype) if dtype != "V8" else np.zeros(len(x), dtype="V8")
    elif kind == "y_dtype":
        arrays["y"] = rng.choice(
            [
                y.astype(np.float32) + 0.5,
                y.astype(np.float64),
                y.astype(np.int8),
                y.astype(np.uint64),
                y.astype(bool),
                y.astype("U3"),
                y.astype(object),
                y.astype(np.complex64),
            ]
        )
    elif kind == "shape":
        arrays["x"], arrays["y"] = rng.choice(
            [
                (x.reshape(-1), y),
                (x.reshape(len(x), 8, 8), y),
                (x[:, :63], y),
                (x[:, :, None], y),
                (x[:0], y[:0]),
                (x, y[:-1]),
                (x, y.reshape(-1, 1)),
                (np.float32(1.0), y),
                (x[:3], y[:3]),
                (x, np.int64(3)),
            ]
        )
    elif kind == "nonfinite":
        arrays["x"].flat[rng.randrange(x.size)] = rng.choice([np.nan, np.inf, -np.inf])
    elif kind == "labels":
        arrays["y"][rng.randrange(len(y))] = rng.choice([10, 99, -1, 2**40, -(2**62)])
    elif kind == "n_classes":
        arrays["n_classes"] = rng.choice(
            [0, -1, 3, 10, 10**9, 2**63 - 1, 2.5, np.nan, "ten", [10], np.zeros((2, 2))]
        )
    elif kind == "keys":
        choice = rng.choice(["drop_x", "drop_y", "train_only", "extra", "empty"])
        if choice == "drop_x":
            del arrays["x"]
        elif choice == "drop_y":
            del arrays["y"]
        elif choice == "train_only":
            arrays = {"x_train": x, "y_train": y}
        elif choice == "extra":
            arrays["x_"] = x
            arrays["y_test"] = y[:5]
        else:
            arrays = {}
    elif kind == "object":
        key = rng.choice(["x", "y"])
        arrays[key] = np.array([{"a": 1}] * len(x), dtype=object)
    elif kind == "pickle":
        return pickle.dumps({"x": x, "y": y}), "a pickle named .npz"
    elif kind == "huge_header":
        shape = rng.choice([(10**12,), (10**6, 10**6), (2**62, 64), (80, 64)])
        member = _npy_member(shape, rng.choice(["<f4", "<f8", "|O", "<i8"]), bytes(64))
        buffer = io.BytesIO()
        with zipfile.ZipFile(buffer, "w") as archive:
            archive.writestr("x.npy", member)
            archive.writestr("y.npy", _npy_member((len(y),), "<i8", y.astype("<i8").tobytes()))
        return buffer.getvalue(), f"huge declared shape {shape}"
    elif kind == "splits":
        arrays = {"x": x, "y": y, "x_test": x[:10], "y_test": y[:9]}
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    data = buffer.getvalue()
    if kind == "bytes":
        data, what = flip_bytes(data, rng)
        return data, f"npz {what}"
    return data, f"npz {kind}"


# ---------------------------------------------------------------------- LID (safetensors)


def mutate_safetensors(data: bytes, rng: random.Random) -> tuple[bytes, str]:
    """Mutate a safetensors file: its bytes, its header length, or fields of its JSON header."""
    kind = rng.choice(["bytes", "length", "header", "header", "header", "metadata", "metadata"])
    if kind == "bytes":
        return flip_bytes(data, rng)
    (size,) = struct.unpack("<Q", data[:8])
    if kind == "length":
        size = rng.choice([0, 1, size - 1, size + 1, len(data), 2**40, 2**64 - 1])
        return struct.pack("<Q", size) + data[8:], f"header length -> {size}"
    header = json.loads(data[8 : 8 + size])
    body = data[8 + size :]
    names = [k for k in header if k != "__metadata__"]
    if kind == "header" and names:
        name = rng.choice(names)
        entry = header[name]
        field = rng.choice(["dtype", "shape", "offsets", "drop", "rename", "document"])
        if field == "dtype":
            entry["dtype"] = rng.choice(["F16", "F32", "BF16", "I64", "BOOL", "U8", "XX", ""])
        elif field == "shape":
            entry["shape"] = rng.choice([[], [0], [10**12], [-1], [2, 2], [3466], ["a"]])
        elif field == "offsets":
            start, end = entry["data_offsets"]
            entry["data_offsets"] = rng.choice(
                [[end, start], [start, end + 8], [0, len(body) + 8], [start, start], [-8, end]]
            )
        elif field == "drop":
            del header[name]
        elif field == "rename":
            header[rng.choice(["x.lower", name + "x", "fc1.weight.upper"])] = header.pop(name)
        else:
            mutate_document(header, rng)
        what = f"header {field} of {name}"
    else:
        metadata = header.setdefault("__metadata__", {})
        key = rng.choice(sorted(metadata) + ["junk"])
        value = rng.choice(
            [
                None,
                "",
                "[]",
                '["nope"]',
                "{}",
                "[" * 5000,
                "zonotope",
                "box",
                "2",
                "0" * 64,
                "nan",
                '[{"n": -1}]',
                json.dumps(["fc1.weight"] * 3),
            ]
        )
        if value is None:
            metadata.pop(key, None)
        else:
            metadata[key] = value
        if rng.random() < 0.1:
            header["__metadata__"] = rng.choice([[], "x", {"a": 1}])
        what = f"metadata {key}"
    text = json.dumps(header).encode()
    text += b" " * ((8 - len(text) % 8) % 8)
    return struct.pack("<Q", len(text)) + text + body, what


# ---------------------------------------------------------------------- certificate.json


def mutate_json_text(text: str, rng: random.Random) -> tuple[str, str]:
    """Text-level damage to a JSON file: truncation, bytes, deep nesting, odd literals."""
    kind = rng.choice(["truncate", "bytes", "deep", "literal", "bom", "empty"])
    if kind == "truncate":
        return text[: rng.randrange(len(text) + 1)], "json truncated"
    if kind == "bytes":
        data, what = flip_bytes(text.encode("utf-8"), rng)
        return data.decode("latin-1"), f"json {what}"
    if kind == "deep":
        depth = rng.choice([100, 1000, 100_000])
        return "[" * depth + "]" * depth, f"json nested {depth} deep"
    if kind == "literal":
        literal = rng.choice(["NaN", "Infinity", "1e999999", "-0", "123" * 2000, '"\\ud800"'])
        return text.replace('"holds": true', f'"holds": {literal}', 1).replace(
            '"n": ', f'"n": {literal}, "x": ', 1
        ), f"json literal {literal[:12]}"
    if kind == "bom":
        return "\ufeff" + text, "json with BOM"
    return "", "json empty"

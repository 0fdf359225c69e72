"""Resource limits for ONNX files (issue 23): refused with exit 2 before anything is allocated.

Each bad model is the same tiny Gemm classifier with one tensor changed: dims that declare more
than `MAX_TENSOR_BYTES`, dims that disagree with the bytes or values stored, and external data
that is absolute, a symbolic link (onnx refuses them too), leaves the model's folder, is
missing or is too short. The refusal must come from the storage check, before onnx reads any
external data.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

import verifier.onnx.reading
from tests.test_cli_pipeline import assert_bad_input, invoke
from verifier.cli import ExitCode
from verifier.errors import GraphError
from verifier.onnx.limits import MAX_TENSOR_BYTES
from verifier.onnx.reading import read_model

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4) / 10


def gemm_model(weight: TensorProto | None = None) -> onnx.ModelProto:
    """x (batch, 4) -> Gemm(W (3, 4), b (3,)) -> logits (batch, 3), opset 17."""
    w = weight if weight is not None else numpy_helper.from_array(WEIGHT, "W")
    b = numpy_helper.from_array(np.zeros(3, np.float32), "b")
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "W", "b"], ["logits"], name="fc", transB=1)],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", 3])],
        [w, b],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _save(folder: Path, name: str, change: Callable[[TensorProto], None]) -> Path:
    model = gemm_model()
    change(model.graph.initializer[0])
    path = folder / name
    onnx.save(model, str(path))
    return path


def _dims(*dims: int) -> Callable[[TensorProto], None]:
    def change(tensor: TensorProto) -> None:
        tensor.dims[:] = list(dims)

    return change


def _typed(values: int, *dims: int) -> Callable[[TensorProto], None]:
    def change(tensor: TensorProto) -> None:
        tensor.ClearField("raw_data")
        tensor.float_data.extend([0.5] * values)
        if dims:
            tensor.dims[:] = list(dims)

    return change


def _external(
    location: str, offset: int | str = 0, length: int | str | None = 48, dims: tuple[int, ...] = ()
) -> Callable[[TensorProto], None]:
    def change(tensor: TensorProto) -> None:
        tensor.ClearField("raw_data")
        if dims:
            tensor.dims[:] = list(dims)
        tensor.data_location = TensorProto.EXTERNAL
        tensor.external_data.add(key="location", value=location)
        tensor.external_data.add(key="offset", value=str(offset))
        if length is not None:
            tensor.external_data.add(key="length", value=str(length))

    return change


def _weights_file(folder: Path, name: str = "w.bin") -> Path:
    path = folder / name
    path.write_bytes(WEIGHT.tobytes())
    return path


def _outside(folder: Path) -> Path:
    inner = folder / "model"
    inner.mkdir()
    _weights_file(folder)
    return _save(inner, "outside.onnx", _external("../w.bin"))


def _symlink_out(folder: Path) -> Path:
    inner = folder / "model"
    inner.mkdir()
    (inner / "w.bin").symlink_to(_weights_file(folder, "secret.bin"))
    return _save(inner, "symlink.onnx", _external("w.bin"))


def _folder_link_out(folder: Path) -> Path:
    inner = folder / "model"
    inner.mkdir()
    _weights_file(folder)
    (inner / "link").symlink_to(folder)
    return _save(inner, "folder_link.onnx", _external("link/w.bin"))


def _huge_consistent(folder: Path) -> Path:
    """12 GiB of external float32 that the file really holds (a sparse file): over the limit."""
    elements = 3 * 2**30
    with (folder / "big.bin").open("wb") as handle:
        handle.truncate(4 * elements)
    return _save(folder, "big.onnx", _external("big.bin", length=4 * elements, dims=(3, 2**30)))


def _with_weights(name: str, change: Callable[[TensorProto], None]) -> Callable[[Path], Path]:
    def write(folder: Path) -> Path:
        _weights_file(folder)
        return _save(folder, name, change)

    return write


LIMIT = f"over the limit of {MAX_TENSOR_BYTES:,} bytes per tensor"
BAD_TENSORS: dict[str, tuple[Callable[[Path], Path], str]] = {
    "raw_1e10_elements": (
        lambda f: _save(f, "huge.onnx", _dims(100_000, 100_000)),
        rf"tensor 'W' declares dims \[100000, 100000\] of FLOAT \(40,000,000,000 bytes\), {LIMIT}",
    ),
    "typed_1e10_elements": (
        lambda f: _save(f, "huge_typed.onnx", _typed(12, 100_000, 100_000)),
        rf"tensor 'W' declares dims \[100000, 100000\] .*{LIMIT}",
    ),
    "raw_dims_too_large": (
        lambda f: _save(f, "dims_large.onnx", _dims(3, 5)),
        r"tensor 'W' declares dims \[3, 5\] of FLOAT \(60 bytes\) but it stores 48 bytes",
    ),
    "raw_dims_too_small": (
        lambda f: _save(f, "dims_small.onnx", _dims(2, 4)),
        r"tensor 'W' declares dims \[2, 4\] of FLOAT \(32 bytes\) but it stores 48 bytes",
    ),
    "negative_dim": (
        lambda f: _save(f, "negative.onnx", _dims(-3, 4)),
        r"tensor 'W' declares negative dims \[-3, 4\]",
    ),
    "typed_too_few_values": (
        lambda f: _save(f, "typed_short.onnx", _typed(5)),
        r"tensor 'W' declares dims \[3, 4\] of FLOAT \(12 values\) but stores 5 in float_data",
    ),
    "external_1e10_elements": (
        _with_weights("ext_huge.onnx", _external("w.bin", length=None, dims=(100_000, 100_000))),
        LIMIT,
    ),
    "external_12_gib_consistent": (_huge_consistent, LIMIT),
    "external_absolute": (
        lambda f: _save(f, "abs.onnx", _external(str(_weights_file(f)))),
        r"external data location '/.*w\.bin' is an absolute path",
    ),
    "external_dot_dot": (_outside, r"external data location '\.\./w\.bin' points outside"),
    "external_symlink_out": (_symlink_out, r"external data location 'w\.bin' is a symbolic link"),
    "external_dir_link_out": (_folder_link_out, r"location 'link/w\.bin' points outside"),
    "external_missing": (
        lambda f: _save(f, "missing.onnx", _external("nowhere.bin")),
        r"external data file 'nowhere\.bin' not found in the model's folder",
    ),
    "external_beyond_end": (
        _with_weights("long.onnx", _external("w.bin", offset=8)),
        r"asks for 48 bytes at offset 8 of 'w\.bin', which holds 48 bytes \(beyond the file",
    ),
    "external_length_mismatch": (
        _with_weights("short.onnx", _external("w.bin", length=40)),
        r"declares dims \[3, 4\] of FLOAT \(48 bytes\) but its external data holds 40 bytes",
    ),
    "external_bad_offset": (
        _with_weights("offset.onnx", _external("w.bin", offset="-1")),
        r"external data offset '-1' is not a non-negative integer",
    ),
    "external_no_location": (
        _with_weights("nolocation.onnx", _external("")),
        r"tensor 'W' is stored externally but names no location",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_bad_tensor_is_refused_with_one_line(tmp_path: Path, case: str) -> None:
    write, pattern = BAD_TENSORS[case]
    path = write(tmp_path)
    line = assert_bad_input(invoke("inspect", path), pattern)
    assert str(path) in line


@pytest.mark.parametrize("case", sorted(BAD_TENSORS))
def test_refused_before_external_data_is_read(
    tmp_path: Path, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    def never(*args: object) -> None:
        raise AssertionError("external data was read before the storage check refused it")

    monkeypatch.setattr(verifier.onnx.reading, "load_external_data_for_model", never)
    path = BAD_TENSORS[case][0](tmp_path)
    with pytest.raises(GraphError, match=re.escape(str(path))):
        read_model(path)


def test_model_with_external_weights_beside_it_loads(tmp_path: Path) -> None:
    path = tmp_path / "external.onnx"
    onnx.save(
        gemm_model(),
        str(path),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="weights.bin",
        size_threshold=0,
    )
    assert (tmp_path / "weights.bin").stat().st_size == WEIGHT.nbytes + 12
    model = read_model(path)
    np.testing.assert_array_equal(numpy_helper.to_array(model.graph.initializer[0]), WEIGHT)
    result = invoke("inspect", path)
    assert result.exit_code == ExitCode.OK, result.output


def test_limit_is_stated_in_the_readme() -> None:
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    assert "8 GiB" in readme and "MAX_TENSOR_BYTES" in readme


def test_sparse_initializer_declaring_a_huge_dense_shape_is_refused(tmp_path: Path) -> None:
    model = gemm_model()
    values = numpy_helper.from_array(np.ones(1, np.float32), "S")
    indices = numpy_helper.from_array(np.zeros(1, np.int64), "S_indices")
    model.graph.sparse_initializer.append(
        helper.make_sparse_tensor(values, indices, [100_000, 100_000])
    )
    path = tmp_path / "sparse.onnx"
    onnx.save(model, str(path))
    assert_bad_input(invoke("inspect", path), rf"a dense 10,000,000,000 elements .*{LIMIT}")


def _with_node(
    node: onnx.NodeProto, *inits: TensorProto, model: onnx.ModelProto | None = None
) -> onnx.ModelProto:
    """The Gemm model with `node` computing `extra` and `x + extra` fed to the Gemm."""
    model = model or gemm_model()
    model.graph.initializer.extend(inits)
    model.graph.node.insert(0, helper.make_node("Add", ["x", "extra"], ["x2"], name="add_extra"))
    model.graph.node.insert(0, node)
    model.graph.node[2].input[0] = "x2"
    return model


def _range_model() -> onnx.ModelProto:
    parts = [
        helper.make_tensor(f"r_{p}", TensorProto.FLOAT, [], [v])
        for p, v in (("start", 0), ("limit", 10**9), ("delta", 1))
    ]
    node = helper.make_node("Range", ["r_start", "r_limit", "r_delta"], ["extra"], name="rng")
    return _with_node(node, *parts)


def _constant_of_shape_model() -> onnx.ModelProto:
    shape = helper.make_tensor("shape", TensorProto.INT64, [2], [10**5, 10**5])
    return _with_node(helper.make_node("ConstantOfShape", ["shape"], ["extra"], name="cos"), shape)


def _huge_input_model() -> onnx.ModelProto:
    model = gemm_model()
    model.graph.input[0].type.tensor_type.shape.dim[1].dim_value = 10**9
    return model


def _huge_pad_model() -> onnx.ModelProto:
    pads = helper.make_tensor("pads", TensorProto.INT64, [4], [0, 0, 0, 2**36])
    model = gemm_model()
    model.graph.initializer.append(pads)
    model.graph.node.insert(0, helper.make_node("Pad", ["x", "pads"], ["x2"], name="pad_huge"))
    model.graph.node[1].input[0] = "x2"
    return model


def _unknown_dtype_model() -> onnx.ModelProto:
    model = gemm_model()
    model.graph.initializer[0].data_type = 99
    return model


BAD_GRAPHS: dict[str, tuple[Callable[[], onnx.ModelProto], str]] = {
    "range_1e9_elements": (
        _range_model,
        r"node 'rng' \(Range\): would compute a constant of 1,000,000,000 elements "
        r"\(4,000,000,000 bytes\), over the limit of [\d,]+ bytes for a computed constant",
    ),
    "constant_of_shape_1e10": (
        _constant_of_shape_model,
        r"node 'cos' \(ConstantOfShape\): would compute a constant of 10,000,000,000 elements",
    ),
    "input_1e9_features": (
        _huge_input_model,
        r"input 'x': one sample would have shape \(1000000000,\) \(1,000,000,000 elements\), "
        r"over the limit of 67,108,864 elements per sample",
    ),
    "pad_to_2e36": (_huge_pad_model, r"node 'pad_huge' \(Pad\): one sample would have shape"),
    "unknown_dtype": (_unknown_dtype_model, r"tensor 'W' has data type 99, which onnx"),
}


@pytest.mark.parametrize("case", sorted(BAD_GRAPHS))
def test_graph_that_would_allocate_too_much_is_refused(tmp_path: Path, case: str) -> None:
    build, pattern = BAD_GRAPHS[case]
    path = tmp_path / f"{case}.onnx"
    onnx.save(build(), str(path))
    assert_bad_input(invoke("inspect", path, "--data", "digits"), pattern)


@pytest.mark.parametrize("location", ["w.bin\x00.txt", "a" * 300])
def test_unopenable_external_location_is_refused(tmp_path: Path, location: str) -> None:
    path = _with_weights("odd.onnx", _external(location))(tmp_path)
    assert_bad_input(invoke("inspect", path), r"external data location .* cannot be opened")

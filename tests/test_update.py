"""Safe updates: projection onto a LID, `verifier project`, multi-LID choice, projected training.

One short LID search on the digits MLP (20 iterations, a few seconds) is shared by the module.
Membership is always checked in float64 on stored values; the held-out samples the LID
certifies must stay correctly classified after any projected update.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner, Result
from onnx import helper, numpy_helper

from tests.model_zoo import build_zoo
from verifier.certify import certify_samples
from verifier.cli import ExitCode, cli
from verifier.data import load_dataset
from verifier.domains import Box, Zonotope
from verifier.domains.io import LidFile, load_lid, save_lid
from verifier.errors import DataError, DomainError
from verifier.files import file_sha256
from verifier.graph import Graph
from verifier.onnx.export import save_with_parameters
from verifier.onnx.importer import load_graph
from verifier.pipeline import prepare_task
from verifier.spec import load_spec
from verifier.update import (
    ProjectedOptimizer,
    SafeUpdate,
    TensorMove,
    TrainableGraph,
    half_diagonal,
    match_parameters,
    project_parameters,
    representable_box,
    representable_corners,
    select_lid,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = ROOT / "onnx_models" / "digits_mlp.onnx"
FP16_WARNING = "ignore:.*float16.*:UserWarning"


def invoke(*args: str | Path) -> Result:
    return CliRunner().invoke(cli, [str(a) for a in args])


@dataclass(frozen=True)
class QuickLid:
    """A LID on the digits MLP with its held-out samples and what it certifies of them."""

    path: Path
    lid: LidFile
    graph: Graph
    x_cert: torch.Tensor
    y_cert: torch.Tensor
    certified: torch.Tensor


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> QuickLid:
    folder = tmp_path_factory.mktemp("quick_lid")
    spec_path = folder / "spec.yaml"
    document = {
        "model": str(MODEL),
        "data": {"name": "digits", "split": "test"},
        "tasks": [{"name": "digits", "metric": "accuracy", "target": 0.5}],
        "search": {"iterations": 20},
        "certify": {"beta": 0.001},
    }
    spec_path.write_text(yaml.safe_dump(document), encoding="utf-8")
    result = invoke("lid", spec_path, "-o", folder / "out")
    assert result.exit_code == ExitCode.OK, result.output
    graph = load_graph(MODEL)
    spec = load_spec(spec_path)
    task = prepare_task(spec, spec.tasks[0], graph)
    lid = load_lid(folder / "out" / "lid.safetensors")
    certified, _ = certify_samples(graph, lid.box, task.x_cert, task.y_cert)
    assert int(certified.sum()) > 100
    return QuickLid(
        folder / "out" / "lid.safetensors", lid, graph, task.x_cert, task.y_cert, certified
    )


def random_update(graph: Graph, seed: int, scale: float) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {n: t + scale * torch.randn(t.shape, generator=gen) for n, t in graph.parameters.items()}


def write_update(path: Path, theta: dict[str, torch.Tensor], source: Path = MODEL) -> Path:
    save_with_parameters(source, theta, path)
    return path


def onnx_initializers(path: Path) -> dict[str, torch.Tensor]:
    model = onnx.load(str(path))
    return {
        t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64))
        for t in model.graph.initializer
    }


def ort_logits(path: Path, x: torch.Tensor) -> torch.Tensor:
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (out,) = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    return torch.from_numpy(out)


# ---------------------------------------------------------------- projection maths


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("seed", range(3))
def test_projection_is_idempotent_exact_and_inside(dtype: torch.dtype, seed: int) -> None:
    gen = torch.Generator().manual_seed(seed)
    centre = {"w": torch.randn(40, 7, generator=gen, dtype=torch.float64), "b": torch.zeros(7)}
    radius = torch.rand(40, 7, generator=gen, dtype=torch.float64) * 0.1
    radius[0, :3] = 0.0  # zero-width entries
    centre["w"] = centre["w"].to(dtype).to(torch.float64)  # each box holds a storable value
    box = Box(
        {"w": centre["w"] - radius, "b": torch.zeros(7, dtype=torch.float64)},
        {"w": centre["w"] + radius, "b": torch.zeros(7, dtype=torch.float64)},
    )
    stored = {n: (t + torch.randn(t.shape, generator=gen)).to(dtype) for n, t in centre.items()}
    theta = {n: t.to(torch.float64) for n, t in stored.items()}
    inner = representable_box(box, {"w": dtype, "b": dtype})
    first = project_parameters(theta, inner)
    assert box.contains(first.theta)  # the original box, float64, atol 0
    for name, value in first.theta.items():  # storable without rounding
        assert torch.equal(value.to(dtype).to(torch.float64), value), name
    second = project_parameters(first.theta, inner)
    assert second.inside and second.distance == 0.0
    for name in theta:
        assert torch.equal(second.theta[name], first.theta[name])
    assert not first.inside and first.distance > 0


def test_projection_is_the_euclidean_nearest_point() -> None:
    box = Box({"w": torch.tensor([-1.0, 0.0, 2.0])}, {"w": torch.tensor([1.0, 0.5, 3.0])})
    proj = project_parameters({"w": torch.tensor([3.0, 0.25, -1.0], dtype=torch.float64)}, box)
    torch.testing.assert_close(proj.theta["w"], torch.tensor([1.0, 0.25, 2.0], dtype=torch.float64))
    (move,) = proj.moves
    assert move == TensorMove("w", True, 3, 2, math.sqrt(2.0**2 + 3.0**2), 3.0)
    assert move.fraction_changed == pytest.approx(2 / 3)


def test_projection_resets_tensors_the_lid_does_not_box() -> None:
    box = Box({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    theta = {"w": torch.tensor([0.5, 2.0]), "b": torch.tensor([3.0]), "c": torch.tensor([1.0])}
    proj = project_parameters(theta, box, reference={"b": torch.tensor([1.0])})
    assert proj.theta["b"].tolist() == [1.0]  # reset to the LID's model
    assert proj.theta["c"].tolist() == [1.0]  # neither boxed nor fixed: passes through
    assert [(m.name, m.boxed, m.n_changed) for m in proj.moves] == [("w", True, 1), ("b", False, 1)]
    assert proj.distance == pytest.approx(math.sqrt(1.0 + 4.0))


def test_representable_corners_round_inward_and_refuse_an_empty_box() -> None:
    lower = torch.tensor([0.1, -0.1, 1.0], dtype=torch.float64)
    upper = torch.tensor([0.2, 0.3, 1.0], dtype=torch.float64)
    lo, up = representable_corners(lower, upper, torch.float16, name="w")
    assert lo.dtype == up.dtype == torch.float16
    assert bool((lo.double() >= lower).all()) and bool((up.double() <= upper).all())
    inf = torch.tensor(math.inf, dtype=torch.float16)
    below, above = torch.nextafter(lo, -inf).double(), torch.nextafter(up, inf).double()
    assert bool(((lo.double() == lower) | (below < lower)).all())  # tight: one ulp further
    assert bool(((up.double() == upper) | (above > upper)).all())  # would leave the box
    gap = torch.tensor([1.0 + 2.0**-20], dtype=torch.float64)  # no float16 value inside
    with pytest.raises(DomainError, match="'w'.*no torch.float16 value"):
        representable_corners(gap, gap, torch.float16, name="w")


# ---------------------------------------------------------------- certified samples survive


@pytest.mark.parametrize("seed", range(3))
def test_projected_large_update_keeps_every_certified_sample(
    quick: QuickLid, seed: int, tmp_path: Path
) -> None:
    theta = random_update(quick.graph, seed, scale=1.0)  # far outside the LID
    updated = write_update(tmp_path / "updated.onnx", theta)
    assert bool((quick.graph.forward(quick.x_cert, theta).argmax(1) != quick.y_cert).any())
    safe = tmp_path / "safe.onnx"
    result = invoke("project", updated, "--lid", quick.path, "-o", safe, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    projected = onnx_initializers(safe)
    assert quick.lid.box.contains(projected)
    x, y, mask = quick.x_cert, quick.y_cert, quick.certified
    exact = quick.graph.forward(x[mask].double(), projected)
    assert bool((exact.argmax(1) == y[mask]).all())
    runtime = ort_logits(safe, x[mask])
    assert bool((runtime.argmax(1) == y[mask]).all())


def test_projection_in_python_keeps_certified_samples(quick: QuickLid) -> None:
    gen = torch.Generator().manual_seed(7)
    for theta in quick.lid.box.sample(3, generator=gen, kind="vertex"):
        far = {
            n: t + 5.0 * torch.randn(t.shape, generator=gen, dtype=t.dtype)
            for n, t in theta.items()
        }
        proj = project_parameters(far, quick.lid.box)
        assert quick.lid.box.contains(proj.theta)
        logits = quick.graph.forward(quick.x_cert[quick.certified].double(), proj.theta)
        assert bool((logits.argmax(1) == quick.y_cert[quick.certified]).all())


# ---------------------------------------------------------------- verifier project


def test_project_round_trips_through_onnx_and_agrees_with_onnxruntime(
    quick: QuickLid, tmp_path: Path
) -> None:
    theta = random_update(quick.graph, 11, scale=0.01)
    updated = write_update(tmp_path / "updated.onnx", theta)
    safe = tmp_path / "safe.onnx"
    result = invoke("project", updated, "--lid", quick.path, "-o", safe, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    expected = project_parameters(
        {n: t.double() for n, t in onnx_initializers(updated).items()}, quick.lid.box
    )
    stored = onnx_initializers(safe)
    for name, value in expected.theta.items():
        assert torch.equal(stored[name], value), name
    graph = load_graph(safe)
    x = load_dataset("digits", split="test").x[:64]
    torch.testing.assert_close(ort_logits(safe, x), graph(x), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(
        ort_logits(safe, x), quick.graph.forward(x, expected.theta).float(), rtol=1e-5, atol=1e-5
    )
    assert doc["verdict"] == "holds" and doc["inside_lid"] is True and doc["kept"] is False
    assert doc["output"]["sha256"] == file_sha256(safe)
    assert doc["moved"]["n_clipped"] == expected.n_clipped > 0
    assert doc["moved"]["distance"] == pytest.approx(expected.distance)
    assert [t["name"] for t in doc["tensors"]] == list(quick.graph.parameters)
    cert = doc["certificate"]
    assert cert["path"] == str(quick.path.parent / "certificate.json")
    assert cert["sha256"] == file_sha256(quick.path.parent / "certificate.json")
    assert cert["tasks"][0]["lower_bound"] >= 0.5 and cert["verdict"] == "holds"


def test_project_human_output_names_the_certificate(quick: QuickLid, tmp_path: Path) -> None:
    updated = write_update(tmp_path / "u.onnx", random_update(quick.graph, 3, scale=0.02))
    result = invoke("project", updated, "--lid", quick.path, "-o", tmp_path / "s.onnx")
    assert result.exit_code == ExitCode.OK, result.output
    out = result.stdout
    assert out.startswith("verdict: holds")
    assert "clipped" in out and "fc1.weight" in out
    assert "checked on the written file in float64" in out
    assert str(quick.path.parent / "certificate.json") in out
    assert re.search(r"task digits: accuracy >= 0\.\d{4} \(clopper-pearson", out)


def test_project_keeps_an_update_inside_the_lid(quick: QuickLid, tmp_path: Path) -> None:
    (inside,) = quick.lid.box.sample(1, generator=torch.Generator().manual_seed(0))
    updated = write_update(tmp_path / "inside.onnx", {n: t.float() for n, t in inside.items()})
    safe = tmp_path / "safe.onnx"
    result = invoke("project", updated, "--lid", quick.path, "-o", safe, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["kept"] is True and doc["moved"]["n_clipped"] == 0
    original, written = onnx_initializers(updated), onnx_initializers(safe)
    assert all(torch.equal(original[n], written[n]) for n in original)


def test_project_may_overwrite_its_input(quick: QuickLid, tmp_path: Path) -> None:
    updated = write_update(tmp_path / "m.onnx", random_update(quick.graph, 4, scale=0.5))
    result = invoke("project", updated, "--lid", quick.path, "-o", updated)
    assert result.exit_code == ExitCode.OK, result.output
    assert quick.lid.box.contains(onnx_initializers(updated))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]  # no temporary left


def _rename_initializer(path: Path, out: Path) -> Path:
    model = onnx.load(str(path))
    for init in model.graph.initializer:
        if init.name == "fc1.weight":
            init.name = "layer1.weight"
    for node in model.graph.node:
        node.input[:] = ["layer1.weight" if i == "fc1.weight" else i for i in node.input]
    onnx.save(model, str(out))
    return out


def _narrow_hidden_layer(path: Path, out: Path) -> Path:
    model = onnx.load(str(path))
    keep = {"fc1.weight": np.s_[:16, :], "fc1.bias": np.s_[:16], "fc2.weight": np.s_[:, :16]}
    for init in model.graph.initializer:
        if init.name in keep:
            array = numpy_helper.to_array(init)[keep[init.name]]
            init.CopyFrom(numpy_helper.from_array(np.ascontiguousarray(array), init.name))
    onnx.save(model, str(out))
    return out


def _tanh_instead_of_relu(path: Path, out: Path) -> Path:
    model = onnx.load(str(path))
    model.graph.node[1].op_type = "Tanh"
    onnx.save(model, str(out))
    return out


def _nan_weight(path: Path, out: Path) -> Path:
    model = onnx.load(str(path))
    init = model.graph.initializer[2]
    array = numpy_helper.to_array(init).copy()
    array[0, 0] = np.nan
    init.CopyFrom(numpy_helper.from_array(array, init.name))
    onnx.save(model, str(out))
    return out


def _gemm_attribute(path: Path, out: Path) -> Path:
    model = onnx.load(str(path))
    model.graph.node[4].attribute.append(helper.make_attribute("alpha", 2.0))
    del model.graph.node[4].attribute[0]  # the old alpha; the new one is 2.0
    onnx.save(model, str(out))
    return out


@pytest.mark.parametrize(
    ("make", "message"),
    [
        (_rename_initializer, "no float initializer 'fc1.weight'"),
        (_narrow_hidden_layer, "initializer 'fc1.weight' has shape \\(16, 64\\)"),
        (_tanh_instead_of_relu, "not the network the LID .* node 1 is Tanh"),
        (_gemm_attribute, "not the network the LID .* node 4 is Gemm"),
        (_nan_weight, "'fc2.weight' contains NaN or Inf"),
        (lambda path, out: out, "no such file"),
    ],
    ids=["renamed", "other-shape", "other-op", "other-attribute", "nan", "missing"],
)
def test_incompatible_models_exit_2_and_write_nothing(
    quick: QuickLid, tmp_path: Path, make: Callable[[Path, Path], Path], message: str
) -> None:
    updated = make(MODEL, tmp_path / "bad.onnx")
    safe = tmp_path / "safe.onnx"
    result = invoke("project", updated, "--lid", quick.path, "-o", safe)
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith("error: ") and re.search(message, line), line
    assert not safe.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []


def test_bad_lid_and_option_combinations_exit_2(quick: QuickLid, tmp_path: Path) -> None:
    safe = tmp_path / "safe.onnx"
    cases: list[tuple[list[str | Path], str]] = [
        (["--lid", tmp_path / "missing.safetensors"], "LID file not found"),
        (["--lid", quick.path, "--choose", "loss"], "needs a data batch"),
        (["--lid", quick.path, "--data", "digits"], "only used with --choose loss"),
    ]
    for extra, message in cases:
        result = invoke("project", MODEL, *extra, "-o", safe)
        assert result.exit_code == ExitCode.BAD_INPUT, result.output
        assert message in result.stderr
    assert not safe.exists()


def test_lid_whose_certificate_is_not_met_exits_1(quick: QuickLid, tmp_path: Path) -> None:
    failed = [
        {"task": "digits", "metric": "accuracy", "target": 0.99, "k": 300, "n": 399}
        | {"beta": 0.001, "bound_kind": "clopper-pearson", "lower_bound": 0.7, "holds": False}
    ]
    lid = tmp_path / "failed" / "lid.safetensors"
    save_lid(lid, quick.lid.box, {**quick.lid.metadata, "certificate": json.dumps(failed)})
    updated = write_update(tmp_path / "u.onnx", random_update(quick.graph, 8, scale=0.1))
    safe = tmp_path / "s.onnx"
    result = invoke("project", updated, "--lid", lid, "--base", MODEL, "-o", safe)
    assert result.exit_code == ExitCode.SPEC_NOT_MET, result.output
    assert result.stdout.startswith("verdict: not met") and "NOT MET" in result.stdout
    assert quick.lid.box.contains(onnx_initializers(safe))  # projected all the same
    result = invoke("project", updated, "--lid", lid, "--base", tmp_path / "nope.onnx", "-o", safe)
    assert result.exit_code == ExitCode.BAD_INPUT and "nope.onnx: no such file" in result.stderr


def test_lid_whose_model_cannot_be_found_needs_base(quick: QuickLid, tmp_path: Path) -> None:
    moved = tmp_path / "alone" / "lid.safetensors"
    save_lid(moved, quick.lid.box, quick.lid.metadata)  # no certificate.json beside it
    updated = write_update(tmp_path / "u.onnx", random_update(quick.graph, 1, scale=0.1))
    result = invoke("project", updated, "--lid", moved, "-o", tmp_path / "s.onnx")
    assert result.exit_code == ExitCode.BAD_INPUT
    assert "--base" in result.stderr
    result = invoke(
        "project", updated, "--lid", moved, "--base", MODEL, "-o", tmp_path / "s.onnx", "--json"
    )
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["certificate"]["path"] is None  # taken from the LID's metadata
    assert doc["certificate"]["verdict"] == "holds"
    other = write_update(tmp_path / "other.onnx", random_update(quick.graph, 2, scale=0.1))
    result = invoke("project", updated, "--lid", moved, "--base", other, "-o", tmp_path / "s.onnx")
    assert result.exit_code == ExitCode.BAD_INPUT  # the base must have the LID's model hash


@pytest.mark.filterwarnings(FP16_WARNING)
def test_float16_model_partial_box_rounds_inward_and_resets_the_rest(tmp_path: Path) -> None:
    model = build_zoo(tmp_path, ["folded_constants-helper"])["folded_constants-helper"].path
    graph = load_graph(model)
    # corners at float64 values that float16 cannot hold: rounding to nearest would leave the box
    box = Box.around({n: graph.parameters[n].double() for n in ("w1_half", "b2")}, radius=1e-3 / 3)
    lid = tmp_path / "lid" / "lid.safetensors"
    save_lid(lid, box, {"model_sha256": file_sha256(model)})
    theta = random_update(graph, 0, scale=0.3)
    updated = write_update(tmp_path / "u.onnx", theta, source=model)
    safe = tmp_path / "safe.onnx"
    result = invoke("project", updated, "--lid", lid, "--base", model, "-o", safe, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["verdict"] == "unknown"  # no certificate anywhere: said, not hidden
    written = onnx.load(str(safe))
    half = next(t for t in written.graph.initializer if t.name == "w1_half")
    assert half.data_type == onnx.TensorProto.FLOAT16
    stored = onnx_initializers(safe)
    assert box.contains(stored)
    original = onnx_initializers(model)
    for name in ("b1", "w2_out_in"):  # not boxed: reset to the LID's model
        assert torch.equal(stored[name], original[name])
    moves = {t["name"]: t for t in doc["tensors"]}
    assert moves["b1"]["boxed"] is False and moves["b1"]["n_changed"] == 5


# ---------------------------------------------------------------- several LIDs


def _boxes() -> tuple[Box, Box]:
    small = Box({"w": torch.tensor([0.0, 0.0])}, {"w": torch.tensor([0.1, 0.1])})
    large = Box({"w": torch.tensor([-10.0, 0.5])}, {"w": torch.tensor([10.0, 10.0])})
    return small, large


def test_selection_keeps_an_update_inside_one_lid() -> None:
    small, large = _boxes()
    theta = {"w": torch.tensor([0.05, 0.05], dtype=torch.float64)}  # in small only
    projections = [project_parameters(theta, b) for b in (large, small)]
    sel = select_lid(projections, [large, small], "closest")
    assert sel.kept and sel.index == 1
    both = {"w": torch.tensor([0.05, 0.05])}
    wide = Box({"w": torch.tensor([-1.0, -1.0])}, {"w": torch.tensor([1.0, 1.0])})
    sel = select_lid(
        [project_parameters(both, b) for b in (wide, small)],
        [wide, small],
        "loss",
        losses=[9.0, 1.0],
    )
    assert sel.kept and sel.index == 0  # the first LID holding it, whatever the rule


def test_closest_and_size_weighted_choose_as_documented() -> None:
    small, large = _boxes()
    theta = {"w": torch.tensor([0.2, 0.2], dtype=torch.float64)}  # 0.14 from small, 0.3 from large
    projections = [project_parameters(theta, b) for b in (small, large)]
    closest = select_lid(projections, [small, large], "closest")
    assert not closest.kept and closest.index == 0
    weighted = select_lid(projections, [small, large], "size-weighted")
    assert weighted.index == 1
    for c, box in zip(weighted.candidates, (small, large), strict=True):
        assert c.size == pytest.approx(half_diagonal(box))
        assert c.score == pytest.approx(c.distance / c.size)
    assert half_diagonal(small) == pytest.approx(0.5 * math.sqrt(0.02))


def test_loss_rule_takes_the_lowest_loss_and_ties_go_to_the_closest() -> None:
    small, large = _boxes()
    theta = {"w": torch.tensor([0.2, 0.2], dtype=torch.float64)}
    projections = [project_parameters(theta, b) for b in (small, large)]
    assert select_lid(projections, [small, large], "loss", losses=[2.0, 1.0]).index == 1
    assert select_lid(projections, [small, large], "loss", losses=[float("nan"), 3.0]).index == 1
    swapped = select_lid(projections[::-1], [large, small], "loss", losses=[1.0, 1.0])
    assert swapped.index == 1  # equal losses: the closer LID (small), though listed second
    with pytest.raises(DataError):
        select_lid(projections, [small, large], "loss")


def test_several_lids_on_the_command_line(quick: QuickLid, tmp_path: Path) -> None:
    theta0 = {n: t.double() for n, t in quick.graph.parameters.items()}
    half = quick.lid.box.scaled(theta0, 0.5)
    half_path = tmp_path / "half" / "lid.safetensors"
    save_lid(half_path, half, quick.lid.metadata)
    update = random_update(quick.graph, 5, scale=0.05)
    updated = write_update(tmp_path / "u.onnx", update)

    def run(*extra: str | Path) -> dict[str, Any]:
        result = invoke(
            "project", updated, "--lid", half_path, "--lid", quick.path,
            "--base", MODEL, "-o", tmp_path / "s.onnx", "--json", *extra,
        )  # fmt: skip
        assert result.exit_code == ExitCode.OK, result.output
        return dict(json.loads(result.stdout))

    closest = run("--choose", "closest")
    assert closest["chosen"]["index"] == 1  # the full box contains the half box: closer
    distances = [c["distance"] for c in closest["candidates"]]
    assert distances[1] < distances[0]
    loss = run("--choose", "loss", "--data", "digits", "--split", "train")
    losses = [c["loss"] for c in loss["candidates"]]
    assert all(isinstance(v, float) for v in losses)
    assert loss["chosen"]["index"] == int(np.argmin(losses))
    weighted = run("--choose", "size-weighted")
    scores = [c["score"] for c in weighted["candidates"]]
    assert weighted["chosen"]["index"] == int(np.argmin(scores))
    result = invoke(
        "project", updated, "--lid", half_path, "--lid", quick.path, "--base", MODEL,
        "-o", tmp_path / "s.onnx", "--choose", "size-weighted",
    )  # fmt: skip
    assert "size-weighted" in result.stdout and "#1" in result.stdout
    (inside,) = half.sample(1, generator=torch.Generator().manual_seed(1))
    kept_path = write_update(tmp_path / "in.onnx", {n: t.float() for n, t in inside.items()})
    result = invoke(
        "project", kept_path, "--lid", quick.path, "--lid", half_path, "--base", MODEL,
        "-o", tmp_path / "k.onnx", "--json",
    )  # fmt: skip
    doc = json.loads(result.stdout)
    assert doc["kept"] is True and doc["chosen"]["index"] == 0  # the first LID holding it


# ---------------------------------------------------------------- zonotope LIDs


def small_zonotope(graph: Graph, *, k: int = 3, seed: int = 0) -> Zonotope:
    """A box of radius 0.01 around the graph's weights plus k small Gaussian generators."""
    gen = torch.Generator().manual_seed(seed)
    theta0 = {n: t.double() for n, t in graph.parameters.items()}
    generators = {
        n: 0.003 * torch.randn((k, *t.shape), generator=gen, dtype=torch.float64)
        for n, t in theta0.items()
    }
    return Zonotope(
        {n: t - 0.01 for n, t in theta0.items()},
        {n: t + 0.01 for n, t in theta0.items()},
        generators,
    )


@pytest.mark.parametrize("seed", range(2))
def test_zonotope_projection_lands_inside_and_is_idempotent(seed: int) -> None:
    graph = load_graph(MODEL)
    zonotope = small_zonotope(graph, seed=seed)
    update = {n: t.float() for n, t in random_update(graph, seed, scale=0.05).items()}
    dtypes = {n: torch.float32 for n in update}
    theta = {n: t.double() for n, t in update.items()}
    first = project_parameters(theta, zonotope, dtypes=dtypes)
    assert not first.inside and first.distance > 0
    assert zonotope.contains(first.theta)  # exact, float64
    for name, value in first.theta.items():  # storable as float32 without rounding
        assert torch.equal(value.float().double(), value), name
    second = project_parameters(first.theta, zonotope, dtypes=dtypes)
    assert second.inside and second.distance == 0.0
    for name in theta:
        assert torch.equal(second.theta[name], first.theta[name])
    # nearest point (up to the INWARD margin): no farther than a sampled point of T
    (inside,) = zonotope.sample(1, generator=torch.Generator().manual_seed(seed))
    assert first.distance <= math.sqrt(
        sum(float(((theta[n] - inside[n]) ** 2).sum()) for n in theta)
    )


def test_safe_update_keeps_a_module_inside_a_zonotope_through_training() -> None:
    graph = load_graph(MODEL)
    zonotope = small_zonotope(graph, k=2)
    net = TrainableGraph(graph, names=zonotope.names)
    optimizer = ProjectedOptimizer(torch.optim.SGD(net.parameters(), lr=0.5), zonotope, net)
    assert optimizer.safe.contains()
    with pytest.raises(DomainError, match="zonotope"):
        _ = optimizer.safe.box
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, *graph.input_shape, generator=gen)
    y = torch.randint(0, 10, (32,), generator=gen)
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.cross_entropy(net(x), y).backward()
        optimizer.step()
        assert optimizer.safe.contains()
    before = net.theta()
    optimizer.safe.project()  # idempotent: nothing moves
    for name, value in net.theta().items():
        assert torch.equal(value, before[name]), name


def test_half_diagonal_of_a_zonotope_without_generators_is_the_boxes() -> None:
    box = Box({"w": torch.zeros(3, dtype=torch.float64)}, {"w": torch.tensor([1.0, 2.0, 2.0])})
    assert half_diagonal(Zonotope.from_box(box)) == pytest.approx(half_diagonal(box), rel=1e-15)
    wider = Zonotope.from_box(box, {"w": torch.tensor([[0.0, 0.0, 2.0]], dtype=torch.float64)})
    assert half_diagonal(wider) == pytest.approx(math.sqrt(1.5**2 + 2.0**2))


def test_project_cli_on_a_zonotope_lid(tmp_path: Path) -> None:
    graph = load_graph(MODEL)
    zonotope = small_zonotope(graph)
    lid_path = tmp_path / "zonotope" / "lid.safetensors"
    save_lid(lid_path, zonotope, {"model_sha256": file_sha256(MODEL)})
    updated = write_update(tmp_path / "u.onnx", random_update(graph, 3, scale=0.05))
    safe = tmp_path / "safe.onnx"
    result = invoke("project", updated, "--lid", lid_path, "--base", MODEL, "-o", safe, "--json")
    assert result.exit_code == ExitCode.OK, result.output
    doc = json.loads(result.stdout)
    assert doc["kept"] is False and doc["moved"]["distance"] > 0
    assert load_lid(lid_path).domain.contains(onnx_initializers(safe))
    again = invoke("project", safe, "--lid", lid_path, "--base", MODEL, "-o", safe, "--json")
    assert again.exit_code == ExitCode.OK, again.output
    assert json.loads(again.stdout)["kept"] is True
    human = invoke("project", updated, "--lid", lid_path, "--base", MODEL, "-o", safe)
    assert human.exit_code == ExitCode.OK, human.output
    assert "projected onto LID" in human.stdout


# ---------------------------------------------------------------- projected training


def test_trainable_graph_matches_the_graph_and_freezes_the_rest(quick: QuickLid) -> None:
    net = TrainableGraph(quick.graph, names=["fc3.weight", "fc3.bias"])
    x = quick.x_cert[:16]
    torch.testing.assert_close(net(x), quick.graph(x), rtol=0, atol=0)
    assert sum(p.numel() for p in net.parameters()) == 330
    assert list(net.onnx_parameters()) == list(quick.graph.parameters)
    with pytest.raises(DomainError, match="not parameters"):
        TrainableGraph(quick.graph, names=["nope"])


@pytest.mark.parametrize("optimizer", ["adam", "sgd-hook"])
def test_projected_optimizer_keeps_weights_inside_through_training(
    quick: QuickLid, optimizer: str
) -> None:
    data = load_dataset("digits", split="train")
    net = TrainableGraph(quick.graph, names=quick.lid.box.names)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():  # start far outside: the wrapper projects on construction
        for p in net.parameters():
            p.add_(torch.randn(p.shape, generator=gen))
    if optimizer == "adam":
        opt: Any = ProjectedOptimizer(torch.optim.Adam(net.parameters(), lr=0.05), quick.lid, net)
        safe = opt.safe
    else:
        safe = SafeUpdate(net, quick.lid)
        opt = torch.optim.SGD(net.parameters(), lr=1.0, momentum=0.9)
        safe.attach(opt)
        safe.project()
    assert safe.contains()
    moved = 0
    for step in range(30):
        i = (step * 64) % (len(data) - 64)
        before = net.theta()
        loss = torch.nn.functional.cross_entropy(net(data.x[i : i + 64]), data.y[i : i + 64])
        opt.zero_grad()
        loss.backward()
        opt.step()
        assert safe.contains(), step
        assert quick.lid.box.contains(net.theta())
        moved += sum(int((before[n] != t).sum()) for n, t in net.theta().items())
    assert moved > 0
    logits = net(quick.x_cert[quick.certified].double())
    assert bool((logits.argmax(1) == quick.y_cert[quick.certified]).all())


def test_safe_update_on_a_plain_module_matches_by_name_and_shape() -> None:
    module = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 4))
    shapes = {"first.weight": (4, 3), "0.bias": (4,)}
    matched = match_parameters(module, shapes)
    assert matched["first.weight"] is module[0].weight and matched["0.bias"] is module[0].bias
    with pytest.raises(DomainError, match="several"):
        match_parameters(module, {"b": (4,), "c": (4,), "0.weight": (4, 3), "2.weight": (4, 4)})
    explicit = match_parameters(module, {"b": (4,)}, names={"b": "2.bias"})
    assert explicit["b"] is module[2].bias
    box = Box.around({"w": module[0].weight.detach().clone()}, radius=0.01)
    for p in module[2].parameters():
        p.requires_grad_(False)
    module[0].bias.requires_grad_(False)
    safe = SafeUpdate(module, box, names={"w": "0.weight"})
    with torch.no_grad():
        module[0].weight.add_(1.0)
    assert not safe.contains()
    safe.project()
    assert safe.contains()
    module[2].weight.requires_grad_(True)
    with pytest.warns(UserWarning, match=r"\['2.weight'\] are trainable but not in the LID"):
        SafeUpdate(module, box, names={"w": "0.weight"})


def test_projected_optimizer_rejects_mixed_arguments() -> None:
    weight = torch.nn.Parameter(torch.zeros(2))
    box = Box({"w": torch.zeros(2)}, {"w": torch.ones(2)})
    opt = torch.optim.SGD([weight], lr=0.1)
    with pytest.raises(ValueError):
        ProjectedOptimizer(opt, box)
    safe = SafeUpdate({"w": weight}, box)
    with pytest.raises(ValueError):
        ProjectedOptimizer(opt, safe, {"w": weight})
    wrapped = ProjectedOptimizer(opt, safe)
    weight.grad = torch.tensor([-5.0, 5.0])
    wrapped.step()
    assert weight.tolist() == [0.5, 0.0]
    assert wrapped.param_groups[0]["lr"] == 0.1 and wrapped.defaults["lr"] == 0.1


# ---------------------------------------------------------------- README


def readme_section(title: str) -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    start = text.index(f"\n## {title}\n")
    end = text.find("\n## ", start + 1)
    return text[start : end if end != -1 else len(text)]


def test_readme_safe_updates_example_runs(
    quick: QuickLid, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    section = readme_section("Safe updates")
    substitutions = {
        "reports/demo/lid.safetensors": str(quick.path),
        "onnx_models/digits_mlp.onnx": str(MODEL),
    }
    for old, new in substitutions.items():
        assert old in section, old
        section = section.replace(old, new)
    blocks = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    assert blocks
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, Any] = {"__name__": "readme_example"}
    for block in blocks:
        exec(compile(block, "README.md#safe-updates", "exec"), namespace)
    commands = re.findall(r"^\$ \.venv/bin/verifier (.+)$", section, flags=re.M)
    assert commands
    for command in commands:
        result = invoke(*shlex.split(command))
        assert result.exit_code == ExitCode.OK, (command, result.output)

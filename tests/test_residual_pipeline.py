"""A whole LID job on a residual CNN exported from torch: load, search, certify on held-out
data, project an update back into the LID through ONNX, and re-verify the run (issue 18)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
import yaml
from click.testing import CliRunner
from onnx import numpy_helper
from torch import nn

from tests.model_zoo import EXPORT_WARNING_FILTERS
from verifier.certify import certify_samples
from verifier.cli import ExitCode, cli
from verifier.data import load_dataset
from verifier.domains.io import load_lid
from verifier.graph import Binary
from verifier.onnx.export import save_with_parameters
from verifier.onnx.importer import load_graph

pytestmark = [pytest.mark.filterwarnings(f) for f in EXPORT_WARNING_FILTERS]


class ResidualCNN(nn.Module):
    """8x8 digits: conv-relu, a residual block (conv + identity), avg-pool, linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(1, 4, 3, padding=1)
        self.block = nn.Conv2d(4, 4, 3, padding=1)
        self.pool = nn.AvgPool2d(2)
        self.head = nn.Linear(4 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.stem(x))
        h = torch.relu(h + self.block(h))
        return self.head(torch.flatten(self.pool(h), 1))


def invoke(*args: object) -> object:
    return CliRunner().invoke(cli, [str(a) for a in args])


@pytest.fixture(scope="module")
def residual_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The residual CNN trained briefly on the digits train split, exported (legacy exporter)."""
    torch.manual_seed(0)
    train = load_dataset("digits", split="train")
    x, y = train.x.reshape(-1, 1, 8, 8), train.y
    model = ResidualCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=1e-2)
    gen = torch.Generator().manual_seed(0)
    for _ in range(150):
        idx = torch.randint(0, x.shape[0], (128,), generator=gen)
        loss = nn.functional.cross_entropy(model(x[idx]), y[idx])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    path = tmp_path_factory.mktemp("residual") / "residual_cnn.onnx"
    torch.onnx.export(
        model.eval(),
        (torch.zeros(1, 1, 8, 8),),
        str(path),
        input_names=["image"],
        output_names=["logits"],
        dynamic_axes={"image": {0: "batch"}, "logits": {0: "batch"}},
        dynamo=False,
    )
    return path


def test_residual_cnn_loads_as_a_dag_and_matches_onnxruntime(residual_model: Path) -> None:
    graph = load_graph(residual_model)
    assert not graph.is_chain() and any(isinstance(op, Binary) for op in graph.ops)
    x = load_dataset("digits", split="test").x[:50].reshape(-1, 1, 8, 8)
    session = ort.InferenceSession(str(residual_model), providers=["CPUExecutionProvider"])
    (expected,) = session.run(None, {"image": x.numpy()})
    torch.testing.assert_close(graph(x), torch.from_numpy(expected), rtol=1e-5, atol=1e-5)


def test_lid_on_a_residual_cnn_is_certified_projected_and_reverified(
    residual_model: Path, tmp_path: Path
) -> None:
    spec = tmp_path / "spec.yaml"
    spec.write_text(
        yaml.safe_dump(
            {
                "model": str(residual_model),
                "data": {"name": "digits", "split": "test"},
                "parameters": "all",
                "tasks": [{"name": "digits", "metric": "accuracy", "target": 0.6}],
                "search": {"iterations": 20, "lr": 1.0},
                "certify": {"beta": 0.001},
            }
        ),
        encoding="utf-8",
    )
    out = tmp_path / "out"
    result = invoke("run", spec, "-o", out, "--json")
    assert result.exit_code == ExitCode.OK, result.output  # type: ignore[attr-defined]
    certificate = json.loads((out / "certificate.json").read_text(encoding="utf-8"))
    assert certificate["verdict"] == "holds"
    lid = load_lid(out / "lid.safetensors")
    assert lid.box.size("mean_width") > 0

    # an update far outside the LID, projected back through ONNX write-back
    gen = torch.Generator().manual_seed(1)
    graph = load_graph(residual_model)
    update = {n: t + 0.3 * torch.randn(t.shape, generator=gen) for n, t in graph.parameters.items()}
    updated = tmp_path / "updated.onnx"
    save_with_parameters(residual_model, update, updated)
    safe = tmp_path / "safe.onnx"
    projected = invoke("project", updated, "--lid", out / "lid.safetensors", "-o", safe, "--json")
    assert projected.exit_code == ExitCode.OK, projected.output  # type: ignore[attr-defined]
    doc = json.loads(projected.stdout)  # type: ignore[attr-defined]
    assert doc["inside_lid"] is True and doc["moved"]["n_clipped"] > 0
    written = {
        t.name: torch.from_numpy(numpy_helper.to_array(t).astype(np.float64))
        for t in onnx.load(str(safe)).graph.initializer
    }
    assert lid.box.contains({n: written[n] for n in lid.box.names})

    # every sample the LID certifies is classified correctly by the projected model
    data = load_dataset("digits", split="test")
    x, y = data.x.reshape(-1, 1, 8, 8).double(), data.y
    mask, _ = certify_samples(graph, lid.box, x, y)
    safe_graph = load_graph(safe)
    predictions = safe_graph.forward(x).argmax(dim=1)
    assert int(mask.sum()) > 0
    assert bool((predictions[mask] == y[mask]).all())

    verified = invoke("verify", out)
    assert verified.exit_code == ExitCode.OK, verified.output  # type: ignore[attr-defined]

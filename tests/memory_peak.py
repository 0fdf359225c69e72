"""Peak memory of one bound pass, measured in a fresh process (for `tests/test_memory.py`).

`python -m tests.memory_peak MODEL METHOD BATCH` prints the bytes by which the resident set's
high-water mark rose over the resident set just before the pass: the peak is reset through
/proc/self/clear_refs (Linux >= 4.0, "5": reset VmHWM to VmRSS) after a warm-up pass on one
sample, so imports, the model and lazily built kernels are not counted. RSS counts what the
allocator holds, not only live tensors, so it is the figure a user's machine sees.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from tests.tiny_nets import box_around, random_mlp
from verifier.graph import Activation, Conv, Graph, Linear, Op, Reshape

ROOT = Path(__file__).resolve().parent.parent


def small_cnn(generator: torch.Generator) -> Graph:
    """Conv(3->16, 3x3, pad 1)-ReLU-Conv(16->32, 3x3, stride 2, pad 1)-ReLU-Linear(8192->10)
    on 3x32x32 inputs: CIFAR-sized activations, small enough for tests."""

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=generator, dtype=torch.float64)

    parameters = {
        "conv0.weight": randn(16, 3, 3, 3) / 5.0,
        "conv0.bias": 0.1 * randn(16),
        "conv1.weight": randn(32, 16, 3, 3) / 12.0,
        "conv1.bias": 0.1 * randn(32),
        "fc.weight": randn(10, 8192) / 90.0,
        "fc.bias": 0.1 * randn(10),
    }
    ops: tuple[Op, ...] = (
        Conv(node="Conv_0", weight="conv0.weight", bias="conv0.bias", pads=(1, 1, 1, 1)),
        Activation(node="Relu_0", function="relu"),
        Conv(
            node="Conv_1",
            weight="conv1.weight",
            bias="conv1.bias",
            strides=(2, 2),
            pads=(1, 1, 1, 1),
        ),
        Activation(node="Relu_1", function="relu"),
        Reshape(node="Flatten_0", shape=(8192,)),
        Linear(node="Gemm_0", weight="fc.weight", bias="fc.bias"),
    )
    return Graph(
        ops=ops,
        parameters=parameters,
        input_name="input",
        input_shape=(3, 32, 32),
        output_name="logits",
        n_classes=10,
    )


def model(name: str) -> Graph:
    """`mlp`: a 784-200-200-10 ReLU MLP; `cnn`: `small_cnn`."""
    gen = torch.Generator().manual_seed(0)
    if name == "mlp":
        return random_mlp((784, 200, 200, 10), gen)
    return small_cnn(gen)


def run_pass(graph: Graph, method: str, batch: int) -> None:
    """One bound pass as certification ("ibp", "best" proofs in float64) or the search
    ("search-ibp", "search-linear": float32 with a backward pass) runs it."""
    from verifier.certify import _proofs
    from verifier.domains.box import Box
    from verifier.search.surrogate import guide_bounds

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(batch, *graph.input_shape, generator=gen, dtype=torch.float64)
    y = torch.randint(0, graph.n_classes, (batch,), generator=gen)
    lower, upper = box_around(graph, 0.01)
    if method.startswith("search-"):
        low = {k: v.float().requires_grad_(True) for k, v in lower.items()}
        up = {k: v.float().requires_grad_(True) for k, v in upper.items()}
        bounds = guide_bounds(graph, low, up, x.float(), y, linear=method == "search-linear")
        finite = bounds.lower[torch.isfinite(bounds.lower)]
        finite.sum().backward()
        return
    with torch.no_grad():
        _proofs(graph, Box(lower, upper), x, y, method)  # type: ignore[arg-type]


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


def measure(name: str, method: str, batch: int) -> int:
    """Peak RSS rise in bytes of one pass (module docstring)."""
    torch.set_num_threads(1)
    graph = model(name)
    run_pass(graph, method, 1)
    Path("/proc/self/clear_refs").write_text("5")
    before = _status("VmRSS")
    run_pass(graph, method, batch)
    return _status("VmHWM") - before


if __name__ == "__main__":
    print(measure(sys.argv[1], sys.argv[2], int(sys.argv[3])))

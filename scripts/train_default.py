"""Train the embedded default model: a 64-32-32-10 ReLU MLP on the digits train split.

Deterministic: fixed seed, `torch.use_deterministic_algorithms(True)`, one CPU thread and
full-batch Adam (no data shuffling). The model is exported with torch's legacy (TorchScript)
ONNX exporter, opset 17, with a dynamic batch axis and the initializers named `fc1.weight`,
`fc1.bias`, ..., `fc3.bias`, then checked with onnx.checker and with onnxruntime, whose test
accuracy must equal torch's. The file is written atomically (temporary file and rename).

Usage: python scripts/train_default.py [--output onnx_models/digits_mlp.onnx]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch
from torch import Tensor, nn

from verifier.data import load_dataset

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = PROJECT_ROOT / "onnx_models" / "digits_mlp.onnx"
SEED = 0
STEPS = 400
LEARNING_RATE = 1e-2
WEIGHT_DECAY = 1e-4
MIN_TEST_ACCURACY = 0.95


class DigitsMLP(nn.Module):
    """64 -> 32 -> 32 -> 10 with ReLU after the two hidden layers."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, 32)
        self.fc2 = nn.Linear(32, 32)
        self.fc3 = nn.Linear(32, 10)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def train(x: Tensor, y: Tensor, *, steps: int, seed: int) -> DigitsMLP:
    """Full-batch Adam on cross-entropy from a seeded initialisation."""
    torch.manual_seed(seed)
    model = DigitsMLP()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE, weight_decay=WEIGHT_DECAY)
    loss_fn = nn.CrossEntropyLoss()
    model.train()
    for _ in range(steps):
        optimiser.zero_grad()
        loss = loss_fn(model(x), y)
        loss.backward()
        optimiser.step()
    model.eval()
    return model


def export_checked(
    model: nn.Module, example: Tensor, doc_string: str, metadata: dict[str, str]
) -> onnx.ModelProto:
    """A model as checked ONNX (legacy exporter, opset 17, dynamic batch axis, input `input`,
    output `logits`), with a doc string and metadata; shared by the training scripts."""
    with tempfile.TemporaryDirectory() as tmp, warnings.catch_warnings():
        # the legacy exporter is chosen on purpose (plain Gemm nodes, initializer names kept)
        warnings.simplefilter("ignore", DeprecationWarning)
        exported = Path(tmp) / "model.onnx"
        torch.onnx.export(
            model,
            (example,),
            exported,
            dynamo=False,
            opset_version=17,
            input_names=["input"],
            output_names=["logits"],
            dynamic_axes={"input": {0: "batch"}, "logits": {0: "batch"}},
            do_constant_folding=True,
        )
        proto = onnx.load(exported)
    proto.doc_string = doc_string
    for key, value in metadata.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto, full_check=True)
    return proto


def export_onnx(model: DigitsMLP, metadata: dict[str, str]) -> bytes:
    """The model as ONNX bytes (legacy exporter, opset 17, dynamic batch axis)."""
    doc = "lid-verifier default model: 64-32-32-10 ReLU MLP on sklearn digits"
    proto = export_checked(model, torch.zeros(1, 64), doc, metadata)
    names = sorted(init.name for init in proto.graph.initializer)
    expected = sorted(f"fc{k}.{p}" for k in (1, 2, 3) for p in ("weight", "bias"))
    if names != expected:
        raise RuntimeError(f"unexpected initializer names {names}; expected {expected}")
    return proto.SerializeToString()


def write_atomic(path: Path, payload: bytes) -> None:
    """Write bytes via a temporary file in the same folder and a rename."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(payload)
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise


def main(argv: list[str] | None = None) -> int:
    """Train, export, check; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--seed", type=int, default=SEED)
    args = parser.parse_args(argv)

    torch.use_deterministic_algorithms(True)
    torch.set_num_threads(1)
    train_data = load_dataset("digits", split="train")
    test_data = load_dataset("digits", split="test")
    model = train(train_data.x, train_data.y, steps=args.steps, seed=args.seed)

    with torch.no_grad():
        torch_logits = model(test_data.x)
    torch_correct = int((torch_logits.argmax(1) == test_data.y).sum())
    torch_accuracy = torch_correct / len(test_data)

    payload = export_onnx(
        model,
        {
            "train_data": f"digits [train] sha256 {train_data.source_sha256}",
            "training": f"seed {args.seed}, full-batch Adam lr {LEARNING_RATE} "
            f"weight_decay {WEIGHT_DECAY}, {args.steps} steps",
            "test_accuracy": f"{torch_accuracy:.4f} on digits [test] ({len(test_data)} samples)",
        },
    )
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    ort_logits = session.run(None, {"input": test_data.x.numpy()})[0]
    ort_correct = int((ort_logits.argmax(1) == test_data.y.numpy()).sum())
    ort_accuracy = ort_correct / len(test_data)
    max_diff = float(np.abs(ort_logits - torch_logits.numpy()).max())

    print(f"torch test accuracy       {torch_accuracy:.4f} ({torch_correct}/{len(test_data)})")
    print(f"onnxruntime test accuracy {ort_accuracy:.4f} ({ort_correct}/{len(test_data)})")
    print(f"max |logit difference|    {max_diff:.2e}")
    if ort_correct != torch_correct or max_diff > 1e-4:
        print("error: onnxruntime disagrees with torch", file=sys.stderr)
        return 1
    if torch_accuracy < MIN_TEST_ACCURACY:
        print(f"error: test accuracy below {MIN_TEST_ACCURACY}", file=sys.stderr)
        return 1
    write_atomic(args.output, payload)
    print(f"wrote {args.output} ({len(payload):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

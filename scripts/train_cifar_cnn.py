"""Train the issue-21 CIFAR-10 CNN (1.09M parameters) and export it to ONNX, BatchNorm folded.

A VGG-style ReLU network without pooling (strided convolutions downsample, so every op is one
the bound engines handle exactly: Conv, ReLU, Flatten, Gemm):

    conv 3->16 k3 s1 | BN | ReLU     32x32
    conv 16->32 k4 s2 | BN | ReLU    16x16
    conv 32->64 k4 s2 | BN | ReLU    8x8
    flatten 4096 -> fc 256 | ReLU -> fc 10

1,092,906 parameters after folding (about 6M multiply-adds per image, so an epoch takes
minutes on 2 CPU cores). Seeded: weights, batch order and flips come from one
generator; torch is told to use deterministic algorithms. Adam (lr 1e-3, batch 128), random
horizontal flips, `--epochs` epochs (default 8) on the 50,000 CIFAR-10 train images read in
place from `../shared/data` (`LID_DATA_DIR`). On export each BatchNorm is folded into the
convolution before it (w' = w γ/σ, b' = (b - μ) γ/σ + β, σ = sqrt(var + eps)), the model is
exported with torch's legacy ONNX exporter (opset 17, dynamic batch), checked with
onnx.checker, and onnxruntime must agree with torch on the test split (same predictions,
max |logit difference| ≤ 1e-3). The file is written atomically; it is 4.4 MB, so it stays out
of the repository (`onnx_models/cifar_cnn.onnx` is git-ignored): this script rebuilds it.

Prints the wall time and the test accuracy. Usage:
    LID_DATA_DIR=../shared/data python scripts/train_cifar_cnn.py [--epochs 8] [--output PATH]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import onnxruntime as ort
import torch
from torch import Tensor, nn
from train_default import export_checked  # scripts/ is on sys.path when run

from verifier.data import load_dataset
from verifier.files import write_atomic

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_OUTPUT = PROJECT_ROOT / "onnx_models" / "cifar_cnn.onnx"
SEED = 0
BATCH = 128
LEARNING_RATE = 1e-3
CONVS = ((3, 16, 3, 1), (16, 32, 4, 2), (32, 64, 4, 2))
"""(in, out, kernel, stride) of each convolution; padding 1 throughout."""


class CifarCNN(nn.Module):
    """The network above, with BatchNorm (folded away by `folded`)."""

    def __init__(self, batch_norm: bool = True) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for c_in, c_out, k, s in CONVS:
            layers.append(nn.Conv2d(c_in, c_out, k, stride=s, padding=1))
            if batch_norm:
                layers.append(nn.BatchNorm2d(c_out))
            layers.append(nn.ReLU())
        self.features = nn.Sequential(*layers)
        self.head = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 8 * 8, 256), nn.ReLU(), nn.Linear(256, 10)
        )

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


def folded(model: CifarCNN) -> CifarCNN:
    """The same function (in eval mode) without BatchNorm: each BN folded into its Conv."""
    plain = CifarCNN(batch_norm=False)
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    norms = [m for m in model.features if isinstance(m, nn.BatchNorm2d)]
    targets = [m for m in plain.features if isinstance(m, nn.Conv2d)]
    with torch.no_grad():
        for conv, norm, target in zip(convs, norms, targets, strict=True):
            assert norm.running_mean is not None and norm.running_var is not None
            scale = norm.weight / torch.sqrt(norm.running_var + norm.eps)
            target.weight.copy_(conv.weight * scale[:, None, None, None])
            bias = conv.bias if conv.bias is not None else torch.zeros_like(scale)
            target.bias.copy_((bias - norm.running_mean) * scale + norm.bias)
        plain.head.load_state_dict(model.head.state_dict())
    return plain.eval()


def train(x: Tensor, y: Tensor, *, epochs: int, seed: int, log: bool = True) -> CifarCNN:
    """Adam with seeded batches and horizontal flips; returns the model in eval mode."""
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    model = CifarCNN()
    optimiser = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
    loss_fn = nn.CrossEntropyLoss()
    n = x.shape[0]
    for epoch in range(epochs):
        model.train()
        order = torch.randperm(n, generator=gen)
        flips = torch.rand(n, generator=gen) < 0.5
        total, started = 0.0, time.time()
        for start in range(0, n, BATCH):
            idx = order[start : start + BATCH]
            xb = x[idx]
            xb = torch.where(flips[idx, None, None, None], xb.flip(3), xb)
            optimiser.zero_grad()
            loss = loss_fn(model(xb), y[idx])
            loss.backward()
            optimiser.step()
            total += loss.item() * idx.numel()
        if log:
            print(
                f"epoch {epoch + 1}/{epochs}: loss {total / n:.4f} ({time.time() - started:.0f} s)",
                flush=True,
            )
    return model.eval()


def export_onnx(model: CifarCNN, metadata: dict[str, str]) -> bytes:
    """The (folded) model as checked ONNX bytes (legacy exporter, opset 17, dynamic batch)."""
    doc = "lid-verifier issue 21: VGG-style CIFAR-10 CNN, BatchNorm folded"
    return export_checked(model, torch.zeros(1, 3, 32, 32), doc, metadata).SerializeToString()


def accuracy(logits: np.ndarray, y: np.ndarray) -> float:
    return float((logits.argmax(1) == y).mean())


def main(argv: list[str] | None = None) -> int:
    """Train, fold, export, check; returns the process exit code."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=DEFAULT_OUTPUT)
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument(
        "--train-samples", type=int, default=None, help="a seeded random N (smoke runs)"
    )
    args = parser.parse_args(argv)

    torch.use_deterministic_algorithms(True)
    started = time.time()
    train_data = load_dataset("cifar10", split="train")
    test_data = load_dataset("cifar10", split="test")
    x, y = train_data.x, train_data.y
    if args.train_samples is not None:  # the split is ordered by class: draw, don't slice
        pick = torch.randperm(x.shape[0], generator=torch.Generator().manual_seed(args.seed))
        x, y = x[pick[: args.train_samples]], y[pick[: args.train_samples]]
    model = train(x, y, epochs=args.epochs, seed=args.seed)
    plain = folded(model)
    with torch.no_grad():
        bn_logits = torch.cat([model(b) for b in test_data.x.split(1000)]).numpy()
        torch_logits = torch.cat([plain(b) for b in test_data.x.split(1000)]).numpy()
    wall = time.time() - started
    n_params = sum(p.numel() for p in plain.parameters())
    test_y = test_data.y.numpy()
    torch_acc = accuracy(torch_logits, test_y)
    payload = export_onnx(
        plain,
        {
            "train_data": f"cifar10 [train] sha256 {train_data.source_sha256}"
            + ("" if args.train_samples is None else f", {args.train_samples} drawn"),
            "training": f"seed {args.seed}, Adam lr {LEARNING_RATE}, batch {BATCH}, "
            f"{args.epochs} epochs, random horizontal flips; BatchNorm folded on export",
            "test_accuracy": f"{torch_acc:.4f} on cifar10 [test] (10,000 samples)",
            "parameters": str(n_params),
        },
    )
    session = ort.InferenceSession(payload, providers=["CPUExecutionProvider"])
    ort_logits = np.concatenate(
        [session.run(None, {"input": b.numpy()})[0] for b in test_data.x.split(1000)]
    )
    fold_diff = float(np.abs(bn_logits - torch_logits).max())
    ort_diff = float(np.abs(ort_logits - torch_logits).max())
    print(f"parameters                {n_params:,}")
    print(f"training wall time        {wall:.0f} s ({torch.get_num_threads()} threads)")
    print(f"test accuracy (torch, BN) {accuracy(bn_logits, test_y):.4f}")
    print(f"test accuracy (folded)    {torch_acc:.4f}")
    print(f"test accuracy (ORT)       {accuracy(ort_logits, test_y):.4f}")
    print(f"max |logit diff| fold {fold_diff:.2e}, onnxruntime {ort_diff:.2e}")
    if (
        fold_diff > 1e-3
        or ort_diff > 1e-3
        or (ort_logits.argmax(1) != torch_logits.argmax(1)).any()
    ):
        print("error: the folded or exported model disagrees with the trained one", file=sys.stderr)
        return 1
    write_atomic(args.output, lambda path: path.write_bytes(payload))
    print(f"wrote {args.output} ({len(payload):,} bytes)")
    return 0


if __name__ == "__main__":
    sys.exit(main())

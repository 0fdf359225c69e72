"""crosscheck.json and the files around a cross-check: load and check the inputs, write results.

Layout of crosscheck.json (schema version "1"; the HTML report reads it): `schema_version`,
`model_sha256`, `lid_sha256`, `data` (name, split, sha256, n_total, n_checked),
`exact_method`, `timeout_s`, `falsifier` (effort and seed), `samples` (per sample: `index`,
`label`, `certified_ibp`, `certified_crown_ibp`, `certified_linear`, `seconds`, `margins`: per
class j != y: `class`, `ibp`, `crown_ibp` (or null), `linear`, `exact` (or null), `exact_status`
("optimal" | "timeout" | "skipped"), `best_bound`, `falsified`, and details), `summary`
(`n_samples`, `n_margins`, `violations`, `verdict` ("sound" | "violation"), `gaps`
(exact - bound per method: n, mean, median, max), `gaps_to_falsified`, `exact` (solved,
timeout, skipped), `time_s`, ...), `violation_details` and `crown_ibp_note`. Non-finite
numbers are written as null.
"""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from verifier.crosscheck.results import MarginCheck, describe_violation
from verifier.crosscheck.run import (
    CrosscheckConfig,
    CrosscheckResult,
    ProgressCallback,
    SampleRunner,
    crosscheck_samples,
)
from verifier.data import load_dataset, validate_for_model
from verifier.domains.io import check_lid_matches, load_lid, tensors_sha256
from verifier.domains.zonotope import Zonotope
from verifier.errors import DomainError
from verifier.files import file_sha256, write_atomic, write_text_atomic
from verifier.graph import Graph

SCHEMA_VERSION = "1"


@dataclass(frozen=True, eq=False)
class CrosscheckReport:
    """A cross-check of files: the result and its crosscheck.json document."""

    result: CrosscheckResult
    document: dict[str, Any]


def _finite(value: float | None) -> float | None:
    return value if value is not None and math.isfinite(value) else None


def margin_json(margin: MarginCheck) -> dict[str, Any]:
    """One entry of a sample's `margins` list in crosscheck.json."""
    exact = margin.exact
    return {
        "class": margin.other,
        "ibp": _finite(margin.ibp),
        "crown_ibp": _finite(margin.crown_ibp),
        "linear": _finite(margin.linear),
        "bab": _finite(margin.bab),
        "exact": _finite(margin.exact_value),
        "exact_status": exact.status,
        "best_bound": _finite(margin.best_bound),
        "falsified": _finite(margin.falsified),
        "falsified_by": margin.falsified_by,
        "exact_method": exact.method if exact.status != "skipped" else None,
        "exact_seconds": exact.seconds,
        "exact_lower": _finite(exact.lower) if exact.status == "timeout" else None,
        "incumbent": _finite(exact.incumbent),
        "exact_note": exact.reason,
        "ibp_allowance": _finite(margin.ibp_allowance),
        "linear_allowance": _finite(margin.linear_allowance),
        "bab_allowance": _finite(margin.bab_allowance),
        "violation": list(margin.violation_methods),
    }


def result_json(result: CrosscheckResult) -> dict[str, Any]:
    """The `samples`, `summary` and `violations` parts of crosscheck.json."""
    return {
        "samples": [
            {
                "index": s.index,
                "label": s.label,
                "certified_ibp": s.certified_ibp,
                "certified_crown_ibp": s.certified_crown_ibp,
                "certified_linear": s.certified_linear,
                "seconds": s.seconds,
                "margins": [margin_json(m) for m in s.margins],
            }
            for s in result.samples
        ],
        "summary": result.summary(),
        "violation_details": [
            {
                "index": s.index,
                "class": m.other,
                "methods": list(m.violation_methods),
                "attained": m.attained,
                "message": describe_violation(s, m),
            }
            for s in result.samples
            for m in s.violations
        ],
        "crown_ibp_note": result.crown_note,
    }


def _check_lid_model(lid_metadata: Mapping[str, str], graph: Graph, model_path: Path) -> None:
    """Refuse a LID recorded for another model (unless its recorded θ0 matches this model's)."""
    recorded = lid_metadata.get("model_sha256", "")
    if not recorded or recorded == file_sha256(model_path):
        return
    theta0 = lid_metadata.get("theta0_sha256", "")
    names = json.loads(lid_metadata.get("parameters", "[]"))
    if theta0 and theta0 == tensors_sha256({n: graph.parameters[n] for n in names}):
        return
    raise DomainError(
        f"the LID was computed for another model (model sha256 {recorded[:12]}..., this model "
        f"{file_sha256(model_path)[:12]}...) and its weights differ; pass the model it was made for"
    )


def run_crosscheck(
    model_path: Path,
    lid_path: Path,
    data_ref: str,
    *,
    split: str = "test",
    data_dir: Path | None = None,
    n_samples: int | None = 20,
    config: CrosscheckConfig | None = None,
    on_progress: ProgressCallback | None = None,
    runner: SampleRunner | None = None,
) -> CrosscheckReport:
    """Cross-check a LID file on the first `n_samples` samples of a data set.

    Args:
        model_path: the ONNX model.
        lid_path: the LID (safetensors) computed for it.
        data_ref: a built-in data set name or an .npz path.
        split: the data split.
        data_dir: the shared data folder (default: `verifier.data.default_data_dir()`).
        n_samples: how many samples, from the start of the split (None: all).
        config: options.
        on_progress: called with (samples done, total).
        runner: where the per-sample work runs (`crosscheck_samples`; e.g. Ray tasks).

    Returns:
        The result and its crosscheck.json document.

    Raises:
        GraphError, DomainError, DataError: bad model, LID (missing, malformed, made for
            another model, or a zonotope) or data (missing, wrong shape or labels).
    """
    from verifier.onnx.prefix import load_bounded_graph

    config = config or CrosscheckConfig()
    lid = load_lid(lid_path)
    if isinstance(lid.domain, Zonotope):
        # its certificate uses zonotope bounds; cross-checking the box engine on the interval
        # hull would test another claim, so refuse rather than report a misleading result
        raise DomainError(
            f"{lid_path}: a zonotope LID (k = {lid.domain.n_generators} generators); "
            "`verifier crosscheck` supports box LIDs only (its bounds, falsifiers and exact "
            "MILP/SMT solvers work on boxes)"
        )
    # a model with a frozen prefix is cut where the LID's parameters start, as `verifier lid` did
    graph = load_bounded_graph(model_path, list(lid.domain.lower))
    check_lid_matches(lid, graph.parameters, source=str(lid_path))
    _check_lid_model(lid.metadata, graph, model_path)
    data = validate_for_model(load_dataset(data_ref, split=split, data_dir=data_dir), graph)
    count = len(data) if n_samples is None else min(n_samples, len(data))
    result = crosscheck_samples(
        graph,
        lid.box,
        data.x[:count],
        data.y[:count],
        indices=list(range(count)),
        config=config,
        on_progress=on_progress,
        runner=runner,
    )
    document = {
        "schema_version": SCHEMA_VERSION,
        "model_sha256": file_sha256(model_path),
        "lid_sha256": file_sha256(lid_path),
        "data": {
            "name": data.name,
            "split": data.split,
            "sha256": data.source_sha256,
            "n_total": len(data),
            "n_checked": count,
        },
        "exact_method": config.exact,
        "timeout_s": config.timeout_s,
        "falsifier": {
            "n_uniform": config.falsifier.n_uniform,
            "n_vertex": config.falsifier.n_vertex,
            "pgd_steps": config.falsifier.pgd_steps,
            "pgd_restarts": config.falsifier.pgd_restarts,
            "seed": config.seed,
        },
        **result_json(result),
    }
    return CrosscheckReport(result, document)


def write_crosscheck(out_dir: Path, report: CrosscheckReport) -> list[Path]:
    """Write crosscheck.json and, per violation, its witness weights (safetensors), atomically.

    Args:
        out_dir: the output folder (created if missing).
        report: the cross-check.

    Returns:
        The paths written.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "crosscheck.json"
    write_text_atomic(path, json.dumps(report.document, indent=2, allow_nan=False) + "\n")
    written = [path]
    for sample in report.result.samples:
        for margin in sample.violations:
            if margin.witness is None:
                continue
            target = out_dir / f"violation_{sample.index}_{margin.other}.safetensors"
            tensors = {
                n: t.detach().to("cpu", torch.float64).contiguous()
                for n, t in margin.witness.items()
            }
            metadata = {"message": describe_violation(sample, margin)}
            write_atomic(target, functools.partial(_save_witness, tensors, metadata))
            written.append(target)
    return written


def _save_witness(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path: Path) -> None:
    save_file(tensors, str(path), metadata=metadata)

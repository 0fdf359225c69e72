"""The whole job behind `verifier lid` / `run` / `certify`: load, split, search, certify, write.

Data flow per task: the task's samples are split once, with a seeded permutation, into a
*certification* part (held out: only the final certificate ever looks at it) and an
*optimisation* part, itself split into the samples that drive the search's gradient and a
validation part used with them to choose and shrink the box.
"""

from __future__ import annotations

import fnmatch
import json
import math
import platform
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from verifier.bounds.bab import BabOptions, check_bab_graph
from verifier.certify import (
    CertMethod,
    TaskCertificate,
    certify_samples,
    certify_task,
    empirical_metric,
    required_rate,
)
from verifier.data import Dataset, data_sha256, load_dataset, validate_for_model
from verifier.domains.box import Box
from verifier.domains.io import check_lid_matches, load_lid, save_lid, tensors_sha256
from verifier.domains.zonotope import Zonotope
from verifier.errors import DataError, SpecError, TargetUnreachable
from verifier.files import file_sha256, folder_lock, write_text_atomic
from verifier.graph import Graph
from verifier.ladder import FixedSequence, lid_warnings, unreachable_message
from verifier.onnx.prefix import load_bounded_graph, prefix_progress
from verifier.report.certificate import build_certificate, portable_spec
from verifier.search import (
    SearchResult,
    SearchStep,
    SearchTask,
    fisher_importance,
    frozen_by_importance,
    hard_metrics,
    search_lid,
    si_importance,
)
from verifier.search.dual import proof_method
from verifier.spec import DataSection, Spec, TaskSection, spec_hash
from verifier.update.sequence import check_inside, load_outer


@dataclass(frozen=True, eq=False)
class PreparedTask:
    """A task with its resolved target and its data parts."""

    section: TaskSection
    clean: float
    target: float
    search_target: float
    search: SearchTask
    x_cert: Tensor
    y_cert: Tensor
    opt_sha256: str
    cert_sha256: str
    search_targets: tuple[float, ...] = ()

    def at_target(self, index: int) -> PreparedTask:
        """The task with the search aiming at its `index`-th ladder target (the last one when
        it has fewer)."""
        if not self.search_targets:
            return self
        value = self.search_targets[min(index, len(self.search_targets) - 1)]
        return replace(self, search_target=value, search=replace(self.search, target=value))


@dataclass(frozen=True, eq=False)
class LidRun:
    """Everything a `verifier lid` run produced."""

    result: SearchResult
    certificates: list[TaskCertificate]
    document: dict[str, Any]
    out_dir: Path

    @property
    def holds(self) -> bool:
        """True when every task's held-out certificate meets its target."""
        return all(c.holds for c in self.certificates)


def select_parameters(graph: Graph, selection: str | Sequence[str]) -> list[str]:
    """Names of the boxed parameters: "all", or names / glob patterns of initializers.

    Raises:
        SpecError: a name or pattern matches no parameter.
    """
    names = list(graph.parameters)
    if not names or not selection:  # nothing to box: the search would have no variable
        why = "the model has no parameters" if not names else "an empty list"
        raise SpecError(
            f"parameters: nothing to box ({why}); name at least one initializer, or use 'all'"
        )
    if selection == "all":
        return names
    chosen: list[str] = []
    for pattern in selection:
        matches = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not matches:
            raise SpecError(
                f"parameters: '{pattern}' matches no parameter of the model; known: {names}"
            )
        chosen.extend(m for m in matches if m not in chosen)
    return chosen


def load_task_data(section: DataSection, graph: Graph) -> Dataset:
    """Load and validate a data section (class filter applied)."""
    data_dir = None if section.data_dir is None else Path(section.data_dir)
    data = validate_for_model(
        load_dataset(section.name, split=section.split, data_dir=data_dir), graph
    )
    if section.classes is not None:
        keep = torch.isin(data.y, torch.tensor(section.classes, dtype=torch.int64))
        if not bool(keep.any()):
            raise DataError(f"data set '{data.name}': no sample has a label in {section.classes}")
        data = data.subset(torch.nonzero(keep).flatten())
    return data


def clean_correct(graph: Graph, x: Tensor, y: Tensor, *, batch: int = 1024) -> Tensor:
    """Boolean mask of samples the nominal network classifies correctly (float32)."""
    with torch.no_grad():
        preds = [graph(x[i : i + batch]).argmax(dim=1) for i in range(0, x.shape[0], batch)]
    return torch.cat(preds) == y if preds else torch.zeros(0, dtype=torch.bool)


def prepare_task(spec: Spec, section: TaskSection, graph: Graph) -> PreparedTask:
    """Split a task's data and resolve its targets."""
    data = load_task_data(section.data or spec.data, graph)
    n = len(data)
    if n < 4:
        raise DataError(f"task '{section.name}': only {n} samples; need at least 4")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(spec.certify.split_seed))
    n_cert = max(1, math.ceil(spec.certify.certification_fraction * n))
    cert_idx, opt_idx = perm[:n_cert], perm[n_cert:]
    if spec.certify.n_samples is not None:
        cert_idx = cert_idx[: spec.certify.n_samples]
    x_opt, y_opt = data.x[opt_idx], data.y[opt_idx]
    x_cert, y_cert = data.x[cert_idx], data.y[cert_idx]
    clean = empirical_metric(clean_correct(graph, x_opt, y_opt), y_opt, section.metric)
    target = section.resolve_target(clean)
    if not 0.0 < target <= 1.0:
        raise SpecError(
            f"task '{section.name}': target resolves to {target:.4f} (clean {clean:.4f}); "
            "it must lie in (0, 1]"
        )
    n_eff, beta = x_cert.shape[0], spec.certify.beta
    if section.metric == "balanced_accuracy":
        # per-class bounds at beta / C; the rarest class needs the highest rate
        counts = torch.unique(y_cert, return_counts=True)[1]
        n_classes = max(int(counts.numel()), 1)
        n_eff, beta = max(int(counts.min()), 1), beta / n_classes
    needed = required_rate(target, n_eff, beta, spec.certify.bound)
    if needed > clean:
        raise TargetUnreachable(unreachable_message(spec, section.name, target, clean, n_eff, beta))
    slack = spec.search.target_slack
    if slack == "auto":
        # aim where a union bound over the ladder's candidates would need to be (a cautious
        # aim that leaves the ladder's smaller scales room to catch a harder held-out part);
        # the certificates themselves are at beta (fixed-sequence testing, verifier.ladder)
        ladder = spec.certify.ladder
        cautious = beta / (len(ladder.scales) * ladder.targets)
        aim = required_rate(target, n_eff, cautious, spec.certify.bound)
        search_target = aim if aim <= clean else needed
    else:
        search_target = min(target + float(slack), clean)
    # the ladder's lower targets: steps of the held-out rate's standard deviation, down to τ
    ladder = spec.certify.ladder
    sigma = math.sqrt(search_target * (1.0 - search_target) / n_eff)
    lowered = [max(target, search_target - j * ladder.step * sigma) for j in range(ladder.targets)]
    search_targets = tuple(dict.fromkeys(lowered))
    perm_opt = torch.randperm(
        x_opt.shape[0], generator=torch.Generator().manual_seed(spec.search.seed)
    )
    n_val = int(spec.search.validation_fraction * x_opt.shape[0])
    val_idx, grad_idx = perm_opt[:n_val], perm_opt[n_val:]
    search = SearchTask(
        section.name,
        section.metric,
        search_target,
        x_opt[grad_idx],
        y_opt[grad_idx],
        x_opt[val_idx],
        y_opt[val_idx],
    )
    return PreparedTask(
        section,
        clean,
        target,
        search_target,
        search,
        x_cert,
        y_cert,
        data_sha256(x_opt, y_opt),
        data_sha256(x_cert, y_cert),
        search_targets,
    )


def _frozen_masks(spec: Spec, graph: Graph, names: list[str]) -> dict[str, Tensor] | None:
    importance = spec.search.importance
    if importance.kind == "none" or importance.fraction == 0.0:
        return None
    if importance.lookahead is None:
        raise SpecError("search.importance.lookahead: required when importance.kind is set")
    data = load_task_data(importance.lookahead, graph)
    count = min(importance.n_samples, len(data))
    x, y = data.x[:count], data.y[:count]
    if importance.kind == "si":
        generator = torch.Generator().manual_seed(spec.search.seed)
        scores = si_importance(graph, names, x, y, generator=generator)
    else:
        scores = fisher_importance(graph, names, x, y)
    return frozen_by_importance(scores, importance.fraction)


def _own_version() -> str:
    # as `verifier.__version__`; read here because nothing inside the package imports its root
    try:
        return metadata.version("lid-verifier")
    except metadata.PackageNotFoundError:  # running from a source tree without installing
        return "0+unknown"


def software_versions() -> dict[str, str]:
    """Versions recorded in certificates."""
    import onnx

    versions = {
        "lid-verifier": _own_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "python": platform.python_version(),
    }
    try:
        from importlib.metadata import version

        versions["auto_LiRPA"] = version("auto_LiRPA")
    except Exception:  # noqa: BLE001 - optional backend, recorded as absent
        versions["auto_LiRPA"] = "not installed"
    return versions


def certify_prepared(
    graph: Graph,
    box: Box | Zonotope,
    task: PreparedTask,
    spec: Spec,
    *,
    method: CertMethod,
) -> TaskCertificate:
    """The held-out certificate of one prepared task."""
    bab = spec.certify.bab
    options = BabOptions(max_domains=bab.max_domains, timeout_s=bab.timeout_s, steps=bab.steps)
    mask, nonfinite = certify_samples(
        graph, box, task.x_cert, task.y_cert, method=method, bab=options
    )
    return certify_task(
        mask,
        task.y_cert,
        task=task.section.name,
        metric=task.section.metric,
        target=task.target,
        beta=spec.certify.beta,
        bound_kind=spec.certify.bound,
        method=method,
        n_nonfinite=nonfinite,
    )


def open_ladder(
    graph: Graph,
    theta0: Mapping[str, Tensor],
    tasks: Sequence[PreparedTask],
    spec: Spec,
    outer: Box | None,
    phase: Callable[[str], None],
) -> FixedSequence:
    """The certification ladder's fixed sequence (`verifier.ladder`), ready for results."""

    def certify(candidate: Box | Zonotope) -> list[TaskCertificate]:
        method = spec.certify.method
        return [certify_prepared(graph, candidate, t, spec, method=method) for t in tasks]

    def size(candidate: Box | Zonotope) -> float:
        return candidate.interval_hull().size(spec.search.size)

    def on_rung(search: int, scale: float) -> None:
        phase(
            f"certifying on held-out data (float64): scale {scale:g} of search {search + 1} "
            f"(candidate {len(ladder.tried) + 1}, fixed sequence at beta)"
        )

    ladder = FixedSequence(
        theta0,
        spec.certify.ladder.scales,
        certify,
        size,
        searches=spec.certify.ladder.targets,
        outer=outer,
        max_width=spec.search.max_width,
        on_rung=on_rung,
    )
    return ladder


def _search(
    spec: Spec,
    graph: Graph,
    tasks: Sequence[PreparedTask],
    names: list[str],
    outer: Box | None,
    frozen: dict[str, Tensor] | None,
    device: str,
    on_step: Callable[[SearchStep], None] | None,
    phase: Callable[[str], None],
) -> tuple[Box | Zonotope, SearchResult]:
    """One search at the tasks' current targets: (the domain, how it was found)."""
    if spec.domain == "box":
        search_tasks = [t.search for t in tasks]
        result = search_lid(
            graph,
            search_tasks,
            spec.search,
            names=names,
            outer=outer,
            frozen=frozen,
            device=device,
            on_step=on_step,
            on_reshape=lambda r, size: phase(
                f"reshaping: round {r} of {spec.search.reshape.rounds}, size {size:.4f}"
            ),
        )
        return result.box, result
    from verifier.search.zonotope import search_zonotope_lid

    ahead = spec.search.importance.lookahead
    lookahead = None
    if spec.zonotope.init == "lookahead" and ahead is not None:
        ahead_data = load_task_data(ahead, graph)
        lookahead = (ahead_data.x, ahead_data.y)
    found = search_zonotope_lid(
        graph,
        [t.search for t in tasks],
        spec.search,
        spec.zonotope,
        names=names,
        outer=outer,
        frozen=frozen,
        device=device,
        lookahead=lookahead,
        on_step=on_step,
    )
    # the search section describes checkpoints by their interval hulls (sizes only)
    return found.zonotope, found.as_search_result()


def run_lid(
    spec: Spec,
    out_dir: Path,
    *,
    device: str | None = None,
    on_step: Callable[[SearchStep], None] | None = None,
    on_phase: Callable[[str], None] | None = None,
    command: str = "",
) -> LidRun:
    """Search a box LID for the spec, certify it on held-out data and write the artifacts.

    Writes `out_dir/lid.safetensors`, `out_dir/certificate.json` and `out_dir/history.jsonl`
    (each atomically). The LID and certificate are written even when the certificate fails.
    The run holds `out_dir`'s lock throughout (`verifier.files.folder_lock`).

    Raises:
        OutputError: another run is writing `out_dir`.
    """
    with folder_lock(out_dir):
        return _run_lid(spec, out_dir, device, on_step, on_phase, command)


def _run_lid(
    spec: Spec,
    out_dir: Path,
    device: str | None,
    on_step: Callable[[SearchStep], None] | None,
    on_phase: Callable[[str], None] | None,
    command: str,
) -> LidRun:
    started = time.time()
    phase = on_phase or (lambda _message: None)
    run_device = device or spec.device
    if re.fullmatch(r"cpu|cuda(:\d+)?", run_device) is None:  # issue 23: torch's own error
        raise SpecError(f"device '{run_device}' is not supported; use cpu, cuda or cuda:N")
    if run_device.startswith("cuda") and not torch.cuda.is_available():
        raise SpecError(f"device '{run_device}' requested but CUDA is not available here")
    model_path = Path(spec.model)
    # issue 11: the whole model, or its suffix after the frozen prefix (onnxruntime)
    graph = load_bounded_graph(model_path, spec.parameters, on_batch=prefix_progress(phase))
    names = select_parameters(graph, spec.parameters)
    if spec.certify.method == "bab":  # refuse before the search, not after it
        check_bab_graph(graph)
    outer, outer_lid = None, None
    if spec.outer_box is not None:  # issue 7: task sequences, LID_t inside LID_{t-1}
        outer_lid = load_outer(spec.outer_box, graph.parameters, names)
        outer = outer_lid.box
    phase("preparing data")
    tasks = [prepare_task(spec, section, graph) for section in spec.tasks]
    frozen = _frozen_masks(spec, graph, names)
    n_searched = sum(graph.parameters[n].numel() for n in names)
    theta0 = {n: graph.parameters[n] for n in names}
    searches = range(max(len(t.search_targets) for t in tasks))
    sequence = open_ladder(graph, theta0, tasks, spec, outer, phase)
    results: dict[int, SearchResult] = {}
    for j in searches:
        at_j = [t.at_target(j) for t in tasks]
        targets = ", ".join(f"{t.search_target:.4f}" for t in at_j)
        phase(
            f"searching a {spec.domain} over {n_searched} parameters (search {j + 1} of "
            f"{len(searches)}, target {targets})"
        )
        domain, results[j] = _search(
            spec, graph, at_j, names, outer, frozen, run_device, on_step, phase
        )
        if outer_lid is not None:
            check_inside(domain, outer_lid)
        sequence.offer(domain, j, tuple(t.search_target for t in at_j))
        if sequence.stopped:  # a candidate missed τ: the fixed sequence ends here
            break
    ladder = sequence.result()
    result = results[ladder.chosen.search]
    tasks = [t.at_target(ladder.chosen.search) for t in tasks]
    inherited = [] if outer_lid is None else outer_lid.inherited
    domain, certificates = ladder.chosen.domain, ladder.chosen.certificates
    if ladder.chosen.scale != 1.0:  # the search section describes the LID that is kept
        hard = hard_metrics(
            graph, domain, [t.search for t in tasks], method=proof_method(spec.search)
        )
        feasible = all(h >= t.search_target for h, t in zip(hard, tasks, strict=True))
        result = replace(result, box=domain.interval_hull(), hard=hard, feasible=feasible)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_sha = file_sha256(model_path)
    metadata = {
        "model_sha256": model_sha,
        "theta0_sha256": tensors_sha256(theta0),
        "spec_sha256": spec_hash(portable_spec(spec, out_dir)),  # as certificate.json records it
        "certificate": json.dumps([c.to_json() for c in certificates]),
        "inherited": json.dumps(inherited),
    }
    lid_path = out_dir / "lid.safetensors"
    save_lid(lid_path, domain, metadata)
    history = "".join(json.dumps(asdict(step)) + "\n" for step in result.history)
    write_text_atomic(out_dir / "history.jsonl", history)
    # build_certificate reads history.jsonl (and crosscheck.json) from out_dir: write them first
    document = build_certificate(
        spec=spec,
        model_path=model_path,
        model_sha=model_sha,
        lid_path=lid_path,
        box=domain,
        tasks=tasks,
        certificates=certificates,
        result=result,
        seconds=time.time() - started,
        command=command,
        software=software_versions(),
    )
    document["inherited"] = inherited
    document["ladder"] = ladder.to_json(spec.certify.beta)
    document["warnings"] = lid_warnings(domain, ladder)
    write_text_atomic(out_dir / "certificate.json", json.dumps(document, indent=2) + "\n")
    return LidRun(result, certificates, document, out_dir)


def run_certify(
    model_path: Path,
    lid_path: Path,
    data_ref: str,
    *,
    split: str,
    data_dir: Path | None,
    target: float | None,
    beta: float,
    bound_kind: str,
    method: CertMethod,
    metric: str = "accuracy",
) -> dict[str, Any]:
    """Re-certify any LID on any data: every sample of the data set counts as held out.

    The caller is responsible for the data being held out from the LID's search; the result
    records its hash.
    """
    lid = load_lid(lid_path)
    # issue 11: the LID's parameters say where a model with a frozen prefix is cut
    graph = load_bounded_graph(model_path, list(lid.domain.lower))
    check_lid_matches(lid, graph.parameters, source=str(lid_path))
    data = validate_for_model(load_dataset(data_ref, split=split, data_dir=data_dir), graph)
    mask, nonfinite = certify_samples(graph, lid.domain, data.x, data.y, method=method)
    cert = certify_task(
        mask,
        data.y,
        task=data.name,
        metric=metric,  # type: ignore[arg-type]
        target=0.0 if target is None else target,
        beta=beta,
        bound_kind=bound_kind,  # type: ignore[arg-type]
        method=method,
        n_nonfinite=nonfinite,
    )
    doc = cert.to_json()
    doc.update(
        holds=cert.holds if target is not None else None,
        verdict=("holds" if cert.holds else "not met") if target is not None else "computed",
        model_sha256=file_sha256(model_path),
        lid_sha256=file_sha256(lid_path),
        data_sha256=data.source_sha256,
        lid_model_match=lid.model_sha256 == file_sha256(model_path),
    )
    return doc


def box_from_lid(path: Path, parameters: Mapping[str, Tensor]) -> Box:
    """Load a LID's box after checking it fits the parameters."""
    lid = load_lid(path)
    check_lid_matches(lid, parameters, source=str(path))
    return lid.box

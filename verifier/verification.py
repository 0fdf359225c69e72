"""`verifier verify OUT/`: recompute a run's certificate from its artifacts and compare.

Nothing recorded is trusted: the model, LID and history files are hashed again, the spec in
the certificate is re-validated and hashed, each task's data is loaded and split again, the
held-out certificate is recomputed in float64 from the model and the LID, and every field of
certificate.json that can be recomputed is compared with the recomputed value. Every check
ends as one `Check` with a status:

* `ok`: recomputed and equal (floats within a relative 1e-9);
* `failed`: a mismatch or a missing / unreadable artifact; the detail names the file, the
  field, the recomputed value and the recorded one;
* `not recomputed`: recorded facts that cannot be recomputed from the artifacts (creation
  time, the checkpoints' boxes, the cross-check's solver results); never counted as verified;
* `note`: information, e.g. software versions that differ from the ones recorded.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Final, Literal

from verifier.domains.box import Box
from verifier.domains.io import check_lid_matches, load_lid, tensors_sha256
from verifier.domains.zonotope import Zonotope
from verifier.errors import InputError
from verifier.files import file_sha256
from verifier.pipeline import certify_prepared, prepare_task, software_versions
from verifier.report.artifacts import (
    CERTIFICATE_FILE,
    CROSSCHECK_FILE,
    ArtifactError,
    find_model,
    load_certificate,
    load_history,
    locate_spec,
    read_json_object,
)
from verifier.report.certificate import (
    READABLE_SCHEMA_VERSIONS,
    lid_entry,
    schema_errors,
    software_extras,
    task_entry,
)

CheckStatus = Literal["ok", "failed", "not recomputed", "note"]
REL_TOL: Final = 1e-9
ABS_TOL: Final = 1e-12
_MISSING: Final = object()


@dataclass(frozen=True)
class Check:
    """The outcome of one check: what was checked, its status and a one-line detail."""

    subject: str
    status: CheckStatus
    detail: str


@dataclass
class Verification:
    """All checks of one output folder; `ok` when none failed."""

    out_dir: Path
    checks: list[Check] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """True when no check failed (and at least one recomputation succeeded)."""
        return any(c.status == "ok" for c in self.checks) and not self.failures

    @property
    def failures(self) -> list[Check]:
        """The failed checks."""
        return [c for c in self.checks if c.status == "failed"]

    def count(self, status: CheckStatus) -> int:
        """Number of checks with the given status."""
        return sum(c.status == status for c in self.checks)

    def to_json(self) -> dict[str, Any]:
        """A JSON-able summary (what `verifier verify --json` prints)."""
        return {
            "verdict": "verified" if self.ok else "failed",
            "out_dir": str(self.out_dir),
            "counts": {s: self.count(s) for s in ("ok", "failed", "not recomputed", "note")},
            "checks": [
                {"subject": c.subject, "status": c.status, "detail": c.detail} for c in self.checks
            ],
        }

    def add(self, subject: str, status: CheckStatus, detail: str) -> None:
        """Record one check."""
        self.checks.append(Check(subject, status, detail))


def _short(value: Any) -> str:
    if value is _MISSING:
        return "nothing (field missing)"
    text = json.dumps(value) if not isinstance(value, str) else repr(value)
    return text if len(text) <= 160 else text[:157] + "..."


def _same_number(a: float, b: float) -> bool:
    if math.isnan(a) or math.isnan(b):
        return math.isnan(a) and math.isnan(b)
    return math.isclose(a, b, rel_tol=REL_TOL, abs_tol=ABS_TOL)


def differences(expected: Any, found: Any, path: str) -> list[tuple[str, Any, Any]]:
    """Where a recorded JSON value differs from the recomputed one.

    Returns:
        (field path, recomputed value, recorded value) for each difference, in document order.
        Numbers (not booleans) compare within a relative 1e-9; everything else exactly.
    """
    if isinstance(expected, Mapping) and isinstance(found, Mapping):
        out = []
        for key in [*expected, *(k for k in found if k not in expected)]:
            out.extend(
                differences(
                    expected.get(key, _MISSING),
                    found.get(key, _MISSING),
                    f"{path}.{key}" if path else str(key),
                )
            )
        return out
    if isinstance(expected, Sequence | tuple) and not isinstance(expected, str):
        if isinstance(found, list) and len(found) == len(expected):
            out = []
            for i, (e, f) in enumerate(zip(expected, found, strict=True)):
                out.extend(differences(e, f, f"{path}[{i}]"))
            return out
        return [(path, list(expected), found)]
    numeric = (int, float)
    if (
        isinstance(expected, numeric)
        and isinstance(found, numeric)
        and not isinstance(expected, bool)
        and not isinstance(found, bool)
    ):
        return [] if _same_number(float(expected), float(found)) else [(path, expected, found)]
    if type(expected) is not type(found) or expected != found:
        return [(path, expected, found)]
    return []


class _Verifier:
    """One verification run; each method adds checks and returns what later steps need."""

    def __init__(self, out_dir: Path, doc: dict[str, Any]) -> None:
        self.out_dir = out_dir
        self.doc = doc
        self.cert_path = out_dir / CERTIFICATE_FILE
        self.result = Verification(out_dir)
        # the spec as recorded (hashed, compared); the one `spec` returns has its paths located
        self.recorded_spec: Any = None

    def compare(self, subject: str, expected: Any, found: Any, path: str, what: str) -> bool:
        """Compare a recomputed value with a recorded field; one check per difference."""
        diffs = differences(expected, found, path)
        for where, exp, got in diffs:
            self.result.add(
                subject,
                "failed",
                f"{self.cert_path.name} {where}: recomputed {_short(exp)}, recorded {_short(got)}",
            )
        if not diffs:
            self.result.add(subject, "ok", what)
        return not diffs

    def hash_check(self, subject: str, file: Path, recomputed: str, field_path: str) -> bool:
        """Compare a file's sha256 with the one recorded at `field_path` of the certificate."""
        recorded = self._field(field_path)
        if recorded == recomputed:
            self.result.add(subject, "ok", f"sha256 of {file} = {recomputed}")
            return True
        self.result.add(
            subject,
            "failed",
            f"sha256 of {file} is {recomputed}; {self.cert_path.name} {field_path} records "
            f"{_short(recorded)}",
        )
        return False

    def _field(self, dotted: str) -> Any:
        value: Any = self.doc
        for part in dotted.split("."):
            value = value.get(part, _MISSING) if isinstance(value, dict) else _MISSING
        return value

    # ------------------------------------------------------------------ steps

    def structure(self) -> bool:
        errors = schema_errors(self.doc)
        for message in errors[:10]:
            self.result.add(
                "certificate.json", "failed", f"{self.cert_path} fails its schema {message}"
            )
        if len(errors) > 10:
            self.result.add("certificate.json", "failed", f"... and {len(errors) - 10} more")
        if not errors:
            version = self.doc["schema_version"]
            what = f"matches its JSON Schema (version {version})"
            self.result.add("certificate.json", "ok", what)
        return not errors

    def spec(self) -> Any:
        """Validate and hash the recorded spec; return it with its paths located here."""
        from verifier.errors import SpecError
        from verifier.spec import parse_spec, spec_hash

        try:
            spec = parse_spec(self.doc["spec"], source=self.cert_path)
        except SpecError as err:
            self.result.add("spec", "failed", f"the recorded spec is not valid: {err}")
            return None
        self.recorded_spec = spec
        self.compare(
            "spec", spec_hash(spec), self.doc["spec_sha256"], "spec_sha256", "spec sha256 matches"
        )
        proof: dict[str, Any] = {
            "method": spec.certify.method,
            "bound_kind": spec.certify.bound,
            "beta": spec.certify.beta,
        }
        self.compare(
            "proof",
            {**self.doc["proof"], **proof},
            self.doc["proof"],
            "proof",
            "proof settings match the spec's certify section",
        )
        if spec.model != self.doc["model"]["path"]:
            self.result.add(
                "model",
                "failed",
                f"{self.cert_path.name} model.path {self.doc['model']['path']!r} differs from "
                f"spec.model {spec.model!r}",
            )
        located, notes = locate_spec(spec, self.out_dir)
        for note in notes:
            self.result.add("data", "note", note)
        return located

    def model(self, override: Path | None, spec: Any) -> tuple[Any, str] | None:
        from verifier.onnx.prefix import load_bounded_graph

        recorded = self.doc["model"]
        found = find_model(self.out_dir, recorded["path"], recorded["sha256"], given=override)
        if found.note is not None:
            self.result.add("model", "note", found.note)
        if found.path is None or found.sha256 is None:  # given but not the model: stop here
            self.result.add("model", "failed", str(found.problem))
            return None
        path, sha = found.path, found.sha256
        self.hash_check("model", path, sha, "model.sha256")
        try:
            # a model with a frozen prefix is cut where the run cut it: at the LID's parameters
            graph = load_bounded_graph(path, self._boxed_names(spec))
        except InputError as err:
            self.result.add("model", "failed", f"cannot load the model: {err}")
            return None
        return graph, sha

    def _boxed_names(self, spec: Any) -> str | list[str]:
        """The LID's parameter names (its metadata), else the spec's selection, else "all"."""
        from safetensors import SafetensorError, safe_open

        path = self.out_dir / str(self.doc["lid"]["file"])
        try:
            with safe_open(str(path), framework="pt") as handle:
                names = json.loads((handle.metadata() or {})["parameters"])
        except (SafetensorError, OSError, KeyError, ValueError):
            names = None  # the lid step reports the unreadable file
        if isinstance(names, list) and all(isinstance(n, str) for n in names):
            return names
        if spec is not None:
            selection: str | list[str] = spec.parameters
            return selection
        return "all"

    def lid(self, graph: Any, model_sha: str, spec: Any) -> Any:
        from verifier.spec import spec_hash

        recorded = self.doc["lid"]
        path = self.out_dir / recorded["file"]
        if not path.is_file():
            self.result.add("lid", "failed", f"{path}: LID file not found")
            return None
        self.hash_check("lid", path, file_sha256(path), "lid.sha256")
        try:
            lid = load_lid(path)
            check_lid_matches(lid, graph.parameters, source=str(path))
        except InputError as err:
            self.result.add("lid", "failed", str(err))
            return None
        meta = lid.metadata
        domain = lid.domain
        theta0 = {n: graph.parameters[n] for n in domain.names}
        for key, expected, what in (
            ("model_sha256", model_sha, "the model's sha256"),
            ("theta0_sha256", tensors_sha256(theta0), "the sha256 of the model's weights"),
            (
                "spec_sha256",
                None if self.recorded_spec is None else spec_hash(self.recorded_spec),
                "the spec's sha256",
            ),
        ):
            if expected is None:
                continue
            if meta.get(key) == expected:
                self.result.add("lid", "ok", f"{path.name} metadata {key} is {what}")
            else:
                self.result.add(
                    "lid",
                    "failed",
                    f"{path} metadata {key} is {_short(meta.get(key))}; {what} is {expected}",
                )
        if isinstance(domain, Zonotope):
            # ε is shared across tensors, so membership is decided jointly (exact, float64)
            outside = [] if domain.contains(theta0) else ["(jointly) " + ", ".join(domain.names)]
        else:
            outside = [
                n
                for n in domain.names
                if not Box({n: domain.lower[n]}, {n: domain.upper[n]}).contains({n: theta0[n]})
            ]
        if outside:
            self.result.add(
                "lid", "failed", f"the LID does not contain the model's own weights: {outside}"
            )
        else:
            self.result.add("lid", "ok", "the LID contains the model's own weights")
        expected_entry = lid_entry(domain, path, meta.get("content_sha256", ""))
        for key in ("file", "path", "sha256"):  # checked above, or free to move
            expected_entry.pop(key)
        found = {k: v for k, v in recorded.items() if k in expected_entry}
        self.compare("lid", expected_entry, found, "lid", "LID size statistics match")
        return lid

    def tasks(self, spec: Any, graph: Any, lid: Any) -> list[Any] | None:
        recorded = self.doc["tasks"]
        if len(recorded) != len(spec.tasks):
            self.result.add(
                "tasks",
                "failed",
                f"{self.cert_path.name} lists {len(recorded)} tasks; the spec has "
                f"{len(spec.tasks)}",
            )
            return None
        prepared, certs = [], []
        recorded_sections = self.recorded_spec.tasks
        for i, section in enumerate(spec.tasks):
            subject = f"task '{section.name}'"
            try:
                chosen = (self.doc.get("ladder") or {}).get("chosen_search", 0)
                task = prepare_task(spec, section, graph).at_target(int(chosen))
                cert = certify_prepared(graph, lid.domain, task, spec, method=spec.certify.method)
            except InputError as err:
                self.result.add(subject, "failed", f"cannot recompute: {err}")
                return None
            # the data source as recorded (paths relative to the certificate's folder)
            expected = task_entry(task, cert, recorded_sections[i].data or self.recorded_spec.data)
            data = section.data or spec.data
            for key, part in (
                ("optimisation_data_sha256", "optimisation"),
                ("certification_data_sha256", "certification"),
            ):
                got = recorded[i].get(key)
                if got == expected[key]:
                    self.result.add(subject, "ok", f"{part} data sha256 = {got}")
                else:
                    self.result.add(
                        subject,
                        "failed",
                        f"{part} data of {data.name} [{data.split}] (seeded split "
                        f"{spec.certify.split_seed}) has sha256 {expected[key]}; "
                        f"{self.cert_path.name} tasks[{i}].{key} records {_short(got)}",
                    )
                expected.pop(key)
            self.compare(
                subject,
                expected,
                {k: v for k, v in recorded[i].items() if k in expected},
                f"tasks[{i}]",
                f"held-out certificate recomputed: {cert.k}/{cert.n} certified, "
                f"{cert.bound_kind} L = {cert.lower_bound:.6f} "
                f"{'>=' if cert.holds else '<'} τ = {cert.target:.6f}",
            )
            prepared.append(task)
            certs.append(cert)
        holds = all(c.holds for c in certs)
        self.compare(
            "verdict",
            {"holds": holds, "verdict": "holds" if holds else "not met"},
            {"holds": self.doc["holds"], "verdict": self.doc["verdict"]},
            "",
            f"verdict '{'holds' if holds else 'not met'}' recomputed",
        )
        stored = lid.metadata.get("certificate")
        try:
            stored_certs = json.loads(stored) if stored is not None else _MISSING
        except (ValueError, RecursionError):  # not JSON, a huge number, nested too deeply
            stored_certs = stored
        diffs = differences([c.to_json() for c in certs], stored_certs, "certificate")
        if diffs:
            where, exp, got = diffs[0]
            self.result.add(
                "lid",
                "failed",
                f"{self.doc['lid']['file']} metadata {where}: recomputed {_short(exp)}, "
                f"recorded {_short(got)}",
            )
        else:
            self.result.add("lid", "ok", "the certificate in the LID's metadata matches")
        return prepared

    def search(self, graph: Any, lid: Any, prepared: list[Any] | None, spec: Any) -> None:
        from verifier.search import hard_metrics
        from verifier.search.dual import proof_method

        search = self.doc["search"]
        path = self.out_dir / search["history_file"]
        recorded_sha = search["history_sha256"]
        if not path.is_file():
            if recorded_sha is None:
                self.result.add("search", "note", f"no {path.name} was recorded")
            else:
                self.result.add("search", "failed", f"{path}: history file not found")
        else:
            if self.hash_check("search", path, file_sha256(path), "search.history_sha256"):
                history = load_history(self.out_dir)
                last = history[-1] if history else None
                keys = ("iteration", "mean_width", "soft", "hard", "lam")
                final = None if last is None else {k: last.get(k) for k in keys}
                self.compare(
                    "search",
                    {"iterations": len(history), "final_step": final},
                    {"iterations": search["iterations"], "final_step": search["final_step"]},
                    "search",
                    f"{path.name}: {len(history)} iterations, final step matches",
                )
        if prepared is not None:
            search_tasks = [t.search for t in prepared]
            method = proof_method(spec.search)
            hard = list(hard_metrics(graph, lid.domain, search_tasks, method=method))
            feasible = all(h >= t.search_target for h, t in zip(hard, prepared, strict=True))
            self.compare(
                "search",
                {"optimisation_hard_metric": hard, "feasible_on_optimisation_data": feasible},
                {
                    "optimisation_hard_metric": search["optimisation_hard_metric"],
                    "feasible_on_optimisation_data": search["feasible_on_optimisation_data"],
                },
                "search",
                "certified metric of the LID on the optimisation data recomputed",
            )
        self.result.add(
            "search",
            "not recomputed",
            f"{len(search['checkpoints'])} checkpoints and the choice '{search['chosen']}' "
            f"(the candidate {'zonotopes' if lid.kind == 'zonotope' else 'boxes'} are not stored)",
        )

    def crosscheck(self, model_sha: str) -> None:
        section = self.doc["crosscheck"]
        path = self.out_dir / CROSSCHECK_FILE
        if section is None:
            if path.is_file():
                self.result.add(
                    "crosscheck",
                    "note",
                    f"{path.name} is present but not part of the certificate (another LID, or "
                    "not yet attached: run `verifier report`)",
                )
            return
        path = self.out_dir / section["file"]
        if not path.is_file():
            self.result.add("crosscheck", "failed", f"{path}: cross-check file not found")
            return
        self.hash_check("crosscheck", path, file_sha256(path), "crosscheck.sha256")
        try:
            document = read_json_object(path)
        except ArtifactError as err:
            self.result.add("crosscheck", "failed", str(err))
            return
        lid_sha = self.doc["lid"]["sha256"]
        for key, expected in (("model_sha256", model_sha), ("lid_sha256", lid_sha)):
            if document.get(key) == expected:
                self.result.add("crosscheck", "ok", f"{path.name} {key} is the artifact's")
            else:
                self.result.add(
                    "crosscheck",
                    "failed",
                    f"{path} {key} is {_short(document.get(key))}; the artifact's is {expected}",
                )
        self.compare(
            "crosscheck",
            document.get("summary"),
            section["summary"],
            "crosscheck.summary",
            f"summary matches {path.name}",
        )
        summary = section["summary"]
        if summary.get("verdict") == "violation":
            self.result.add(
                "crosscheck",
                "failed",
                f"the cross-check found {summary.get('violations')} violation(s) of the bounds: "
                "the certificate's bound method was refuted on this LID",
            )
        self.result.add(
            "crosscheck",
            "not recomputed",
            "the falsifier and exact-solver results (re-run `verifier crosscheck` to redo them)",
        )

    def recorded_facts(self) -> None:
        current = {**software_versions(), **software_extras()}
        for name, version in self.doc["software"].items():
            now = current.get(name)
            if now != version:
                self.result.add(
                    "software", "note", f"{name} {version} recorded, {now or 'absent'} here"
                )
        self.result.add(
            "run",
            "not recomputed",
            "created, command, working_directory and search.seconds (facts about the run)",
        )


def verify_artifacts(
    out_dir: Path,
    *,
    model_path: Path | None = None,
    on_phase: Callable[[str], None] | None = None,
) -> Verification:
    """Recompute the certificate of an output folder from its artifacts and compare.

    Args:
        out_dir: the folder written by `verifier run` / `verifier lid`.
        model_path: use this model file (its sha256 must still match the recorded one); else
            the recorded path (relative to the folder), else an .onnx file in the folder or its
            parent with the recorded sha256.
        on_phase: called with a short message before each slow step.

    Returns:
        Every check made; `ok` is False when any failed.

    Raises:
        ArtifactError: the folder or certificate.json is missing, the certificate is not JSON,
            or its schema version is not the one this verifier reads.
    """
    phase = on_phase or (lambda _message: None)
    doc = load_certificate(out_dir)
    version = doc.get("schema_version")
    if version not in READABLE_SCHEMA_VERSIONS:
        readable = " and ".join(map(repr, READABLE_SCHEMA_VERSIONS))
        raise ArtifactError(
            f"{out_dir / CERTIFICATE_FILE}: schema version {version!r}; this verifier reads "
            f"{readable} (re-run `verifier lid` with this version)"
        )
    check = _Verifier(out_dir, doc)
    if not check.structure():
        return check.result
    spec = check.spec()
    loaded = check.model(model_path, spec)
    if loaded is None:
        return check.result
    graph, model_sha = loaded
    lid = check.lid(graph, model_sha, spec)
    if lid is not None and spec is not None:
        phase("recomputing the held-out certificate (float64)")
        prepared = check.tasks(spec, graph, lid)
        check.search(graph, lid, prepared, spec)
    check.crosscheck(model_sha)
    check.recorded_facts()
    return check.result

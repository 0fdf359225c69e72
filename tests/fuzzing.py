"""A seeded mutation fuzzer of the command line (issue 23): every case ends with exit 0, 1 or 2.

A case mutates one kind of input (`TARGETS`: an ONNX model, a spec, an .npz data file, a LID
file, an output folder's certificate.json and its neighbours), writes it into its own folder
and runs one `verifier` command on it in-process, through the console-script entry point
`verifier.cli.main` (click's `standalone_mode=False`, as the installed `verifier` runs), with
stdout and stderr captured and a per-case timeout (SIGALRM). A case fails when:

* `traceback`: an exception escaped the command (anything but its `SystemExit`);
* `hang`: it ran past the timeout;
* `bad exit`: an exit code the command does not have, or 1 without a verdict (exit 1 means
  only "specification not met" or "verification failed"), or 2 without an `error:` line.

Cases are reproducible from (target, index, seed): `benchmarks/fuzz.py --target T --case I`
replays one. The seeds (`Seeds`) are small: the digits MLP and the DAG / bad-model zoos written
with onnx.helper, 80 digits samples, and two real output folders from 3-iteration searches.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import random
import re
import shutil
import signal
import sys
import time
import traceback
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, Final, Literal

import numpy as np
import onnx
import yaml

from tests.fuzz_mutations import (
    flip_bytes,
    interesting,
    mutate_document,
    mutate_json_text,
    mutate_npz,
    mutate_onnx,
    mutate_safetensors,
    mutate_spec,
)

ROOT: Final = Path(__file__).resolve().parents[1]
MODEL: Final = ROOT / "onnx_models" / "digits_mlp.onnx"
TARGETS: Final = ("onnx", "spec", "data", "lid", "certificate")
Outcome = Literal["ok", "traceback", "hang", "bad exit"]
# exit codes each command has (cli/__init__.py): inspect and report never exit 1
EXIT_CODES: Final = {
    "inspect": {0, 2},
    "report": {0, 2},
    "lid": {0, 1, 2},
    "run": {0, 1, 2},
    "certify": {0, 1, 2},
    "verify": {0, 1, 2},
    "project": {0, 1, 2},
}


# ---------------------------------------------------------------------- seeds


@dataclass(frozen=True)
class Seeds:
    """Valid inputs the mutations start from, written once into `folder`.

    Layout: `model.onnx` (the digits MLP), `tiny.npz` (80 digits test samples), `spec.yaml` (a
    3-iteration search on them), `out/` and `zono/` (the output folders of that spec, box and
    zonotope), `zoo/*.onnx` (helper-built models, good and bad, one with external weights).
    """

    folder: Path

    @property
    def model(self) -> Path:
        return self.folder / "model.onnx"

    @property
    def data(self) -> Path:
        return self.folder / "tiny.npz"

    def spec_document(self) -> dict[str, Any]:
        return spec_document(self.model, self.data)

    def zoo(self) -> list[Path]:
        return sorted((self.folder / "zoo").glob("*.onnx"))

    def arrays(self) -> tuple[np.ndarray, np.ndarray]:
        with np.load(self.data) as archive:
            return archive["x"], archive["y"]


# a short certification ladder, in the layouts `certify.ladder` has had (the first valid is used)
CHEAP_LADDERS: Final = ({"targets": 1, "scales": [1.0, 0.5]}, [1.0, 0.5])


def spec_document(model: Path, data: Path) -> dict[str, Any]:
    """A valid, cheap spec: the digits MLP on 80 samples, 3 search iterations, a short ladder."""
    from verifier.errors import SpecError
    from verifier.spec import parse_spec

    doc: dict[str, Any] = {
        "model": str(model),
        "data": {"name": str(data), "split": "test"},
        "tasks": [{"name": "digits", "metric": "accuracy", "target": 0.5}],
        "search": {"iterations": 3, "batch_size": 64, "checkpoint_every": 2},
        "certify": {"beta": 0.001},
    }
    for ladder in CHEAP_LADDERS:
        trial = {**doc, "certify": {**doc["certify"], "ladder": ladder}}
        with contextlib.suppress(SpecError):
            parse_spec(trial, source=Path("spec.yaml"))
            return trial
    return doc


def build_seeds(folder: Path) -> Seeds:
    """Write the seeds (a few seconds: two tiny searches and the helper-built zoo)."""
    from tests.graph_zoo import HELPER_MODELS
    from tests.model_zoo import BAD_MODELS
    from tests.test_onnx_limits import gemm_model
    from verifier.data.digits import digits_arrays

    folder.mkdir(parents=True, exist_ok=True)
    seeds = Seeds(folder)
    shutil.copyfile(MODEL, seeds.model)
    x, y = digits_arrays("test")
    np.savez(seeds.data, x=x[:80], y=y[:80])
    zoo = folder / "zoo"
    zoo.mkdir()
    for name, write in HELPER_MODELS.items():
        write(zoo / f"{name}.onnx")
    for name, (write_bad, _) in BAD_MODELS.items():
        if name not in ("missing", "directory"):
            bad = zoo / f"bad_{name}"
            bad.mkdir()
            path = write_bad(bad)
            shutil.move(path, zoo / f"bad_{name}.onnx")
            shutil.rmtree(bad)
    onnx.save(
        gemm_model(),
        str(zoo / "external.onnx"),
        save_as_external_data=True,
        location="external.bin",
        size_threshold=0,
    )
    for name, extra in (("out", {}), ("zono", {"domain": "zonotope", "zonotope": {"k": 2}})):
        spec = folder / f"{name}.yaml"
        spec.write_text(yaml.safe_dump({**seeds.spec_document(), **extra}), encoding="utf-8")
        result = run_cli(["lid", str(spec), "-o", str(folder / name)], timeout_s=300)
        if result.code != 0:
            raise RuntimeError(f"seed run {name} failed: {result.stdout}{result.stderr}")
    shutil.copyfile(folder / "out.yaml", folder / "spec.yaml")
    return seeds


# ---------------------------------------------------------------------- running a command


class CaseTimeout(BaseException):
    """Raised by SIGALRM in the main thread: the case ran past its timeout.

    A BaseException, so that no `except Exception` in the code under test swallows it.
    """


@dataclass(frozen=True)
class CliResult:
    """What one in-process command run gave: exit code (None if it did not exit), output."""

    code: int | None
    stdout: str
    stderr: str
    error: str | None = None  # the traceback of an escaped exception
    timed_out: bool = False
    seconds: float = 0.0


def _alarm(signum: int, frame: FrameType | None) -> None:
    raise CaseTimeout


@contextlib.contextmanager
def _deadline(timeout_s: float) -> Iterator[None]:
    """Raise CaseTimeout after timeout_s (main thread only; elsewhere no deadline)."""
    import threading

    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGALRM, _alarm)
    signal.setitimer(signal.ITIMER_REAL, timeout_s)
    try:
        yield
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def run_cli(argv: list[str], *, timeout_s: float) -> CliResult:
    """Run `verifier ARGV` in this process through `verifier.cli.main`, as the console script.

    Warnings are recorded, not raised (as in a real process, where they only print), and the
    global state a command may touch (sys.argv, warning filters) is restored afterwards.
    """
    from verifier.cli import main

    stdout, stderr = io.StringIO(), io.StringIO()
    code: int | None = None
    error = None
    timed_out = False
    saved_argv = sys.argv
    started = time.perf_counter()
    try:
        sys.argv = ["verifier", *argv]
        with (
            contextlib.redirect_stdout(stdout),
            contextlib.redirect_stderr(stderr),
            warnings.catch_warnings(record=True),
            _deadline(timeout_s),
        ):
            warnings.simplefilter("always")
            main()
    except SystemExit as exit_:
        code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    except CaseTimeout:
        timed_out = True
    except KeyboardInterrupt:
        raise
    except BaseException:  # noqa: BLE001 - any escaped exception is the finding
        error = traceback.format_exc()
    finally:
        sys.argv = saved_argv
    seconds = time.perf_counter() - started
    return CliResult(code, stdout.getvalue(), stderr.getvalue(), error, timed_out, seconds)


def judge(command: str, result: CliResult) -> tuple[Outcome, str]:
    """The outcome of a case, and a short reason when it failed."""
    if result.timed_out:
        return "hang", "ran past its timeout"
    if result.error is not None:
        return "traceback", result.error.strip().splitlines()[-1][:300]
    code = result.code
    if code not in EXIT_CODES[command]:
        return "bad exit", f"exit {code} from {command}: {result.stderr.strip()[-300:]}"
    lines = result.stderr.strip().splitlines()
    if code == 2:
        errors = [ln for ln in lines if ln.startswith(("error: ", "Error: "))]
        if not errors:
            return "bad exit", f"exit 2 without an error line: {result.stderr.strip()[-300:]}"
    if code == 1:
        verdict = re.search(r"\bverdict\b", result.stdout) is not None or any(
            ln.startswith("not certifiable:") for ln in lines
        )
        if not verdict:
            return "bad exit", f"exit 1 without a verdict: {result.stderr.strip()[-300:]}"
    return "ok", ""


# ---------------------------------------------------------------------- cases


@dataclass(frozen=True)
class Case:
    """One fuzz case: what was mutated and the command run on it."""

    target: str
    index: int
    mutation: str
    argv: list[str] = field(default_factory=list)

    @property
    def command(self) -> str:
        return self.argv[0]


def case_rng(target: str, index: int, seed: int) -> random.Random:
    digest = hashlib.sha256(f"{seed}:{target}:{index}".encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "little"))


def _copy_run(seeds: Seeds, folder: Path, name: str = "out") -> Path:
    """A copy of a seed output folder with the model and data beside it, as recorded."""
    shutil.copyfile(seeds.model, folder / "model.onnx")
    shutil.copyfile(seeds.data, folder / "tiny.npz")
    out = folder / "out"
    shutil.copytree(seeds.folder / name, out)
    return out


def _onnx_case(seeds: Seeds, rng: random.Random, folder: Path) -> tuple[str, list[str]]:
    source = seeds.model if rng.random() < 0.5 else rng.choice(seeds.zoo())
    if source.name == "external.onnx":
        shutil.copyfile(source.parent / "external.bin", folder / "external.bin")
    data, what = mutate_onnx(source.read_bytes(), rng, folder)
    model = folder / "model.onnx"
    model.write_bytes(data)
    what = f"{source.name}: {what}"
    roll = rng.random()
    if roll < 0.15 and source == seeds.model:
        spec = folder / "spec.yaml"
        doc = {**seeds.spec_document(), "model": str(model)}
        spec.write_text(yaml.safe_dump(doc), encoding="utf-8")
        return what, ["lid", str(spec), "-o", str(folder / "out")]
    if roll < 0.3 and source == seeds.model:
        lid = str(seeds.folder / "out" / "lid.safetensors")
        return what, ["certify", str(model), lid, str(seeds.data), "--target", "0.5"]
    if roll < 0.6:
        return what, ["inspect", str(model), "--data", str(seeds.data)]
    return what, ["inspect", str(model)]


def _spec_case(seeds: Seeds, rng: random.Random, folder: Path) -> tuple[str, list[str]]:
    files = {
        "zoo": str(rng.choice(seeds.zoo())),
        "data_as_model": str(seeds.data),
        "lid": str(seeds.folder / "out" / "lid.safetensors"),
        "zono_lid": str(seeds.folder / "zono" / "lid.safetensors"),
        "folder": str(seeds.folder),
        "spec": str(seeds.folder / "spec.yaml"),
        "model": str(seeds.model),
        "data": str(seeds.data),
    }
    text, what = mutate_spec(seeds.spec_document(), rng, files)
    spec = folder / "spec.yaml"
    spec.write_text(text, encoding="utf-8", errors="surrogateescape")
    command = "run" if rng.random() < 0.03 else "lid"
    return what, [command, str(spec), "-o", str(folder / "out")]


def _data_case(seeds: Seeds, rng: random.Random, folder: Path) -> tuple[str, list[str]]:
    x, y = seeds.arrays()
    if rng.random() < 0.08:
        path = rng.choice(["", "digits", "mnist", "nope", str(folder), str(seeds.model)])
        what = f"data reference {Path(path).name!r}"
    else:
        data, what = mutate_npz(x, y, rng)
        path = str(folder / "data.npz")
        Path(path).write_bytes(data)
    split = rng.choice(["test", "test", "test", "train", "default", "nope"])
    if rng.random() < 0.5:
        lid = str(seeds.folder / "out" / "lid.safetensors")
        argv = ["certify", str(seeds.model), lid, path, "--target", "0.5", "--split", split]
    else:
        argv = ["inspect", str(seeds.model), "--data", path, "--split", split]
    return what, argv


def _lid_case(seeds: Seeds, rng: random.Random, folder: Path) -> tuple[str, list[str]]:
    name = "zono" if rng.random() < 0.3 else "out"
    out = _copy_run(seeds, folder, name)
    lid = out / "lid.safetensors"
    if rng.random() < 0.1:
        other = "out" if name == "zono" else "zono"
        shutil.copyfile(seeds.folder / other / "lid.safetensors", lid)
        what = f"{name}: the LID of {other}"
    else:
        data, what = mutate_safetensors(lid.read_bytes(), rng)
        lid.write_bytes(data)
        what = f"{name}: {what}"
    roll = rng.random()
    if roll < 0.45:
        return what, ["verify", str(out)]
    if roll < 0.9:
        return what, ["certify", str(folder / "model.onnx"), str(lid), str(seeds.data)]
    return what, ["project", str(folder / "model.onnx"), "--lid", str(lid), "-o", "safe.onnx"]


MODEL_PATHS: Final = ("", ".", "..", "/nonexistent", "lid.safetensors", "../tiny.npz")
NEIGHBOURS: Final = (
    "history.jsonl",
    "crosscheck.json",
    "lid.safetensors",
    "../model.onnx",
    "../tiny.npz",
)


def _certificate_case(seeds: Seeds, rng: random.Random, folder: Path) -> tuple[str, list[str]]:
    name = "zono" if rng.random() < 0.2 else "out"
    out = _copy_run(seeds, folder, name)
    path = out / "certificate.json"
    kind = rng.choice(["document", "document", "document", "text", "files", "mismatch"])
    if kind == "document":
        doc = json.loads(path.read_text(encoding="utf-8"))
        model, lid = dict(doc["model"]), dict(doc["lid"])
        what = "; ".join(mutate_document(doc, rng) for _ in range(rng.choice([1, 1, 2])))
        if rng.random() < 0.3:
            key, value = rng.choice(
                [
                    ("schema_version", rng.choice(["1", "2", "3", 3, None])),
                    ("model", {**model, "path": rng.choice(MODEL_PATHS)}),
                    ("lid", {**lid, "file": rng.choice(["", "..", "history.jsonl", "x"])}),
                    ("crosscheck", {"file": "crosscheck.json", "summary": interesting(rng)}),
                ]
            )
            doc[key] = value
            what += f"; {key} replaced"
        path.write_text(json.dumps(doc, indent=2), encoding="utf-8")
    elif kind == "text":
        text, what = mutate_json_text(path.read_text(encoding="utf-8"), rng)
        path.write_bytes(text.encode("utf-8", errors="surrogatepass"))
    elif kind == "files":
        which = rng.choice(NEIGHBOURS)
        target = out / which
        if which == "crosscheck.json" or not target.exists():
            doc = {"schema_version": "1", "model_sha256": "0" * 64, "lid_sha256": "0" * 64}
            mutate_document(doc, rng)
            target.write_text(json.dumps(doc), encoding="utf-8")
        elif which == "history.jsonl" and rng.random() < 0.5:
            text, _ = mutate_json_text(target.read_text(encoding="utf-8"), rng)
            target.write_bytes(text.encode("utf-8", errors="surrogatepass"))
        else:
            data, _ = flip_bytes(target.read_bytes(), rng)
            target.write_bytes(data)
        what = f"{which} damaged"
    else:
        other = "out" if name == "zono" else "zono"
        which = rng.choice(["certificate.json", "history.jsonl", "lid.safetensors"])
        shutil.copyfile(seeds.folder / other / which, out / which)
        what = f"{which} of {other}"
    what = f"{name}: {what}"
    roll = rng.random()
    if roll < 0.05:
        return what, ["report", str(out)]
    if roll < 0.15:
        return what, ["verify", str(out), "--model", str(rng.choice(seeds.zoo()))]
    return what, ["verify", str(out), *(["--json"] if roll < 0.3 else [])]


BUILDERS: Final = {
    "onnx": _onnx_case,
    "spec": _spec_case,
    "data": _data_case,
    "lid": _lid_case,
    "certificate": _certificate_case,
}


def make_case(seeds: Seeds, target: str, index: int, folder: Path, *, seed: int = 0) -> Case:
    """Write case `index` of `target` into `folder` (which must exist) and return it."""
    rng = case_rng(target, index, seed)
    what, argv = BUILDERS[target](seeds, rng, folder)
    return Case(target, index, what, argv)


@dataclass(frozen=True)
class CaseResult:
    """A case, its outcome and what the command gave."""

    case: Case
    outcome: Outcome
    reason: str
    result: CliResult

    def describe(self) -> str:
        """One line: target, index, mutation, command, outcome and why."""
        argv = " ".join(Path(a).name if "/" in a else a for a in self.case.argv)
        return (
            f"[{self.case.target} #{self.case.index}] {self.case.mutation} :: verifier {argv} "
            f"-> {self.outcome} (exit {self.result.code}) {self.reason}"
        )


def run_case(
    seeds: Seeds, target: str, index: int, scratch: Path, *, seed: int = 0, timeout_s: float = 60
) -> CaseResult:
    """Build and run one case in a fresh folder under `scratch` (removed afterwards)."""
    folder = scratch / f"{target}-{index}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    try:
        case = make_case(seeds, target, index, folder, seed=seed)
        with contextlib.chdir(folder):  # relative outputs (`project -o safe.onnx`) land here
            result = run_cli(case.argv, timeout_s=timeout_s)
        outcome, reason = judge(case.command, result)
        return CaseResult(case, outcome, reason, result)
    finally:
        shutil.rmtree(folder, ignore_errors=True)

"""The package's import graph: no cycles, and every import goes down the layer order.

Imports are read from the source (module level and inside functions alike); those under
`if TYPE_CHECKING:` are left out, since they never run. The layer order is `verifier.LAYERS`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import verifier

PACKAGE = Path(verifier.__file__).parent


def _module_names() -> dict[str, Path]:
    out = {}
    for path in PACKAGE.rglob("*.py"):
        parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _type_checking_nodes(tree: ast.AST) -> set[int]:
    skipped: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            skipped.update(id(inner) for inner in ast.walk(node))
    return skipped


def import_graph() -> dict[str, set[str]]:
    """Module -> the package modules it imports (resolved to the most specific module)."""
    modules = _module_names()
    edges: dict[str, set[str]] = {name: set() for name in modules}
    for name, path in modules.items():
        tree = ast.parse(path.read_text(), str(path))
        skipped = _type_checking_nodes(tree)
        for node in ast.walk(tree):
            if id(node) in skipped:
                continue
            targets: list[str] = []
            if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                targets = [f"{node.module}.{alias.name}" for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level > 0:
                raise AssertionError(f"{name}: relative import; import from the full path")
            elif isinstance(node, ast.Import):
                targets = [alias.name for alias in node.names]
            for target in targets:
                if target.split(".")[0] != "verifier":
                    continue
                while target not in modules:
                    target = target.rsplit(".", 1)[0]
                if target != name:
                    edges[name].add(target)
    return edges


def find_cycle(edges: dict[str, set[str]]) -> list[str] | None:
    """One import cycle as a list of modules (first = last), or None."""
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for succ in sorted(edges[node]):
            if state.get(succ) == 1:
                return stack[stack.index(succ) :] + [succ]
            if succ not in state and (found := visit(succ)) is not None:
                return found
        stack.pop()
        state[node] = 2
        return None

    for start in sorted(edges):
        if start not in state and (found := visit(start)) is not None:
            return found
    return None


def _unit(module: str) -> str:
    """The layer unit of a module: its top-level subpackage or module under `verifier`."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "verifier"


def test_no_import_cycles() -> None:
    cycle = find_cycle(import_graph())
    assert cycle is None, "import cycle: " + " -> ".join(cycle or [])


def test_cycle_check_finds_a_planted_cycle() -> None:
    edges = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert find_cycle(edges) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_every_unit_has_a_layer() -> None:
    units = {_unit(m) for m in import_graph()} - {"verifier"}
    layered = [u for layer in verifier.LAYERS for u in layer]
    assert len(layered) == len(set(layered)), "a unit is listed in two layers"
    assert units == set(layered), f"missing: {units - set(layered)}; stale: {set(layered) - units}"


def test_imports_go_down_the_layers() -> None:
    rank = {unit: i for i, layer in enumerate(verifier.LAYERS) for unit in layer}
    bad = []
    for module, targets in import_graph().items():
        source = _unit(module)
        for target in targets:
            dest = _unit(target)
            if dest == "verifier" and source != "verifier":
                bad.append(f"{module} imports the package root (the facade)")
            elif source not in ("verifier", dest) and rank[dest] >= rank[source]:
                bad.append(f"{module} (layer {rank[source]}) imports {target} (layer {rank[dest]})")
    assert not bad, "\n".join(sorted(bad))


def module_sizes() -> dict[str, int]:
    """Lines of every module of the package (package __init__ files included)."""
    return {name: len(path.read_text().splitlines()) for name, path in _module_names().items()}


def test_modules_stay_small_and_are_named_for_what_they_hold() -> None:
    sizes = module_sizes()
    largest = max(sizes, key=lambda name: sizes[name])
    assert sizes[largest] <= 600, f"{largest} has {sizes[largest]} lines; split it"
    plain = sorted(
        n for m, n in sizes.items() if not (PACKAGE.parent / Path(*m.split("."))).is_dir()
    )
    median = (plain[(len(plain) - 1) // 2] + plain[len(plain) // 2]) / 2
    assert median <= 200, f"median module (package __init__ files left out) has {median} lines"
    grab_bags = {"utils", "helpers", "common", "misc", "util", "helper"}
    named = [m for m in sizes if m.rsplit(".", 1)[-1] in grab_bags]
    assert not named or named == ["verifier.cli.conventions"], named

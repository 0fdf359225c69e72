"""A seeded sample of the fuzzer (issue 23): 5 x 40 cases, each exit 0, 1 or 2, never a
traceback, a hang or an exit code without its message. `benchmarks/fuzz.py` runs 10,000.

A failure lists each failed case as `[target #index] mutation :: command -> outcome`; replay one
with `.venv/bin/python benchmarks/fuzz.py --target T --case I --show`.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.fuzzing import TARGETS, Seeds, build_seeds, run_case

CASES_PER_TARGET = 40
SEED = 23
TIMEOUT_S = 60.0  # a hang detector, far above any case's cost (about 0.01 to 1 s)


@pytest.fixture(scope="module")
def seeds(tmp_path_factory: pytest.TempPathFactory) -> Seeds:
    return build_seeds(tmp_path_factory.mktemp("fuzz_seeds"))


@pytest.mark.parametrize("target", TARGETS)
def test_fuzz_sample_ends_with_exit_0_1_or_2(seeds: Seeds, tmp_path: Path, target: str) -> None:
    results = [
        run_case(seeds, target, index, tmp_path, seed=SEED, timeout_s=TIMEOUT_S)
        for index in range(CASES_PER_TARGET)
    ]
    failures = [r.describe() for r in results if r.outcome != "ok"]
    assert not failures, "\n".join(failures)
    codes = {r.result.code for r in results}
    assert 2 in codes  # the mutations do reach the input checks ...
    assert codes & {0, 1}  # ... and some inputs stay valid enough to run through


def test_cases_are_reproducible(seeds: Seeds, tmp_path: Path) -> None:
    from tests.fuzzing import make_case

    for target in TARGETS:
        first, second = tmp_path / f"{target}-a", tmp_path / f"{target}-b"
        first.mkdir()
        second.mkdir()
        a = make_case(seeds, target, 7, first, seed=SEED)
        b = make_case(seeds, target, 7, second, seed=SEED)
        assert a.mutation == b.mutation
        assert [x.replace(str(first), "") for x in a.argv] == [
            x.replace(str(second), "") for x in b.argv
        ]

"""`verifier inspect` on a bad model: exit code 2 and one line on stderr, never a traceback."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.model_zoo import BAD_MODELS
from verifier.cli import ExitCode, cli

# `inspect` checks that the path is a file before loading it, in its own words
CLI_PATTERNS = {
    "missing": "not found|no such file",
    "directory": "not found|not a file",
}


@pytest.mark.parametrize("bad", sorted(BAD_MODELS))
def test_inspect_bad_model_exits_2_with_one_line(tmp_path: Path, bad: str) -> None:
    write, pattern = BAD_MODELS[bad]
    path = write(tmp_path)
    result = CliRunner().invoke(cli, ["inspect", str(path)])
    assert result.exit_code == ExitCode.BAD_INPUT, result.output
    assert isinstance(result.exception, SystemExit)
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("error: ")
    assert re.search(CLI_PATTERNS.get(bad, pattern), lines[0]), lines[0]
    assert str(path) in lines[0]
    assert "Traceback" not in result.output

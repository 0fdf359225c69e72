"""A real two-node Ray cluster on this machine (issue 22): `ray start --head`, then a second
`ray start --address=...`, and `verifier certify --ray HOST:PORT` across it.

Both nodes are started with `--block`, so each is one process of ours; the test stops them by
pid (SIGTERM drains the node and ends every process it started), never with a machine-wide
`ray stop` that would also end other users' instances.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from click.testing import CliRunner

from tests.test_cli_pipeline import MODEL
from verifier.cli import cli
from verifier.domains import Box
from verifier.domains.io import save_lid
from verifier.onnx.importer import load_graph

pytest.importorskip("ray")
# a Ray call that never returns fails the test instead of holding CI (pytest-timeout)
pytestmark = pytest.mark.timeout(600)
BIN = Path(sys.executable).parent


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _wait_for(process: subprocess.Popen[bytes], log: Path, marker: str, timeout_s: float) -> None:
    """Poll the node's log until `marker` appears (or fail with what it printed)."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline and process.poll() is None:
        if marker in log.read_text(errors="replace"):
            return
        time.sleep(0.2)
    raise AssertionError(f"ray start did not report '{marker}':\n{log.read_text()[-3000:]}")


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is None:
        process.send_signal(signal.SIGTERM)  # drains the node and ends what it started
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)  # its own session: only what it started
            process.wait(timeout=30)


@pytest.fixture
def two_nodes() -> Iterator[tuple[str, dict[str, str]]]:
    """A head and a worker node (one CPU each) on this machine; yields (address, env)."""
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tempfile.mkdtemp(prefix="ray", dir="/tmp")  # short: Ray's socket paths must fit
    port = _free_port()
    common = ["--block", "--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    nodes: list[subprocess.Popen[bytes]] = []
    try:
        for i, args in enumerate(
            (
                ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={temp}"],
                [f"--address=127.0.0.1:{port}"],
            )
        ):
            log = Path(temp) / f"node{i}.log"
            with log.open("wb") as out:  # the child keeps its own copy of the descriptor
                node = subprocess.Popen(
                    [str(BIN / "ray"), "start", *args, *common],
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    env=env,
                    start_new_session=True,
                )
            nodes.append(node)
            _wait_for(node, log, "Ray runtime started", timeout_s=120)
        yield f"127.0.0.1:{port}", env
    finally:
        for node in reversed(nodes):
            _stop(node)
        shutil.rmtree(temp, ignore_errors=True)


def test_certify_across_a_two_node_cluster_matches_the_local_run(
    tmp_path: Path, two_nodes: tuple[str, dict[str, str]]
) -> None:
    address, env = two_nodes
    lid_path = tmp_path / "lid.safetensors"
    save_lid(lid_path, Box.around(dict(load_graph(MODEL).parameters), radius=0.004), {})
    args = ["certify", str(MODEL), str(lid_path), "digits", "--split", "all", "--json"]
    local = CliRunner().invoke(cli, args)
    remote = subprocess.run(
        [str(BIN / "verifier"), *args, "--ray", address],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert local.exit_code == remote.returncode == 0, remote.stderr
    assert json.loads(remote.stdout) == json.loads(local.stdout)
    assert f"Ray cluster at {address}: 2 node(s), 2 CPUs" in remote.stderr, remote.stderr
    assert "task(s) on 2 node(s)" in remote.stderr, remote.stderr  # SPREAD used both nodes

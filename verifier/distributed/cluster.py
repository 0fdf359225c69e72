"""Joining a Ray cluster: the `--ray local|auto|ADDRESS` value, checked once, and the session.

`local` starts a Ray instance on this machine for the run and shuts it down afterwards; `auto`
joins the cluster `ray start` left on this machine (or `RAY_ADDRESS`); `HOST:PORT` (or
`ray://HOST:PORT`, Ray Client) joins that cluster's head. Joining never stops the cluster, only
disconnects. Ray is imported here, and only when a session opens, so commands run without it
start as fast as before.
"""

from __future__ import annotations

import logging
import re
import socket
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from types import ModuleType

from verifier.errors import BackendError

RAY_PIN = "ray==2.60.0"
"""The Ray version this package is tested with (pyproject's `ray` extra)."""

CONNECT_TIMEOUT_S = 5.0
"""How long to wait for a cluster head to accept a TCP connection before giving up."""

_ADDRESS = re.compile(
    r"^(?P<scheme>ray://)?(?P<host>[A-Za-z0-9._-]+|\[[0-9A-Fa-f:.]+\]):(?P<port>\d+)$"
)


@dataclass(frozen=True)
class ClusterInfo:
    """What the run sees of the cluster it joined.

    Attributes:
        address: the `--ray` value as given.
        n_nodes: live nodes.
        cpus: CPUs over all nodes.
        gpus: GPUs over all nodes.
        started_here: True when this run started the instance (`local`) and will stop it.
    """

    address: str
    n_nodes: int
    cpus: float
    gpus: float
    started_here: bool

    def describe(self) -> str:
        """One line for the terminal."""
        where = "local Ray instance" if self.started_here else f"Ray cluster at {self.address}"
        gpus = f", {self.gpus:g} GPUs" if self.gpus else ""
        return f"{where}: {self.n_nodes} node(s), {self.cpus:g} CPUs{gpus}"


def check_address(value: str) -> str:
    """Validate a `--ray` value: `local`, `auto`, `HOST:PORT` or `ray://HOST:PORT`.

    Returns:
        The value, stripped.

    Raises:
        BackendError: anything else (one line naming the value and the accepted forms).
    """
    text = value.strip()
    if text in ("local", "auto"):
        return text
    match = _ADDRESS.match(text)
    if match is None or not 0 < int(match["port"]) < 65536:
        raise BackendError(
            f"--ray '{value}': expected local, auto, HOST:PORT or ray://HOST:PORT "
            "(e.g. --ray 10.0.0.5:6379, the address `ray start --head` prints)"
        )
    return text


def import_ray() -> ModuleType:
    """Import Ray, or say how to install it.

    Raises:
        BackendError: Ray is not installed.
    """
    try:
        import ray
    except ImportError as err:
        raise BackendError(
            f"--ray needs Ray; install it with `.venv/bin/pip install {RAY_PIN}` "
            "(or `pip install 'lid-verifier[ray]'`)"
        ) from err
    return ray


def _check_reachable(address: str) -> None:
    match = _ADDRESS.match(address)
    assert match is not None
    host, port = match["host"].strip("[]"), int(match["port"])
    try:
        with socket.create_connection((host, port), timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as err:
        reason = err.strerror or type(err).__name__
        raise BackendError(
            f"--ray {address}: no Ray cluster answers there ({reason}); start one with "
            "`ray start --head` and pass the address it prints, or use --ray local"
        ) from err


def _describe(ray: ModuleType, address: str, started_here: bool) -> ClusterInfo:
    resources = ray.cluster_resources()
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    return ClusterInfo(
        address,
        len(nodes),
        float(resources.get("CPU", 0.0)),
        float(resources.get("GPU", 0.0)),
        started_here,
    )


@contextmanager
def ray_session(address: str, *, num_cpus: int | None = None) -> Iterator[ClusterInfo]:
    """Connect to Ray for the duration of the block (module docstring).

    When this process is already connected (a test's shared instance, a notebook), that
    connection is used and left open.

    Args:
        address: a value `check_address` accepts.
        num_cpus: CPUs of a `local` instance (default: all of this machine's).

    Yields:
        What the run sees of the cluster.

    Raises:
        BackendError: Ray missing, a malformed address, or no cluster there (one line).
    """
    address = check_address(address)
    ray = import_ray()
    if ray.is_initialized():
        yield _describe(ray, address, started_here=False)
        return
    options = {
        "include_dashboard": False,
        "log_to_driver": False,  # solvers print to their stdout; results travel as objects
        "logging_level": logging.WARNING,
    }
    if address == "local":
        ray.init(num_cpus=num_cpus, **options)
    else:
        if address != "auto":
            _check_reachable(address)
        try:
            ray.init(address=address, **options)
        except (ConnectionError, RuntimeError, TimeoutError) as err:
            first = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise BackendError(f"--ray {address}: cannot join the Ray cluster ({first})") from err
    try:
        yield _describe(ray, address, started_here=address == "local")
    finally:
        ray.shutdown()

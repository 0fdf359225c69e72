"""Certifying a held-out set larger than memory, chunk by chunk, here or on Ray (issue 22).

The stream (`verifier.data.stream`) is read in blocks of whole bound passes; each block is
certified (in this process, or as a Ray task with at most a few blocks in flight) and reduced
to its mask and per-class counts before the next is read, so memory stays flat: the samples of
a few blocks, plus one byte per sample for the mask. On Ray each block is put into the object
store once, as it is read, and its task is sent only a reference to it. Blocks are
`chunk_size`-aligned, so the mask, k and every number of the certificate equal those of
`certify_samples` and `certify_task` on the whole set in memory, bit for bit.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verifier.bounds.memory import current_memory_budget
from verifier.certify import (
    BoundKind,
    CertMethod,
    Metric,
    certificate_from_counts,
    certify_samples,
)
from verifier.data.stream import SampleStream, open_stream, stream_sha256
from verifier.distributed.certification import RayCertifier, SampleSlice, SliceResult, certify_slice
from verifier.distributed.cluster import import_ray
from verifier.distributed.tasks import map_tasks
from verifier.domains.box import Box
from verifier.domains.io import check_lid_matches, load_lid
from verifier.domains.zonotope import Zonotope
from verifier.errors import DataError
from verifier.files import file_sha256
from verifier.graph import Graph
from verifier.onnx.prefix import load_bounded_graph

BLOCK_SAMPLES = 8192
"""Samples per block of a stream by default (rounded up to whole bound passes)."""


@dataclass(frozen=True, eq=False)
class StreamCounts:
    """What certifying a stream found.

    Attributes:
        mask: the certified mask (bool, one byte per sample).
        n_nonfinite: samples whose bounds were NaN or Inf.
        class_n: label -> samples with it.
        class_k: label -> certified samples with it.
        x_digest: sha256 state over the samples' float32 bytes, in order.
    """

    mask: Tensor
    n_nonfinite: int
    class_n: dict[int, int]
    class_k: dict[int, int]
    x_digest: Any


def _shaped(stream: SampleStream, graph: Graph) -> tuple[int, ...]:
    """The per-sample shape the model takes, for the stream's samples (flat <-> shaped as
    `verifier.data.validate_for_model` does)."""
    expected, found = tuple(graph.input_shape), stream.sample_shape
    if found == expected:
        return expected
    if (len(found) == 1 or len(expected) == 1) and math.prod(found) == math.prod(expected):
        return expected
    raise DataError(
        f"{stream.folder}: samples have shape {found}; the model's input "
        f"'{graph.input_name}' expects {expected}"
    )


def certify_stream(
    graph: Graph,
    domain: Box | Zonotope,
    stream: SampleStream,
    *,
    method: CertMethod = "ibp",
    chunk_size: int = 256,
    block_samples: int = BLOCK_SAMPLES,
    ray: RayCertifier | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> StreamCounts:
    """Prove, in float64, which samples of a stream every network in the domain classifies
    correctly, reading it block by block (module docstring).

    Args:
        graph: the network.
        domain: the LID.
        stream: the held-out samples.
        method: bound method, as for `certify_samples`.
        chunk_size: samples per bound pass, as for `certify_samples`.
        block_samples: samples read at a time (rounded up to a multiple of chunk_size).
        ray: run the blocks as Ray tasks (inside a Ray session); None: in this process.
        on_progress: called with (samples done, stream.n) as each block completes.

    Returns:
        The mask, counts and the samples' hash state.

    Raises:
        DataError: the samples do not fit the model, a label is out of range, or a bad value.
    """
    shape = _shaped(stream, graph)
    size = max(1, math.ceil(block_samples / chunk_size)) * chunk_size
    digest = hashlib.sha256()
    class_n: dict[int, int] = {}
    class_k: dict[int, int] = {}
    labels: dict[int, Tensor] = {}
    done = 0

    def blocks() -> Iterator[tuple[Tensor, Tensor]]:
        for index, (x, y) in enumerate(stream.chunks(size)):
            digest.update(x.numpy().data)
            if int(y.max()) >= graph.n_classes:
                bad = int(torch.nonzero(y >= graph.n_classes)[0])
                raise DataError(
                    f"{stream.folder}: label {int(y[bad])} at sample {index * size + bad} is "
                    f"outside the model's {graph.n_classes} classes"
                )
            labels[index] = y
            yield x.reshape(x.shape[0], *shape), y

    def count(index: int, result: tuple[Tensor, int]) -> None:
        nonlocal done
        mask, y = result[0], labels.pop(index)
        for label, n_c in zip(*np.unique(y.numpy(), return_counts=True), strict=True):
            class_n[int(label)] = class_n.get(int(label), 0) + int(n_c)
        for label, k_c in zip(*np.unique(y[mask].numpy(), return_counts=True), strict=True):
            class_k[int(label)] = class_k.get(int(label), 0) + int(k_c)
        done += int(mask.numel())
        if on_progress is not None:
            on_progress(done, stream.n)

    results: list[tuple[Tensor, int]] = []
    if ray is None:
        for index, (x, y) in enumerate(blocks()):
            result = certify_samples(graph, domain, x, y, method=method, chunk_size=chunk_size)
            count(index, result)
            results.append(result)
    else:  # at most a few blocks in flight (`map_tasks`), so memory stays flat here too
        ray_module = import_ray()
        shared = (graph, domain, method, chunk_size, "cpu", current_memory_budget())
        parts = (
            SampleSlice(ray_module.put((x.numpy(), y.numpy())), 0, int(x.shape[0]))
            for x, y in blocks()
        )

        def unpacked(index: int, result: SliceResult) -> None:
            count(index, (torch.from_numpy(result.mask()), result.n_nonfinite))

        found = map_tasks(
            certify_slice,
            shared,
            parts,
            on_result=unpacked,
            stats=ray.stats,
            cache_shared=True,
        )
        results = [(torch.from_numpy(r.mask()), r.n_nonfinite) for r in found]
    masks = [m for m, _ in results]
    for c in class_n:
        class_k.setdefault(c, 0)
    mask = torch.cat(masks) if masks else torch.zeros(0, dtype=torch.bool)
    return StreamCounts(mask, sum(nf for _, nf in results), class_n, class_k, digest)


def run_certify_stream(
    model_path: Path,
    lid_path: Path,
    folder: Path,
    *,
    target: float | None,
    beta: float,
    bound_kind: BoundKind,
    method: CertMethod,
    metric: Metric = "accuracy",
    ray: RayCertifier | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> dict[str, Any]:
    """`verifier.pipeline.run_certify` for a stream folder: the same document, the data read
    chunk by chunk (every sample counts as held out).

    Raises:
        DataError: a bad stream folder or one that does not fit the model.
        DomainError: the LID does not fit the model.
    """
    lid = load_lid(lid_path)
    graph = load_bounded_graph(model_path, list(lid.domain.lower))
    check_lid_matches(lid, graph.parameters, source=str(lid_path))
    if type(graph).prepare_data is not Graph.prepare_data:
        raise DataError(
            f"{folder}: a stream folder needs the model's own inputs; this model has a frozen "
            "prefix (map the samples to its features first, or use an in-memory data set)"
        )
    stream = open_stream(folder)
    found = certify_stream(
        graph, lid.domain, stream, method=method, ray=ray, on_progress=on_progress
    )
    cert = certificate_from_counts(
        found.class_n,
        found.class_k,
        task=str(folder),
        metric=metric,
        target=0.0 if target is None else target,
        beta=beta,
        bound_kind=bound_kind,
        method=method,
        n_nonfinite=found.n_nonfinite,
    )
    doc = cert.to_json()
    model_sha = file_sha256(model_path)
    doc.update(
        holds=cert.holds if target is not None else None,
        verdict=("holds" if cert.holds else "not met") if target is not None else "computed",
        model_sha256=model_sha,
        lid_sha256=file_sha256(lid_path),
        data_sha256=stream_sha256(stream, found.x_digest),
        lid_model_match=lid.model_sha256 == model_sha,
    )
    return doc

"""verifier.runtime: the allocator settings long CPU jobs start with."""

from __future__ import annotations

import platform
import sys

import pytest
import torch

from verifier.runtime import tune_allocator


@pytest.mark.skipif(
    not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc",
    reason="glibc only",
)
def test_the_thresholds_apply_on_glibc_and_work_goes_on() -> None:
    assert tune_allocator() is True
    assert tune_allocator() is True  # idempotent
    # large blocks are still allocated, used and freed correctly after the change
    blocks = [torch.full((8 << 20,), float(i)) for i in range(4)]
    assert [float(b.sum()) for b in blocks] == [float(i * (8 << 20)) for i in range(4)]

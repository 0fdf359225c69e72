"""Synthetic continual-learning data for tests: ten separated Gaussian clusters."""

from __future__ import annotations

import torch


def clusters(
    n: int, dim: int, seed: int, *, non_negative: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of each of ten well separated Gaussian clusters, shuffled. The centres depend
    on `dim` only, so train and test samples drawn with other seeds share them; every row is
    distinct (continuous noise), so sets of rows identify samples. `non_negative` clamps the
    features at 0 (like ReLU features)."""
    centres = 3.0 * torch.rand(10, dim, generator=torch.Generator().manual_seed(dim))
    gen = torch.Generator().manual_seed(seed)
    y = torch.arange(10).repeat_interleave(n)
    x = centres[y] + 0.3 * torch.randn(len(y), dim, generator=gen)
    if non_negative:
        x = x.clamp_min(0.0)
    perm = torch.randperm(len(y), generator=gen)
    return x[perm], y[perm]

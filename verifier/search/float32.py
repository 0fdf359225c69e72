"""Float32 rounding toward the inside of a box.

The search runs in float32 while proofs run in float64: corners are rounded inward so that a
float32 box is a subset of the float64 one (still sound), and projected float32 weights lie
exactly inside it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from verifier.domains.box import Box


def inward_float32(box: Box) -> Box:
    """Round corners to float32 toward the inside of the box (a subset: still sound).

    The corners are returned as float64 tensors holding float32-representable values.
    """
    lower, upper = {}, {}
    for name, lo in box.lower.items():
        lo64, up64 = lo.to(torch.float64), box.upper[name].to(torch.float64)
        lo32, up32 = lo64.to(torch.float32), up64.to(torch.float32)
        inf = torch.tensor(float("inf"), dtype=torch.float32, device=lo32.device)
        lo32 = torch.where(lo32.to(torch.float64) < lo64, torch.nextafter(lo32, inf), lo32)
        up32 = torch.where(up32.to(torch.float64) > up64, torch.nextafter(up32, -inf), up32)
        lower[name], upper[name] = lo32.to(torch.float64), up32.to(torch.float64)
    return Box(lower, upper)


def down_float32(value: Tensor) -> Tensor:
    """max(value, 0) as float32, rounded toward zero (a cap never exceeds the true room)."""
    value = value.clamp(min=0)
    down = value.float()
    zero = torch.zeros((), dtype=torch.float32, device=down.device)
    return torch.where(down.double() > value, torch.nextafter(down, zero), down)

"""Box LIDs: {θ : lower <= θ <= upper}, one tensor pair per named parameter."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch
from torch import Tensor

from verifier.errors import DomainError

if TYPE_CHECKING:
    from verifier.domains.zonotope import Zonotope

SizeKind = Literal["mean_width", "mean_log_width", "layer_log_width", "log_volume"]
LOG_WIDTH_FLOOR = 1e-12


@dataclass(frozen=True, eq=False)
class Box:
    """The region {θ : lower <= θ <= upper}; parameters not named are not part of the box.

    Corners may be asymmetric around the model's weights. A box is a value: operations return
    new boxes.
    """

    lower: Mapping[str, Tensor]
    upper: Mapping[str, Tensor]

    def __post_init__(self) -> None:
        if set(self.lower) != set(self.upper):
            missing = sorted(set(self.lower) ^ set(self.upper))
            raise DomainError(f"box corners name different parameters: {missing}")
        for name, lo in self.lower.items():
            up = self.upper[name]
            if lo.shape != up.shape:
                raise DomainError(
                    f"parameter '{name}': lower has shape {tuple(lo.shape)}, "
                    f"upper has shape {tuple(up.shape)}"
                )
            if not (bool(torch.isfinite(lo).all()) and bool(torch.isfinite(up).all())):
                raise DomainError(f"parameter '{name}': box corners contain NaN or Inf")
            if bool((lo > up).any()):
                raise DomainError(f"parameter '{name}': lower corner exceeds upper corner")

    @classmethod
    def around(
        cls,
        centre: Mapping[str, Tensor],
        *,
        radius: float,
        relative: float = 0.0,
    ) -> Box:
        """The box centre ± (radius + relative*|centre|), elementwise."""
        lower, upper = {}, {}
        for name, value in centre.items():
            r = radius + relative * value.abs()
            lower[name], upper[name] = value - r, value + r
        return cls(lower, upper)

    @property
    def names(self) -> list[str]:
        """The boxed parameter names, in insertion order."""
        return list(self.lower)

    def n_parameters(self) -> int:
        """Number of scalar parameters the box constrains."""
        return sum(t.numel() for t in self.lower.values())

    def widths(self) -> dict[str, Tensor]:
        """upper - lower per parameter."""
        return {n: self.upper[n] - self.lower[n] for n in self.lower}

    def contains(self, theta: Mapping[str, Tensor], *, atol: float = 0.0) -> bool:
        """True if every boxed parameter of theta lies in the box (within atol), in float64."""
        for name, lo in self.lower.items():
            if name not in theta:
                return False
            value = theta[name].to(torch.float64)
            if value.shape != lo.shape:
                return False
            if bool((value < lo.to(torch.float64) - atol).any()):
                return False
            if bool((value > self.upper[name].to(torch.float64) + atol).any()):
                return False
        return True

    def project(self, theta: Mapping[str, Tensor]) -> dict[str, Tensor]:
        """Euclidean projection onto the box (a clamp); parameters not boxed pass through."""
        out = dict(theta)
        for name, lo in self.lower.items():
            value = theta[name]
            out[name] = torch.clamp(
                value, lo.to(value.dtype).to(value.device), self.upper[name].to(value)
            )
        return out

    def intersect(self, outer: Box) -> Box:
        """The intersection with another box (parameters boxed in only one keep that box).

        Raises:
            DomainError: the intersection is empty for some parameter.
        """
        lower, upper = dict(self.lower), dict(self.upper)
        for name, lo in outer.lower.items():
            if name in lower:
                lower[name] = torch.maximum(lower[name], lo.to(lower[name]))
                upper[name] = torch.minimum(upper[name], outer.upper[name].to(upper[name]))
            else:
                lower[name], upper[name] = lo, outer.upper[name]
        return Box(lower, upper)

    def interval_hull(self) -> Box:
        """The box itself: a box is its own interval hull (as `Zonotope.interval_hull`), so
        code that needs a box from either domain calls `domain.interval_hull()`."""
        return self

    def scaled(self, centre: Mapping[str, Tensor], factor: float) -> Box:
        """Shrink (factor < 1) or grow the box toward/away from `centre` (which it contains)."""
        lower, upper = {}, {}
        for name, lo in self.lower.items():
            c = centre[name].to(lo)
            lower[name] = c - factor * (c - lo)
            upper[name] = c + factor * (self.upper[name] - c)
        return Box(lower, upper)

    def size(self, kind: SizeKind = "mean_width") -> float:
        """Size measure: mean width, mean log-width (widths floored at 1e-12), the mean over
        tensors of each tensor's mean log-width (`layer_log_width`: every tensor counts alike,
        however many entries it has), or log-volume."""
        if kind == "layer_log_width":
            per_tensor = [
                torch.log(w.to(torch.float64).clamp(min=LOG_WIDTH_FLOOR)).mean()
                for w in self.widths().values()
                if w.numel()
            ]
            return float(torch.stack(per_tensor).mean()) if per_tensor else 0.0
        widths = torch.cat([w.flatten().to(torch.float64) for w in self.widths().values()])
        if widths.numel() == 0:
            return 0.0
        if kind == "mean_width":
            return float(widths.mean())
        logs = torch.log(widths.clamp(min=LOG_WIDTH_FLOOR))
        return float(logs.mean()) if kind == "mean_log_width" else float(logs.sum())

    def sample(
        self,
        n: int,
        *,
        generator: torch.Generator,
        kind: Literal["uniform", "vertex"] = "uniform",
    ) -> Iterator[dict[str, Tensor]]:
        """Draw n parameter dictionaries from the box, uniformly or among its vertices."""
        for _ in range(n):
            theta = {}
            for name, lo in self.lower.items():
                up = self.upper[name]
                if kind == "uniform":
                    u = torch.rand(lo.shape, generator=generator, dtype=torch.float64)
                else:
                    u = torch.randint(0, 2, lo.shape, generator=generator).to(torch.float64)
                lo64, up64 = lo.to(torch.float64), up.to(torch.float64)
                theta[name] = lo64 + u * (up64 - lo64)
            yield theta

    def to(self, dtype: torch.dtype, device: torch.device | str | None = None) -> Box:
        """The same box with corners in another dtype/device (float64 widening is exact)."""
        return Box(
            {n: t.to(dtype=dtype, device=device) for n, t in self.lower.items()},
            {n: t.to(dtype=dtype, device=device) for n, t in self.upper.items()},
        )


def width_summary(box: Box | Zonotope) -> dict[str, dict[str, float]]:
    """Per-tensor width statistics (mean, max, total, fraction of zero-width entries).

    For a zonotope these are the widths of its interval hull (`Zonotope.widths`).
    """
    out = {}
    for name, w in box.widths().items():
        w64 = w.to(torch.float64)
        out[name] = {
            "mean_width": float(w64.mean()),
            "max_width": float(w64.max()),
            "total_width": float(w64.sum()),
            "frozen_fraction": float((w64 == 0).to(torch.float64).mean()),
            "n": int(w64.numel()),
        }
    return out

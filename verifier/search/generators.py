"""The variables of a zonotope search: box widths plus k generators, their size measure, and the
initial generators (random isotropic or look-ahead directions).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from verifier.domains.box import Box
from verifier.domains.zonotope import Zonotope
from verifier.errors import SpecError
from verifier.graph import Graph
from verifier.search.dual import SearchTask
from verifier.search.float32 import inward_float32
from verifier.search.importance import fisher_importance
from verifier.spec import SearchSection, ZonotopeSection

BUILD_FLOOR = 2.0**-19
"""Box width kept on entries that generators move, relative to |θ0| + d + Σ|G| (twice
`verifier.domains.zonotope.WIDTH_FLOOR`, so inward float32 rounding keeps it above that)."""


class ZonotopeVariables:
    """The search variables d_lo, d_hi >= 0 (box part) and G (k, *shape), and their projection."""

    def __init__(
        self,
        theta0: Mapping[str, Tensor],
        search: SearchSection,
        config: ZonotopeSection,
        initial: Mapping[str, Tensor],
        outer: Box | None,
        frozen: Mapping[str, Tensor] | None,
        start: Box | None = None,
    ) -> None:
        """Start at `start` (default: the box of width `search.init_width`) plus `initial`.

        Args:
            theta0: the parameters' values (float32), keyed by name.
            search: the search settings (init_width, max_width, size).
            config: the zonotope settings.
            initial: initial generators, (k, *shape) per name.
            outer: the interval hull must stay inside this box.
            frozen: masks of entries kept at θ0 (zero width, zero in every generator).
            start: the box part to start from (it must contain θ0).
        """
        half = search.init_width / 2
        self.theta0 = dict(theta0)
        self.config = config
        self.size_kind = search.size
        self.max_width = search.max_width
        if start is None:
            self.d_lo = {n: torch.full_like(t, half) for n, t in theta0.items()}
            self.d_hi = {n: torch.full_like(t, half) for n, t in theta0.items()}
        else:
            self.d_lo = {n: (t - start.lower[n].to(t)).clamp(min=0) for n, t in theta0.items()}
            self.d_hi = {n: (start.upper[n].to(t) - t).clamp(min=0) for n, t in theta0.items()}
        for t in [*self.d_lo.values(), *self.d_hi.values()]:
            t.requires_grad_(True)
        self.gens = {n: initial[n].clone().to(t).requires_grad_(True) for n, t in theta0.items()}
        self.cap_lo: dict[str, Tensor] = {}
        self.cap_hi: dict[str, Tensor] = {}
        self.free: dict[str, Tensor] = {}
        for n, t in theta0.items():
            cap_lo = torch.full_like(t, math.inf)
            cap_hi = torch.full_like(t, math.inf)
            if outer is not None and n in outer.lower:
                t64 = t.double()
                cap_lo = (t64 - outer.lower[n].to(t.device).double()).clamp(min=0).to(t.dtype)
                cap_hi = (outer.upper[n].to(t.device).double() - t64).clamp(min=0).to(t.dtype)
            free = torch.ones_like(t, dtype=torch.bool)
            if frozen is not None and n in frozen:
                free = ~frozen[n].to(t.device)
            cap_lo = torch.where(free, cap_lo, torch.zeros_like(t))
            cap_hi = torch.where(free, cap_hi, torch.zeros_like(t))
            self.cap_lo[n], self.cap_hi[n], self.free[n] = cap_lo, cap_hi, free
        self.n_free = sum(int(((self.cap_lo[n] + self.cap_hi[n]) > 0).sum()) for n in theta0)
        self.project()

    def box_variables(self) -> list[Tensor]:
        """d_lo and d_hi tensors (for the optimiser)."""
        return list(self.d_lo.values()) + list(self.d_hi.values())

    def generator_variables(self) -> list[Tensor]:
        """The generator tensors (for the optimiser)."""
        return list(self.gens.values())

    @torch.no_grad()
    def project(self) -> None:
        """d >= 0, frozen entries 0, hull inside the outer box and at most max_width wide."""
        for n in self.d_lo:
            lo, hi, g = self.d_lo[n], self.d_hi[n], self.gens[n]
            g.mul_(self.free[n])
            lo.clamp_(min=0)
            hi.clamp_(min=0)
            mass = g.abs().sum(dim=0)
            factor = torch.ones_like(lo)
            for cap, d in ((self.cap_lo[n], lo), (self.cap_hi[n], hi)):
                extent = d + mass
                factor = torch.minimum(
                    factor, torch.where(extent > cap, cap / extent.clamp(min=1e-30), 1.0)
                )
            if self.max_width is not None:
                total = lo + hi + 2 * mass
                factor = torch.minimum(
                    factor,
                    torch.where(
                        total > self.max_width, self.max_width / total.clamp(min=1e-30), 1.0
                    ),
                )
            lo.mul_(factor)
            hi.mul_(factor)
            g.mul_(factor)

    def corners(self) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
        """Box-part corners θ0 - d_lo, θ0 + d_hi (differentiable)."""
        lower = {n: self.theta0[n] - self.d_lo[n] for n in self.d_lo}
        upper = {n: self.theta0[n] + self.d_hi[n] for n in self.d_hi}
        return lower, upper

    def size(self) -> Tensor:
        """The size S being maximised (see the module docstring); differentiable."""
        k = self.config.k
        flat = torch.cat([g.reshape(k, math.prod(g.shape[1:])) for g in self.gens.values()], 1)
        widths = torch.cat([(self.d_lo[n] + self.d_hi[n]).flatten() for n in self.d_lo])
        return self._measure(widths, flat)

    def measure(self, zonotope: Zonotope) -> float:
        """S of a built zonotope (same formula as `size`, float64)."""
        k = zonotope.n_generators
        widths = torch.cat(
            [(zonotope.upper[n] - zonotope.lower[n]).flatten().cpu() for n in self.d_lo]
        )
        flat = torch.cat(
            [zonotope.generators[n].reshape(k, -1 if k else 0).cpu() for n in self.d_lo], 1
        )
        return float(self._measure(widths.double(), flat.double()))

    def _measure(self, widths: Tensor, generators: Tensor) -> Tensor:
        order = 2 if self.config.size == "isotropic_width" else 1
        norms = torch.linalg.vector_norm(generators, ord=order, dim=1)
        free = torch.cat([self.free[n].flatten() for n in self.free]).to(widths.device)
        return size_measure(
            widths, norms, free, self.n_free, self.size_kind, self.config.generator_weight
        )

    def hull_mean_width(self) -> float:
        """Mean width of the interval hull over all entries."""
        with torch.no_grad():
            total = sum(
                float((self.d_lo[n] + self.d_hi[n] + 2 * self.gens[n].abs().sum(0)).sum())
                for n in self.d_lo
            )
            count = sum(t.numel() for t in self.d_lo.values())
        return total / max(count, 1)

    @torch.no_grad()
    def zonotope(self, factor: float = 1.0) -> Zonotope:
        """The current zonotope (scaled toward θ0 by `factor`), float64, ready to certify."""
        return build_zonotope(
            self.theta0,
            {n: factor * t for n, t in self.d_lo.items()},
            {n: factor * t for n, t in self.d_hi.items()},
            {n: factor * t for n, t in self.gens.items()},
            self.cap_lo,
            self.cap_hi,
        )


def size_measure(
    widths: Tensor,
    norms: Tensor,
    free: Tensor,
    n_free: int,
    kind: str,
    weight: float,
) -> Tensor:
    """The zonotope search's size S (differentiable).

    mean_width: (Σ_free w_i + 2 γ Σ_k ||G_k||) / p. mean_log_width: (Σ_free log w_i +
    γ Σ_k log(1 + 2 ||G_k|| / w_g)) / p with w_g the geometric mean of the free widths: each
    generator adds the log-volume of a segment on a box of width w_g (0 for G_k = 0, so the
    box's own S is its mean log width).

    Args:
        widths: box-part widths, flat, shape (p_all,).
        norms: generator norms, shape (k,).
        free: boolean mask of the entries that may move, shape (p_all,).
        n_free: p, the number of free entries.
        kind: search.size ("mean_width" or "mean_log_width").
        weight: γ.
    """
    p = max(n_free, 1)
    mask = free.to(widths.dtype)
    if kind == "mean_width":
        return ((widths * mask).sum() + 2 * weight * norms.sum()) / p
    logs = torch.log(widths + 1e-12) * mask
    typical = torch.exp(logs.sum() / p)
    return (logs.sum() + weight * torch.log1p(2 * norms / typical).sum()) / p


def build_zonotope(
    theta0: Mapping[str, Tensor],
    d_lo: Mapping[str, Tensor],
    d_hi: Mapping[str, Tensor],
    generators: Mapping[str, Tensor],
    cap_lo: Mapping[str, Tensor],
    cap_hi: Mapping[str, Tensor],
) -> Zonotope:
    """A float64 zonotope from search variables: float32-inward corners, representable.

    Entries that generators move get a box width of at least BUILD_FLOOR times their magnitude
    (on both sides of θ0), unless the outer caps forbid it; there the generators' entries are
    dropped. (Any such change is harmless: every candidate is certified as built.)
    """
    lower, upper, gens = {}, {}, {}
    for n, t in theta0.items():
        t64 = t.detach().double()
        lo, hi = d_lo[n].detach().double(), d_hi[n].detach().double()
        g = generators[n].detach().double()
        mass = g.abs().sum(dim=0)
        floor = BUILD_FLOOR * (t64.abs() + lo + hi + mass)
        moved = mass > 0
        lo_f = torch.where(moved, torch.maximum(lo, floor), lo)
        hi_f = torch.where(moved, torch.maximum(hi, floor), hi)
        fits = (lo_f + mass <= cap_lo[n].double()) & (hi_f + mass <= cap_hi[n].double())
        keep = ~moved | fits
        lower[n] = t64 - torch.where(keep, lo_f, lo)
        upper[n] = t64 + torch.where(keep, hi_f, hi)
        gens[n] = g * keep
    box = inward_float32(Box(lower, upper))
    return Zonotope(dict(box.lower), dict(box.upper), gens)


def lookahead_directions(
    graph: Graph,
    names: Sequence[str],
    k: int,
    x: Tensor,
    y: Tensor,
    *,
    batch_size: int = 32,
    max_samples: int = 2048,
) -> dict[str, Tensor]:
    """The k principal directions of mini-batch loss gradients on (x, y), pointing downhill.

    Gradients of the mean cross-entropy at θ0 over batches of `batch_size` (at most
    `max_samples` samples) form the rows of M; the directions are M's top-k right singular
    vectors, each signed to descend the mean gradient; unit Euclidean norm, keyed by name
    with shape (k, *shape). Fewer batches than k leave the remaining directions zero.
    """
    theta = {n: graph.parameters[n].detach().float().clone().requires_grad_(True) for n in names}
    rows = []
    x, y = x[:max_samples].float(), y[:max_samples]
    for start in range(0, x.shape[0], batch_size):
        logits = graph.forward(x[start : start + batch_size], theta)
        loss = torch.nn.functional.cross_entropy(logits, y[start : start + batch_size])
        grads = torch.autograd.grad(loss, [theta[n] for n in names])
        rows.append(torch.cat([g.flatten() for g in grads]))
    matrix = torch.stack(rows).double()
    _, _, vh = torch.linalg.svd(matrix, full_matrices=False)
    directions = torch.zeros((k, matrix.shape[1]), dtype=torch.float64)
    used = min(k, vh.shape[0])
    directions[:used] = vh[:used]
    signs = torch.sign(-(directions @ matrix.mean(dim=0)))
    directions = directions * torch.where(signs == 0, 1.0, signs)[:, None]
    out, offset = {}, 0
    for n in names:
        size = graph.parameters[n].numel()
        shape = graph.parameters[n].shape
        out[n] = directions[:, offset : offset + size].reshape(k, *shape).float()
        offset += size
    return out


def initial_generators(
    graph: Graph,
    names: Sequence[str],
    config: ZonotopeSection,
    tasks: Sequence[SearchTask],
    *,
    generator: torch.Generator,
    lookahead: tuple[Tensor, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The starting generators, (k, *shape) float32 per name, with root-mean-square entry
    `config.init_scale` (see `ZonotopeSection.init`).

    Raises:
        SpecError: init is "lookahead" and no look-ahead data is given.
    """
    k = config.k
    raw = {
        n: torch.randn((k, *graph.parameters[n].shape), generator=generator, dtype=torch.float32)
        for n in names
    }
    if config.init == "fisher" and k > 0:
        x = torch.cat([t.x.cpu() for t in tasks])[:512].float()
        y = torch.cat([t.y.cpu() for t in tasks])[:512]
        fisher = fisher_importance(graph, names, x, y)
        mean = torch.cat([f.flatten() for f in fisher.values()]).mean()
        raw = {n: raw[n] * (fisher[n].float() + mean + 1e-12).rsqrt() for n in names}
    if config.init == "lookahead" and k > 0:
        if lookahead is None:
            raise SpecError(
                "zonotope.init: lookahead needs the next task's data in search.importance.lookahead"
            )
        raw = lookahead_directions(graph, names, k, lookahead[0].cpu(), lookahead[1].cpu())
    flat = torch.cat([g.flatten() for g in raw.values()]) if raw else torch.zeros(0)
    rms = float(flat.pow(2).mean().sqrt()) if flat.numel() else 1.0
    scale = config.init_scale / max(rms, 1e-30)
    return {n: g * scale for n, g in raw.items()}

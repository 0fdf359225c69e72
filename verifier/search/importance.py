"""Parameter importance for biased searches: Fisher and SI importance, and the masks that freeze
the least important fraction (the paper's look-ahead bias, DESIGN.md §3).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch
from torch import Tensor

from verifier.graph import Graph

SI_BATCH, SI_LR, SI_XI = 64, 1e-3, 1e-3


def fisher_importance(
    graph: Graph, names: Sequence[str], x: Tensor, y: Tensor
) -> dict[str, Tensor]:
    """Diagonal empirical Fisher information E[(∂ log p(y|x) / ∂θ)^2] of the named parameters."""
    from torch.func import grad, vmap

    params = {n: graph.parameters[n].to(x.device) for n in names}

    def log_prob(theta: dict[str, Tensor], xi: Tensor, yi: Tensor) -> Tensor:
        logits = graph.forward(xi.unsqueeze(0), theta)
        return torch.log_softmax(logits, dim=1)[0].gather(0, yi.reshape(1))[0]

    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for start in range(0, x.shape[0], 128):
        grads = vmap(grad(log_prob), in_dims=(None, 0, 0))(
            params, x[start : start + 128], y[start : start + 128]
        )
        for n in names:
            total[n] += grads[n].pow(2).sum(0)
    return {n: t / max(x.shape[0], 1) for n, t in total.items()}


def si_importance(
    graph: Graph,
    names: Sequence[str],
    x: Tensor,
    y: Tensor,
    *,
    generator: torch.Generator,
) -> dict[str, Tensor]:
    """Synaptic-Intelligence importance (Zenke et al., ICML 2017, Eq. 5) from given data.

    Trains a copy of the named parameters for one epoch over (x, y) (Adam, lr 1e-3, batch
    64; the rest fixed), accumulating the path integral ω = Σ_t -g(t) Δθ(t) of each entry's
    contribution to the drop in loss, and returns Ω = max(ω, 0) / (Δ² + ξ), ξ = 1e-3, with Δ
    the entry's total change. The graph itself is not modified.
    """
    theta = {n: graph.parameters[n].to(x.device).clone().requires_grad_(True) for n in names}
    start = {n: t.detach().clone() for n, t in theta.items()}
    omega = {n: torch.zeros_like(t) for n, t in theta.items()}
    optimiser = torch.optim.Adam(list(theta.values()), lr=SI_LR)
    order = torch.randperm(x.shape[0], generator=generator).to(x.device)
    for i in range(0, x.shape[0], SI_BATCH):
        idx = order[i : i + SI_BATCH]
        before = {n: t.detach().clone() for n, t in theta.items()}
        optimiser.zero_grad()
        loss = torch.nn.functional.cross_entropy(graph.forward(x[idx], theta), y[idx])
        loss.backward()
        grads = {n: t.grad.detach().clone() for n, t in theta.items() if t.grad is not None}
        optimiser.step()
        for n, t in theta.items():
            if n in grads:
                omega[n] -= grads[n] * (t.detach() - before[n])
    return {
        n: omega[n].clamp(min=0) / ((theta[n].detach() - start[n]).pow(2) + SI_XI) for n in names
    }


def frozen_by_importance(importance: Mapping[str, Tensor], fraction: float) -> dict[str, Tensor]:
    """Masks (True = frozen) of the `fraction` of entries with the lowest importance."""
    flat = torch.cat([v.flatten() for v in importance.values()])
    n_freeze = int(fraction * flat.numel())
    if n_freeze == 0:
        return {n: torch.zeros_like(v, dtype=torch.bool) for n, v in importance.items()}
    threshold = torch.kthvalue(flat, n_freeze).values
    return {n: v <= threshold for n, v in importance.items()}

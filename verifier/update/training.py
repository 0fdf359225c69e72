"""Projected training: any torch optimiser step, then the projection onto the LID.

This is projected gradient descent with the LID as the feasible set ("PGD with LID"): after
every step the boxed parameters are clamped into the box (for a zonotope LID, projected jointly
onto it with one `Zonotope.project` call, since its coefficients ε are shared by all tensors),
so at every point of training the network lies in the LID and its certificate applies. The
parameters the LID does not box must keep the values of the model the LID was computed for;
`TrainableGraph(graph, names=box.names)` makes only the boxed ones trainable.

Parameters are keyed by ONNX initializer name. A `TrainableGraph` turns any verifier `Graph`
into an `nn.Module` with one `nn.Parameter` per initializer; for a module of your own,
`match_parameters` maps initializer names to its parameters (by name, then by unique shape),
or you pass the mapping yourself.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from verifier.domains.box import Box
from verifier.domains.io import LidFile
from verifier.domains.zonotope import Zonotope
from verifier.errors import DomainError
from verifier.graph import Graph
from verifier.update.projection import representable_corners


class TrainableGraph(nn.Module):
    """A verifier `Graph` as an `nn.Module` whose parameters are its ONNX initializers.

    Attributes:
        graph: the op graph (its own parameter values are not used after construction).
        trainable_names: initializer names held as `nn.Parameter`s, in graph order.
        frozen_names: the other parameters, held as buffers (they move with `.to()`).
    """

    def __init__(self, graph: Graph, *, names: Iterable[str] | None = None) -> None:
        """Copy the graph's parameters into the module.

        Args:
            graph: the network, e.g. from `verifier.load_model`.
            names: the initializers to train (default: all); pass `lid.box.names` so the
                parameters the LID does not box stay fixed.

        Raises:
            DomainError: a name is not a parameter of the graph.
        """
        super().__init__()
        self.graph = graph
        chosen = list(graph.parameters) if names is None else list(names)
        unknown = [n for n in chosen if n not in graph.parameters]
        if unknown:
            raise DomainError(
                f"{unknown} are not parameters of the graph; known: {list(graph.parameters)}"
            )
        self.trainable_names = [n for n in graph.parameters if n in chosen]
        self.frozen_names = [n for n in graph.parameters if n not in chosen]
        # nn.Module names may not contain ".", which initializer names often do
        self.weights = nn.ParameterList(
            nn.Parameter(graph.parameters[n].detach().clone()) for n in self.trainable_names
        )
        for i, name in enumerate(self.frozen_names):
            self.register_buffer(f"frozen_{i}", graph.parameters[name].detach().clone())

    def onnx_parameters(self) -> dict[str, Tensor]:
        """The live tensors keyed by initializer name (`nn.Parameter`s and frozen buffers)."""
        out: dict[str, Tensor] = dict(zip(self.trainable_names, self.weights, strict=True))
        for i, name in enumerate(self.frozen_names):
            out[name] = getattr(self, f"frozen_{i}")
        return {n: out[n] for n in self.graph.parameters}

    def theta(self) -> dict[str, Tensor]:
        """Detached copies of every parameter, keyed by initializer name."""
        return {n: t.detach().clone() for n, t in self.onnx_parameters().items()}

    def forward(self, x: Tensor) -> Tensor:
        """Logits for a batch x of shape (batch, *graph.input_shape)."""
        return self.graph.forward(x, self.onnx_parameters())

    def save(self, source: Path | str, out: Path | str) -> None:
        """Write the ONNX model `source` with this module's parameter values to `out`.

        The values are rounded to each initializer's dtype; for float32 models (and a LID from
        `verifier lid`) a projected module stays in the LID exactly. Run `verifier project` on
        the result for the float64 membership check and the certificate.
        """
        from verifier.onnx.export import save_with_parameters

        save_with_parameters(Path(source), self.theta(), Path(out))


def match_parameters(
    module: nn.Module,
    shapes: Mapping[str, tuple[int, ...]],
    *,
    names: Mapping[str, str] | None = None,
) -> dict[str, Tensor]:
    """Map initializer names to the parameters of `module`.

    Order of matching: the explicit `names` mapping (initializer -> module parameter name);
    for a `TrainableGraph`, its own mapping; then equal names (torch's ONNX exporter keeps
    `fc1.weight`); then a shape that exactly one remaining module parameter has.

    Args:
        module: the module being trained.
        shapes: shape per initializer name to match (e.g. a LID's boxed parameters).
        names: optional explicit mapping, initializer name -> `module.named_parameters()` name.

    Returns:
        The module's parameter tensors keyed by initializer name.

    Raises:
        DomainError: a name cannot be matched, is ambiguous, or has another shape.
    """
    if isinstance(module, TrainableGraph) and names is None:
        available = module.onnx_parameters()
        direct = {n: available[n] for n in shapes if n in available}
    else:
        available = dict(module.named_parameters())
        direct = {}
        for init, param_name in (names or {}).items():
            if param_name not in available:
                raise DomainError(f"'{param_name}' (for '{init}') is not a parameter of the module")
            direct[init] = available[param_name]
        for init in shapes:
            if init not in direct and init in available:
                direct[init] = available[init]
    used = {id(t) for t in direct.values()}
    out: dict[str, Tensor] = {}
    for init, shape in shapes.items():
        if init in direct:
            out[init] = direct[init]
            continue
        same = [
            (n, t) for n, t in available.items() if id(t) not in used and tuple(t.shape) == shape
        ]
        if len(same) != 1:
            found = "none" if not same else f"several ({[n for n, _ in same]})"
            raise DomainError(
                f"initializer '{init}' {shape}: no module parameter of that name, and {found} "
                "of that shape; pass names={initializer: module parameter name}"
            )
        out[init] = same[0][1]
        used.add(id(same[0][1]))
    for init, shape in shapes.items():
        if tuple(out[init].shape) != tuple(shape):
            raise DomainError(
                f"initializer '{init}' has shape {tuple(shape)} in the LID but the module "
                f"parameter has {tuple(out[init].shape)}; transpose it or build a TrainableGraph"
            )
    return out


class SafeUpdate:
    """Keeps parameters inside a LID: `project()` moves them into it in place.

    Box LIDs: corners are rounded inward to each parameter's dtype once, so the clamp is exact
    and the result lies in the LID in float64 (`contains()` checks it). Zonotope LIDs: all
    boxed tensors are projected jointly by `Zonotope.project`, which returns values in each
    tensor's dtype that lie in the zonotope exactly (float64 check) and keeps values already
    inside bit for bit; the results are copied back. Works on any device.
    """

    def __init__(
        self,
        target: nn.Module | Mapping[str, Tensor],
        lid: Box | Zonotope | LidFile,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        """Bind a module (or a dict of tensors keyed by initializer name) to a LID.

        Args:
            target: the module being trained, or its tensors keyed by initializer name.
            lid: the LID (a `Box`, a `Zonotope`, or a `LidFile` from `verifier.load_lid`).
            names: for a module: initializer name -> module parameter name, where matching by
                name and unique shape (`match_parameters`) is not enough.

        Raises:
            DomainError: a boxed parameter is missing, has another shape, or its box holds no
                value of the parameter's dtype.
        """
        self.domain: Box | Zonotope = lid.domain if isinstance(lid, LidFile) else lid
        shapes = {n: tuple(t.shape) for n, t in self.domain.lower.items()}
        if isinstance(target, nn.Module):
            self.tensors = match_parameters(target, shapes, names=names)
            boxed = {id(t) for t in self.tensors.values()}
            loose = [
                n for n, p in target.named_parameters() if p.requires_grad and id(p) not in boxed
            ]
            if loose:
                warnings.warn(
                    f"parameters {loose} are trainable but not in the LID; its certificate "
                    "assumes they keep their values: freeze them (requires_grad_(False))",
                    stacklevel=2,
                )
        else:
            missing = [n for n in shapes if n not in target]
            if missing:
                raise DomainError(f"the LID boxes {missing}, which are not among the tensors")
            self.tensors = {n: target[n] for n in shapes}
            for n, shape in shapes.items():
                if tuple(self.tensors[n].shape) != shape:
                    raise DomainError(
                        f"parameter '{n}' has shape {tuple(self.tensors[n].shape)}; the LID "
                        f"has {shape}"
                    )
        self._corners: dict[str, tuple[Tensor, Tensor]] = {}
        if isinstance(self.domain, Box):
            for name in self.domain.names:
                self._corners_for(name)

    @property
    def box(self) -> Box:
        """The LID as a `Box` (box LIDs only).

        Raises:
            DomainError: the LID is a zonotope; use `.domain`.
        """
        if isinstance(self.domain, Zonotope):
            raise DomainError(
                f"this SafeUpdate keeps a zonotope LID (k = {self.domain.n_generators}); use "
                "`.domain`"
            )
        return self.domain

    def _corners_for(self, name: str) -> tuple[Tensor, Tensor]:
        t = self.tensors[name]
        cached = self._corners.get(name)
        if cached is None or cached[0].dtype != t.dtype or cached[0].device != t.device:
            lo, up = representable_corners(
                self.box.lower[name], self.box.upper[name], t.dtype, name=name
            )
            cached = (lo.to(t.device), up.to(t.device))
            self._corners[name] = cached
        return cached

    @torch.no_grad()
    def project(self) -> None:
        """Move every boxed parameter into the LID, in place (the Euclidean projection).

        Raises:
            DomainError: (zonotopes) a projected value cannot be stored in its tensor's dtype
                inside the LID (see `Zonotope.representable`).
        """
        if isinstance(self.domain, Zonotope):
            projected = self.domain.project({n: t.detach() for n, t in self.tensors.items()})
            for name, t in self.tensors.items():
                value = projected[name]
                if value is not t and not torch.equal(value, t):
                    t.copy_(value)
            return
        for name, t in self.tensors.items():
            lo, up = self._corners_for(name)
            t.clamp_(lo, up)

    def contains(self) -> bool:
        """True when every boxed parameter lies in the LID, checked in float64."""
        return self.domain.contains({n: t.detach().cpu() for n, t in self.tensors.items()})

    def attach(self, optimizer: torch.optim.Optimizer) -> RemovableHandle:
        """Project after every `optimizer.step()` (a step post-hook); returns its handle.

        Use this when other code needs the optimiser itself (LR schedulers, AMP's GradScaler).
        """
        return optimizer.register_step_post_hook(lambda *_: self.project())


class ProjectedOptimizer:
    """Wraps any torch optimiser: `step()` takes the optimiser's step, then projects.

    Everything else (`zero_grad`, `param_groups`, `state_dict`, ...) goes to the wrapped
    optimiser; give LR schedulers `.optimizer`. The parameters are projected once on
    construction, so they lie in the LID from the start.
    """

    def __init__(
        self,
        optimizer: torch.optim.Optimizer,
        lid: Box | Zonotope | LidFile | SafeUpdate,
        target: nn.Module | Mapping[str, Tensor] | None = None,
        *,
        names: Mapping[str, str] | None = None,
    ) -> None:
        """Wrap `optimizer`.

        Args:
            optimizer: any `torch.optim.Optimizer` over the module's parameters.
            lid: the LID, or a ready `SafeUpdate` (then leave target and names out).
            target: the module (or tensors by initializer name) the LID constrains.
            names: initializer name -> module parameter name, as for `SafeUpdate`.

        Raises:
            ValueError: target missing for a LID, or given with a `SafeUpdate`.
            DomainError: as for `SafeUpdate`.
        """
        if isinstance(lid, SafeUpdate):
            if target is not None or names is not None:
                raise ValueError("give target and names to the SafeUpdate, not here")
            self.safe = lid
        else:
            if target is None:
                raise ValueError("ProjectedOptimizer needs the module (target) the LID constrains")
            self.safe = SafeUpdate(target, lid, names=names)
        self.optimizer = optimizer
        self.safe.project()

    def step(self, closure: Callable[[], Any] | None = None) -> Any:
        """One optimiser step, then the projection onto the LID; returns the step's result."""
        loss = self.optimizer.step() if closure is None else self.optimizer.step(closure)
        self.safe.project()
        return loss

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Reset the gradients (as the wrapped optimiser does)."""
        self.optimizer.zero_grad(set_to_none=set_to_none)

    @property
    def param_groups(self) -> list[dict[str, Any]]:
        """The wrapped optimiser's parameter groups."""
        return self.optimizer.param_groups

    def state_dict(self) -> dict[str, Any]:
        """The wrapped optimiser's state."""
        return self.optimizer.state_dict()

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore the wrapped optimiser's state."""
        self.optimizer.load_state_dict(state_dict)

    def __getattr__(self, name: str) -> Any:
        if "optimizer" not in self.__dict__:  # during construction or unpickling
            raise AttributeError(name)
        return getattr(self.__dict__["optimizer"], name)

    def __repr__(self) -> str:
        return f"ProjectedOptimizer({self.optimizer!r}, {len(self.safe.tensors)} boxed tensors)"

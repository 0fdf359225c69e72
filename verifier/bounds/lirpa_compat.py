"""Run-time compatibility patches that let auto_LiRPA 0.3 run on torch 2.13 and numpy 2.

auto_LiRPA on PyPI stops at 0.3, which was written for torch < 1.13 and numpy 1. It installs
with ``pip install --no-deps auto_LiRPA==0.3`` and, with the small patches below, builds and
bounds the plain feed-forward modules that `verifier.bounds.lirpa` hands it. We never edit
site-packages: every patch is made here, at run time, and only when the lirpa backend is used
(`import verifier` patches nothing).

Patches 1-4 restore names that auto_LiRPA 0.3 uses and a newer torch or numpy removed or
changed; patches 5-6 fix auto_LiRPA's float64 support (it builds some tensors in the default
dtype), which our proofs need:

1. ``numpy.lib.arraysetops``: numpy 2 made it private (``numpy.lib._arraysetops_impl``);
   ``auto_LiRPA.operators.base`` does ``from numpy.lib.arraysetops import isin``. We register
   an alias module holding the set functions of numpy's public namespace.
2. ``torch.onnx.symbolic_helper._set_opset_version``: removed from torch; auto_LiRPA's graph
   parser calls it before running torch's ONNX graph passes. We add a function that sets the
   exporter's opset global, as the old one did.
3. ``torch._C.Node.__getitem__``: old torch monkey-patched it in ``torch.onnx.utils``; the
   parser reads node attributes as ``node[name]``. We add the same polymorphic getter, which
   dispatches on ``node.kindOf(name)`` to ``node.f`` / ``node.i`` / ``node.s`` / ``node.t`` /
   ``node.fs`` / ``node.is_`` / ...
4. ``BoundedModule._named_members``: torch's ``Module.named_parameters`` and friends now pass
   ``remove_duplicate=...``, which auto_LiRPA's override does not accept. We wrap the override
   so that both call shapes work. This one patches an auto_LiRPA class, so it is applied right
   after auto_LiRPA is imported (here), never on torch's own ``Module``.
5. ``BoundLinear.bound_backward_with_weight``: when CROWN bounds a perturbed-weight layer as an
   intermediate node, the identity spec (``eyeC``) is expanded with ``torch.eye`` in the
   *default* dtype, so float64 models fail with "expected scalar type Double but found Float".
   We expand it ourselves in the dtype of the layer's bounds first. (Not needed for IBP and
   CROWN-IBP; float32 is unaffected.)
6. ``BoundTanh.precompute_relaxation`` / ``bound_relax_impl`` (also used by ``BoundSigmoid``
   and ``BoundAtan``): the tangent-point tables for S-shaped activations are computed when the
   node is built, in the default dtype (float32), taking ~2.5 s per node. In a float64 model
   they fail ("Index put requires the source and destination dtypes match") and, cast
   naively, would give tangent lines that are only float32-valid. We defer the tables to the
   first CROWN relaxation and compute them there with auto_LiRPA's own algorithm, in the
   dtype of the bounds (~0.1 s, once per function and dtype; IBP never needs them).

Importing auto_LiRPA also calls ``warnings.simplefilter("once")`` (in ``auto_LiRPA.utils`` and
``auto_LiRPA.bound_general``) and emits torch's ``torch.jit.script`` deprecation warnings. We
import it inside ``warnings.catch_warnings(record=True)``, which hides that noise and restores
the caller's warning filters afterwards.

auto_LiRPA also imports ``tqdm`` and ``appdirs``; both are runtime dependencies of ours.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from torch import Tensor

from verifier.errors import BackendError

_applied = False

INSTALL_HINT = "pip install --no-deps auto_LiRPA==0.3"

# Patch 6: (activation class, x_limit, step, dtype, device) -> (d_lower, d_upper); read-only.
_TANGENT_TABLES: dict[tuple[str, float, float, torch.dtype, str], tuple[Tensor, Tensor]] = {}

# The functions numpy 1 exposed from numpy.lib.arraysetops; all stay public in numpy 2.
_ARRAYSETOPS_NAMES = (
    "ediff1d",
    "intersect1d",
    "isin",
    "setdiff1d",
    "setxor1d",
    "union1d",
    "unique",
)


def apply_lirpa_compat() -> None:
    """Patch what auto_LiRPA 0.3 needs on torch 2.13 / numpy 2, then import it.

    Idempotent: a second call does nothing. Patches 1-3 restore a name only where it is
    missing; patches 4-6 wrap auto_LiRPA methods once and keep their behaviour otherwise.

    Raises:
        BackendError: auto_LiRPA is not installed, or fails to import even with the patches.
    """
    global _applied
    if _applied:
        return
    if importlib.util.find_spec("auto_LiRPA") is None:
        raise BackendError(f"the lirpa backend needs auto_LiRPA; install it with `{INSTALL_HINT}`")
    # record=True keeps the import's warnings (torch.jit.script deprecations) off the caller's
    # filters, and the context restores the filters auto_LiRPA resets to "once" on import.
    # auto_LiRPA's forward_bound raises the recursion limit to 10^6 on import: deep input (a
    # JSON or YAML file nested 100,000 levels) would then overflow the C stack and crash the
    # process instead of raising RecursionError; keep the interpreter's limit (issue 23)
    recursion_limit = sys.getrecursionlimit()
    with warnings.catch_warnings(record=True):
        _alias_numpy_arraysetops()
        _add_set_opset_version()
        _add_node_getitem()
        try:
            import auto_LiRPA.bound_general
            import auto_LiRPA.operators.activation
            import auto_LiRPA.operators.linear
            import auto_LiRPA.utils
        except ImportError as err:
            raise BackendError(
                f"auto_LiRPA failed to import on torch {torch.__version__} / numpy "
                f"{np.__version__} ({err}); the lirpa backend supports `{INSTALL_HINT}`"
            ) from err
        finally:
            sys.setrecursionlimit(recursion_limit)
    _accept_remove_duplicate(auto_LiRPA.bound_general.BoundedModule)
    _dense_identity_in_weight_backward(
        auto_LiRPA.operators.linear.BoundLinear, auto_LiRPA.utils.eyeC
    )
    _tables_in_bound_dtype(auto_LiRPA.operators.activation.BoundTanh)
    _applied = True


@contextmanager
def onnx_opset_restored() -> Iterator[None]:
    """Restore torch's ONNX-exporter opset global after auto_LiRPA's tracing sets it to 12.

    auto_LiRPA's graph parser calls ``_set_opset_version(12)`` (patch 2) on every
    `BoundedModule` build; wrapping the build in this context leaves torch's state as it was.
    """
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    before = GLOBALS.export_onnx_opset_version
    try:
        yield
    finally:
        GLOBALS.export_onnx_opset_version = before


def _alias_numpy_arraysetops() -> None:
    """Patch 1: register ``numpy.lib.arraysetops`` (made private in numpy 2)."""
    name = "numpy.lib.arraysetops"
    if name in sys.modules or hasattr(np.lib, "arraysetops"):
        return
    module = types.ModuleType(name, "Alias of numpy's set routines for auto_LiRPA 0.3.")
    for attr in _ARRAYSETOPS_NAMES:
        setattr(module, attr, getattr(np, attr))
    module.__all__ = list(_ARRAYSETOPS_NAMES)  # type: ignore[attr-defined]
    sys.modules[name] = module


def _add_set_opset_version() -> None:
    """Patch 2: restore ``torch.onnx.symbolic_helper._set_opset_version``."""
    import torch.onnx.symbolic_helper as symbolic_helper

    if hasattr(symbolic_helper, "_set_opset_version"):
        return
    from torch.onnx._internal.torchscript_exporter._globals import GLOBALS

    def _set_opset_version(opset_version: int) -> None:
        GLOBALS.export_onnx_opset_version = opset_version

    symbolic_helper._set_opset_version = _set_opset_version  # type: ignore[attr-defined]


def _add_node_getitem() -> None:
    """Patch 3: restore ``torch._C.Node.__getitem__`` (attribute access by name)."""
    if hasattr(torch._C.Node, "__getitem__"):
        return

    def _node_getitem(node: torch._C.Node, key: str) -> Any:
        # kindOf names the typed getter: "f", "i", "s", "t", "fs", "is", "ss", "ts", "g", ...
        return getattr(node, node.kindOf(key))(key)

    torch._C.Node.__getitem__ = _node_getitem  # type: ignore[method-assign,attr-defined]


def _accept_remove_duplicate(cls: type[torch.nn.Module]) -> None:
    """Patch 4: let ``cls._named_members`` take torch 2's ``remove_duplicate`` keyword."""
    original = cls.__dict__["_named_members"]
    if getattr(original, "_verifier_compat", False):
        return

    @functools.wraps(original)
    def _named_members(
        self: torch.nn.Module,
        get_members_fn: Callable[[torch.nn.Module], Any],
        prefix: str = "",
        recurse: bool = True,
        remove_duplicate: bool = True,
    ) -> Iterator[tuple[str, Any]]:
        # auto_LiRPA's version always removes duplicates (torch's default); it also maps
        # node names back to the original parameter names, which we must keep.
        del remove_duplicate
        return original(self, get_members_fn, prefix, recurse)

    _named_members._verifier_compat = True  # type: ignore[attr-defined]
    cls._named_members = _named_members  # type: ignore[method-assign]


def _dense_identity_in_weight_backward(cls: type, eye_type: Any) -> None:
    """Patch 5: expand ``eyeC`` specs in the layer's dtype before the weight-perturbed backward."""
    original = cls.__dict__["bound_backward_with_weight"]
    if getattr(original, "_verifier_compat", False):
        return

    def dense(last_A: Any, like: Tensor) -> Any:
        if not isinstance(last_A, eye_type):
            return last_A
        # The same tensor auto_LiRPA builds, (spec, batch, *shape), in like's dtype.
        shape: tuple[int, ...] = tuple(last_A.shape)
        eye = torch.eye(shape[0], dtype=like.dtype, device=like.device)
        return eye.view(shape[0], 1, *shape[2:]).expand(shape)

    @functools.wraps(original)
    def bound_backward_with_weight(
        self: Any,
        last_lA: Any,
        last_uA: Any,
        input_lb: Any,
        input_ub: Any,
        x: Any,
        y: Any,
    ) -> Any:
        like = input_lb[0]
        return original(self, dense(last_lA, like), dense(last_uA, like), input_lb, input_ub, x, y)

    bound_backward_with_weight._verifier_compat = True  # type: ignore[attr-defined]
    cls.bound_backward_with_weight = bound_backward_with_weight  # type: ignore[attr-defined]


def _tables_in_bound_dtype(cls: type) -> None:
    """Patch 6: build the S-shape tangent tables lazily, in the dtype of the bounds."""
    original = cls.__dict__["bound_relax_impl"]
    if getattr(original, "_verifier_compat", False):
        return

    def precompute_relaxation(
        self: Any, name: str, func: Any, dfunc: Any, x_limit: float = 500
    ) -> None:
        # Same settings as auto_LiRPA's; the tables themselves wait for bound_relax_impl.
        del name, func, dfunc
        self.x_limit = x_limit
        self.step_pre = 0.01
        self.num_points_pre = int(self.x_limit / self.step_pre)
        self.d_lower = self.d_upper = None

    @functools.wraps(original)
    def bound_relax_impl(self: Any, x: Any, func: Any, dfunc: Any) -> Any:
        dtype, device = x.lower.dtype, x.lower.device
        if self.d_lower is None or self.d_lower.dtype != dtype:
            key = (type(self).__name__, self.x_limit, self.step_pre, dtype, str(device))
            if key not in _TANGENT_TABLES:
                _TANGENT_TABLES[key] = _tangent_tables(
                    func, dfunc, self.x_limit, self.step_pre, dtype, device
                )
            self.d_lower, self.d_upper = _TANGENT_TABLES[key]
        return original(self, x, func, dfunc)

    bound_relax_impl._verifier_compat = True  # type: ignore[attr-defined]
    cls.precompute_relaxation = precompute_relaxation  # type: ignore[attr-defined]
    cls.bound_relax_impl = bound_relax_impl  # type: ignore[attr-defined]


@torch.no_grad()
def _tangent_tables(
    func: Callable[[Tensor], Tensor],
    dfunc: Callable[[Tensor], Tensor],
    x_limit: float,
    step: float,
    dtype: torch.dtype,
    device: torch.device,
) -> tuple[Tensor, Tensor]:
    """auto_LiRPA 0.3's ``BoundTanh.precompute_relaxation``, in an explicit dtype.

    For grid points u = k*step >= 0, d_lower[k] <= 0 is (by bisection) the tangent point
    closest to 0 whose tangent line stays below func at u; d_upper mirrors it for u <= 0.
    Only points that pass the check are kept, so stopping the bisection early (here once the
    bracket is below the dtype's resolution) loosens the tables but never makes them invalid.
    func at the grid is computed once: float64 tanh of large arguments is slow on CPU. The
    tables depend only on the function and the dtype, so they are shared between nodes.
    """
    n_points = int(x_limit / step) + 5
    grid = step * torch.arange(0, n_points, dtype=dtype, device=device)

    def search(ends: Tensor, f_ends: Tensor, sign: float) -> Tensor:
        # sign -1: tangent at d <= 0 below func at ends >= 0; sign +1: above func at ends <= 0.
        def valid(d: Tensor) -> Tensor:
            line = dfunc(d) * (ends - d) + func(d)
            return line <= f_ends if sign < 0 else line >= f_ends

        far, near = torch.full_like(ends, sign), torch.zeros_like(ends)
        for _ in range(64):
            ok = valid(far)
            if bool(ok.all()):
                break
            far = torch.where(ok, far, 2 * far)
        else:
            raise BackendError("auto_LiRPA: no valid tangent line for an S-shaped activation")
        resolution = torch.finfo(dtype).eps * far.abs().clamp(min=1.0)
        for _ in range(100):
            if bool(((far - near).abs() <= resolution).all()):
                break
            mid = (far + near) / 2
            ok = valid(mid)
            far, near = torch.where(ok, mid, far), torch.where(ok, near, mid)
        return far

    d_lower = search(grid, func(grid), -1.0)
    d_upper = search(-grid, func(-grid), 1.0)
    return d_lower, d_upper

"""Run-time compatibility patches that let auto_LiRPA 0.3 run on torch 2.13 and numpy 2.

auto_LiRPA on PyPI stops at 0.3, which was written for torch < 1.13 and numpy 1. It installs
with ``pip install --no-deps auto_LiRPA==0.3`` and, with the small patches below, builds and
bounds the plain feed-forward modules that `verifier.bounds.lirpa` hands it. We never edit
site-packages: every patch is made here, at run time, and only when the lirpa backend is used
(`import verifier` patches nothing).

Each patch restores one name that auto_LiRPA 0.3 uses and a newer library removed or changed:

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

auto_LiRPA also imports ``tqdm`` and ``appdirs``; both are runtime dependencies of ours.
"""

from __future__ import annotations

import functools
import importlib.util
import sys
import types
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch

from verifier.errors import BackendError

_applied = False

INSTALL_HINT = "pip install --no-deps auto_LiRPA==0.3"

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

    Idempotent: a second call does nothing. Each patch is applied only when the name it
    restores is missing, so on an old torch/numpy it is a no-op.

    Raises:
        BackendError: auto_LiRPA is not installed.
    """
    global _applied
    if _applied:
        return
    if importlib.util.find_spec("auto_LiRPA") is None:
        raise BackendError(f"the lirpa backend needs auto_LiRPA; install it with `{INSTALL_HINT}`")
    _alias_numpy_arraysetops()
    _add_set_opset_version()
    _add_node_getitem()
    import auto_LiRPA.bound_general

    _accept_remove_duplicate(auto_LiRPA.bound_general.BoundedModule)
    _applied = True


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

    torch._C.Node.__getitem__ = _node_getitem  # type: ignore[attr-defined]


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

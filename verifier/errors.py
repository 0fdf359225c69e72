"""The one exception hierarchy of lid-verifier.

`InputError` covers everything a user can fix (a bad file, spec, graph, domain or data set);
the CLI turns it into one line on stderr and exit code 2. `TargetUnreachable` means the
held-out data cannot certify a target whatever the box (exit 1, as for a target not met).
`SoundnessError` means a falsifier broke a certified claim: that is a bug, and nothing
catches it to carry on.
"""

from __future__ import annotations


class VerifierError(Exception):
    """Base class of every error raised on purpose by lid-verifier."""


class InputError(VerifierError):
    """Something the user can fix: a file, a spec key, a model, a data set."""


class SpecError(InputError):
    """A spec file is missing, malformed, or has an unknown, missing or invalid key."""


class GraphError(InputError):
    """An ONNX model cannot be loaded or uses something the bound engine cannot handle."""


class DomainError(InputError):
    """A LID (box or zonotope) is malformed or does not match the model."""


class DataError(InputError):
    """A data set is missing, malformed, or does not match the model."""


class OutputError(InputError):
    """An output folder cannot be written now (e.g. another run holds its lock)."""


class BackendError(InputError):
    """An optional backend (auto_LiRPA, z3, Chromium) is missing or cannot handle the request."""


class MemoryBudgetError(InputError):
    """A memory budget (`--max-memory`) is malformed or too small for one bound pass."""


class TargetUnreachable(VerifierError):
    """The held-out data cannot certify a target, whatever the box (the CLI exits 1)."""


class SoundnessError(VerifierError):
    """A falsifier found weights inside a LID that break a sample the bounds certified."""

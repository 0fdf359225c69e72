"""Float64 rounding-error bounds shared by the proof modes of `ibp` and `zonotope`.

Higham, "Accuracy and Stability of Numerical Algorithms", Lemma 3.1 / Eq. 3.5: a dot product
of length n computed in floating point has error at most γ_n Σ |a_i b_i|, with
γ_n = n u / (1 - n u) and u = 2^-53 the unit roundoff of float64 (round to nearest). Each
engine states in its module docstring which n it charges for which computation.
"""

from __future__ import annotations

from torch import Tensor

UNIT_ROUNDOFF_64 = 2.0**-53
"""u, the unit roundoff of float64."""


def gamma(n: int) -> float:
    """Higham's γ_n = n u / (1 - n u) for float64, the relative error bound of n roundings.

    Args:
        n: the number of chained roundings (a dot product's length plus extra operations).

    Returns:
        γ_n as a float.
    """
    nu = n * UNIT_ROUNDOFF_64
    return nu / (1.0 - nu)


def mapped_error(error: Tensor, gain: Tensor | float, magnitude: Tensor) -> Tensor:
    """Bound the float error after an elementwise map: gain * error + 4u * magnitude.

    The error carried in grows by at most the map's Lipschitz constant `gain`; computing the
    map adds at most 4 ulp of its output (libm functions, one multiply or add).

    Args:
        error: bound on the error of the map's input.
        gain: the map's Lipschitz constant (scalar or broadcastable tensor).
        magnitude: bound on the magnitude of the map's output.

    Returns:
        Bound on the error of the map's output.
    """
    return gain * error + 4 * UNIT_ROUNDOFF_64 * magnitude

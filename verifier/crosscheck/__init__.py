"""Cross-checks of the bound engine: falsifiers, exact worst-case margins (closed form and
MILP), and z3 decisions, side by side with the bounds (`verifier crosscheck`).

z3 is imported only in `verifier.crosscheck.smt`, and only when an SMT function is called.
"""

from verifier.crosscheck.document import CrosscheckReport, run_crosscheck, write_crosscheck
from verifier.crosscheck.exact import exact_margins
from verifier.crosscheck.falsify import Falsification, FalsifierConfig, falsify_sample
from verifier.crosscheck.problem import ExactMargin
from verifier.crosscheck.run import CrosscheckConfig, CrosscheckResult, crosscheck_samples

__all__ = [
    "CrosscheckConfig",
    "CrosscheckReport",
    "CrosscheckResult",
    "ExactMargin",
    "Falsification",
    "FalsifierConfig",
    "crosscheck_samples",
    "exact_margins",
    "falsify_sample",
    "run_crosscheck",
    "write_crosscheck",
]

"""Primal-dual LID search: box (`box`) and zonotope (`zonotope`) searches, the constraints and
dual state they share (`dual`), importance biases (`importance`), shrink-to-feasible (`shrink`),
float32 inward rounding (`float32`) and what a search returns (`results`).
"""

from verifier.search.box import search_lid
from verifier.search.dual import DualState, SearchTask, hard_metrics, meets_targets
from verifier.search.float32 import inward_float32
from verifier.search.importance import fisher_importance, frozen_by_importance, si_importance
from verifier.search.results import Checkpoint, SearchResult, SearchStep
from verifier.search.shrink import shrink_to_feasible
from verifier.search.zonotope import ZonotopeSearchResult, search_zonotope_lid

__all__ = [
    "Checkpoint",
    "DualState",
    "SearchResult",
    "SearchStep",
    "SearchTask",
    "ZonotopeSearchResult",
    "fisher_importance",
    "frozen_by_importance",
    "hard_metrics",
    "inward_float32",
    "meets_targets",
    "search_lid",
    "search_zonotope_lid",
    "shrink_to_feasible",
    "si_importance",
]

"""Safe updates: project any update onto a LID, projected training, choosing among LIDs.

* `project_parameters` / `representable_box`: the Euclidean projection onto a box LID, exact
  in the storage dtype (`projection`).
* `select_lid`: keep an update that lies in one of several LIDs, else choose one by
  closest / size-weighted closest / lowest loss (`selection`).
* `SafeUpdate`, `ProjectedOptimizer`, `TrainableGraph`, `match_parameters`: projected training
  with any torch optimiser (`training`).
* `project_model`: the `verifier project` job on ONNX files (`onnx_projection`).
"""

from verifier.update.onnx_projection import ModelProjection, project_model
from verifier.update.projection import (
    Projection,
    TensorMove,
    project_parameters,
    representable_box,
    representable_corners,
)
from verifier.update.selection import RULES, Rule, Selection, half_diagonal, select_lid
from verifier.update.training import (
    ProjectedOptimizer,
    SafeUpdate,
    TrainableGraph,
    match_parameters,
)

__all__ = [
    "RULES",
    "ModelProjection",
    "ProjectedOptimizer",
    "Projection",
    "Rule",
    "SafeUpdate",
    "Selection",
    "TensorMove",
    "TrainableGraph",
    "half_diagonal",
    "match_parameters",
    "project_model",
    "project_parameters",
    "representable_box",
    "representable_corners",
    "select_lid",
]

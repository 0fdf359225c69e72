"""Scale-out on Ray (issue 22): certification, cross-checks and benchmark grids as Ray tasks.

Ray is the engine ML teams already run; nothing here schedules work itself. `ray_session`
joins a cluster (`local`, `auto` or HOST:PORT, `verifier.distributed.cluster`); `map_tasks`
fans a function out over items with retries (`verifier.distributed.tasks`); `RayCertifier`
runs `certify_samples` calls as tasks, bit-identical to one process
(`verifier.distributed.certification`); `certify_stream` certifies a held-out set larger than
memory chunk by chunk (`verifier.distributed.streaming`). Ray is imported only when a session
opens.
"""

from verifier.distributed.certification import RayCertifier, ray_certification
from verifier.distributed.cluster import ClusterInfo, check_address, ray_session
from verifier.distributed.tasks import RayTaskRunner, TaskStats, map_tasks

__all__ = [
    "ClusterInfo",
    "RayCertifier",
    "RayTaskRunner",
    "TaskStats",
    "check_address",
    "map_tasks",
    "ray_certification",
    "ray_session",
]

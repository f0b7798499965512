"""JSON shapes of tasks, nodes and the mesh: the seed's contract plus added fields."""

from __future__ import annotations

import functools
import logging
import re
import time
from collections import Counter
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Concatenate, ParamSpec

import msgspec

from coordinator.core.drain import drain_view, view_status
from coordinator.model import Node, Task, TaskState
from coordinator.scheduling.tenants import weighted_fairness
from shared.limits import Throttled

if TYPE_CHECKING:
    from coordinator.core.mesh import Mesh

GB = 1024  # MiB per GiB: GPU memory is reported in MiB by every vendor tool

# --- defence in depth: what a node reported never fails a listing -------------------------
# The values are checked where they arrive (shared/protocol.py ranges, shared/limits.py);
# should one get through anyway, that node's entry says so and the answer is still 200.

log = logging.getLogger(__name__)
_view_errors = Throttled(log)
_P = ParamSpec("_P")


def never_fails(
    view: Callable[Concatenate[Node, _P], dict[str, Any]],
) -> Callable[Concatenate[Node, _P], dict[str, Any]]:
    """A node view that, should building it raise, gives a stub for that node instead."""

    @functools.wraps(view)
    def guarded(node: Node, /, *args: _P.args, **kwargs: _P.kwargs) -> dict[str, Any]:
        try:
            return view(node, *args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - one record must not fail the listing
            _view_errors.warning(node.name, "cannot show node %s: %r", node.name, exc)
            return {"gpu_count": 0, "gpu_type": "none", "gpu_memory": 0.0,
                    "status": "online" if node.online else "offline", "active_tasks": 0,
                    "completed_tasks": 0, "view_error": f"its record cannot be shown "
                    f"({type(exc).__name__}); see the coordinator's log"}

    return guarded


def jsonable(value: Any, depth: int = 0) -> Any:
    """`value` with what JSON cannot carry made null: integers orjson cannot write (outside
    -2**63 .. 2**64-1), objects that are not JSON, nesting past 64 levels. For an answer
    orjson refused."""
    if value is None or isinstance(value, str | bool | float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else None
    if depth >= 64:
        return None
    if isinstance(value, Mapping):
        return {str(k): jsonable(v, depth + 1) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [jsonable(v, depth + 1) for v in value]
    return None


def iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")


def task_view(t: Task, reason: str = "") -> dict[str, Any]:
    spec = t.spec
    view: dict[str, Any] = {
        "task_id": t.id,
        "task_type": t.task_type,
        "status": t.state.value,
        "priority": t.priority,
        "node": t.node,
        "attempt": t.attempt,
        "max_attempts": t.max_attempts,
        "executor": t.executor,
        "gpu_indices": list(t.gpu_indices),
        "requirements": msgspec.to_builtins(spec.requirements),
        "submitted_at": iso(t.submitted_at),
        "assigned_at": iso(t.assigned_at),
        "started_at": iso(t.started_at),
        "finished_at": iso(t.finished_at),
        "result": t.result,
        "error": t.error or None,
        "infra_losses": t.infra_retries,
        "history": t.history,
    }
    if spec.image:
        view["image"] = spec.image
    if spec.name:
        view["name"] = spec.name
    if spec.tenant:
        view["tenant"] = spec.tenant
    if t.state is TaskState.QUEUED:
        view["reason"] = reason
    return view


def _gpu_type(node: Node) -> str:
    names = Counter(g.name for g in node.gpus)
    return names.most_common(1)[0][0] if names else "none"


# --- tenant privacy: what a caller who is not an admin sees of other tenants --------------
# Its own tenant's task ids; other tenants' only as anonymous counts (`active_tasks`), their
# names and usage not at all, and no task id in free text that a node or the coordinator
# wrote about someone's work (a quarantine reason, a node's health, a queued reason).

# A task id (new_task_id: 32 hex digits), also with a UUID's dashes, in either case.
_TASK_ID = re.compile(
    r"(?<![0-9A-Fa-f])[0-9A-Fa-f]{8}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?[0-9A-Fa-f]{4}-?"
    r"[0-9A-Fa-f]{12}(?![0-9A-Fa-f])"
)


def redact_task_ids(text: str) -> str:
    """`text` with every task id in it replaced by "a task" (for non-admin eyes)."""
    return _TASK_ID.sub("a task", text) if text else text


def tasks_of(mesh: Mesh, tenant: str) -> Callable[[str], bool]:
    """Whether a task id (one a node holds) is `tenant`'s."""
    tasks = mesh.tasks

    def mine(task_id: str) -> bool:
        t = tasks.get(task_id)
        return t is not None and t.tenant == tenant

    return mine


def _private_node(view: dict[str, Any], node: Node, mine: Callable[[str], bool]) -> None:
    """A node's view as a non-admin sees it: `mine` says which task ids it may see."""
    for key in ("quarantine_reason", "health"):
        view[key] = redact_task_ids(view[key])
    view["faulted_gpus"] = {k: redact_task_ids(v) for k, v in view["faulted_gpus"].items()}
    if view["drain"] is not None:
        view["drain"] = {**view["drain"],
                         "reason": redact_task_ids(str(view["drain"]["reason"]))}
    if "tasks" in view:
        view["tasks"] = sorted(i for i in node.tasks if mine(i))
        for g in view["gpus"]:
            g["fault"] = redact_task_ids(g.get("fault") or "")


@never_fails
def node_view(
    node: Node, *, detail: bool = False, mine: Callable[[str], bool] | None = None
) -> dict[str, Any]:
    """The seed's node fields (`gpu_memory` is GB per GPU, the largest) and more. With
    `mine` (a caller who is not an admin): only the task ids `mine` accepts, free text
    without task ids; the counts (`active_tasks`...) stay totals."""
    biggest = max((g.memory_total_mb for g in node.gpus), default=0)
    view: dict[str, Any] = {
        "gpu_count": len(node.gpus),
        "gpu_type": _gpu_type(node),
        "gpu_memory": round(biggest / GB, 1),
        "total_gpu_memory": round(sum(g.memory_total_mb for g in node.gpus) / GB, 1),
        "status": view_status(node),  # draining / drained: coordinator/core/drain.py
        "active_tasks": len(node.tasks),
        "completed_tasks": node.completed,
        "failed_tasks": node.failed,
        "free_gpus": node.free_gpu_count(),
        "slots": node.slots,
        "free_slots": node.free_slots,
        "executors": sorted(node.executors),
        "labels": node.labels,
        "energy_j": round(node.energy_j, 1),
        "quarantined": bool(node.quarantine_reason),
        "quarantine_reason": node.quarantine_reason,
        "health": node.health,
        "eligible": node.online and not node.unavailable,
        "faulted_gpus": {str(g.index): g.fault for g in node.gpus if g.fault},
        "infra_failures": node.infra_total,
        "drain": drain_view(node.drain),
    }
    if detail:
        view.update(
            name=node.name,
            hostname=node.hostname,
            role=node.role,
            version=node.version,
            protocol=node.protocol,
            seed_form=node.seed_form,
            isolation=node.isolation,  # user+cgroup | user | none; "": an older client
            cpu_count=node.cpu_count,
            memory_mb=node.memory_mb,
            cpu_pct=node.cpu_pct,
            memory_used_mb=node.memory_used_mb,
            load1=node.load1,
            connected_at=iso(node.connected_at),
            tasks=sorted(node.tasks),
            gpus=[
                {**msgspec.to_builtins(g), "busy": g.index in node.gpu_tasks} for g in node.gpus
            ],
            history=[
                {"t": round(t, 3), "cpu_pct": cpu, "gpu_util_pct": round(util, 1),
                 "gpu_memory_used_mb": mem, "power_w": round(power, 1)}
                for t, cpu, util, mem, power in node.history
            ],
        )
    if mine is not None:
        _private_node(view, node, mine)
    return view


def mesh_status(mesh: Mesh, tenant: str | None = None) -> dict[str, Any]:
    """`/mesh/status`; for a caller who is not an admin (`tenant`: its tenant) the same fields,
    the per-tenant ones (`fairness`) holding its own tenant only."""
    gpus = [g for n in mesh.nodes.values() if n.online for g in n.gpus]
    counts = mesh.state_counts
    mine = tasks_of(mesh, tenant) if tenant is not None else None
    return {
        "coordinator": mesh.settings.name,
        "status": "ok",
        "uptime_s": round(time.time() - mesh.started_at, 1),
        "total_nodes": len(mesh.nodes),
        "online_nodes": sum(1 for n in mesh.nodes.values() if n.online),
        "total_gpus": len(gpus),
        "free_gpus": sum(n.free_gpu_count() for n in mesh.nodes.values() if n.online),
        "total_vram": round(sum(g.memory_total_mb for g in gpus) / GB, 1),
        "used_vram": round(sum(g.memory_used_mb for g in gpus) / GB, 1),
        "active_tasks": counts[TaskState.ASSIGNED] + counts[TaskState.RUNNING],
        "queued_tasks": counts[TaskState.QUEUED],
        "completed_tasks": mesh.finished_counts["completed"],
        "failed_tasks": mesh.finished_counts["failed"],
        "cancelled_tasks": mesh.finished_counts["cancelled"],
        "queue_by_priority": {b: mesh.queued_by_band[b] for b in ("critical", "high",
                                                                    "normal", "low")},
        "balancing": mesh.settings.balancing,
        "energy_j": round(sum(n.energy_j for n in mesh.nodes.values()), 1),
        "fairness": _own_tenant(fairness(mesh.gpu_seconds)
                                | weighted_fairness(mesh.fair, mesh.gpu_seconds), tenant),
        "nodes": {name: node_view(n, mine=mine) for name, n in sorted(mesh.nodes.items())},
    }


def _own_tenant(doc: dict[str, Any], tenant: str | None) -> dict[str, Any]:
    """`fairness` with its per-tenant maps cut to `tenant` (None: every tenant); the indexes
    over all tenants stay (anonymous totals)."""
    if tenant is None:
        return doc
    for key in ("gpu_seconds_by_tenant", "weights"):
        doc[key] = {k: v for k, v in doc[key].items() if k == tenant}
    return doc


def fairness(gpu_seconds: Mapping[str, float]) -> dict[str, Any]:
    """Jain's index over GPU-seconds per tenant: 1.0 is perfectly even, 1/n is one
    tenant taking everything. None until some tenant has used a GPU."""
    shares = [v for v in gpu_seconds.values() if v > 0]
    total = sum(shares)
    jain = total * total / (len(shares) * sum(v * v for v in shares)) if shares else None
    return {
        "jain_index": round(jain, 4) if jain is not None else None,
        "gpu_seconds_by_tenant": {k: round(v, 3) for k, v in sorted(gpu_seconds.items())},
    }


"""The SDK's typed results and errors (gpumesh/sdk.py): msgspec Structs decoded from the
API's JSON. Fields the server adds later are ignored; fields it leaves out take defaults."""

from __future__ import annotations

from typing import Any

import msgspec

UNFINISHED = ("queued", "assigned", "running", "lost")
FINISHED = ("completed", "failed", "cancelled")


# --- results -------------------------------------------------------------------------------


class Submitted(msgspec.Struct, kw_only=True):
    task_id: str
    status: str = "queued"


class TaskInfo(msgspec.Struct, kw_only=True):
    """A task as `GET /tasks/{id}` shows it; fields the server adds later are ignored."""

    task_id: str
    task_type: str = ""
    status: str = ""
    priority: int = 5
    node: str | None = None
    attempt: int = 0
    max_attempts: int = 0
    executor: str = ""
    gpu_indices: list[int] = []
    submitted_at: str | None = None
    assigned_at: str | None = None
    started_at: str | None = None
    finished_at: str | None = None
    result: dict[str, Any] | None = None
    error: str | None = None
    reason: str = ""  # why a queued task waits
    name: str = ""
    tenant: str = ""
    image: str | None = None

    @property
    def finished(self) -> bool:
        return self.status in FINISHED


class GpuView(msgspec.Struct, kw_only=True):
    index: int
    name: str = ""
    vendor: str = ""
    memory_total_mb: int = 0
    memory_used_mb: int = 0
    utilization_pct: float = 0.0
    temperature_c: float | None = None
    power_w: float | None = None
    fault: str = ""
    busy: bool = False


class DrainMark(msgspec.Struct, kw_only=True):
    reason: str = ""
    since: str | None = None
    by: str = ""


class NodeInfo(msgspec.Struct, kw_only=True):
    """A node as `GET /mesh/nodes` shows it. `status`: online, disconnected, lost, or
    draining / drained (an admin drained it: it takes no new work)."""

    name: str = ""
    status: str = ""
    gpu_count: int = 0
    gpu_type: str = ""
    gpu_memory: float = 0.0
    active_tasks: int = 0
    completed_tasks: int = 0
    failed_tasks: int = 0
    free_gpus: int = 0
    executors: list[str] = []
    labels: dict[str, str] = {}
    health: str = ""
    quarantined: bool = False
    quarantine_reason: str = ""
    drain: DrainMark | None = None
    cpu_pct: float = 0.0
    memory_mb: int = 0
    memory_used_mb: int = 0
    hostname: str = ""
    version: str = ""
    gpus: list[GpuView] = []


class MeshStatus(msgspec.Struct, kw_only=True):
    coordinator: str = ""
    status: str = ""
    uptime_s: float = 0.0
    total_nodes: int = 0
    online_nodes: int = 0
    total_gpus: int = 0
    free_gpus: int = 0
    total_vram: float = 0.0
    used_vram: float = 0.0
    active_tasks: int = 0
    queued_tasks: int = 0
    completed_tasks: int = 0
    failed_tasks: int = 0
    cancelled_tasks: int = 0
    queue_by_priority: dict[str, int] = {}
    nodes: dict[str, dict[str, Any]] = {}


class Health(msgspec.Struct, kw_only=True):
    """`GET /health` (public, no token): "healthy" when this coordinator serves the API.
    A standby with no leader, or a leader rebuilding its mesh, answers 503 (MeshError)."""

    status: str = ""
    version: str = ""
    online_nodes: int = 0
    role: str = ""  # leader | standby
    leader: str | None = None  # the leader's URL, None: not known


class TaskPage(msgspec.Struct, kw_only=True):
    """One page of `tasks()`; pass `next` as `cursor=` for the following one (None: done)."""

    tasks: list[TaskInfo]
    next: str | None = None


class DrainState(msgspec.Struct, kw_only=True):
    node: str
    draining: bool
    status: str = ""
    active_tasks: int = 0
    drain: DrainMark | None = None


# --- errors --------------------------------------------------------------------------------


class MeshError(Exception):
    """The coordinator refused a request (`status` is the HTTP status, `error` and
    `reason` its own words), or could not be reached (status 0)."""

    def __init__(self, status: int, error: str, reason: str = "") -> None:
        super().__init__(f"{error}: {reason}" if reason else error)
        self.status, self.error, self.reason = status, error, reason


class MeshUnreachable(MeshError, ConnectionError):
    """No answer from the coordinator at `url` (refused, timed out, TLS failed)."""

    def __init__(self, url: str, reason: str) -> None:
        super().__init__(0, f"cannot reach {url}", reason)
        self.url = url


# --- model services (issue 27): `POST /services` and friends -------------------------------


class ReplicaInfo(msgspec.Struct, kw_only=True):
    task_id: str
    node: str | None = None
    attempt: int = 0
    state: str = ""  # starting | ready | unhealthy | stopping
    outstanding: int = 0
    retiring: bool = False
    reason: str = ""


class ServiceInfo(msgspec.Struct, kw_only=True):
    """A model service as `GET /services/{name}` shows it (`history` only there)."""

    name: str
    model: str = ""
    tenant: str = ""
    engine: str | None = None
    executor: str = ""
    replicas: list[ReplicaInfo] = []
    scale: dict[str, int] = {}  # min, max, desired, ready
    outstanding: int = 0
    routing: str = ""
    health_path: str = ""
    idle_s: float = 0.0
    target_ongoing: int = 0
    requests: dict[str, float | None] = {}  # total, errors, mean_s, ttft_mean_s, ...
    created_at: float = 0.0
    updated_at: float = 0.0
    spec: dict[str, Any] = {}
    history: list[dict[str, Any]] = []

    @property
    def ready(self) -> int:
        return sum(1 for r in self.replicas if r.state == "ready")

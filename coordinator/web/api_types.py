"""The JSON shapes the HTTP API answers with, as msgspec Structs, for /openapi.json.

The routes build their answers in coordinator/web/views.py (dicts, for speed); these types say
what those dicts hold. tests/web/test_openapi.py calls every route on a real server and
validates each answer against the schema generated from here, with every object closed
(no key these types do not name), so a field added to a view without being added here
fails that test. Request bodies are documented with the types the routes decode with
(shared.tasks.TaskSubmit), not copies of them.

A field with a default here is one the answer may leave out.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from shared.protocol import GpuInfo, TaskOutcome
from shared.tasks import Requirements

Time = Annotated[str, msgspec.Meta(extra_json_schema={"format": "date-time"})]
TaskStatus = Literal["queued", "assigned", "running", "completed", "failed", "cancelled", "lost"]


class ErrorBody(msgspec.Struct, kw_only=True):
    """Every refusal: what went wrong, and why (msgspec's words for a body that does not
    validate, e.g. ``Expected `int`, got `str` - at `$.priority` ``)."""

    error: str
    reason: str


class Index(msgspec.Struct, kw_only=True):
    """`GET /`: what answers here, and where to go next."""

    name: str
    service: str
    version: str
    coordinator: str
    task_types: list[str]
    links: dict[str, str]


class Health(msgspec.Struct, kw_only=True):
    """`GET /health`: 200 healthy; 503 while the coordinator rebuilds from its store, or
    (a standby, with PostgreSQL HA) while it starts or no leader is known."""

    status: Literal["healthy", "rebuilding", "starting", "no leader"]
    version: str
    online_nodes: int
    reason: str = ""
    role: Literal["leader", "standby"] = "leader"  # with PostgreSQL HA: this coordinator's
    leader: str | None = None  # the leader's URL, where known


class GpuView(GpuInfo, kw_only=True):
    """One GPU of a node: its latest readings, and whether a task holds it."""

    busy: bool


class HistoryPoint(msgspec.Struct, kw_only=True):
    """One heartbeat's readings (`t` is Unix time)."""

    t: float
    cpu_pct: float
    gpu_util_pct: float
    gpu_memory_used_mb: int
    power_w: float


class DrainView(msgspec.Struct, kw_only=True):
    """An admin's drain of a node: why, since when, by whom."""

    reason: str
    since: Time
    by: str


class NodeSummary(msgspec.Struct, kw_only=True):
    """A node as `/mesh/status` lists it (the seed's fields first; `gpu_memory` is GB)."""

    gpu_count: int
    gpu_type: str
    gpu_memory: float
    total_gpu_memory: float
    status: str
    active_tasks: int
    completed_tasks: int
    failed_tasks: int
    free_gpus: int
    slots: int
    free_slots: int
    executors: list[str]
    labels: dict[str, str]
    energy_j: float
    quarantined: bool
    quarantine_reason: str
    health: str
    eligible: bool
    faulted_gpus: dict[str, str]
    infra_failures: int
    drain: DrainView | None = None  # set while drained; `status` is draining / drained


class NodeDetail(NodeSummary, kw_only=True):
    """A node with its GPUs, host readings and recent history (`/mesh/nodes`)."""

    name: str
    hostname: str
    role: str
    version: str
    protocol: int
    seed_form: bool
    # How the node isolates process tasks: `user+cgroup` (a uid and a cgroup per attempt),
    # `user` (a uid per attempt, no cgroup), `none` (tasks share the client's or MESH_RUN_AS's
    # user; it runs only its owner's unless opted in), "" (an older client that does not say).
    isolation: Literal["", "user+cgroup", "user", "none"]
    cpu_count: int
    memory_mb: int
    cpu_pct: float
    memory_used_mb: int
    load1: float
    connected_at: Time | None
    tasks: list[str]
    gpus: list[GpuView]
    history: list[HistoryPoint]


class NodeList(msgspec.Struct, kw_only=True):
    nodes: dict[str, NodeDetail]
    count: int


class QueueBands(msgspec.Struct, kw_only=True):
    """Queued tasks per priority band: critical 8-10, high 6-7, normal 3-5, low 0-2."""

    critical: int
    high: int
    normal: int
    low: int


class Fairness(msgspec.Struct, kw_only=True):
    """Jain's index over GPU-seconds per tenant (null until some tenant used a GPU). The maps
    by tenant hold only the caller's own tenant unless the caller is an admin."""

    jain_index: float | None
    gpu_seconds_by_tenant: dict[str, float]
    weighted_jain_index: float | None = None  # the same, each tenant's use over its weight
    weights: dict[str, float] = {}


class MeshStatus(msgspec.Struct, kw_only=True):
    """`GET /mesh/status`: the seed's shape (`nodes` keyed by name) and more."""

    coordinator: str
    status: str
    uptime_s: float
    total_nodes: int
    online_nodes: int
    total_gpus: int
    free_gpus: int
    total_vram: float
    used_vram: float
    active_tasks: int
    queued_tasks: int
    completed_tasks: int
    failed_tasks: int
    cancelled_tasks: int
    queue_by_priority: QueueBands
    balancing: str
    energy_j: float
    fairness: Fairness
    nodes: dict[str, NodeSummary]


class TaskResultView(TaskOutcome, kw_only=True):
    """What the node reported when the task ended (`output` is the tail of its output)."""


class AttemptEnd(msgspec.Struct, kw_only=True):
    """Why an attempt ended that was not the task's own outcome (node lost, node fault)."""

    at: float
    attempt: int
    node: str | None
    cause: str
    infra: bool


class TaskView(msgspec.Struct, kw_only=True):
    """One task. `reason` (queued tasks only) says what it waits for."""

    task_id: str
    task_type: str
    status: TaskStatus
    priority: int
    node: str | None
    attempt: int
    max_attempts: int
    executor: str
    gpu_indices: list[int]
    requirements: Requirements
    submitted_at: Time | None
    assigned_at: Time | None
    started_at: Time | None
    finished_at: Time | None
    result: TaskResultView | None
    error: str | None
    infra_losses: int = 0  # attempts ended by the node, not the task (not counted)
    history: list[AttemptEnd] = []
    image: str = ""
    name: str = ""
    tenant: str = ""
    reason: str = ""
    params: dict[str, Any] = {}  # `GET /tasks/{id}` only: the submission's other fields


class Accepted(msgspec.Struct, kw_only=True):
    """A task is durable and queued (answered only after the store committed it)."""

    task_id: str
    status: Literal["queued"]


class BatchAccepted(msgspec.Struct, kw_only=True):
    """A JSON list was submitted: all of it was accepted, in order."""

    tasks: list[Accepted]
    count: int


class ActiveTasks(msgspec.Struct, kw_only=True):
    """Every unfinished task the caller may see, keyed by id (queued ones included)."""

    tasks: dict[str, TaskView]
    count: int


class CompletedPage(msgspec.Struct, kw_only=True):
    """Finished tasks, newest first. Page on with `?cursor=<next>` (or `offset`)."""

    tasks: dict[str, TaskView]
    count: int
    total: int | None
    limit: int
    offset: int
    next_offset: int | None
    next: str | None


class TokenCreate(msgspec.Struct, kw_only=True):
    """`POST /admin/tokens`: a token for `tenant` with `role` (read < submit < admin;
    `metrics`: read, and every tenant's series in /metrics, for a scraper)."""

    tenant: Annotated[str, msgspec.Meta(pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")]
    role: Literal["read", "metrics", "submit", "admin"] = "submit"
    name: Annotated[str, msgspec.Meta(max_length=128)] = ""


class TokenInfo(msgspec.Struct, kw_only=True):
    """A token as listed: never its secret, never its hash."""

    id: str
    tenant: str
    role: str
    name: str
    created_at: float
    revoked: bool
    revoked_at: float | None


class TokenCreated(TokenInfo, kw_only=True):
    """The new token: `token` is the secret, shown only in this answer."""

    token: str
    note: str


class TokenList(msgspec.Struct, kw_only=True):
    tokens: list[TokenInfo]
    count: int


class AuditRecord(msgspec.Struct, kw_only=True):
    seq: int
    at: float
    actor: str
    token_id: str
    tenant: str
    action: str
    target: str
    detail: dict[str, Any]


class AuditPage(msgspec.Struct, kw_only=True):
    """Audit records oldest first; page on with `?after=<next_after>`."""

    records: list[AuditRecord]
    count: int
    next_after: int | None


class Forgotten(msgspec.Struct, kw_only=True):
    node: str
    forgotten: bool
    was_registered: bool
    had_credential: bool


class DrainRequest(msgspec.Struct, kw_only=True):
    """`POST /mesh/nodes/{name}/drain` (the body is optional)."""

    reason: str = ""


class DrainState(msgspec.Struct, kw_only=True):
    """A node's drain after the change (`status` "not connected" for a node not connected)."""

    node: str
    draining: bool
    status: str
    active_tasks: int
    drain: DrainView | None


class ArtifactStored(msgspec.Struct, kw_only=True):
    """A node's upload of an artifact, on disk and fsynced."""

    name: str
    size: int
    sha256: str


class TenantView(msgspec.Struct, kw_only=True):
    """A tenant's share and quotas (`quota`, as set), and what it uses now."""

    name: str
    configured: bool
    weight: float
    quota: dict[str, Any]
    usage_gpu_s: float
    gpu_seconds: float
    share: float
    target_share: float
    gpus: int
    running: int
    queued: int
    nonpreemptible_gpus: int


class TenantList(msgspec.Struct, kw_only=True):
    tenants: list[TenantView]
    count: int
    defaults: dict[str, Any]


# --- model services (coordinator/web/services_api.py, issue 27) --------------------------


class ReplicaView(msgspec.Struct, kw_only=True):
    """One replica: a task; `node` and `attempt` where it runs (null while queued)."""

    task_id: str
    node: str | None
    attempt: int
    state: Literal["starting", "ready", "unhealthy", "stopping"]
    outstanding: int
    retiring: bool  # to be replaced (its node drains, its service changed): stops once a
    reason: str = ""  # new one is ready; `reason`: the node's word on an unhealthy replica


class ServiceScale(msgspec.Struct, kw_only=True):
    min: int
    max: int
    desired: int  # what the control plane scales to now
    ready: int


class ServiceRequests(msgspec.Struct, kw_only=True):
    """Requests routed to the service since the coordinator started."""

    total: float
    errors: float
    mean_s: float | None
    ttft_mean_s: float | None
    completion_tokens: float


class ServiceEvent(msgspec.Struct, kw_only=True):
    """One entry of a service's history: created, updated, replica started, placed, ready,
    unhealthy, lost, stopping, retiring, ended, restart, scaled up, scaled down."""

    seq: int
    at: float
    kind: str
    detail: dict[str, Any]


class ServiceView(msgspec.Struct, kw_only=True):
    name: str
    model: str
    tenant: str
    engine: str | None
    executor: str
    replicas: list[ReplicaView]
    scale: ServiceScale
    outstanding: int
    routing: Literal["least", "prefix"]
    health_path: str
    idle_s: float
    target_ongoing: int
    requests: ServiceRequests
    created_at: float
    updated_at: float
    spec: dict[str, Any]  # as submitted (POST /services body)
    history: list[ServiceEvent] = []  # GET /services/{name}: the newest `?history=` events


class ServiceList(msgspec.Struct, kw_only=True):
    services: list[ServiceView]
    count: int


class ServiceDeleted(msgspec.Struct, kw_only=True):
    deleted: str
    tenant: str
    replicas_stopping: int


# --- the OpenAI-compatible /v1 (coordinator/web/openai.py): OpenAI's own shapes ----------

class OpenAIErrorDetail(msgspec.Struct, kw_only=True):
    message: str
    type: str  # invalid_request_error | rate_limit_error | server_error
    param: str | None
    code: str  # model_not_found, invalid_json, request_too_large, no_ready_replica, ...


class OpenAIError(msgspec.Struct, kw_only=True):
    """A refusal on /v1, in OpenAI's shape (the `openai` client reads it)."""

    error: OpenAIErrorDetail


class ModelCard(msgspec.Struct, kw_only=True):
    id: str  # the service's `model`
    object: Literal["model"]
    created: int  # when the service was created (epoch seconds)
    owned_by: str  # its tenant


class ModelList(msgspec.Struct, kw_only=True):
    object: Literal["list"]
    data: list[ModelCard]

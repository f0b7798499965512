"""What each HTTP route does, for /openapi.json: summary, query parameters, request and
answer types, and the refusals it can answer with.

Keyed by (method, path template) exactly as the app mounts them. The document is built from
the app's own routes (coordinator/web/openapi.py) and looks each one up here; the role each
needs comes from coordinator/auth.required_role, the function the middleware enforces.
tests/web/test_openapi.py fails when a mounted route is missing here or an entry here is not
mounted, and validates every route's real answers against the documented types.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.scheduling.fairshare import TenantConfig
from coordinator.web import api_types as t
from shared.services import ServiceSpec
from shared.tasks import TaskSubmit

WEBSOCKET = "WEBSOCKET"  # the method under which a WebSocketRoute is listed here


@dataclass(frozen=True)
class Param:
    name: str
    schema: dict[str, Any]
    description: str


@dataclass(frozen=True)
class Op:
    """One operation. `ok` is a Struct (JSON answer), a tuple of them (one of), or a dict of
    media type -> description (an answer that is not JSON: logs, metrics, pages)."""

    tag: str
    summary: str
    ok: type | tuple[type, ...] | dict[str, str]
    errors: tuple[int, ...] = ()
    body: Any = None  # a type msgspec can describe
    query: tuple[Param, ...] = ()
    description: str = ""
    also: dict[int, type] = field(default_factory=dict)  # other answers with a JSON body
    caller: str = ""  # who may call, where auth.required_role does not decide (node routes)


def _int(lo: int, hi: int) -> dict[str, Any]:
    return {"type": "integer", "minimum": lo, "maximum": hi}


TENANT = Param("tenant", {"type": "string"},
               "admins only: list this tenant's tasks (others always see their own)")
SERVICE_TENANT = Param("tenant", {"type": "string"},
                       "admins only: the tenant whose service this is (others: their own)")
TEXT = {"text/plain": "plain text, UTF-8"}
HTML = {"text/html": "an HTML page (its scripts and styles come from /ui/assets)"}

# /v1's POSTs: whatever the engine answers, passed through; refusals in OpenAI's shape.
V1_ANSWER = {"application/json": "the engine's answer, in OpenAI's shape",
             "text/event-stream": "with `stream: true`: the engine's server-sent events"}
V1_ERRORS: dict[int, type] = {
    s: t.OpenAIError for s in (400, 401, 403, 404, 413, 415, 429, 502, 503, 504)}

ROUTES: dict[tuple[str, str], Op] = {
    ("GET", "/"): Op("service", "Name, version and links", t.Index),
    ("GET", "/health"): Op(
        "service", "Liveness and readiness", t.Health, also={503: t.Health},
        description="503 (with `reason`) while the coordinator rebuilds from its store.",
    ),
    ("GET", "/metrics"): Op(
        "service", "Prometheus metrics", {"text/plain": "Prometheus text exposition format"},
        description="Series that name a tenant (`gpumesh_tenant_*`) only for an admin or a "
        "`metrics` token.",
    ),
    ("GET", "/mesh/status"): Op(
        "mesh", "The mesh at a glance: nodes, GPUs, queue", t.MeshStatus,
        description="A caller who is not an admin finds only its own tenant in `fairness`; "
        "counts and indexes are over all tenants.",
    ),
    ("GET", "/mesh/nodes"): Op(
        "mesh", "Every node with its GPUs and readings", t.NodeList,
        description="A caller who is not an admin sees only its own tenant's task ids in "
        "`tasks` (`active_tasks` counts all) and no task ids in free text.",
    ),
    ("GET", "/mesh/nodes/{name}"): Op("mesh", "One node", t.NodeDetail, errors=(404,)),
    ("DELETE", "/mesh/nodes/{name}"): Op(
        "mesh", "Forget a node and its credential", t.Forgotten, errors=(404, 409),
        description="Refused with 409 while the node holds tasks. A connected idle node is "
        "closed with 4004; its name is free for the next node that joins.",
    ),
    ("POST", "/mesh/nodes/{name}/drain"): Op(
        "mesh", "Drain a node: it finishes its tasks and is given no more", t.DrainState,
        errors=(400, 404, 413, 422), body=t.DrainRequest,
        description="Durable: a drained node stays drained across restarts and reconnects. "
        "Draining again replaces the reason.",
    ),
    ("POST", "/mesh/nodes/{name}/undrain"): Op(
        "mesh", "Undrain a node: it may be given work again", t.DrainState, errors=(404,),
    ),
    ("POST", "/tasks/submit"): Op(
        "tasks", "Submit a task, or a JSON list of tasks (all or nothing)",
        (t.Accepted, t.BatchAccepted), errors=(400, 413, 422, 429),
        body=TaskSubmit | list[TaskSubmit],
        description="Answered once the tasks are durable. Top-level fields not named here "
        "(`model`, `prompt`, ...) are kept as the task's `params`. A submit token's tenant "
        "is stamped on its tasks.",
    ),
    ("GET", "/tasks/active"): Op(
        "tasks", "Unfinished tasks (queued ones included), keyed by id", t.ActiveTasks,
        query=(TENANT,),
    ),
    ("GET", "/tasks/completed"): Op(
        "tasks", "Finished tasks, newest first, paged", t.CompletedPage, errors=(400,),
        query=(
            Param("limit", _int(1, 1000), "page size (default 100)"),
            Param("offset", _int(0, 10_000), "skip this many (beyond: use `cursor`)"),
            Param("cursor", {"type": "string"}, "the `next` of the previous page"),
            Param("after", {"type": "string"}, "the old name of `cursor`"),
            TENANT,
        ),
    ),
    ("GET", "/tasks/{task_id}"): Op(
        "tasks", "One task; with `?wait=` answers when it finishes (or at the deadline)",
        t.TaskView, errors=(400, 404),
        query=(Param("wait", {"type": "number", "minimum": 0},
                     "seconds to wait for the task to finish (at most MESH_MAX_WAIT_S)"),),
    ),
    ("DELETE", "/tasks/{task_id}"): Op(
        "tasks", "Cancel a task", t.TaskView, errors=(404, 409),
        description="409 when the task already finished.",
    ),
    ("POST", "/tasks/{task_id}/cancel"): Op(
        "tasks", "Cancel a task (the same as DELETE /tasks/{task_id})", t.TaskView,
        errors=(404, 409),
    ),
    ("GET", "/tasks/{task_id}/logs"): Op(
        "tasks", "A task's output; with `?follow=true` streamed as it arrives", TEXT,
        errors=(404, 429),
        query=(Param("follow", {"type": "string", "enum": ["true", "false", "1", "0",
                                                           "yes", "no"]},
                     "stream until the task ends (or is idle for MESH_MAX_WAIT_S)"),),
        description="429 when MESH_MAX_LOG_FOLLOWERS streams follow already.",
    ),
    ("GET", "/tasks/{task_id}/artifacts/{name}"): Op(
        "tasks", "Download an artifact the task's result names",
        {"application/octet-stream": "the file (its SHA-256 in X-Sha256)"}, errors=(404, 410),
        description="410 once deleted (MESH_ARTIFACT_RETENTION_S after the task finished).",
    ),
    ("PUT", "/nodes/{node}/tasks/{task_id}/{attempt}/artifacts/{name}"): Op(
        "nodes", "A node uploads an artifact of its current attempt", t.ArtifactStored,
        errors=(401, 404, 409, 413, 422, 507), caller="node credential",
        body={"application/octet-stream": "the file"},
        description="Sent by compute clients with their node credential as the bearer token; "
        "409 when that attempt is no longer the task's current one on that node.",
    ),
    ("POST", "/admin/tokens"): Op(
        "admin", "Create an API token (the secret is shown only in this answer)",
        t.TokenCreated, errors=(400, 409, 413, 422), body=t.TokenCreate,
    ),
    ("GET", "/admin/tokens"): Op("admin", "List API tokens (never their secrets)",
                                 t.TokenList),
    ("DELETE", "/admin/tokens/{token_id}"): Op("admin", "Revoke an API token", t.TokenInfo,
                                               errors=(404,)),
    ("GET", "/admin/audit"): Op(
        "admin", "The audit trail: who changed what, when", t.AuditPage, errors=(400,),
        query=(
            Param("after", _int(0, 2**62), "the `next_after` of the previous page"),
            Param("limit", _int(1, 1000), "page size (default 100)"),
            Param("tenant", {"type": "string"}, "only this tenant's records"),
        ),
    ),
    ("GET", "/admin/tenants"): Op("admin", "Tenants: shares, quotas and use", t.TenantList),
    ("GET", "/admin/tenants/{name}"): Op("admin", "One tenant's share, quotas and use",
                                         t.TenantView),
    ("PUT", "/admin/tenants/{name}"): Op(
        "admin", "Set a tenant's weight and quotas", t.TenantView, errors=(413, 422),
        body=TenantConfig,
        description="Durable with its audit record before it applies; queued work is "
        "reconsidered at once.",
    ),
    ("POST", "/services"): Op(
        "services", "Create a model service: replicas placed like tasks, served on /v1",
        t.ServiceView, errors=(409, 413, 422), body=ServiceSpec, query=(SERVICE_TENANT,),
        also={201: t.ServiceView},
        description="A submit token's tenant owns it; its replicas' GPUs count against that "
        "tenant's quota. 409 when the tenant already has a service of that name or model, "
        "or MESH_MAX_SERVICES exist. Answered once durable (with its audit record).",
    ),
    ("GET", "/services"): Op(
        "services", "The caller's tenant's services (an admin's: every tenant's)",
        t.ServiceList, query=(SERVICE_TENANT,),
    ),
    ("GET", "/services/{name}"): Op(
        "services", "One service, its replicas and its history", t.ServiceView,
        errors=(400, 404, 409),
        query=(Param("history", _int(0, 1000), "how many of the newest events (default 50)"),
               SERVICE_TENANT),
        description="Another tenant's service is a 404. 409: an admin's name matches several "
        "tenants' services (add `?tenant=`).",
    ),
    ("PUT", "/services/{name}"): Op(
        "services", "Replace a service's spec", t.ServiceView, errors=(404, 409, 413, 422),
        body=ServiceSpec, query=(SERVICE_TENANT,),
        description="Replicas that run an older command are replaced: new ones first, each "
        "old one stopped once a new one is ready. A service cannot be renamed.",
    ),
    ("DELETE", "/services/{name}"): Op(
        "services", "Delete a service and stop its replicas", t.ServiceDeleted,
        errors=(404, 409), query=(SERVICE_TENANT,),
    ),
    # The OpenAI-compatible API (coordinator/web/openai.py): answers and refusals in OpenAI's
    # shapes; 401/403 are the middleware's.
    ("GET", "/v1/models"): Op(
        "openai", "The models the caller's tenant serves (OpenAI's list shape)", t.ModelList,
        also={s: t.OpenAIError for s in (401, 403)},
    ),
    ("GET", "/v1/models/{model}"): Op(
        "openai", "One model the caller's tenant serves", t.ModelCard,
        also={s: t.OpenAIError for s in (401, 403, 404)},
    ),
    **{("POST", path): Op(
        "openai", f"OpenAI's {path.removeprefix('/v1/')}, answered by a ready replica",
        V1_ANSWER, body=dict[str, Any], also=V1_ERRORS,
        description="The body goes to a ready replica of the caller's tenant's service of "
        "its `model`, over that node's own link; the engine's answer (SSE with `stream: "
        "true`) is passed through as it comes. 404 `model_not_found` for an unknown model "
        "or another tenant's; 413 past MESH_SERVE_MAX_BODY_BYTES; 429 over the tenant's "
        "rate; 503 with Retry-After when no replica is ready within MESH_SERVE_COLD_START_S "
        "or MESH_SERVE_MAX_STREAMS are open; 502 when the replica failed before answering "
        "(tried once more elsewhere first); 504 when it sent nothing within "
        "MESH_SERVE_HEAD_TIMEOUT_S. Errors are OpenAI's shape.",
    ) for path in ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")},
    ("GET", "/openapi.json"): Op(
        "console", "This document (OpenAPI 3.1)",
        {"application/json": "the OpenAPI 3.1 document"},
    ),
    ("GET", "/docs"): Op("console", "This document, rendered", HTML),
    ("GET", "/ui"): Op("console", "The console: nodes, queue, tasks, logs", HTML),
    ("GET", "/ui/assets/{name}"): Op(
        "console", "A script or stylesheet of the pages",
        {"text/javascript": "a script", "text/css": "a stylesheet"}, errors=(404,),
    ),
    (WEBSOCKET, "/ws/{node_id}"): Op(
        "nodes", "The compute clients' WebSocket", {},
        description="Compute clients connect here and send `register` first, with the join "
        "token (or their credential). Messages are JSON objects tagged by `type`: "
        "`ClientMessage` from the node, `ServerMessage` from the coordinator. Close codes: "
        "1008 bad token, 4001 superseded, 4002 protocol unsupported, 4003 node lost, "
        "4004 name taken, 4005 slow consumer, 1013 too many connections.",
    ),
}

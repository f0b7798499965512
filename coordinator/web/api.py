"""HTTP routes: translate requests into Mesh calls and Mesh state into JSON. No state here.

Bad input is a 4xx with `{"error": <what>, "reason": <why>}`; the reason for a body comes
from msgspec ("Expected `int`, got `str` - at `$.priority`").
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

import msgspec
import orjson
from prometheus_client import CONTENT_TYPE_LATEST
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse
from starlette.routing import Route

from coordinator.access.audit import Audit
from coordinator.access.auth import Principal, principal_of
from coordinator.core.mesh import AlreadyFinished, Mesh, UnknownTask
from coordinator.model import Task, TaskState
from coordinator.storage.store import AuditInsert, StoreError
from coordinator.web.edge import (
    MAX_OFFSET,
    BodyTooLarge,
    decode_cursor,
    encode_cursor,
    frame_refusal,
    item_refusal,
    launch_refusal,
    open_id_chunks,
    read_body,
    stream_tasks,
)
from coordinator.web.templates import TemplateError, parse_submission
from coordinator.web.views import mesh_status, node_view, redact_task_ids, task_view, tasks_of
from shared import __version__
from shared.limits import Throttled
from shared.tasks import TASK_TYPES

log = logging.getLogger(__name__)

MAX_BATCH = 10_000
_unencodable = Throttled(log)  # logged once per 10 s


class JSON(Response):
    media_type = "application/json"

    def render(self, content: Any) -> bytes:
        try:
            return orjson.dumps(content)
        except orjson.JSONEncodeError as exc:  # defence in depth: see views.jsonable
            from coordinator.web.views import jsonable

            _unencodable.warning("render", "an answer held what JSON cannot carry (%s): "
                                 "sent with those values as null", exc)
            return orjson.dumps(jsonable(content))


# (status, JSON document, extra headers): what a route computes, before it is a Response,
# so that the fast lane (coordinator/web/fastlane.py) can send the same answer without one.
Answer = tuple[int, Any, dict[str, str] | None]


def refused(status: int, what: str, reason: str, headers: dict[str, str] | None = None) -> Answer:
    return status, {"error": what, "reason": reason}, headers


def as_json(answer: Answer) -> JSON:
    status, doc, headers = answer
    return JSON(doc, status_code=status, headers=headers)


def error(status: int, what: str, reason: str) -> JSON:
    return as_json(refused(status, what, reason))


def not_stored(exc: Exception) -> Answer:
    """A write that could not be committed, or the Mesh rebuilding after one: retry soon.
    (The app's handler for a `StoreError` a route lets through, and the fast lane's.)"""
    return refused(503, "not stored", str(exc), {"Retry-After": "1"})


def _mesh(request: Request) -> Mesh:
    mesh: Mesh = request.app.state.mesh
    return mesh


def _param(
    request: Request, name: str, cast: type[int] | type[float], lo: float, hi: float
) -> float | None:
    """A numeric query parameter in [lo, hi], or None when absent; 400 with the reason."""
    raw = request.query_params.get(name)
    if raw is None:
        return None
    kind = "an integer" if cast is int else "a number"
    try:
        value = cast(raw)
    except ValueError:
        raise HTTPException(400, f"`{name}` must be {kind}, got {raw!r}") from None
    if not lo <= value <= hi:
        raise HTTPException(400, f"`{name}` must be between {lo:g} and {hi:g}, got {value:g}")
    return value


def listed_tenant(request: Request) -> str | None:
    """Whose tasks this caller lists: its tenant's; an admin's all (None) or `?tenant=`."""
    who = principal_of(request)
    return request.query_params.get("tenant") if who.role == "admin" else who.tenant


def visible(request: Request) -> Callable[[str], bool]:
    only = listed_tenant(request)
    return (lambda tenant: True) if only is None else (lambda tenant: tenant == only)


def audit_row(request: Request, action: str, task_ids: list[str]) -> AuditInsert:
    """The audit record of a change, committed in the same transaction as the change."""
    return audit_of(request.app.state.audit, principal_of(request), action, task_ids)


def audit_of(audit: Audit, who: Principal, action: str, task_ids: list[str]) -> AuditInsert:
    target = task_ids[0] if len(task_ids) == 1 else f"{len(task_ids)} tasks"
    return audit.row(who, action, target, {"task_ids": task_ids})


async def index(request: Request) -> JSON:
    return JSON({
        "name": "gpumesh",
        "service": "gpumesh coordinator",
        "version": __version__,
        "coordinator": _mesh(request).settings.name,
        "task_types": list(TASK_TYPES),
        "links": {
            "health": "/health", "status": "/mesh/status", "nodes": "/mesh/nodes",
            "submit": "/tasks/submit", "active": "/tasks/active",
            "completed": "/tasks/completed", "task": "/tasks/{task_id}",
            "metrics": "/metrics", "websocket": "/ws/{node_id}",
        },
    })


async def health(request: Request) -> JSON:
    role = request.app.state.role  # coordinator/leader/standby.py: leader | standby, and the leader
    if not role.leading:  # a standby forwards the API to `leader`; with none known it cannot
        why = role.unready()
        return JSON({"status": why or "healthy", "version": __version__, "online_nodes": 0,
                     **role.fields()}, status_code=503 if why else 200)
    mesh = _mesh(request)
    online = sum(1 for n in mesh.nodes.values() if n.online)
    if mesh.broken:  # rebuilding from the store: not ready, say why (503 for load balancers)
        return JSON({"status": "rebuilding", "version": __version__, "online_nodes": online,
                     "reason": mesh.broken, **role.fields()}, status_code=503)
    return JSON({"status": "healthy", "version": __version__, "online_nodes": online,
                 **role.fields()})


def private_to(request: Request) -> str | None:
    """The tenant a caller who is not an admin is kept to (other tenants' task ids, names and
    usage left out of what it is shown; coordinator/web/views.py); None for an admin."""
    who = principal_of(request)
    return None if who.sees_all_tenants else who.tenant


def _mine(request: Request) -> Callable[[str], bool] | None:
    tenant = private_to(request)
    return None if tenant is None else tasks_of(_mesh(request), tenant)


async def status(request: Request) -> JSON:
    mesh = _mesh(request)
    await mesh.settled()
    return JSON(mesh_status(mesh, private_to(request)))


async def nodes(request: Request) -> JSON:
    mesh = _mesh(request)
    await mesh.settled()
    mine = _mine(request)
    views = {name: node_view(n, detail=True, mine=mine)
             for name, n in sorted(mesh.nodes.items())}
    return JSON({"nodes": views, "count": len(views)})


async def node(request: Request) -> JSON:
    n = _mesh(request).nodes.get(request.path_params["name"])
    if n is None:
        return error(404, "unknown node", f"no node named {request.path_params['name']!r}")
    return JSON(node_view(n, detail=True, mine=_mine(request)))


async def submit(request: Request) -> JSON:
    limits = _mesh(request).settings
    try:
        body = await read_body(request, limits.max_body_bytes)
    except BodyTooLarge as exc:
        return error(413, "body too large", str(exc))
    return as_json(await accept_tasks(request.app.state, principal_of(request), body))


async def accept_tasks(state: Any, who: Principal, body: bytes) -> Answer:
    """`POST /tasks/submit` after its body was read: the route and the fast lane
    (coordinator/web/fastlane.py) both answer with this."""
    mesh: Mesh = state.mesh
    try:
        doc = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        return refused(400, "invalid JSON", str(exc))
    batch = isinstance(doc, list)
    items = doc if batch else [doc]
    if not items or len(items) > MAX_BATCH:
        return refused(400, "invalid task", f"send 1 to {MAX_BATCH} tasks")
    if (full := queue_full(mesh, len(items))) is not None:
        return full
    specs = []  # every item is checked before anything changes: a batch is all or nothing
    templates = state.templates
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            return refused(422, "invalid task", f"item {i}: expected an object")
        path = f"$[{i}]" if batch else "$"
        if why := item_refusal(item, path):
            return refused(422, "invalid task", why)
        try:
            spec, params = parse_submission(item, templates)
        except (msgspec.ValidationError, TemplateError) as exc:
            where = f"item {i}: " if batch else ""
            return refused(422, "invalid task", f"{where}{exc}")
        if why := launch_refusal(spec, path):  # what no node could start: not a node's fault
            return refused(422, "invalid task", why)
        if why := frame_refusal(spec, params, path):
            return refused(413, "task too large", why)
        specs.append((spec, params))
    if who.role != "admin":  # a tenant's token stamps its tenant; the body cannot choose
        specs = [(msgspec.structs.replace(s, tenant=who.tenant), p) for s, p in specs]
    if (over := tenant_refusal(mesh, [s.tenant for s, _ in specs])) is not None:
        return over
    audit: Audit = state.audit
    try:
        tasks = await mesh.submit(
            specs, also=lambda ts: audit_of(audit, who, "task.submit", [t.id for t in ts])
        )
    except StoreError as exc:
        return not_stored(exc)
    accepted = [{"task_id": t.id, "status": "queued"} for t in tasks]
    if batch:
        return 200, {"tasks": accepted, "count": len(accepted)}, None
    return 200, accepted[0], None


async def active(request: Request) -> Response:
    """Every unfinished task the caller may see, streamed in slices, its ids read from the
    store in chunks, so a 1,000,000-task backlog never holds the loop for long (edge.py)."""
    mesh = _mesh(request)
    see = visible(request)
    await mesh.settled()  # the snapshot below holds no transition still being written
    if not mesh.loaded.is_set():
        # After a restart queued tasks stream into memory; until they are all there an id
        # read from the store could be missed, and the seed's client reads "missing" as done.
        await mesh.loaded.wait()

    def lookup(task_id: str) -> Task | None:
        t = mesh.tasks.get(task_id)
        return t if t is not None and see(t.tenant) else None

    reason = queued_reason_for(mesh, principal_of(request))
    ids = open_id_chunks(mesh.store)
    body = stream_tasks(ids, lookup, lambda t: task_view(t, reason(t)))
    return StreamingResponse(body, media_type="application/json")


async def completed(request: Request) -> JSON:
    mesh = _mesh(request)
    limit = int(_param(request, "limit", int, 1, 1000) or 100)
    offset = int(_param(request, "offset", int, 0, MAX_OFFSET) or 0)
    cursor = request.query_params.get("cursor") or request.query_params.get("after")
    after = decode_cursor(cursor) if cursor else None
    if cursor and after is None:
        return error(400, "bad request", "`cursor` is not one this server gave out (`next`)")
    tenant = listed_tenant(request)
    page = await mesh.store.finished_page(limit + 1, after, offset, tenant)  # one more: next?
    more = len(page) > limit
    nxt = offset + limit if more and after is None else None
    page = page[:limit]
    # per tenant there is no running count: `total` is null in a tenant's view
    total = sum(mesh.finished_counts.values()) if tenant is None else None
    return JSON({
        "tasks": {t.id: task_view(t) for t in page},
        "count": len(page),
        "total": total,
        "limit": limit,
        "offset": offset,
        "next_offset": nxt,
        "next": encode_cursor(page[-1]) if more else None,  # pass as `?cursor=`
    })


async def task(request: Request) -> JSON:
    mesh = _mesh(request)
    wait = _param(request, "wait", float, 0, mesh.settings.max_wait_s)
    return as_json(await task_answer(mesh, principal_of(request),
                                     request.path_params["task_id"], wait))


def queued_reason_for(mesh: Mesh, who: Principal) -> Callable[[Task], str]:
    """Why a queued task waits, as `who` may read it: the reason names nodes and may quote
    what a node said (a quarantine's last error, its health), so a caller who is not an
    admin gets it without task ids (another tenant's could be in it)."""
    if who.sees_all_tenants:
        return mesh.queued_reason
    return lambda t: redact_task_ids(mesh.queued_reason(t))


async def task_answer(mesh: Mesh, who: Principal, task_id: str, wait: float | None) -> Answer:
    """`GET /tasks/{id}[?wait=s]`: the route and the fast lane both answer with this."""
    t = await mesh.lookup(task_id)
    if t is not None and not who.sees(t.tenant):
        t = None  # another tenant's task is not there for this caller
    if t is None:
        return refused(404, "unknown task", f"no task {task_id}")
    if wait:
        await mesh.wait_finished(task_id, wait)
        t = await mesh.lookup(task_id) or t
    view = task_view(t, queued_reason_for(mesh, who)(t))
    view["params"] = orjson.loads(t.params_raw)  # what the template was filled with
    if t.gang_size > 1:  # a gang: its members, rank by rank (coordinator/core/gangs.py)
        view["gang"] = mesh.gangs.view(t)
    return 200, view, None


async def cancel(request: Request) -> JSON:
    task_id = request.path_params["task_id"]
    known = await _mesh(request).lookup(task_id)
    if known is not None and not principal_of(request).sees(known.tenant):
        return error(404, "unknown task", f"no task {task_id}")
    try:
        t = await _mesh(request).cancel(
            task_id, also=audit_row(request, "task.cancel", [task_id])
        )
    except UnknownTask:
        return error(404, "unknown task", f"no task {task_id}")
    except AlreadyFinished as exc:
        return error(409, "already finished", str(exc))
    return JSON(task_view(t))


async def logs(request: Request) -> Response:
    mesh = _mesh(request)
    task_id = request.path_params["task_id"]
    t = await mesh.lookup(task_id)
    if t is None or not principal_of(request).sees(t.tenant):
        return error(404, "unknown task", f"no task {task_id}")
    if (rank := request.query_params.get("rank")) is not None:  # a gang's member's logs
        member = mesh.gangs.member_id(t, int(rank)) if rank.isdigit() and len(rank) < 4 else None
        if t.gang_size < 2 or member is None:
            why = f"task {task_id} has no member of rank {rank[:20]!r}"
            return error(404, "unknown rank", why + (" (not a gang)" if t.gang_size < 2 else ""))
        task_id, t = member, await mesh.lookup(member)
        if t is None:
            return error(404, "unknown task", f"no task {task_id}")
    follow = request.query_params.get("follow", "").lower() in ("1", "true", "yes")
    unfinished = task_id in mesh.tasks
    if follow and unfinished and mesh.logs.followers >= mesh.settings.max_log_followers:
        cap = mesh.settings.max_log_followers
        busy = error(429, "too many followers", f"{cap} follow already (MESH_MAX_LOG_FOLLOWERS)")
        busy.headers["Retry-After"] = "5"
        return busy
    buf = mesh.logs.open(task_id) if follow and unfinished else mesh.logs.get(task_id)
    if not follow or buf is None or buf.closed:
        text = buf.text() if buf is not None else (t.result or {}).get("output", "")
        return Response(text, media_type="text/plain; charset=utf-8")
    timeout = mesh.settings.max_wait_s

    async def stream() -> AsyncIterator[bytes]:
        async for chunk in mesh.logs.follow(buf, timeout):  # counted against the cap
            yield chunk.encode()

    return StreamingResponse(stream(), media_type="text/plain; charset=utf-8")


def queue_full(mesh: Mesh, adding: int) -> Answer | None:
    """429 with Retry-After when `adding` more tasks would pass MESH_MAX_QUEUED."""
    queued, cap = mesh.state_counts[TaskState.QUEUED], mesh.settings.max_queued
    if queued + adding <= cap:
        return None
    return refused(429, "queue full",
                   f"{queued} tasks queued; the limit is {cap} (MESH_MAX_QUEUED)",
                   {"Retry-After": "5"})


def tenant_refusal(mesh: Mesh, tenants: list[str]) -> Answer | None:
    """429 when a tenant's `max_queued` or rate would be passed (coordinator/scheduling/tenants.py);
    with Retry-After when waiting helps. Nothing is stored."""
    why, wait = mesh.fair.admit_many(tenants, time.monotonic())
    if not why:
        return None
    retry = {"Retry-After": str(max(1, math.ceil(wait)))} if wait is not None else None
    return refused(429, "tenant quota", why, retry)


async def metrics(request: Request) -> Response:
    # On the loop on purpose: the gauges read live Mesh state, which only the loop may touch.
    # Series that name a tenant only for an admin or a `metrics` token (tenant privacy).
    body = _mesh(request).metrics.exposition(principal_of(request).can("metrics"))
    return Response(body, media_type=CONTENT_TYPE_LATEST)


routes = [
    Route("/", index),
    Route("/health", health),
    Route("/mesh/status", status),
    Route("/mesh/nodes", nodes),
    Route("/mesh/nodes/{name}", node),
    Route("/tasks/submit", submit, methods=["POST"]),
    Route("/tasks/active", active),
    Route("/tasks/completed", completed),
    Route("/tasks/{task_id}", task),
    Route("/tasks/{task_id}", cancel, methods=["DELETE"]),
    Route("/tasks/{task_id}/cancel", cancel, methods=["POST"]),
    Route("/tasks/{task_id}/logs", logs),
    Route("/metrics", metrics),
]

"""The SDK's requests as values, and the calls that take several requests as generators:
no I/O here (gpumesh/sdk.py runs them on httpx, sync or async). Like a sans-I/O protocol
core: `Calls.get(id, wait=5)` is a `Call` (method, path, parameters, the parser of its
answer); `wait_steps` yields `Call`s, receives parsed answers (or has a `MeshError` thrown
into it), and returns its result."""

from __future__ import annotations

import re
import time
import urllib.parse
from collections.abc import Callable, Generator, Mapping
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import msgspec

from gpumesh.sdk_types import (
    FINISHED,
    DrainState,
    Health,
    MeshError,
    MeshStatus,
    NodeInfo,
    ServiceInfo,
    Submitted,
    TaskInfo,
    TaskPage,
)

LONG_POLL_S = 60.0  # one `?wait=` request; lowered to the server's MESH_MAX_WAIT_S if less
_WAIT_CAP = re.compile(r"`wait` must be between \S+ and (\d+(?:\.\d+)?)")
T = TypeVar("T")


@dataclass(frozen=True)
class Call(Generic[T]):
    method: str
    path: str
    parse: Callable[[Any], T]
    params: Mapping[str, str] = field(default_factory=dict)
    body: Any = None
    timeout: float = 30.0


def _as(kind: type[T]) -> Callable[[Any], T]:
    return lambda doc: msgspec.convert(doc, kind, strict=False)


def _q(part: str) -> str:
    return urllib.parse.quote(part, safe="")


def _spec(spec: Any, fields: dict[str, Any]) -> dict[str, Any]:
    if spec is None:
        return fields
    doc = spec if isinstance(spec, dict) else msgspec.to_builtins(spec)
    return {**doc, **fields}


def _tasks_of(doc: Any) -> list[TaskInfo]:
    views = doc.get("tasks", {})
    items = views.values() if isinstance(views, dict) else views
    return [msgspec.convert(v, TaskInfo, strict=False) for v in items]


class Calls:
    """Every request the SDK makes, as a value; no I/O here."""

    @staticmethod
    def submit(spec: Any = None, **fields: Any) -> Call[Submitted]:
        return Call("POST", "/tasks/submit", _as(Submitted), body=_spec(spec, fields))

    @staticmethod
    def submit_many(specs: list[Any]) -> Call[list[Submitted]]:
        body = [_spec(s, {}) for s in specs]
        return Call("POST", "/tasks/submit", lambda d: msgspec.convert(
            d["tasks"], list[Submitted], strict=False), body=body)

    @staticmethod
    def get(task_id: str, wait: float = 0) -> Call[TaskInfo]:
        params = {"wait": f"{wait:g}"} if wait > 0 else {}
        return Call("GET", f"/tasks/{_q(task_id)}", _as(TaskInfo), params, timeout=wait + 30)

    @staticmethod
    def cancel(task_id: str) -> Call[TaskInfo]:
        return Call("POST", f"/tasks/{_q(task_id)}/cancel", _as(TaskInfo))

    @staticmethod
    def nodes() -> Call[list[NodeInfo]]:
        def parse(doc: Any) -> list[NodeInfo]:
            return [msgspec.convert({"name": k} | v, NodeInfo, strict=False)
                    for k, v in doc.get("nodes", {}).items()]

        return Call("GET", "/mesh/nodes", parse)

    @staticmethod
    def health(timeout: float = 30.0) -> Call[Health]:
        return Call("GET", "/health", _as(Health), timeout=timeout)

    @staticmethod
    def status() -> Call[MeshStatus]:
        return Call("GET", "/mesh/status", _as(MeshStatus))

    @staticmethod
    def drain(name: str, reason: str = "", lift: bool = False) -> Call[DrainState]:
        verb = "undrain" if lift else "drain"
        body = {} if lift else {"reason": reason}
        return Call("POST", f"/mesh/nodes/{_q(name)}/{verb}", _as(DrainState), body=body)

    @staticmethod
    def forget(name: str) -> Call[dict[str, Any]]:
        return Call("DELETE", f"/mesh/nodes/{_q(name)}", dict)

    @staticmethod
    def serve(spec: Any = None, **fields: Any) -> Call[ServiceInfo]:
        return Call("POST", "/services", _as(ServiceInfo), body=_spec(spec, fields))

    @staticmethod
    def services() -> Call[list[ServiceInfo]]:
        return Call("GET", "/services", lambda d: msgspec.convert(
            d.get("services", []), list[ServiceInfo], strict=False))

    @staticmethod
    def service(name: str, history: int = 50) -> Call[ServiceInfo]:
        return Call("GET", f"/services/{_q(name)}", _as(ServiceInfo),
                    {"history": str(min(max(history, 0), 1000))})

    @staticmethod
    def update_service(name: str, spec: Any = None, **fields: Any) -> Call[ServiceInfo]:
        body = {"name": name, **_spec(spec, fields)}
        return Call("PUT", f"/services/{_q(name)}", _as(ServiceInfo), body=body)

    @staticmethod
    def delete_service(name: str) -> Call[dict[str, Any]]:
        return Call("DELETE", f"/services/{_q(name)}", dict)

    @staticmethod
    def raw(method: str, path: str, body: Any = None) -> Call[Any]:
        """Any route, its JSON answer as is (the routes the typed calls do not cover)."""
        return Call(method, path, lambda doc: doc, body=body)

    @staticmethod
    def active(tenant: str | None) -> Call[list[TaskInfo]]:
        params = {"tenant": tenant} if tenant else {}
        return Call("GET", "/tasks/active", _tasks_of, params, timeout=120)

    @staticmethod
    def completed(limit: int, cursor: str, tenant: str | None) -> Call[tuple[list[TaskInfo],
                                                                             str | None]]:
        params = {"limit": str(min(max(limit, 1), 1000))}
        if cursor:
            params["cursor"] = cursor
        if tenant:
            params["tenant"] = tenant
        return Call("GET", "/tasks/completed", lambda d: (_tasks_of(d), d.get("next")), params)

    @staticmethod
    def logs(task_id: str, follow: bool, rank: int | None = None) -> Call[str]:
        params = {"follow": "1"} if follow else {}
        if rank is not None:  # one rank of a gang task (issue 28)
            params["rank"] = str(rank)
        return Call("GET", f"/tasks/{_q(task_id)}/logs", str, params)


Steps = Generator[Call[Any], Any, T]


def wait_steps(task_id: str, timeout: float) -> Steps[TaskInfo]:
    """Long-poll `GET /tasks/{id}?wait=` until the task ends or `timeout` passes; the task
    as last seen (check `.finished`)."""
    deadline = time.monotonic() + timeout
    poll = LONG_POLL_S
    while True:
        left = deadline - time.monotonic()
        try:
            t: TaskInfo = yield Calls.get(task_id, wait=min(max(left, 0), poll))
        except MeshError as exc:  # a server whose MESH_MAX_WAIT_S is below our poll
            cap = _WAIT_CAP.search(exc.reason) if exc.status == 400 else None
            if cap is None or float(cap.group(1)) >= poll:
                raise
            poll = float(cap.group(1))
            continue
        if t.finished or left <= 0:
            return t


def tasks_steps(
    state: str | None, node: str | None, tenant: str | None, limit: int, cursor: str | None
) -> Steps[TaskPage]:
    """One page of tasks. Unfinished ones come first (from /tasks/active, cursor
    "active:N"), then finished ones newest first (/tasks/completed, cursor "done:C").
    `state` and `node` are filtered here, so a page may hold fewer than `limit` rows and
    still have a `next`."""
    cursor = cursor or ("done:" if state in FINISHED else "active:0")

    def keep(t: TaskInfo) -> bool:
        return (state is None or t.status == state) and (node is None or t.node == node)

    if cursor.startswith("active:"):
        offset = int(cursor.split(":", 1)[1] or 0)
        rows = [t for t in (yield Calls.active(tenant)) if keep(t)]
        rows.sort(key=lambda t: (-t.priority, t.submitted_at or ""))
        page = rows[offset:offset + limit]
        if offset + limit < len(rows):
            return TaskPage(tasks=page, next=f"active:{offset + limit}")
        return TaskPage(tasks=page, next="done:" if state is None else None)
    rows, nxt = yield Calls.completed(limit, cursor.split(":", 1)[1], tenant)
    return TaskPage(tasks=[t for t in rows if keep(t)], next=f"done:{nxt}" if nxt else None)


class LogResume:
    """What a log follow already gave, so that following again (after the server's idle
    limit) skips it: the server resends the held log from its start."""

    def __init__(self) -> None:
        self.given = 0  # characters (newlines included) handed to the caller
        self.pos = 0  # position in the current stream

    def again(self) -> None:
        self.pos = 0

    def admit(self, line: str) -> str | None:
        size = len(line) + 1
        start, self.pos = self.given - self.pos, self.pos + size
        if start >= size:
            return None
        self.given = self.pos
        return line[max(start, 0):]

"""gpumesh's Python SDK: submit work, wait for it, follow its logs, look at the mesh.

    from shared.sdk import Client, AsyncClient

    with Client() as mesh:                      # MESH_URL / MESH_API_TOKEN, or ./mesh-data
        task = mesh.submit(task_type="test", priority=7)
        done = mesh.wait(task.task_id, timeout=60)
        print(done.status, done.result)

    async with AsyncClient("http://gpu-head:8001", token) as mesh:
        async for line in mesh.logs(task_id, follow=True):
            print(line)

One implementation, two transports: every call is a `Call` (method, path, parameters and
the parser of its answer) built by `Calls`; calls that take several requests (`wait`,
paging) are generators that yield `Call`s and receive parsed answers. `Client` runs them on
`httpx.Client`, `AsyncClient` on `httpx.AsyncClient`; nothing else differs.

Errors: an answer that is not 2xx raises `MeshError(status, error, reason)` with the
server's own words; a coordinator that cannot be reached raises `MeshUnreachable` (a
`MeshError` and a `ConnectionError`, status 0).
"""

from __future__ import annotations

import os
import re
import ssl
import time
import urllib.parse
from collections.abc import AsyncIterator, Callable, Generator, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any, Generic, TypeVar

import httpx
import msgspec

from shared.sdk_types import (
    FINISHED,
    UNFINISHED,
    DrainMark,
    DrainState,
    GpuView,
    MeshError,
    MeshStatus,
    MeshUnreachable,
    NodeInfo,
    Submitted,
    TaskInfo,
    TaskPage,
)

__all__ = [
    "FINISHED", "UNFINISHED", "AsyncClient", "Call", "Calls", "Client", "DrainMark",
    "DrainState", "GpuView", "MeshError", "MeshStatus", "MeshUnreachable", "NodeInfo",
    "Submitted", "TaskInfo", "TaskPage", "default_token", "default_url", "token_file",
]

DEFAULT_URL = "http://127.0.0.1:8001"
LONG_POLL_S = 60.0  # one `?wait=` request; lowered to the server's MESH_MAX_WAIT_S if less
_WAIT_CAP = re.compile(r"`wait` must be between \S+ and (\d+(?:\.\d+)?)")
T = TypeVar("T")


# --- where and who -------------------------------------------------------------------------


def default_url() -> str:
    return os.environ.get("MESH_URL", "").strip() or DEFAULT_URL


def token_file() -> Path:
    return Path(os.environ.get("MESH_DATA_DIR") or "./mesh-data") / "admin.token"


def default_token() -> str:
    """MESH_API_TOKEN, else MESH_TOKEN, else the admin token the coordinator wrote to
    <MESH_DATA_DIR or ./mesh-data>/admin.token; "" when there is none."""
    for var in ("MESH_API_TOKEN", "MESH_TOKEN"):
        token = os.environ.get(var, "").strip()
        if token:
            return token
    try:
        return token_file().read_text().strip()
    except OSError:
        return ""


def _verify() -> ssl.SSLContext | bool:
    ca = os.environ.get("MESH_CA_FILE", "").strip()  # a private CA for https:// URLs
    return ssl.create_default_context(cafile=ca) if ca else True


# --- requests and their parsers (shared by both clients) ------------------------------------


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


def _check(resp: httpx.Response) -> Any:
    """The answer's JSON, or MeshError with the server's `error` and `reason`."""
    if resp.is_success:
        return resp.json() if resp.content else {}
    try:
        doc = resp.json()
    except ValueError:
        doc = None
    if isinstance(doc, dict) and "error" in doc:
        raise MeshError(resp.status_code, str(doc["error"]), str(doc.get("reason", "")))
    raise MeshError(resp.status_code, f"HTTP {resp.status_code}", resp.text.strip()[:300])


def _unreachable(url: str, exc: httpx.TransportError) -> MeshUnreachable:
    why = str(exc) or type(exc).__name__
    return MeshUnreachable(url, why.splitlines()[0])


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
    def logs(task_id: str, follow: bool) -> Call[str]:
        params = {"follow": "1"} if follow else {}
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


class _Resume:
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


# --- the two clients -----------------------------------------------------------------------


class _Base:
    def __init__(self, url: str | None, token: str | None) -> None:
        self.url = (url or default_url()).rstrip("/")
        self.token = default_token() if token is None else token
        self._headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _req(self, call: Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"params": dict(call.params), "timeout": call.timeout}
        if call.body is not None:
            args["json"] = call.body
        return args


class Client(_Base):
    """The blocking client. `Client(url, token)`; both default from the environment."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        super().__init__(url, token)
        self._http = httpx.Client(base_url=self.url, headers=self._headers, verify=_verify())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, call: Call[T]) -> T:
        try:
            resp = self._http.request(call.method, call.path, **self._req(call))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return call.parse(_check(resp))

    def _run(self, steps: Steps[T]) -> T:
        try:
            call = next(steps)
            while True:
                try:
                    answer = self.call(call)
                except MeshError as exc:  # the steps may handle it (wait: a lower cap)
                    call = steps.throw(exc)
                    continue
                call = steps.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    def submit(self, spec: Any = None, **fields: Any) -> Submitted:
        return self.call(Calls.submit(spec, **fields))

    def submit_many(self, specs: list[Any]) -> list[Submitted]:
        return self.call(Calls.submit_many(specs))

    def get(self, task_id: str) -> TaskInfo:
        return self.call(Calls.get(task_id))

    def wait(self, task_id: str, timeout: float = 300.0) -> TaskInfo:
        return self._run(wait_steps(task_id, timeout))

    def cancel(self, task_id: str) -> TaskInfo:
        return self.call(Calls.cancel(task_id))

    def tasks(self, state: str | None = None, node: str | None = None,
              tenant: str | None = None, limit: int = 100, cursor: str | None = None) -> TaskPage:
        return self._run(tasks_steps(state, node, tenant, limit, cursor))

    def nodes(self) -> list[NodeInfo]:
        return self.call(Calls.nodes())

    def status(self) -> MeshStatus:
        return self.call(Calls.status())

    def drain(self, name: str, reason: str = "") -> DrainState:
        return self.call(Calls.drain(name, reason))

    def undrain(self, name: str) -> DrainState:
        return self.call(Calls.drain(name, lift=True))

    def forget(self, name: str) -> dict[str, Any]:
        return self.call(Calls.forget(name))

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self.call(Calls.raw(method, path, body))

    def logs(self, task_id: str, follow: bool = False) -> Iterator[str]:
        """The task's output, line by line; with `follow`, until the task ends."""
        resume = _Resume()
        while True:
            call = Calls.logs(task_id, follow)
            try:
                with self._http.stream("GET", call.path, params=dict(call.params),
                                       timeout=httpx.Timeout(30, read=None)) as resp:
                    if not resp.is_success:
                        resp.read()
                        _check(resp)
                    for line in resp.iter_lines():
                        if (new := resume.admit(line)) is not None:
                            yield new
            except httpx.TransportError as exc:
                raise _unreachable(self.url, exc) from None
            if not follow or self.get(task_id).finished:
                return
            resume.again()  # idle past the server's follow limit: follow again


class AsyncClient(_Base):
    """The asyncio client: the same calls as `Client`, awaited."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        super().__init__(url, token)
        self._http = httpx.AsyncClient(base_url=self.url, headers=self._headers,
                                       verify=_verify())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, call: Call[T]) -> T:
        try:
            resp = await self._http.request(call.method, call.path, **self._req(call))
        except httpx.TransportError as exc:
            raise _unreachable(self.url, exc) from None
        return call.parse(_check(resp))

    async def _run(self, steps: Steps[T]) -> T:
        try:
            call = next(steps)
            while True:
                try:
                    answer = await self.call(call)
                except MeshError as exc:
                    call = steps.throw(exc)
                    continue
                call = steps.send(answer)
        except StopIteration as done:
            return done.value  # type: ignore[no-any-return]

    async def submit(self, spec: Any = None, **fields: Any) -> Submitted:
        return await self.call(Calls.submit(spec, **fields))

    async def submit_many(self, specs: list[Any]) -> list[Submitted]:
        return await self.call(Calls.submit_many(specs))

    async def get(self, task_id: str) -> TaskInfo:
        return await self.call(Calls.get(task_id))

    async def wait(self, task_id: str, timeout: float = 300.0) -> TaskInfo:
        return await self._run(wait_steps(task_id, timeout))

    async def cancel(self, task_id: str) -> TaskInfo:
        return await self.call(Calls.cancel(task_id))

    async def tasks(self, state: str | None = None, node: str | None = None,
                    tenant: str | None = None, limit: int = 100,
                    cursor: str | None = None) -> TaskPage:
        return await self._run(tasks_steps(state, node, tenant, limit, cursor))

    async def nodes(self) -> list[NodeInfo]:
        return await self.call(Calls.nodes())

    async def status(self) -> MeshStatus:
        return await self.call(Calls.status())

    async def drain(self, name: str, reason: str = "") -> DrainState:
        return await self.call(Calls.drain(name, reason))

    async def undrain(self, name: str) -> DrainState:
        return await self.call(Calls.drain(name, lift=True))

    async def forget(self, name: str) -> dict[str, Any]:
        return await self.call(Calls.forget(name))

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return await self.call(Calls.raw(method, path, body))

    async def logs(self, task_id: str, follow: bool = False) -> AsyncIterator[str]:
        """The task's output, line by line; with `follow`, until the task ends."""
        resume = _Resume()
        while True:
            call = Calls.logs(task_id, follow)
            try:
                async with self._http.stream("GET", call.path, params=dict(call.params),
                                             timeout=httpx.Timeout(30, read=None)) as resp:
                    if not resp.is_success:
                        await resp.aread()
                        _check(resp)
                    async for line in resp.aiter_lines():
                        if (new := resume.admit(line)) is not None:
                            yield new
            except httpx.TransportError as exc:
                raise _unreachable(self.url, exc) from None
            if not follow or (await self.get(task_id)).finished:
                return
            resume.again()

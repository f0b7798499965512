"""gpumesh's Python SDK: submit work, wait for it, follow its logs, look at the mesh.

    from gpumesh import Client, AsyncClient

    with Client() as mesh:                      # MESH_URL / MESH_API_TOKEN, or ./mesh-data
        task = mesh.submit(task_type="test", priority=7)
        done = mesh.wait(task.task_id, timeout=60)
        print(done.status, done.result)

    async with AsyncClient("http://gpu-head:8001", token) as mesh:
        async for line in mesh.logs(task_id, follow=True):
            print(line)

One implementation, two transports: every call is a `Call` (method, path, parameters and
the parser of its answer) built by `Calls`; calls that take several requests (`wait`,
paging) are generators that yield `Call`s and receive parsed answers (gpumesh/sdk_calls.py,
no I/O). `Client` runs them on `httpx.Client`, `AsyncClient` on `httpx.AsyncClient`;
nothing else differs. The results are msgspec Structs (gpumesh/sdk_types.py).

A URL may be a comma-separated list of the coordinators of one mesh (HA): a request goes to
the one that answered last, and to the next when a connection cannot even be opened.

Errors: an answer that is not 2xx raises `MeshError(status, error, reason)` with the
server's own words; a coordinator that cannot be reached raises `MeshUnreachable` (a
`MeshError` and a `ConnectionError`, status 0).
"""

from __future__ import annotations

import os
import ssl
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import httpx

from gpumesh.sdk_calls import Call, Calls, LogResume, Steps, tasks_steps, wait_steps
from gpumesh.sdk_types import (
    FINISHED,
    UNFINISHED,
    DrainMark,
    DrainState,
    GpuView,
    Health,
    MeshError,
    MeshStatus,
    MeshUnreachable,
    NodeInfo,
    ReplicaInfo,
    ServiceInfo,
    Submitted,
    TaskInfo,
    TaskPage,
)

__all__ = [
    "FINISHED", "UNFINISHED", "AsyncClient", "Call", "Calls", "Client", "DrainMark",
    "DrainState", "GpuView", "Health", "MeshError", "MeshStatus", "MeshUnreachable", "NodeInfo",
    "ReplicaInfo", "ServiceInfo", "Submitted", "TaskInfo", "TaskPage", "default_token",
    "default_url", "token_file",
]

DEFAULT_URL = "http://127.0.0.1:8001"
T = TypeVar("T")


# --- where and who -------------------------------------------------------------------------


def default_url() -> str:
    return os.environ.get("MESH_URL", "").strip() or DEFAULT_URL


def token_file() -> Path:
    return Path(os.environ.get("MESH_DATA_DIR") or "./mesh-data") / "admin.token"


def default_token() -> str:
    """MESH_API_TOKEN, else the admin token the coordinator wrote to
    <MESH_DATA_DIR or ./mesh-data>/admin.token; "" when there is none. (Never MESH_TOKEN:
    that is a node's join token, not an API token.)"""
    token = os.environ.get("MESH_API_TOKEN", "").strip()
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



# --- the two clients -----------------------------------------------------------------------


_NOTHING_SENT = (httpx.ConnectError, httpx.ConnectTimeout)  # safe to try the next URL


class _Base:
    def __init__(self, url: str | None, token: str | None) -> None:
        # "http://a:8001,http://b:8001": coordinators of one mesh (HA); the one that last
        # answered is asked first, the next one when a connection cannot even be opened.
        urls = [u.strip().rstrip("/") for u in (url or default_url()).split(",")]
        self.urls = list(dict.fromkeys(u for u in urls if u)) or [DEFAULT_URL]
        self.url = self.urls[0]
        self.token = default_token() if token is None else token
        self._headers = {"Authorization": f"Bearer {self.token}"} if self.token else {}

    def _bases(self) -> list[str]:
        return [self.url, *(u for u in self.urls if u != self.url)]

    def _req(self, call: Call[Any]) -> dict[str, Any]:
        args: dict[str, Any] = {"params": dict(call.params), "timeout": call.timeout}
        if call.body is not None:
            args["json"] = call.body
        return args


class Client(_Base):
    """The blocking client. `Client(url, token)`; both default from the environment."""

    def __init__(self, url: str | None = None, token: str | None = None) -> None:
        super().__init__(url, token)
        self._http = httpx.Client(headers=self._headers, verify=_verify())

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def call(self, call: Call[T]) -> T:
        last: httpx.TransportError | None = None
        for base in self._bases():
            try:
                resp = self._http.request(call.method, base + call.path, **self._req(call))
            except _NOTHING_SENT as exc:
                last = exc
                continue
            except httpx.TransportError as exc:
                raise _unreachable(base, exc) from None
            self.url = base
            return call.parse(_check(resp))
        assert last is not None
        raise _unreachable(", ".join(self.urls), last)

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

    def health(self, timeout: float = 30.0) -> Health:
        """`GET /health`; a coordinator that is not ready (503) raises MeshError."""
        return self.call(Calls.health(timeout))

    def status(self) -> MeshStatus:
        return self.call(Calls.status())

    def drain(self, name: str, reason: str = "") -> DrainState:
        return self.call(Calls.drain(name, reason))

    def undrain(self, name: str) -> DrainState:
        return self.call(Calls.drain(name, lift=True))

    def forget(self, name: str) -> dict[str, Any]:
        return self.call(Calls.forget(name))

    def serve(self, spec: Any = None, **fields: Any) -> ServiceInfo:
        """Create a model service (`POST /services`): name, model, engine or command..."""
        return self.call(Calls.serve(spec, **fields))

    def services(self) -> list[ServiceInfo]:
        return self.call(Calls.services())

    def service(self, name: str, history: int = 50) -> ServiceInfo:
        return self.call(Calls.service(name, history))

    def update_service(self, name: str, spec: Any = None, **fields: Any) -> ServiceInfo:
        return self.call(Calls.update_service(name, spec, **fields))

    def delete_service(self, name: str) -> dict[str, Any]:
        return self.call(Calls.delete_service(name))

    def request(self, method: str, path: str, body: Any = None) -> Any:
        return self.call(Calls.raw(method, path, body))

    def logs(self, task_id: str, follow: bool = False,
             rank: int | None = None) -> Iterator[str]:
        """The task's output, line by line; with `follow`, until the task ends. `rank`: the
        output of that rank of a gang task."""
        resume = LogResume()
        if len(self.urls) > 1:
            self.get(task_id)  # finds the coordinator that answers
        while True:
            call = Calls.logs(task_id, follow, rank)
            try:
                with self._http.stream("GET", self.url + call.path, params=dict(call.params),
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
        self._http = httpx.AsyncClient(headers=self._headers, verify=_verify())

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def call(self, call: Call[T]) -> T:
        last: httpx.TransportError | None = None
        for base in self._bases():
            try:
                resp = await self._http.request(call.method, base + call.path,
                                                **self._req(call))
            except _NOTHING_SENT as exc:
                last = exc
                continue
            except httpx.TransportError as exc:
                raise _unreachable(base, exc) from None
            self.url = base
            return call.parse(_check(resp))
        assert last is not None
        raise _unreachable(", ".join(self.urls), last)

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

    async def health(self, timeout: float = 30.0) -> Health:
        """`GET /health`; a coordinator that is not ready (503) raises MeshError."""
        return await self.call(Calls.health(timeout))

    async def status(self) -> MeshStatus:
        return await self.call(Calls.status())

    async def drain(self, name: str, reason: str = "") -> DrainState:
        return await self.call(Calls.drain(name, reason))

    async def undrain(self, name: str) -> DrainState:
        return await self.call(Calls.drain(name, lift=True))

    async def forget(self, name: str) -> dict[str, Any]:
        return await self.call(Calls.forget(name))

    async def serve(self, spec: Any = None, **fields: Any) -> ServiceInfo:
        return await self.call(Calls.serve(spec, **fields))

    async def services(self) -> list[ServiceInfo]:
        return await self.call(Calls.services())

    async def service(self, name: str, history: int = 50) -> ServiceInfo:
        return await self.call(Calls.service(name, history))

    async def update_service(self, name: str, spec: Any = None, **fields: Any) -> ServiceInfo:
        return await self.call(Calls.update_service(name, spec, **fields))

    async def delete_service(self, name: str) -> dict[str, Any]:
        return await self.call(Calls.delete_service(name))

    async def request(self, method: str, path: str, body: Any = None) -> Any:
        return await self.call(Calls.raw(method, path, body))

    async def logs(self, task_id: str, follow: bool = False,
                   rank: int | None = None) -> AsyncIterator[str]:
        """The task's output, line by line; with `follow`, until the task ends. `rank`: the
        output of that rank of a gang task."""
        resume = LogResume()
        if len(self.urls) > 1:
            await self.get(task_id)
        while True:
            call = Calls.logs(task_id, follow, rank)
            try:
                async with self._http.stream("GET", self.url + call.path, params=dict(call.params),
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

"""A coordinator's role (leader or standby), and what a standby does with what it cannot serve.

With SQLite a coordinator is always the leader. With PostgreSQL it starts as a standby and
leads once it holds the lease (coordinator/leader/lease.py). A standby:

- answers `GET /health` itself (`"role": "standby"`, `"leader": "<url>"`);
- forwards every other HTTP request to the leader with `httpx` — method, path, query, the
  caller's headers (its `Authorization` too: the leader decides), the body read under
  `MESH_MAX_BODY_BYTES` — and streams the leader's answer back as it comes (long polls,
  `logs?follow` and `/v1` streams included); a caller who disconnects closes the request to
  the leader, which then sees its caller leave (a `/v1` stream is cancelled on its node).
  No leader known, or the leader unreachable: 503 + `Retry-After`.
  Only an origin-form target is forwarded (a path from `/`, `origin_form`), and the URL is
  the leader's base with that path and query (`upstream_url`), so nothing a caller writes
  can name another host: `*`, `http://host/x` or `@host:port/x` get 400;
- accepts a node's WebSocket and closes it at once with 4010 NOT_LEADER, the reason being the
  leader's ws:// URL, so the node goes there (if that URL is one it was configured with); with
  no leader known it closes with 1013 TRY_AGAIN_LATER.

A forwarded request carries `X-Gpumesh-Forwarded`; a coordinator that is not the leader never
forwards such a request again (two standbys with stale views would otherwise bounce it).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote_from_bytes

import httpx
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from coordinator.leader.lease import Lead, Leadership, Lease, new_holder_id, serve_leadership
from coordinator.settings import Settings
from coordinator.storage.store import Deposed, StoreError
from shared.protocol import CloseCode

log = logging.getLogger(__name__)

FORWARDED = b"x-gpumesh-forwarded"
_HOP = frozenset({
    b"connection", b"keep-alive", b"proxy-authenticate", b"proxy-authorization", b"te",
    b"trailer", b"transfer-encoding", b"upgrade", b"host", b"content-length",
})
_HOP_OUT = frozenset({b"connection", b"keep-alive", b"transfer-encoding"})
# What a path or query may hold as it is (RFC 3986 pchar, "/", "%"; "?" in the query); the
# rest is percent-encoded, so a `#`, a backslash or a space cannot change what a URL means.
_PATH_SAFE = "/:@!$&'()*+,;=-._~%"
_QUERY_SAFE = _PATH_SAFE + "?"


def origin_form(scope: Scope) -> bytes | None:
    """The path and query this server parsed from the request target, percent-encoded where
    a URL may not hold a byte as it is; None when the target is not a path from `/` (origin
    form): `*`, an absolute URL, `@host:port/x`."""
    raw: bytes = scope.get("raw_path") or scope["path"].encode()
    if not raw.startswith(b"/"):
        return None
    target = quote_from_bytes(raw, safe=_PATH_SAFE)
    if query := scope.get("query_string", b""):
        target += "?" + quote_from_bytes(query, safe=_QUERY_SAFE)
    return target.encode("ascii")


def upstream_url(leader_url: str, target: bytes) -> httpx.URL:
    """The leader's base URL with `target` (from `origin_form`) as its path and query: the
    scheme, host and port are the leader's whatever the target holds."""
    base = httpx.URL(leader_url)
    return base.copy_with(raw_path=base.raw_path.rstrip(b"/") + target)


def advertise_url(host: str, port: int, tls: bool, configured: str = "") -> str:
    """Where other coordinators and nodes reach this one: MESH_ADVERTISE_URL, else built from
    the bind address (a wildcard bind advertises this machine's host name)."""
    if configured:
        return configured.rstrip("/")
    if host in ("", "0.0.0.0", "::"):
        host = socket.gethostname()
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if tls else 'http'}://{host}:{port}"


def ws_url_of(url: str) -> str:
    """`http://h:p` -> `ws://h:p`, `https://` -> `wss://`."""
    if url.startswith("https://"):
        return "wss://" + url[len("https://"):]
    if url.startswith("http://"):
        return "ws://" + url[len("http://"):]
    return url


@dataclass
class Role:
    """What this coordinator is now; the lease loop sets it, requests read it."""

    url: str  # this coordinator's advertised URL
    state: str = "standby"  # standby | promoting | leader
    leader_url: str = ""  # the leader's URL ("" = none known); ours while leading
    http: httpx.AsyncClient | None = field(default=None, repr=False)

    @classmethod
    def sole(cls, url: str) -> Role:
        """SQLite: the only coordinator, always the leader."""
        return cls(url=url, state="leader", leader_url=url)

    @property
    def leading(self) -> bool:
        return self.state == "leader"

    def set(self, state: str, leader_url: str) -> None:
        if (state, leader_url) != (self.state, self.leader_url):
            log.info("role: %s (leader: %s)", state, leader_url or "none known")
        self.state, self.leader_url = state, leader_url

    def unready(self) -> str:
        """Why a coordinator that is not leading cannot serve the API now ("" if it can)."""
        if self.state == "promoting":
            return "starting"  # it holds the lease and is loading the mesh
        if not self.leader_url or self.leader_url == self.url:
            return "no leader"  # the lease is free, lapsing, or its own from a previous life
        return ""

    def fields(self) -> dict[str, Any]:
        """What `GET /health` adds: the role, and where the leader is (None: not known)."""
        return {"role": "leader" if self.leading else "standby",
                "leader": self.leader_url or None}


class BodyRefused(Exception):
    """Raised by the gate's `read_body` for a body it will not forward (413, with this
    message as the reason)."""


def _unavailable(reason: str) -> JSONResponse:
    resp = JSONResponse({"error": "no leader", "reason": reason}, status_code=503)
    resp.headers["Retry-After"] = "1"
    return resp


class StandbyGate:
    """ASGI middleware, outermost: passes everything through while leading; otherwise
    answers /health locally (the app does), forwards HTTP and redirects node sockets.

    `read_body` reads a request's body under MESH_MAX_BODY_BYTES or raises BodyRefused: the
    web face's reader, passed in by coordinator.web.app (leadership imports nothing of it)."""

    def __init__(
        self, app: ASGIApp, *, role: Callable[[], Role | None],
        read_body: Callable[[Request], Awaitable[bytes]],
    ) -> None:
        self.app, self.role, self.read_body = app, role, read_body

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        role = self.role()
        kind = scope["type"]
        if role is None or role.leading or kind == "lifespan" or (
            kind == "http" and scope["path"] == "/health"
        ):
            await self.app(scope, receive, send)
        elif kind == "websocket":
            await _redirect_node(role, receive, send)
        else:
            await self._forward(role, scope, receive, send)

    async def _forward(self, role: Role, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        target = origin_form(scope)
        if target is None:
            resp = JSONResponse({"error": "bad request target", "reason": (
                "a standby forwards only a path from '/' (origin form), not "
                f"{scope['path'][:64]!r}")}, status_code=400)
            return await resp(scope, receive, send)
        if why := role.unready():
            reason = ("this coordinator is loading the mesh as the new leader"
                      if why == "starting" else "no leader elected yet (the lease is free or "
                      "lapsing)")
            return await _unavailable(f"{reason}; retry shortly")(scope, receive, send)
        assert role.http is not None
        if any(k == FORWARDED for k, _ in scope["headers"]):
            return await _unavailable("forwarded by another standby: this one is not the "
                                      "leader either; retry shortly")(scope, receive, send)
        try:
            body = await self.read_body(request)
        except BodyRefused as exc:
            resp = JSONResponse({"error": "body too large", "reason": str(exc)}, 413)
            return await resp(scope, receive, send)
        headers = [(k, v) for k, v in scope["headers"] if k.lower() not in _HOP]
        headers.append((FORWARDED, role.url.encode()))
        url = upstream_url(role.leader_url, target)
        req = role.http.build_request(scope["method"], url, headers=headers, content=body)
        # uvicorn drops what is sent to a caller that left without a word, so a relay alone
        # would hold the leader's answer open until its next chunk, for ever where none comes
        # (a stream the engine still computes, a completion not yet answered, a long poll):
        # the caller's `http.disconnect` is watched from here on, and closes the request to
        # the leader, which then sees its own caller leave (a `/v1` stream is cancelled on
        # its node).
        gone = asyncio.ensure_future(_caller_gone(receive))
        try:
            await self._answer(role, scope, req, gone, send)
        finally:
            gone.cancel()
            if gone.done() and not gone.cancelled():
                gone.exception()  # retrieved: a broken `receive` counts as the caller gone

    async def _answer(self, role: Role, scope: Scope, req: httpx.Request,
                      gone: asyncio.Future[None], send: Send) -> None:
        assert role.http is not None
        sending = asyncio.ensure_future(role.http.send(req, stream=True))
        if not await _first(sending, gone):
            return _left(scope, "before the leader answered")
        try:
            upstream = sending.result()
        except httpx.HTTPError as exc:
            log.warning("forwarding %s %r to the leader %s failed: %s", scope["method"],
                        scope["path"], role.leader_url, exc)
            return await _unavailable(f"the leader {role.leader_url} did not answer "
                                      f"({type(exc).__name__}); retry shortly")(
                scope, _no_body, send)
        try:
            await send({"type": "http.response.start", "status": upstream.status_code,
                        "headers": [(k, v) for k, v in upstream.headers.raw
                                    if k.lower() not in _HOP_OUT]})
            relaying = asyncio.ensure_future(_relay(upstream, send))
            if not await _first(relaying, gone):
                return _left(scope, "before the leader's answer ended")
            relaying.result()  # the leader's answer broke off: raised, as before
        finally:
            await upstream.aclose()  # mid-answer: closes the connection, the leader sees it


async def _first(work: asyncio.Future[Any], gone: asyncio.Future[None]) -> bool:
    """Wait for `work` or the caller's leaving; False (and `work` cancelled and over) if
    the caller left first."""
    await asyncio.wait((work, gone), return_when=asyncio.FIRST_COMPLETED)
    if work.done():
        return True
    work.cancel()
    await asyncio.wait((work,))  # its cleanup (httpx closing the connection) has run
    if not work.cancelled() and work.exception() is None:
        with contextlib.suppress(Exception):
            await work.result().aclose()  # a response that came as it was cancelled
    return False


async def _caller_gone(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass  # the body was read already: only a disconnect can come


async def _no_body() -> Message:
    """The `receive` of an answer made here (the watcher owns the caller's)."""
    return {"type": "http.disconnect"}


async def _relay(upstream: httpx.Response, send: Send) -> None:
    async for chunk in upstream.aiter_raw():
        await send({"type": "http.response.body", "body": chunk, "more_body": True})
    await send({"type": "http.response.body", "body": b"", "more_body": False})


def _left(scope: Scope, when: str) -> None:
    log.info("the caller of a forwarded %s %r left %s: the request to the leader is closed",
             scope["method"], scope["path"][:64], when)


async def _redirect_node(role: Role, receive: Receive, send: Send) -> None:
    """Accept, then close: 4010 with the leader's ws URL (1013 while none is known). Closing
    before accepting would answer the handshake with 403, which nodes treat as fatal."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    await send({"type": "websocket.accept"})
    if not role.unready():
        code, reason = CloseCode.NOT_LEADER, ws_url_of(role.leader_url)
    else:
        code, reason = CloseCode.TRY_AGAIN_LATER, "no leader yet: retry shortly"
    await send({"type": "websocket.close", "code": int(code), "reason": reason[:123]})


def forwarding_client(settings: Settings) -> httpx.AsyncClient:
    """The standby's client to the leader. A read may wait as long as the leader itself
    stays silent before an answer: a long poll (`max_wait_s`), or a `/v1` request that waits
    for a replica to start (MESH_SERVE_COLD_START_S) and then for its answer's head
    (MESH_SERVE_HEAD_TIMEOUT_S: a non-streamed completion's head comes with its end); the
    leader's own deadlines answer first. A caller who leaves closes the request sooner.

    Each forwarded request holds a connection to the leader while its answer lasts: as many
    at once as the leader holds long answers of its bounded kinds (MESH_SERVE_MAX_STREAMS
    `/v1` streams, MESH_MAX_LOG_FOLLOWERS `logs?follow`), not httpx's default 100, past
    which a caller waited for one and got 503."""
    silent_s = max(settings.max_wait_s,
                   settings.serve_cold_start_s + settings.serve_head_timeout_s)
    timeout = httpx.Timeout(connect=3.0, read=silent_s + 30.0, write=30.0, pool=5.0)
    limits = httpx.Limits(max_connections=settings.serve_max_streams
                          + settings.max_log_followers, max_keepalive_connections=64)
    return httpx.AsyncClient(timeout=timeout, limits=limits, follow_redirects=False,
                             trust_env=False)


def postgres_dsn(settings: Settings) -> str | None:
    """The PostgreSQL URL of MESH_STORE, or None (SQLite: no lease, always the leader)."""
    store = settings.store
    return store if store.startswith(("postgresql://", "postgres://")) else None


def fence_store(store: Any, epoch: int, depose: Callable[[str], None]) -> None:
    """Fence the store at `epoch`; a write it refuses as `Deposed` also tells the lease loop,
    which steps down now rather than at the next renewal. Call after the Mesh is built (it
    sets `store.on_failure`)."""
    store.fence(epoch)
    mesh_failed: Callable[[StoreError], None] | None = store.on_failure

    def failed(err: StoreError) -> None:
        if isinstance(err, Deposed):
            depose(f"a write was refused: {err}")
        if mesh_failed is not None:
            mesh_failed(err)

    store.on_failure = failed


@contextlib.asynccontextmanager
async def serve_role(state: Any, settings: Settings, lead: Lead) -> AsyncIterator[None]:
    """SQLite: lead for the whole life of the app. PostgreSQL: run the lease loop, leading
    while it holds the lease and forwarding as a standby otherwise."""
    url = advertise_url(settings.host, settings.port, settings.tls_cert is not None,
                        settings.advertise_url)
    dsn = postgres_dsn(settings)
    if dsn is None:
        state.role = Role.sole(url)
        async with lead(None, None):  # type: ignore[arg-type]
            yield
        return
    role = Role(url=url, http=forwarding_client(settings))
    state.role = role
    leadership = Leadership(Lease(dsn, new_holder_id(), url, settings.lease_s), lead,
                            on_role=role.set)
    state.leadership = leadership
    log.info("PostgreSQL store: starting as a standby at %s (lease %.1fs)", url,
             settings.lease_s)
    try:
        async with serve_leadership(leadership):
            yield
    finally:
        await role.http.aclose()  # type: ignore[union-attr]

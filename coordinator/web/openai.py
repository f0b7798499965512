"""The OpenAI-compatible API: `/v1/models`, `/v1/chat/completions`, `/v1/completions`,
`/v1/embeddings`, routed to a tenant's model services (issue 27).

A request names a `model`; the caller's tenant's service of that model
(`mesh.services.lookup`) has ready replicas (`ready`; with none, `wait_ready` starts one and
waits up to MESH_SERVE_COLD_START_S, then 503 with Retry-After). One is chosen by the
service's `routing` (coordinator/scheduling/routing.py), and the request travels to it as a
stream over its node's own WebSocket (coordinator/link/streams.py). The answer is passed
through as it comes, chunk by chunk (SSE included), never held whole; the caller's pace is
the node's (credit). A caller that goes away cancels the engine's request. A replica whose
node goes away, or whose answer breaks off, before a byte reached the caller, is tried once
more on another ready replica; after that the answer ends short: an SSE answer with an
`error` event, any other by closing the connection before its last chunk.

Errors are OpenAI's shape, `{"error": {"message", "type", "param", "code"}}`: a body that is
not a JSON object 400, an unknown model (or another tenant's) 404 `model_not_found`, a body
over MESH_SERVE_MAX_BODY_BYTES 413, a tenant over its rate 429 with Retry-After, no stream
room or no ready replica 503 with Retry-After, a replica that failed 502, one that sent no
answer within MESH_SERVE_HEAD_TIMEOUT_S 504. Auth is the middleware's: `read` for GET,
`submit` for the POSTs (coordinator/access/auth.py).
"""

from __future__ import annotations

import asyncio
import logging
import math
import random
import re
import time
import weakref
from collections.abc import Generator, Sequence
from typing import Any

import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from coordinator.access.auth import Message, Receive, Scope, Send, principal_of
from coordinator.core.mesh import Mesh
from coordinator.core.services import Replica, Service, ServiceManager
from coordinator.link.streams import Stream, StreamBroken, StreamTable
from coordinator.model import Link
from coordinator.scheduling.fairshare import tenant_of
from coordinator.scheduling.routing import PrefixRing, least_loaded, prompt_key
from coordinator.scheduling.tenants import TokenBucket
from coordinator.settings import Settings
from coordinator.web.edge import BodyTooLarge, read_body

log = logging.getLogger(__name__)

# The routes and the engine path each one goes to.
PATHS = {
    "/v1/chat/completions": "/v1/chat/completions",
    "/v1/completions": "/v1/completions",
    "/v1/embeddings": "/v1/embeddings",
}
_USAGE = re.compile(rb'"completion_tokens"\s*:\s*(\d{1,12})')
_SSE = b"text/event-stream"


# --- answers ----------------------------------------------------------------------------

def _error_body(message: str, kind: str, code: str, param: str | None = None) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param,
                                   "code": code}})


async def _answer(send: Send, status: int, body: bytes,
                  headers: Sequence[tuple[bytes, bytes]] = ()) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [
        (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
        *headers]})
    await send({"type": "http.response.body", "body": body})


class Refusal(Exception):
    """An answer in OpenAI's error shape, before anything was sent."""

    KINDS = {400: "invalid_request_error", 404: "invalid_request_error",
             413: "invalid_request_error", 429: "rate_limit_error", 502: "server_error",
             503: "server_error", 504: "server_error"}

    def __init__(self, status: int, code: str, message: str, *, param: str | None = None,
                 retry_after: float | None = None) -> None:
        super().__init__(message)
        self.status, self.code, self.message, self.param = status, code, message, param
        self.retry_after = retry_after

    async def send(self, send: Send) -> None:
        headers = [] if self.retry_after is None else [
            (b"retry-after", str(max(1, math.ceil(self.retry_after))).encode())]
        body = _error_body(self.message, self.KINDS.get(self.status, "server_error"),
                           self.code, self.param)
        await _answer(send, self.status, body, headers)


# --- the router -------------------------------------------------------------------------

class Router:
    """The /v1 side of one leadership: the stream table, the rings of `prefix` services
    and the tenants' request buckets. Built with the Mesh (coordinator/web/app.py)."""

    def __init__(self, settings: Settings, rng: random.Random | None = None) -> None:
        self.settings = settings
        self.streams = StreamTable(
            max_streams=settings.serve_max_streams,
            max_per_node=settings.serve_max_streams_per_node,
            window=settings.serve_window_bytes)
        self.rng = rng or random.Random()
        self._rings: weakref.WeakKeyDictionary[Service, PrefixRing] = (
            weakref.WeakKeyDictionary())
        self.buckets: dict[str, TokenBucket] = {}

    def over_rate(self, mesh: Mesh, tenant: str, now: float) -> float:
        """Seconds to wait when `tenant` is over its rate (its `rate` and `burst`, the ones
        submissions have, counted in a bucket of its own for requests); 0.0 when it is not."""
        config = mesh.fair.config(tenant_of(tenant))
        if config.rate is None:
            return 0.0
        bucket = self.buckets.get(tenant)
        burst = float(config.burst or max(1, math.ceil(config.rate)))
        if bucket is None or bucket.rate != config.rate or bucket.burst != burst:
            bucket = self.buckets[tenant] = TokenBucket(config.rate, burst, burst, now)
        return bucket.take(1, now)

    def choose(self, mesh: Mesh, svc: Service, ready: Sequence[Replica], key: str,
               tried: set[str], size: int = 0) -> tuple[Replica, Link] | str:
        """(replica, its node's link) to send this request (its `stream_open` about `size`
        bytes) to, or why none. A node whose link already holds half its queue bound
        (MESH_WS_QUEUE_BYTES) is passed over: a burst of large requests must not make the
        link close the node as a slow consumer."""
        streams = self.streams
        if len(streams) >= streams.max_streams:
            return f"{len(streams)} requests in flight (MESH_SERVE_MAX_STREAMS)"
        fit: list[Replica] = []
        why = "no ready replica"
        for r in ready:
            if r.task_id in tried:
                continue
            node = mesh.nodes.get(r.node)
            if node is None or node.link is None:
                why = f"the node of replica {r.task_id} is not connected"
                continue
            if room := streams.room(r.node):
                why = room
                continue
            queued, bound = _backlog(node.link)
            if bound and queued + size > bound // 2:
                why = f"the link to node {r.node} has {queued} bytes waiting to be read"
                continue
            fit.append(r)
        if not fit:
            return why
        if key and len(fit) > 1 and svc.spec.routing == "prefix":
            ring = self._rings.get(svc)  # over every ready replica: a full one is skipped
            ids = tuple(sorted(r.task_id for r in ready))
            if ring is None or ring.ids != ids:
                ring = self._rings[svc] = PrefixRing(ids)
            chosen = ring.pick(key, fit)
        else:
            chosen = least_loaded(fit, self.rng)
        link = mesh.nodes[chosen.node].link
        assert link is not None  # checked above, with no await between
        return chosen, link


def _backlog(link: Link) -> tuple[int, int]:
    """(bytes queued to the node, the link's bound on them); (0, 0) for a link that does not
    say (coordinator/link/ws.py WsLink does)."""
    return getattr(link, "queued_bytes", 0), getattr(link, "max_bytes", 0)


def _leading(scope: Scope) -> tuple[Mesh, Router] | None:
    state = scope["app"].state
    mesh: Mesh | None = getattr(state, "mesh", None)
    router: Router | None = getattr(state, "router", None)
    return None if mesh is None or router is None else (mesh, router)


# --- GET /v1/models ---------------------------------------------------------------------

def _model_doc(svc: Service) -> dict[str, Any]:
    return {"id": svc.model, "object": "model", "created": int(svc.created_at),
            "owned_by": svc.tenant}


async def models(request: Request) -> Response:
    found = _leading(request.scope)
    listed = [] if found is None else found[0].services.models(principal_of(request).tenant)
    model = request.path_params.get("model")
    if model is not None:
        match = [s for s in listed if s.model == model]
        if not match:
            return Response(_error_body(f"The model `{model}` does not exist",
                                        "invalid_request_error", "model_not_found", "model"),
                            404, media_type="application/json")
        return Response(orjson.dumps(_model_doc(match[0])), media_type="application/json")
    doc = {"object": "list", "data": [_model_doc(s) for s in listed]}
    return Response(orjson.dumps(doc), media_type="application/json")


# --- POST /v1/chat/completions, /v1/completions, /v1/embeddings -------------------------

class Relay:
    """The endpoint of the three POST routes, a raw ASGI one (as Starlette's HTTPEndpoint:
    made per request with scope, receive and send, then awaited): it watches for the
    caller's disconnect from the moment the body is read and passes chunks through as they
    come, with no Request/Response objects on the way."""

    def __init__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.scope, self.receive, self.send = scope, receive, send

    def __await__(self) -> Generator[Any, None, None]:
        return self._answer().__await__()

    async def _answer(self) -> None:
        try:
            await self._relay(self.scope, self.receive, self.send)
        except Refusal as refusal:
            await refusal.send(self.send)

    async def _relay(self, scope: Scope, receive: Receive, send: Send) -> None:
        found = _leading(scope)
        if found is None:
            raise Refusal(503, "not_ready", "the coordinator is starting", retry_after=1)
        mesh, router = found
        request = Request(scope, receive)
        tenant = principal_of(request).tenant  # the tenant services are stored under
        if wait := router.over_rate(mesh, tenant, time.monotonic()):
            raise Refusal(429, "rate_limit_exceeded",
                          f"tenant {tenant} is over its rate of requests (its `rate` and "
                          "`burst`, as for submissions)", retry_after=wait)
        limit = router.settings.serve_max_body_bytes
        try:
            raw = await read_body(request, limit)
        except BodyTooLarge:
            raise Refusal(413, "request_too_large", f"the request body is larger than {limit} "
                          "bytes (MESH_SERVE_MAX_BODY_BYTES)") from None
        body = _json_object(raw)
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise Refusal(400, "invalid_request_error", "`model` must be a non-empty string",
                          param="model")
        services = mesh.services
        svc = services.lookup(tenant, model)
        if svc is None:
            raise Refusal(404, "model_not_found", f"The model `{model}` does not exist",
                          param="model")
        call = _Call(mesh, router, services, svc, scope["path"], body, raw)
        watcher = asyncio.ensure_future(_watch(receive, call))
        try:
            await call.run(send)
        finally:
            watcher.cancel()


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise Refusal(400, "invalid_json", f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise Refusal(400, "invalid_request_error", "the body must be a JSON object")
    return body


async def _watch(receive: Receive, call: _Call) -> None:
    """Tells `call` when the caller disconnects (the body was read already)."""
    while True:
        msg: Message = await receive()
        if msg["type"] == "http.disconnect":
            call.caller_gone()
            return


class _Call:
    """One request's trip: choose, open, relay, report."""

    def __init__(self, mesh: Mesh, router: Router, services: ServiceManager, svc: Service,
                 path: str,
                 body: dict[str, Any], raw: bytes) -> None:
        self.mesh, self.router, self.services, self.svc = mesh, router, services, svc
        self.path, self.raw = PATHS[path], raw
        self.gone = asyncio.Event()
        self.stream: Stream | None = None
        self.key = prompt_key(body) if svc.spec.routing == "prefix" else ""
        self.t0 = time.perf_counter()

    def caller_gone(self) -> None:
        self.gone.set()
        if self.stream is not None:
            self.stream.cancel("the caller disconnected")

    async def run(self, send: Send) -> None:
        settings = self.router.settings
        tried: set[str] = set()
        last = ""
        text = self.raw.decode()  # orjson read it: valid UTF-8
        for _ in range(2):  # a second replica only when nothing reached the caller yet
            if self.gone.is_set():
                return
            ready: Sequence[Replica] = self.services.ready(self.svc)
            if not ready and not tried:
                ready = await self._cold_start(settings.serve_cold_start_s)
            picked = self.router.choose(self.mesh, self.svc, ready, self.key, tried,
                                        len(self.raw) + 256)
            if isinstance(picked, str):
                if last:
                    raise Refusal(502, "replica_failed", last)
                raise Refusal(503, "no_ready_replica", f"model {self.svc.model}: {picked}",
                              retry_after=1 if ready else min(10.0, settings.serve_cold_start_s))
            replica, link = picked
            tried.add(replica.task_id)
            stream = self.router.streams.open(replica.node, link, replica.task_id,
                                              replica.attempt, self.path, text)
            self.services.started(self.svc, replica)
            self.stream = stream
            try:
                last = await self._one(send, stream, replica)
            finally:
                self.stream = None
                stream.close()
            if not last:
                return
            log.info("model %s: replica %s failed before answering (%s)%s", self.svc.model,
                     replica.task_id, last, "" if len(tried) > 1 else "; trying another")
        raise Refusal(502, "replica_failed", f"model {self.svc.model}: {last}")

    async def _cold_start(self, timeout: float) -> Sequence[Replica]:
        """No replica is ready: the control plane starts one; waits up to `timeout` (or
        until the caller goes away)."""
        waiting = asyncio.ensure_future(self.services.wait_ready(self.svc, timeout))
        gone = asyncio.ensure_future(self.gone.wait())
        try:
            await asyncio.wait((waiting, gone), return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            if not waiting.done():
                waiting.cancel()
        if self.gone.is_set() or waiting.cancelled():
            return []
        return waiting.result()

    async def _one(self, send: Send, stream: Stream, replica: Replica) -> str:
        """Relay one attempt. "" when it is over (answered, or cut short after bytes went
        out); else why it failed before a byte reached the caller (another may be tried)."""
        status, ttft, tokens = 0, None, None
        gone = self.gone
        try:
            try:
                await stream.started(self.router.settings.serve_head_timeout_s)
            except StreamBroken as exc:
                if gone.is_set():
                    status = 499
                    return ""
                if exc.timeout:
                    status = 504
                    raise Refusal(504, "replica_timeout", f"model {self.svc.model}: "
                                  f"{exc.reason} (MESH_SERVE_HEAD_TIMEOUT_S)") from None
                status = 502
                return exc.reason
            ttft = time.perf_counter() - self.t0
            status = stream.status
            tokens = await self._pass_through(send, stream)
            return ""
        finally:
            self.services.finished(
                self.svc, replica, status=499 if gone.is_set() else status, ttft_s=ttft,
                duration_s=time.perf_counter() - self.t0, completion_tokens=tokens)

    async def _pass_through(self, send: Send, stream: Stream) -> int | None:
        """Send the answer as it comes; the completion tokens of its `usage`, if it said.
        An answer that is already whole here (most non-streamed ones: head, data and end
        came in one frame) goes out in one piece with its Content-Length."""
        ctype = stream.content_type.encode()
        sse = ctype.startswith(_SSE)
        headers = [(b"content-type", ctype), (b"cache-control", b"no-cache")]
        chunk = await stream.read()  # started(): bytes are here, or it ended whole
        if stream.ended and not stream.error and not stream.buffered:
            body = chunk or b""
            await send({"type": "http.response.start", "status": stream.status,
                        "headers": [*headers, (b"content-length", b"%d" % len(body))]})
            await send({"type": "http.response.body", "body": body})
            found = _USAGE.findall(body[-8192:])
            return int(found[-1]) if found else None
        await send({"type": "http.response.start", "status": stream.status, "headers": headers})
        prev = last = b""
        while True:
            try:
                if chunk is None:
                    chunk = await stream.read()
            except StreamBroken as exc:
                if self.gone.is_set():
                    return None
                log.warning("model %s: an answer broke off: %s", self.svc.model, exc.reason)
                if sse:  # an error event the client reads as such, then the end
                    event = b"data: " + _error_body(exc.reason, "server_error",
                                                    "replica_failed") + b"\n\n"
                    await send({"type": "http.response.body", "body": event})
                # else: returning without the body's last chunk makes the server close the
                # connection, so the caller sees an incomplete answer, never a short one
                return None
            if chunk is None:
                await send({"type": "http.response.body", "body": b""})
                break
            # the last chunk and the end of the body leave in one write when both are here
            done = stream.ended and not stream.error and not stream.buffered
            await send({"type": "http.response.body", "body": chunk, "more_body": not done})
            prev, last, chunk = last, chunk, None
            if done:
                break
        found = _USAGE.findall((prev + last)[-8192:])
        return int(found[-1]) if found else None


routes = [
    Route("/v1/models", models, methods=["GET"]),
    Route("/v1/models/{model:path}", models, methods=["GET"]),
    *(Route(path, Relay, methods=["POST"]) for path in PATHS),
]

"""The fast lane: the two requests of every task's life, answered without the full stack.

`POST /tasks/submit` and `GET /tasks/{id}[?wait=s]` are most of the API's traffic (the seed's
clients submit, then poll or long-poll). Through Starlette they cross the standby gate, CORS,
auth, the exception middleware, the router, a `Request` and a `Response`: about a third of a
submission's CPU on the coordinator (docs/benchmarks.md, issue 16). This ASGI middleware sits
just inside Starlette's error handler and answers those two requests itself, with the same
functions the routes use (`api.accept_tasks`, `api.task_answer`), but only in the plain case:

- this coordinator leads (a standby forwards, coordinator/leader/standby.py);
- no `Origin` header (a browser: CORS applies);
- a bearer token that resolves to a role allowed to make the request (or MESH_AUTH=off);
- for a submission, a JSON content type and a body within MESH_MAX_BODY_BYTES;
- for a read, no query but a valid `wait`.

The OpenAI API's `POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings` take
the lane too, in the same plain case (a leader, no `Origin`, a JSON content type, a token
that may `submit`): the caller is set as the auth middleware sets it and the router
(coordinator/web/openai.py `Relay`) answers, refusals included, from there. Every streamed
chunk of its answer then skips the stack's `send` wrappers as well (issue 27's benchmark).

Everything else, every refusal the middleware would make included (401, 403, 413, 415, a bad
`wait`), goes down the full stack, with the body already read replayed to it, so those
answers are the full stack's, byte for byte. Answers carry the headers the full stack adds
(`content-type`, `content-length`, `vary: Origin`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import orjson

from coordinator.access.auth import (
    ASGIApp,
    Message,
    Principal,
    Receive,
    Scope,
    Send,
    TokenBook,
    caller_of,
    headers_of,
    is_json,
)
from coordinator.storage.store import StoreError
from coordinator.web.api import Answer, accept_tasks, not_stored, task_answer
from coordinator.web.openai import PATHS as OPENAI_POSTS
from coordinator.web.openai import Relay

_SKIP = frozenset({"active", "completed"})  # /tasks/... routes of their own
_JSON = (b"content-type", b"application/json")
_VARY = (b"vary", b"Origin")


class FastLane:
    def __init__(
        self, app: ASGIApp, *, state: Callable[[], Any], auth: bool,
        book: Callable[[], TokenBook | None], max_body_bytes: int,
    ) -> None:
        self.app, self.state, self.auth, self.book = app, state, auth, book
        self.max_body = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            path: str = scope["path"]
            if path.startswith("/tasks/"):
                method = scope["method"]
                if method == "POST" and path == "/tasks/submit":
                    handed = await self._submit(scope, receive, send)
                    if handed is None:
                        return
                    receive = handed
                elif method == "GET" and await self._task(scope, path[7:], send):
                    return
            elif path in OPENAI_POSTS and scope["method"] == "POST" and self._openai(scope):
                await Relay(scope, receive, _vary(send))
                return
        await self.app(scope, receive, send)

    def _serving(self) -> Any:
        """The app state when this coordinator leads and its Mesh is up, else None."""
        state = self.state()
        role = getattr(state, "role", None)
        if role is None or not role.leading or getattr(state, "mesh", None) is None:
            return None
        return state

    def _caller(self, scope: Scope, need: str) -> tuple[Principal, dict[bytes, bytes]] | None:
        h = headers_of(scope)
        if b"origin" in h:
            return None
        who = caller_of(h, self.auth, self.book())
        return (who, h) if who is not None and who.can(need) else None

    def _openai(self, scope: Scope) -> bool:
        """Whether this `POST /v1/...` goes straight to the router (coordinator/web/openai.py),
        its caller set as the auth middleware would: a leader, a JSON body, a `submit` token.
        The router reads the body and answers every refusal of its own (413, 429, 404...)."""
        if self._serving() is None:
            return False
        caller = self._caller(scope, "submit")
        if caller is None or not is_json(caller[1].get(b"content-type")):
            return False
        scope.setdefault("state", {})["principal"] = caller[0]
        return True

    async def _submit(self, scope: Scope, receive: Receive, send: Send) -> Receive | None:
        """None when answered; else the `receive` to hand down (the body replayed)."""
        state = self._serving()
        caller = self._caller(scope, "submit") if state is not None else None
        if caller is None:
            return receive
        who, h = caller
        declared = h.get(b"content-length", b"")
        if not is_json(h.get(b"content-type")) or (
            declared.isdigit() and int(declared) > self.max_body
        ):
            return receive
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] != "http.request":  # the client left: let the stack see it
                return _replay(chunks, receive, True, message)
            chunk = message.get("body", b"")
            size += len(chunk)
            chunks.append(chunk)
            more = message.get("more_body", False)
            if size > self.max_body:  # the stack refuses it (413) the same way
                return _replay(chunks, receive, more)
        try:
            answer = await accept_tasks(state, who, b"".join(chunks))
        except StoreError as exc:  # as the app's exception handler answers it
            answer = not_stored(exc)
        await _send(send, answer)
        return None

    async def _task(self, scope: Scope, task_id: str, send: Send) -> bool:
        if not task_id or "/" in task_id or task_id in _SKIP:
            return False
        state = self._serving()
        if state is None:
            return False
        wait = _wait(scope.get("query_string", b""), state.mesh.settings.max_wait_s)
        if wait is False:
            return False
        caller = self._caller(scope, "read")
        if caller is None:
            return False
        try:
            answer = await task_answer(state.mesh, caller[0], task_id, wait or None)
        except StoreError as exc:  # the Mesh is rebuilding: as the app's handler answers
            answer = not_stored(exc)
        await _send(send, answer)
        return True


def _wait(query: bytes, most: float) -> float | bool | None:
    """`wait` from a query of nothing but `wait=<seconds>`: None when absent, False when
    the query is anything else (the route answers it, 400 included)."""
    if not query:
        return None
    name, eq, raw = query.partition(b"=")
    if name != b"wait" or not eq or b"&" in raw:
        return False
    try:
        value = float(raw)
    except ValueError:
        return False
    return value if math.isfinite(value) and 0 <= value <= most else False


def _replay(chunks: list[bytes], receive: Receive, more: bool,
            then: Message | None = None) -> Receive:
    """A `receive` that first gives back the body read so far (`more`: whether more of it
    follows) and `then`, a message already taken (a disconnect), then reads on."""
    pending: list[Message] = [{"type": "http.request", "body": b"".join(chunks),
                               "more_body": more}]
    if then is not None:
        pending.append(then)

    async def again() -> Message:
        return pending.pop(0) if pending else await receive()

    return again


def _vary(send: Send) -> Send:
    """`send` with the `vary: Origin` header the full stack's CORS middleware adds."""
    async def sender(message: Message) -> None:
        if message["type"] == "http.response.start":
            message["headers"] = [*message.get("headers", ()), _VARY]
        await send(message)

    return sender


async def _send(send: Send, answer: Answer) -> None:
    status, doc, extra = answer
    body = orjson.dumps(doc)
    headers = [(b"content-length", str(len(body)).encode()), _JSON]
    if extra:
        headers += [(k.lower().encode(), v.encode()) for k, v in extra.items()]
    headers.append(_VARY)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})

"""The node WebSocket: decode frames, call the Mesh, send what it returns. No state here.

Close codes are `shared.protocol.CloseCode`. A frame that does not decode gets an `error`
reply and the connection carries on; an invalid node name, a first frame that is not
`register`, or a bad join token closes with 1008; an unsupported protocol version with 4002;
a name that belongs to another node's credential with 4004 (see coordinator/link/identity.py).
No first frame within MESH_REGISTER_TIMEOUT_S closes with 4006; sockets without a first frame
past MESH_MAX_UNREGISTERED, and nodes past MESH_MAX_CONNECTIONS, with 1013 (`Connections`).
Oversize frames (over MAX_FRAME_BYTES) and non-UTF-8 text are closed by the WebSocket layer
with 1009 / 1007.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
from collections import deque
from typing import Any

import msgspec
from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.access.audit import Audit
from coordinator.core.drain import drain_notice
from coordinator.core.mesh import Mesh
from coordinator.link.identity import NodeIdentities, Refused
from coordinator.link.join_proof import answer, join_refusal
from coordinator.link.streams import StreamTable
from coordinator.storage.store import StoreError
from shared.limits import MAX_NAME, NodeLogLimit, Throttled, message_refusal
from shared.protocol import (
    BUNDLE,
    FEATURES,
    SUPPORTED_PROTOCOLS,
    BadMessage,
    ClientBundle,
    ClientMsg,
    CloseCode,
    Error,
    Msg,
    Register,
    StreamData,
    StreamEnd,
    StreamHead,
    bundle_frame,
    decode_client,
    encode,
    encode_exact,
    valid_node_name,
)

NAME_RULE = "1-63 letters, digits, '.', '_' or '-', starting with a letter or digit"

log = logging.getLogger(__name__)

# Warnings about one node (records with `extra={"node": ...}`: refusals, stale messages, its
# connection's fate) from the loggers of the node edge and the Mesh: at most 10 of each
# per node per 10 s, whatever the node sends (shared/limits.py NodeLogLimit; README).
NODE_LOGS = NodeLogLimit()
for _name in ("coordinator.link.ws", "coordinator.link.join_proof", "coordinator.link.identity",
              "coordinator.core.mesh", "coordinator.link.streams"):
    logging.getLogger(_name).addFilter(NODE_LOGS)


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


class WsLink:
    """A node's outgoing side: `send` enqueues, one writer task drains in order.

    The queue is bounded in frames and bytes (MESH_WS_QUEUE_FRAMES / _BYTES). A peer that
    does not read fills it: its queued frames are dropped, it is closed with 4005
    SLOW_CONSUMER (logged once), and if even the close cannot be written within
    CLOSE_TIMEOUT_S the TCP connection is aborted, so a stuck peer holds no memory.

    The byte count is what the process really holds for the peer: each frame at its exact
    size (`encode_exact`) plus FRAME_OVERHEAD for its object, and the frame being written
    counted twice (its bytes and the text handed to the server) until the socket took it.
    Below that, the transport buffers at most WRITE_BUFFER_HIGH before the writer waits
    (plus the rest of the one write that crossed it); the kernel's socket buffers are not
    the process's memory. So one non-reading peer costs at most MESH_WS_QUEUE_BYTES plus
    about 1 MiB of RSS (README "Limits"; tests/security/test_node_input.py measures it).

    `error` frames are replies to what the node sent: at most ERROR_FRAMES per
    ERROR_WINDOW_S; past that they are dropped, and the first one sent in the next window
    says how many were. Whatever a node sends, it cannot make us answer faster."""

    CLOSE_TIMEOUT_S = 10.0
    BUNDLE_FRAMES = 256  # at most this many messages, and BUNDLE_BYTES, in one bundle
    BUNDLE_BYTES = 256 << 10
    FRAME_OVERHEAD = 64  # a queued bytes object's header, its allocation and its deque slot
    WRITE_BUFFER_HIGH = 64 << 10  # the transport's write buffer: the writer waits above it
    WRITE_BUFFER_LOW = 16 << 10
    ERROR_FRAMES = 256  # `error` replies to one connection per ERROR_WINDOW_S
    ERROR_WINDOW_S = 10.0

    def __init__(
        self, ws: WebSocket, node: str, max_frames: int | None = None,
        max_bytes: int | None = None,
    ) -> None:
        settings = ws.app.state.mesh.settings
        self.ws, self.node = ws, node
        self.max_frames = max_frames or settings.ws_queue_frames
        self.max_bytes = max_bytes or settings.ws_queue_bytes
        self._out: deque[bytes | _Close] = deque()
        self._ready = asyncio.Event()
        self.queued_bytes = 0
        self.closing = False
        self.slow = False
        self.bundle = False  # the node offered "bundle": frames queued together leave as one
        self._sent = False  # the first frame (`registered`, which says so) always goes alone
        self.writing = 0  # bytes held for the frame being written (see above)
        self._errors_at, self._errors, self.errors_dropped = 0.0, 0, 0
        self._errors_held = 0  # dropped in the current window, told in the next
        transport = _transport_of(ws._send)
        if transport is not None:  # asyncio's defaults today: set, so the bound holds
            transport.set_write_buffer_limits(self.WRITE_BUFFER_HIGH, self.WRITE_BUFFER_LOW)

    def send(self, msg: Msg) -> None:
        if self.closing:
            return
        if isinstance(msg, Error):
            if (err := self._error_budget(msg)) is None:
                return
            msg = err
        frame = encode_exact(msg)
        cost = len(frame) + self.FRAME_OVERHEAD
        if (len(self._out) >= self.max_frames
                or self.queued_bytes + self.writing + cost > self.max_bytes):
            self._slow_consumer()
            return
        self._out.append(frame)
        self.queued_bytes += cost
        self._ready.set()

    def _error_budget(self, msg: Error) -> Error | None:
        """`msg` if this window's budget of `error` replies allows it (with a note of those
        dropped in the last one), else None."""
        now = asyncio.get_running_loop().time()
        if now - self._errors_at >= self.ERROR_WINDOW_S:
            held, self._errors_held = self._errors_held, 0
            self._errors_at, self._errors = now, 0
            if held:
                msg = msgspec.structs.replace(msg, reason=(
                    f"{msg.reason} ({held} earlier refusals not answered: more than "
                    f"{self.ERROR_FRAMES} in {self.ERROR_WINDOW_S:g}s)"))
        if self._errors >= self.ERROR_FRAMES:
            self._errors_held += 1
            self.errors_dropped += 1
            return None
        self._errors += 1
        return msg

    def close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self._out.append(_Close(code, reason))
            self._ready.set()

    def _slow_consumer(self) -> None:
        frames, size = len(self._out), self.queued_bytes
        self._out.clear()
        self.queued_bytes = 0
        self.slow = True
        log.warning(
            "node %s does not read: %d frames (%d bytes) queued; closing with %d",
            self.node, frames, size, CloseCode.SLOW_CONSUMER, extra={"node": self.node},
        )
        conns: Connections | None = getattr(self.ws.app.state, "connections", None)
        if conns is not None:
            conns.slow_consumers += 1
        self.close(CloseCode.SLOW_CONSUMER, f"slow consumer: more than {frames} frames or "
                   f"{self.max_bytes} bytes waiting to be read")
        asyncio.get_running_loop().call_later(self.CLOSE_TIMEOUT_S, _abort, self.ws)

    async def writer(self) -> None:
        while True:
            while not self._out:
                self._ready.clear()
                await self._ready.wait()
            item = self._out.popleft()
            if isinstance(item, _Close):
                await self.ws.close(item.code, item.reason)
                return
            self.queued_bytes -= len(item) + self.FRAME_OVERHEAD
            if self._sent and self.bundle and self._out and not isinstance(self._out[0], _Close):
                item = self._bundle(item)
            self._sent = True
            text = item.decode()
            self.writing = 2 * len(item)  # its bytes and its text, until the socket took it
            try:
                await self.ws.send_text(text)
            finally:
                self.writing = 0

    def _bundle(self, first: bytes) -> bytes:
        """`first` and the frames queued behind it, up to the caps, as one `bundle` frame:
        one ASGI send and one socket write instead of one per message."""
        frames, size, out = [first], len(first), self._out
        while out and len(frames) < self.BUNDLE_FRAMES:
            nxt = out[0]
            if isinstance(nxt, _Close) or size + len(nxt) > self.BUNDLE_BYTES:
                break
            out.popleft()
            frames.append(nxt)
            size += len(nxt)
            self.queued_bytes -= len(nxt) + self.FRAME_OVERHEAD
        return frames[0] if len(frames) == 1 else bundle_frame(frames)


def _abort(ws: WebSocket) -> None:
    """Drop a connection whose peer does not read even the close frame. ASGI offers no
    abort, so this finds the server's transport behind the `send` callable it was given
    (uvicorn's protocol object, possibly wrapped in middleware closures). Without it the
    socket lingers with at most the transport's and the kernel's buffers held."""
    transport = _transport_of(ws._send)
    if transport is None:
        log.warning("cannot abort %r: no transport found behind its send", ws.url.path)
        return
    if not transport.is_closing():
        log.warning("aborting %r: the peer did not read its close frame", ws.url.path)
    transport.abort()  # also one closing gracefully: its buffer may never drain


def _transport_of(send: object) -> asyncio.Transport | None:
    todo, looked = [send], 0
    while todo and looked < 32:
        fn = todo.pop()
        looked += 1
        transport = getattr(getattr(fn, "__self__", None), "transport", None)
        # asyncio's transports, and uvloop's (what `python -m coordinator` runs on), which
        # are not asyncio.BaseTransport subclasses: any with the two methods used here.
        if all(hasattr(transport, m) for m in ("abort", "set_write_buffer_limits")):
            return transport
        for cell in getattr(fn, "__closure__", None) or ():
            try:
                value = cell.cell_contents
            except ValueError:
                continue
            if callable(value):
                todo.append(value)
    return None


class Connections:
    """Counts sockets for /metrics and the caps; no node state.

    A socket is *waiting* from its handshake until its first frame arrives: at most
    MESH_MAX_UNREGISTERED of them, each for at most MESH_REGISTER_TIMEOUT_S (then 4006). One
    more pushes the oldest waiting socket out (1013), so sockets that never say a word cannot
    keep a node out: a real node sends `register` at once. From its first frame a socket is
    *open* (being admitted, then registered): MESH_MAX_CONNECTIONS counts only these."""

    def __init__(self) -> None:
        self.open = 0
        self.refused = 0  # over the cap: closed with 1013
        self._waiting: dict[asyncio.Event, None] = {}  # oldest first; set: pushed out
        self.pushed_out = 0  # waiting sockets closed with 1013 to make room for a newer one
        self.register_timeouts = 0  # closed with 4006
        self.slow_consumers = 0  # closed with 4005
        # Repeated refusals (bad frames, oversize fields) are logged once per interval per node.
        self.refusals = Throttled(log)

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def wait_slot(self, cap: int) -> asyncio.Event:
        """A place among the waiting sockets; the event is set when a newer one pushes this
        one out (the oldest goes once `cap` are waiting)."""
        while self._waiting and len(self._waiting) >= max(cap, 1):
            oldest = next(iter(self._waiting))
            del self._waiting[oldest]
            oldest.set()
            self.pushed_out += 1
        slot = asyncio.Event()
        self._waiting[slot] = None
        return slot

    def end_wait(self, slot: asyncio.Event) -> None:
        self._waiting.pop(slot, None)


async def _receive(ws: WebSocket) -> str | bytes | None:
    """The next frame's payload, or None once the peer is gone."""
    msg = await ws.receive()
    if msg["type"] == "websocket.disconnect":
        return None
    text: str | None = msg.get("text")
    return text if text is not None else msg.get("bytes", b"")


async def _reject(ws: WebSocket, code: CloseCode, reason: str) -> None:
    log.warning("closing %r with %d: %s", ws.url.path, code, reason)  # %r: no forged lines
    await ws.send_text(encode(Error(reason=reason, code="bad_message")).decode())
    # A close reason is at most 123 bytes; the `error` frame above carries all of it.
    await ws.close(code, reason.encode()[:123].decode(errors="ignore"))


async def node_socket(ws: WebSocket) -> None:
    mesh: Mesh = ws.app.state.mesh
    conns: Connections = ws.app.state.connections
    name = ws.path_params["node_id"]
    ws.state.join_challenge = challenge = answer(ws, ws.app.state.identities, name)
    await ws.accept(headers=challenge.headers)  # the join-token proof, if the node asked
    if not valid_node_name(name):
        await _reject(ws, CloseCode.POLICY_VIOLATION, f"invalid node name {name!r}: {NAME_RULE}")
        return
    slot = conns.wait_slot(mesh.settings.max_unregistered)
    counted = False
    try:
        raw = await _first_frame(ws, mesh, conns, slot)
        if raw is None:
            return
        if conns.open >= mesh.settings.max_connections:  # registered (or admitting) nodes
            conns.refused += 1
            conns.refusals.warning(
                "-connections", "refused a node connection: %d open (MESH_MAX_CONNECTIONS)",
                conns.open,
            )
            await ws.close(CloseCode.TRY_AGAIN_LATER, "too many connections; retry later")
            return
        conns.open += 1
        counted = True
        await _serve(ws, mesh, name, raw)
    except WebSocketDisconnect:
        pass
    finally:
        conns.end_wait(slot)
        if counted:
            conns.open -= 1


async def _first_frame(
    ws: WebSocket, mesh: Mesh, conns: Connections, slot: asyncio.Event
) -> str | bytes | None:
    """The socket's first frame; or None after closing it: 4006 past MESH_REGISTER_TIMEOUT_S,
    1013 when pushed out by a newer waiting socket (MESH_MAX_UNREGISTERED)."""
    receive = asyncio.ensure_future(_receive(ws))
    pushed = asyncio.ensure_future(slot.wait())
    try:
        await asyncio.wait((receive, pushed), timeout=mesh.settings.register_timeout_s,
                           return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in (receive, pushed):
            if not fut.done():
                fut.cancel()
    conns.end_wait(slot)
    if receive.done() and not receive.cancelled():
        return receive.result()
    if pushed.done() and not pushed.cancelled():
        why = (f"too many connections that have not sent register (MESH_MAX_UNREGISTERED "
               f"{mesh.settings.max_unregistered}); retry")
        conns.refusals.warning("-unregistered", "closing %r with 1013: %s", ws.url.path, why)
        await ws.close(CloseCode.TRY_AGAIN_LATER, why)
        return None
    conns.register_timeouts += 1
    why = f"no register message within {mesh.settings.register_timeout_s:g}s"
    conns.refusals.warning("-register-timeout", "closing %r with %d: %s", ws.url.path,
                           CloseCode.REGISTER_TIMEOUT, why)
    await ws.close(CloseCode.REGISTER_TIMEOUT, why)
    return None


async def _audit(ws: WebSocket, name: str, action: str, detail: dict[str, Any]) -> None:
    """Record a node admission or refusal in the audit trail (which also logs it)."""
    audit: Audit = ws.app.state.audit
    try:
        await audit.record(f"node:{name}", action, name, detail)
    except StoreError:  # the mesh rebuilds from its store (crash-only); admission goes on
        log.warning("audit record %s for node %s not stored", action, name)


async def _first_register(
    ws: WebSocket, mesh: Mesh, name: str, raw: str | bytes
) -> Register | None:
    """The connection's `register` (its first frame, `raw`), checked for protocol and join
    token; or None after closing the socket with the reason (1008 bad token, 4002 protocol)."""
    first = decode_client(raw)
    why: str | None  # a refusal's reason; None or "": none
    if not isinstance(first, Register):
        why = first.reason if isinstance(first, BadMessage) else f"got {type(first).__name__}"
        await _reject(ws, CloseCode.POLICY_VIOLATION, f"first message must be register: {why}")
        return None
    if first.protocol not in SUPPORTED_PROTOCOLS:
        await _reject(
            ws, CloseCode.PROTOCOL_UNSUPPORTED,
            f"protocol {first.protocol} unsupported; speak {sorted(SUPPORTED_PROTOCOLS)}",
        )
        return None
    if why := message_refusal(first):  # names, labels, GPUs past shared/limits.py: fatal
        await _reject(ws, CloseCode.POLICY_VIOLATION, f"register refused: {why}")
        return None
    ids: NodeIdentities = ws.app.state.identities
    if why := join_refusal(ids, name, first, getattr(ws.state, "join_challenge", None)):
        await _audit(ws, name, "node.refuse", {"why": why})
        await _reject(ws, CloseCode.POLICY_VIOLATION, why)
        return None
    return first


async def _admit(
    ws: WebSocket, mesh: Mesh, name: str, raw: str | bytes
) -> tuple[Register, str] | None:
    """A checked register and the credential to issue ("" if the node presented its own)."""
    first = await _first_register(ws, mesh, name, raw)
    if first is None:
        return None
    ids: NodeIdentities = ws.app.state.identities
    try:
        admission = await ids.admit(name, first.credential)
    except (sqlite3.Error, OSError) as exc:
        log.error("storing node %s's credential failed: %s", name, exc, extra={"node": name})
        await _reject(ws, CloseCode.INTERNAL_ERROR, "could not store the node's credential")
        return None
    if isinstance(admission, Refused):
        await _audit(ws, name, "node.refuse", {"why": "name taken"})
        await _reject(ws, CloseCode.NAME_TAKEN, admission.reason)
        return None
    await _audit(ws, name, "node.admit", {"new": bool(admission.issued),
                                          "rejoined": admission.rejoined})
    return first, admission.issued


async def _serve(ws: WebSocket, mesh: Mesh, name: str, raw: str | bytes) -> None:
    admitted = await _admit(ws, mesh, name, raw)
    if admitted is None:
        return
    first, issued = admitted
    if mesh.broken:  # rebuilding from the store after a failed write: come back shortly
        await ws.close(CloseCode.TRY_AGAIN_LATER, "coordinator rebuilding its state; retry")
        return
    link = WsLink(ws, name)
    writer = asyncio.create_task(link.writer(), name=f"ws-writer-{name}")
    why = "closed"
    try:
        if not first.address and ws.client is not None:  # a gang's MASTER_ADDR: where it is
            first = msgspec.structs.replace(first, address=ws.client.host[:253])
        registered = mesh.register(name, first, link)
        registered.credential = issued  # its hash committed before this reply goes out
        registered.features = sorted(FEATURES.intersection(first.features))
        link.send(registered)
        link.bundle = BUNDLE in registered.features  # from the next frame on
        if (notice := drain_notice(mesh, name)) is not None:
            link.send(notice)  # drained before it (re)joined: it still takes no new work
        why = await _read_loop(ws, mesh, name, link)
    finally:
        mesh.disconnected(name, link, why)
        if (streams := _streams(ws)) is not None:
            streams.link_gone(name, link, why)  # its replicas' answers in flight end short
        link.close(CloseCode.NORMAL, why)
        try:
            await asyncio.wait_for(writer, 5)
        except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
            writer.cancel()


def _streams(ws: WebSocket) -> StreamTable | None:
    """The stream table of model serving (coordinator/link/streams.py), once the app built it."""
    return getattr(ws.app.state, "streams", None)


async def _read_loop(ws: WebSocket, mesh: Mesh, name: str, link: WsLink) -> str:
    streams = _streams(ws)
    while not link.closing:
        raw = await _receive(ws)
        if raw is None:
            return "peer closed"
        msg = decode_client(raw)
        for one in msg.msgs if isinstance(msg, ClientBundle) else (msg,):
            if link.closing or (ok := _admitted(ws, mesh, name, link, one)) is None:
                continue
            if isinstance(ok, StreamData | StreamHead | StreamEnd) and streams is not None:
                mesh.heard(name, link)  # alive; the stream table checks and applies it
                streams.on_frame(name, link, ok)
                continue
            try:
                mesh.handle(name, link, ok)
            except Exception:  # a bug in the Mesh must not take this node's connection down
                log.exception("handling %s from %s failed", type(ok).__name__, name)
                link.send(Error(reason="internal error handling this message", code="internal"))
    return "closed by coordinator"


def _admitted(
    ws: WebSocket, mesh: Mesh, name: str, link: WsLink, msg: ClientMsg | BadMessage
) -> ClientMsg | None:
    """`msg`, for the Mesh to handle; or None, refused: a frame that does not decode, or
    holds what the store cannot keep, gets an `error` frame naming the field and the limit,
    nothing changes, the connection lives on. The log line is throttled per node
    (`Connections.refusals`)."""
    why: str | None
    if isinstance(msg, BadMessage):
        why, code, task_id, attempt = msg.reason, "bad_message", None, None
    elif why := message_refusal(msg):
        code, task_id, attempt = "too_large", _task_id(msg), getattr(msg, "attempt", None)
    else:
        return msg
    mesh.heard(name, link)  # refused, but the node is alive: never judged silent for it
    mesh.metrics.bad_messages.inc()
    conns: Connections = ws.app.state.connections
    conns.refusals.warning(name, "refused a frame from %s: %s", name, why, extra={"node": name})
    link.send(Error(reason=why, code=code, task_id=task_id, attempt=attempt))
    return None


def _task_id(msg: Msg) -> str | None:
    task_id = getattr(msg, "task_id", None)
    return task_id if isinstance(task_id, str) and len(task_id) <= MAX_NAME else None

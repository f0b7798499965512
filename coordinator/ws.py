"""The node WebSocket: decode frames, call the Mesh, send what it returns. No state here.

Close codes are `shared.protocol.CloseCode`. A frame that does not decode gets an `error`
reply and the connection carries on; a first frame that is not `register`, or a bad token,
closes with 1008; an unsupported protocol version with 4002. Oversize frames (over
MAX_FRAME_BYTES) and non-UTF-8 text are closed by the WebSocket layer with 1009 / 1007.
"""

from __future__ import annotations

import asyncio
import logging
import secrets

from starlette.websockets import WebSocket, WebSocketDisconnect

from coordinator.mesh import Mesh
from shared.protocol import (
    SUPPORTED_PROTOCOLS,
    BadMessage,
    CloseCode,
    Error,
    Msg,
    Register,
    decode_client,
    encode,
)

log = logging.getLogger(__name__)


class _Close:
    __slots__ = ("code", "reason")

    def __init__(self, code: int, reason: str) -> None:
        self.code, self.reason = code, reason


class WsLink:
    """A node's outgoing side: `send` enqueues, one writer task drains in order."""

    def __init__(self, ws: WebSocket, node: str) -> None:
        self.ws, self.node = ws, node
        self._out: asyncio.Queue[bytes | _Close] = asyncio.Queue()
        self.closing = False

    def send(self, msg: Msg) -> None:
        if not self.closing:
            self._out.put_nowait(encode(msg))

    def close(self, code: int, reason: str) -> None:
        if not self.closing:
            self.closing = True
            self._out.put_nowait(_Close(code, reason))

    async def writer(self) -> None:
        while True:
            item = await self._out.get()
            if isinstance(item, _Close):
                await self.ws.close(item.code, item.reason)
                return
            await self.ws.send_text(item.decode())


class Connections:
    """Counts open sockets for /metrics; holds no node state."""

    def __init__(self) -> None:
        self.open = 0


async def _receive(ws: WebSocket) -> str | bytes | None:
    """The next frame's payload, or None once the peer is gone."""
    msg = await ws.receive()
    if msg["type"] == "websocket.disconnect":
        return None
    text: str | None = msg.get("text")
    return text if text is not None else msg.get("bytes", b"")


async def _reject(ws: WebSocket, code: CloseCode, reason: str) -> None:
    log.warning("closing %s with %d: %s", ws.url.path, code, reason)
    await ws.send_text(encode(Error(reason=reason, code="bad_message")).decode())
    await ws.close(code, reason)


async def node_socket(ws: WebSocket) -> None:
    mesh: Mesh = ws.app.state.mesh
    conns: Connections = ws.app.state.connections
    name = ws.path_params["node_id"]
    await ws.accept()
    conns.open += 1
    try:
        await _serve(ws, mesh, name)
    except WebSocketDisconnect:
        pass
    finally:
        conns.open -= 1


async def _serve(ws: WebSocket, mesh: Mesh, name: str) -> None:
    settings = mesh.settings
    try:
        raw = await asyncio.wait_for(_receive(ws), settings.register_timeout_s)
    except TimeoutError:
        await _reject(ws, CloseCode.POLICY_VIOLATION, "no register message in time")
        return
    if raw is None:
        return
    first = decode_client(raw)
    if not isinstance(first, Register):
        why = first.reason if isinstance(first, BadMessage) else f"got {type(first).__name__}"
        await _reject(ws, CloseCode.POLICY_VIOLATION, f"first message must be register: {why}")
        return
    if first.protocol not in SUPPORTED_PROTOCOLS:
        await _reject(
            ws, CloseCode.PROTOCOL_UNSUPPORTED,
            f"protocol {first.protocol} unsupported; speak {sorted(SUPPORTED_PROTOCOLS)}",
        )
        return
    if settings.token and not secrets.compare_digest(first.token, settings.token):
        await _reject(ws, CloseCode.POLICY_VIOLATION, "bad token")
        return
    link = WsLink(ws, name)
    writer = asyncio.create_task(link.writer(), name=f"ws-writer-{name}")
    why = "closed"
    try:
        link.send(mesh.register(name, first, link))
        why = await _read_loop(ws, mesh, name, link)
    finally:
        mesh.disconnected(name, link, why)
        link.close(CloseCode.NORMAL, why)
        try:
            await asyncio.wait_for(writer, 5)
        except (TimeoutError, RuntimeError, OSError, WebSocketDisconnect):
            writer.cancel()


async def _read_loop(ws: WebSocket, mesh: Mesh, name: str, link: WsLink) -> str:
    while not link.closing:
        raw = await _receive(ws)
        if raw is None:
            return "peer closed"
        msg = decode_client(raw)
        if isinstance(msg, BadMessage):
            mesh.metrics.bad_messages.inc()
            log.warning("bad message from %s: %s", name, msg.reason, extra={"node": name})
            link.send(Error(reason=msg.reason, code="bad_message"))
            continue
        try:
            mesh.handle(name, link, msg)
        except Exception:  # a bug in the Mesh must not take this node's connection down
            log.exception("handling %s from %s failed", type(msg).__name__, name)
            link.send(Error(reason="internal error handling this message", code="internal"))
    return "closed by coordinator"

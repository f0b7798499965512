"""HTTP connections that do not send a request head in time are closed (slowloris).

uvicorn closes a keep-alive connection left idle after a response (`timeout_keep_alive`), but
nothing bounds the time a client takes to *send* a request head: a connection that says
nothing, or sends its request line a byte at a time, stays open for ever and holds a socket,
a protocol object and a file descriptor. `head_deadline_protocol` returns uvicorn's httptools
protocol with two bounds added (MESH_HTTP_HEAD_TIMEOUT_S, MESH_MAX_HTTP_PENDING):

- **a deadline for the head**: the request line and headers must be complete within
  `timeout_s` of the connection opening, and of the first byte of each later request on it
  (between requests the keep-alive timeout holds). Past it the connection is closed. A
  deadline that falls while a response is still being sent (a long poll; a pipelined head
  waits behind it) is set again, so no honest request is cut short;
- **a cap on connections waiting for their head**: at most `max_pending` at once; one more
  closes the oldest waiting one (an honest client sends its head at once, so the oldest is
  the slowest).

A WebSocket upgrade's head completes like any other, and after it the socket is the node
link's (coordinator/link/ws.py holds its own deadline for `register`). With TLS the protocol
sees the connection only after the handshake, which asyncio bounds (60 s).
"""

from __future__ import annotations

import asyncio
import logging
from typing import ClassVar

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

log = logging.getLogger(__name__)


class HeadDeadline(HttpToolsProtocol):
    """uvicorn's httptools protocol with a deadline for each request head (see the module).
    Use `head_deadline_protocol` for a subclass with its own limits and bookkeeping."""

    timeout_s: ClassVar[float] = 5.0
    max_pending: ClassVar[int] = 1024
    # Connections whose head deadline runs, oldest first (per subclass: per server).
    pending: ClassVar[dict[HeadDeadline, None]] = {}
    closed: ClassVar[int] = 0  # connections closed for a late head (tests and logs read it)

    _head_timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._head_timer is None and not self._responding():
            self._arm()  # bytes of a new request (or filler between requests): the clock runs
        super().data_received(data)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._arm()  # a pipelined request's first byte, read while a response is sent

    def on_headers_complete(self) -> None:
        self._disarm()  # the head is in: the app (or the WebSocket) takes it from here
        super().on_headers_complete()

    def _responding(self) -> bool:
        return self.cycle is not None and not self.cycle.response_complete

    def _arm(self) -> None:
        if self._head_timer is not None or self.transport is None:
            return
        pending = type(self).pending
        while len(pending) >= max(self.max_pending, 1):
            oldest = next(iter(pending))
            oldest._expire(pushed_out=True)
        pending[self] = None
        self._head_timer = self.loop.call_later(self.timeout_s, self._expire)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        type(self).pending.pop(self, None)

    def _expire(self, pushed_out: bool = False) -> None:
        self._disarm()
        if self.transport.is_closing():
            return
        if self._responding() and not pushed_out:
            self._arm()  # a response is still going out; its head waits behind it
            return
        cls = type(self)
        cls.closed += 1
        if cls.closed == 1 or cls.closed % 1000 == 0:
            log.warning("closed %d HTTP connection(s) that sent no complete request head "
                        "within %gs or were pushed out past %d waiting "
                        "(MESH_HTTP_HEAD_TIMEOUT_S, MESH_MAX_HTTP_PENDING)", cls.closed,
                        self.timeout_s, self.max_pending)
        self.transport.close()


def head_deadline_protocol(timeout_s: float, max_pending: int) -> type[HeadDeadline]:
    """A protocol class for `uvicorn.Config(http=...)` with these limits and its own list of
    waiting connections."""
    return type("HeadDeadlineProtocol", (HeadDeadline,), {
        "timeout_s": timeout_s, "max_pending": max_pending, "pending": {}, "closed": 0,
    })

"""The stream table: HTTP requests to model replicas, carried over their node's own WebSocket.

One stream is one HTTP request the router (coordinator/web/openai.py) makes to a replica:
`open` sends `stream_open` down the node's link; the node answers `stream_head`, then
`stream_data` chunks as the engine produces them, then `stream_end`. The WebSocket handler
(coordinator/link/ws.py) hands those three frames to `on_frame` and calls `link_gone` when
a node's connection ends. No Mesh state here; only the streams in flight.

Flow control is by credit (shared/protocol.py): a node may send at most `window` bytes of
`stream_data` (the UTF-8 length of `data`) beyond what was granted back with
`stream_credit`, and credit is granted only for bytes the caller's response already took.
So a stream holds at most `window` bytes here, whatever the caller and the node do
(MESH_SERVE_WINDOW_BYTES; README "Limits"), and in all at most MESH_SERVE_MAX_STREAMS
(MESH_SERVE_MAX_STREAMS_PER_NODE per node) of them are open.

Whatever a node sends is input to check. A frame for a stream id this coordinator never
opened, or one opened to another node, is refused with an `error` frame (code
`unknown_stream`), and the stream it names is untouched. A frame for a stream that already
ended (a cancel crossing the node's last chunks) is dropped quietly. A node that sends past
its window, sends data before its head, a second head, or a content type that is not a
plain header value breaks only that stream: the caller's answer ends with the reason, the
node gets `stream_cancel` and an `error` frame (code `stream_window` for an overrun,
`bad_stream` for the rest).
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections import Counter
from collections.abc import Iterator
from typing import Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

from coordinator.model import Link
from shared.protocol import (
    Error,
    StreamCancel,
    StreamCredit,
    StreamData,
    StreamEnd,
    StreamHead,
    StreamOpen,
)

log = logging.getLogger(__name__)

# A content type passed on as the caller's header: printable ASCII, no CR/LF, not too long.
_CONTENT_TYPE = re.compile(r"[ -~]{1,200}")
MAX_REASON = 500  # characters of a node's `stream_end` error kept for the caller


class StreamBroken(Exception):
    """A stream ended without its whole body: the node went away, the node broke the
    protocol, the engine's request failed, or no head came in time."""

    def __init__(self, reason: str, *, timeout: bool = False) -> None:
        super().__init__(reason)
        self.reason = reason
        self.timeout = timeout


class Stream:
    """One request to a replica. Its reader (one task) calls `started`, then `read` until it
    returns None, and `close` at the end whatever happened."""

    __slots__ = (
        "id", "node", "link", "task_id", "attempt", "window", "status", "content_type",
        "_table", "_chunks", "buffered", "received", "granted", "_taken", "_last",
        "ended", "error", "_waiter",
    )

    def __init__(self, table: StreamTable, sid: int, node: str, link: Link, task_id: str,
                 attempt: int, window: int) -> None:
        self._table = table
        self.id, self.node, self.link = sid, node, link
        self.task_id, self.attempt, self.window = task_id, attempt, window
        self.status = 0  # the engine's HTTP status, once `stream_head` came
        self.content_type = ""
        self._chunks: list[bytes] = []  # what the caller has not taken yet, oldest first
        self.buffered = 0  # bytes in _chunks
        self.received = 0  # bytes of stream_data in all
        self.granted = window  # bytes the node may send in all (window + credit sent)
        self._taken = 0  # bytes the caller took and we have not granted back yet
        self._last = 0  # the size of the chunk handed out last (granted at the next read)
        self.ended = False
        self.error = ""  # why it ended short ("" for a complete body)
        self._waiter: asyncio.Future[None] | None = None

    # --- the reader's side (the router) ----------------------------------------------

    async def started(self, timeout: float) -> None:
        """Wait until the first bytes of the body are here, or the stream ended. Raises
        StreamBroken when it ended short before a byte came, or after `timeout`: until then
        nothing was sent to the caller, so the router may try another replica."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not self._chunks and not self.ended:
            left = deadline - loop.time()
            if left <= 0:
                self.cancel("no response from the replica in time")
                raise StreamBroken(f"the replica sent no response within {timeout:g}s",
                                   timeout=True)
            waiter = self._waiter = loop.create_future()
            timer = loop.call_later(left, _wake, waiter)
            try:
                await waiter
            finally:
                timer.cancel()
                self._waiter = None
        if not self._chunks and self.error:
            raise StreamBroken(self.error)
        if not self.status:
            raise StreamBroken("the replica's answer ended before its status line")

    async def read(self) -> bytes | None:
        """The next chunk of the body; None once it is complete. Raises StreamBroken when it
        ended short. Credit for the chunk handed out before goes back to the node here,
        since the caller's response has taken it by the time it asks for the next one."""
        if self._last:
            self._give_credit(self._last)
            self._last = 0
        while not self._chunks:
            if self.ended:
                if self.error:
                    raise StreamBroken(self.error)
                return None
            waiter = self._waiter = asyncio.get_running_loop().create_future()
            try:
                await waiter
            finally:
                self._waiter = None
        chunks = self._chunks
        chunk = chunks[0] if len(chunks) == 1 else b"".join(chunks)
        chunks.clear()
        self.buffered = 0
        self._last = len(chunk)
        return chunk

    def cancel(self, reason: str) -> None:
        """The caller went away (or gave up): the node is told to abort the engine's request."""
        if not self.ended:
            self.link.send(StreamCancel(stream=self.id, reason=reason))
            self._end(reason)

    def close(self) -> None:
        """The reader is done with it: cancel it if the node has not ended it."""
        self.cancel("the caller's request ended")

    def _give_credit(self, n: int) -> None:
        self._taken += n
        if not self.ended and self._taken >= self.window >> 2:  # a frame per quarter window
            self.granted += self._taken
            self.link.send(StreamCredit(stream=self.id, bytes=self._taken))
            self._taken = 0

    # --- the node's side (the table calls these) -------------------------------------

    def _wake(self) -> None:
        if self._waiter is not None:
            _wake(self._waiter)

    def _end(self, error: str) -> None:
        if not self.ended:
            self.ended, self.error = True, error
            self._table._forget(self)
            self._wake()


def _wake(waiter: asyncio.Future[None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class StreamTable:
    """Every open stream, by id and by the link it travels on. Lives for one leadership
    (built with the Mesh in coordinator/web/app.py)."""

    def __init__(self, *, max_streams: int, max_per_node: int, window: int) -> None:
        self.max_streams, self.max_per_node, self.window = max_streams, max_per_node, window
        self._streams: dict[int, Stream] = {}
        self._by_link: dict[Link, dict[int, Stream]] = {}
        self.per_node: Counter[str] = Counter()
        self._last_id = 0
        # For /metrics and tests: streams opened, frames refused, streams a node broke.
        self.opened = 0
        self.refused_frames = 0
        self.broken_by_node = 0

    def __len__(self) -> int:
        return len(self._streams)

    def __iter__(self) -> Iterator[Stream]:
        return iter(list(self._streams.values()))

    def room(self, node: str) -> str:
        """Why no stream may be opened to `node` now ("" when one may)."""
        if len(self._streams) >= self.max_streams:
            return f"{len(self._streams)} streams open (MESH_SERVE_MAX_STREAMS)"
        if self.per_node[node] >= self.max_per_node:
            return (f"{self.per_node[node]} streams open to node {node} "
                    "(MESH_SERVE_MAX_STREAMS_PER_NODE)")
        return ""

    def open(self, node: str, link: Link, task_id: str, attempt: int, path: str, body: str,
             *, method: Literal["GET", "POST"] = "POST",
             content_type: str = "application/json") -> Stream:
        """A new stream to the replica `task_id`/`attempt` on `node`, its `stream_open` sent.
        The caller checked `room(node)` first."""
        self._last_id += 1
        sid = self._last_id
        stream = Stream(self, sid, node, link, task_id, attempt, self.window)
        self._streams[sid] = stream
        self._by_link.setdefault(link, {})[sid] = stream
        self.per_node[node] += 1
        self.opened += 1
        link.send(StreamOpen(stream=sid, task_id=task_id, attempt=attempt, path=path,
                             method=method, content_type=content_type, body=body,
                             window=self.window))
        return stream

    def _forget(self, stream: Stream) -> None:
        if self._streams.pop(stream.id, None) is None:
            return
        on_link = self._by_link.get(stream.link)
        if on_link is not None:
            on_link.pop(stream.id, None)
            if not on_link:
                del self._by_link[stream.link]
        self.per_node[stream.node] -= 1
        if self.per_node[stream.node] <= 0:
            del self.per_node[stream.node]

    # --- frames from nodes (coordinator/link/ws.py) ----------------------------------

    def on_frame(self, node: str, link: Link, msg: StreamHead | StreamData | StreamEnd) -> None:
        """One stream frame from `node` on `link`: checked, then applied to its stream."""
        stream = self._streams.get(msg.stream)
        if stream is None or stream.link is not link:
            if stream is None and msg.stream <= self._last_id:
                return  # ended here first (a cancel crossed the node's last frames): dropped
            self.refused_frames += 1
            log.warning("node %s sent %s for stream %d, which was not opened to it",
                        node, type(msg).__name__, msg.stream, extra={"node": node})
            link.send(Error(reason=f"stream {msg.stream} was not opened to this node",
                            code="unknown_stream"))
            return
        if isinstance(msg, StreamData):
            if not stream.status:
                self._broken(stream, "bad_stream", "stream_data before stream_head")
                return
            data = msg.data.encode()
            stream.received += len(data)
            if stream.received > stream.granted:
                self._broken(stream, "stream_window", (
                    f"sent {stream.received} bytes on stream {stream.id}; only "
                    f"{stream.granted} were granted (window {stream.window} plus credit)"))
                return
            if data:
                stream._chunks.append(data)
                stream.buffered += len(data)
                stream._wake()
        elif isinstance(msg, StreamHead):
            if stream.status:
                self._broken(stream, "bad_stream", "a second stream_head")
                return
            if msg.status < 200:  # 1xx: not a final answer, and not one to pass on
                self._broken(stream, "bad_stream", f"stream_head status {msg.status}: "
                             "an answer's status is 200-599")
                return
            if msg.content_type and not _CONTENT_TYPE.fullmatch(msg.content_type):
                self._broken(stream, "bad_stream", "stream_head content_type is not a plain "
                             "header value (1-200 printable ASCII characters)")
                return
            stream.status = msg.status
            stream.content_type = msg.content_type or "application/octet-stream"
        else:
            why = msg.error[:MAX_REASON] if msg.error else ""
            stream._end(f"the replica's node: {why}" if why else "")

    def _broken(self, stream: Stream, code: str, why: str) -> None:
        """The node broke the protocol on `stream`: that stream ends (the caller sees why),
        the node is told to abort it and why; its other streams go on."""
        self.refused_frames += 1
        self.broken_by_node += 1
        log.warning("node %s broke stream %d: %s", stream.node, stream.id, why,
                    extra={"node": stream.node})
        stream.link.send(Error(reason=f"stream {stream.id}: {why}", code=code))
        stream._chunks.clear()  # nothing more of a broken answer goes to the caller
        stream.buffered = 0
        stream.cancel(f"refused: {why}")

    def link_gone(self, node: str, link: Link, why: str) -> None:
        """`node`'s connection `link` ended: every stream on it ends short."""
        for stream in list(self._by_link.get(link, {}).values()):
            stream._end(f"the replica's node {node} went away ({why})")

    def shutdown(self, why: str) -> None:
        """This coordinator stops leading: every stream ends short."""
        for stream in list(self._streams.values()):
            stream._end(why)


class StreamMetrics(Collector):
    """/metrics: streams open now, opened, and the frames and streams nodes got refused."""

    def __init__(self, table: StreamTable) -> None:
        self.table = table

    def collect(self) -> Iterator[Metric]:
        t = self.table
        yield GaugeMetricFamily("gpumesh_serve_streams_open",
                                "Requests to replicas in flight over node links", value=len(t))
        yield CounterMetricFamily("gpumesh_serve_streams",
                                  "Requests sent to replicas over node links", value=t.opened)
        yield CounterMetricFamily(
            "gpumesh_serve_stream_frames_refused",
            "Stream frames refused from nodes (not their stream, past the window, malformed)",
            value=t.refused_frames)

"""The node side of model serving (issue 27): replicas' health and HTTP streams over the link.

A service replica is an ordinary task whose `assign` carries `service`. Before it runs, the
node picks a free loopback port and puts it wherever `{port}` appears (command, script, env
values, string params) and in `MESH_SERVICE_PORT`; the docker executor publishes that port
on 127.0.0.1 only. Once the executor says it runs, a watcher polls
`http://127.0.0.1:{port}{health_path}` and reports `replica` on every change: starting ->
ready on the first 2xx, ready -> unhealthy after `UNHEALTHY_AFTER` failed checks in a row,
and back to ready. After each `registered` the node re-sends the state of every replica it
still runs, adopted ones included (a record per replica in the state dir says which port and
health path an attempt a previous client started uses).

The coordinator opens streams with `stream_open`: one HTTP request each to the engine of a
replica this node runs at that attempt. The answer goes back as `stream_head`, `stream_data`
chunks as the engine writes them (decoded incrementally, never split inside a character, at
most MAX_STREAM_CHUNK bytes each) and one `stream_end`. Flow control: a stream never has
more than its `window` bytes sent beyond the credit granted back (`stream_credit`); it waits
for credit, reading the engine pauses (holding at most one read of it, 256 KiB), the engine's
socket fills, the engine slows down. Each read of the engine goes out at once from the
connection's callback (gpu_client/enginehttp.py `Answer.pipe`), as one chunk when it fits the
credit and MAX_STREAM_CHUNK: never held back to gather more. `stream_cancel` (and a lost
connection) closes the engine request at once, which llama.cpp's server takes as a cancel.

Bounds per node: at most `serve_max_streams` open streams, and the windows of open streams
plus their request bodies at most `serve_buffer_mb` MiB, so the stream data this node holds
unacknowledged (in its outbox or in flight) is bounded; a stream over either cap ends at
once with an error. Nothing here blocks the event loop: one asyncio task per stream and one
per replica watcher, each reaped when it ends.
"""

from __future__ import annotations

import asyncio
import codecs
import json
import logging
import os
import re
import socket
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import msgspec

from gpu_client.enginehttp import Answer, EngineClient, EngineError
from gpu_client.executors.base import OnOutput, RunOutcome
from shared.protocol import (
    MAX_STREAM_CHUNK,
    Assign,
    Msg,
    ReplicaState,
    StreamCancel,
    StreamCredit,
    StreamData,
    StreamEnd,
    StreamHead,
    StreamOpen,
)

log = logging.getLogger(__name__)

Key = tuple[str, int]
Work = Callable[[OnOutput], Awaitable[RunOutcome]]
State = Literal["starting", "ready", "unhealthy"]
PORT_VAR = "MESH_SERVICE_PORT"  # every replica's environment names its port here too
UNHEALTHY_AFTER = 2  # failed checks in a row that turn a ready replica unhealthy
FIRST_CHECK_S = 0.05  # a starting replica is checked this soon, then ever less often
CONNECT_TIMEOUT_S = 5.0  # to the engine on loopback
STREAM_IDLE_S = 600.0  # the longest an engine may go quiet in the middle of an answer
MAX_PATH = 2048  # bytes of a stream's path
MAX_CONTENT_TYPE = 256  # characters of a content type passed either way
MIN_WINDOW = 4  # a window must hold one character of UTF-8
MAX_REASON = 300  # characters of a reason sent to the coordinator
MAX_HEALTH_BODY = 1 << 20  # bytes of a health answer read (then the check failed)
_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
_BAD_PATH = re.compile(r"\.\.|//|\\|[\x00-\x20\x7f]|%(2e|2f|5c|00)|#", re.IGNORECASE)


def path_problem(path: str) -> str:
    """Why `path` is no request this node passes to an engine ("" when it is)."""
    if not path.startswith("/v1/"):
        return "the path must start with /v1/"
    if len(path.encode()) > MAX_PATH:
        return f"the path is longer than {MAX_PATH} bytes"
    if _BAD_PATH.search(path):
        return "the path holds '..', '//', a backslash, '#', an encoded dot or slash, or a " \
               "control or space character"
    return ""


def health_path_problem(path: str) -> str:
    """Why `path` cannot be a replica's health check ("" when it can)."""
    if not path.startswith("/") or len(path.encode()) > MAX_PATH or _BAD_PATH.search(path):
        return f"health path {path[:80]!r} must be an absolute path without '..', '//', " \
               "backslashes or control characters"
    return ""


def fill_port(a: Assign, port: int) -> Assign:
    """`a` with `{port}` replaced by `port` in command, script, env values and string params,
    and `MESH_SERVICE_PORT` set. Plain replacement: other braces in a script stay as they are."""
    p = str(port)

    def fill(value: str) -> str:
        return value.replace("{port}", p)

    return msgspec.structs.replace(
        a,
        command=None if a.command is None else [fill(v) for v in a.command],
        script=None if a.script is None else fill(a.script),
        env={**{k: fill(v) for k, v in a.env.items()}, PORT_VAR: p},
        params={k: fill(v) if isinstance(v, str) else v for k, v in a.params.items()},
    )


def free_port(taken: set[int]) -> int:
    """A loopback port nothing listens on now, not among `taken` (ports of our replicas)."""
    for _ in range(32):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port: int = s.getsockname()[1]
        if port not in taken:
            return port
    raise OSError("no free loopback port")


def piece(data: bytes, pos: int, credit: int, limit: int = MAX_STREAM_CHUNK) -> int:
    """How many bytes of `data` from `pos` (whole UTF-8 characters) may go in the next
    `stream_data` with `credit` bytes of window left: 0 when the next character does not fit."""
    n = min(len(data) - pos, credit, limit)
    while 0 < n < len(data) - pos and (data[pos + n] & 0xC0) == 0x80:  # inside a character
        n -= 1
    return n


@dataclass(eq=False)
class Replica:
    task_id: str
    attempt: int
    port: int
    health_path: str
    service: str = ""
    model: str = ""
    state: State = "starting"
    reason: str = ""
    watcher: asyncio.Task[None] | None = None
    streams: set[int] = field(default_factory=set)

    @property
    def key(self) -> Key:
        return (self.task_id, self.attempt)

    def report(self) -> ReplicaState:
        return ReplicaState(task_id=self.task_id, attempt=self.attempt, state=self.state,
                            port=self.port, reason=self.reason[:MAX_REASON])


@dataclass(eq=False)
class Stream:
    id: int
    replica: Replica
    window: int
    reserved: int  # what it holds of the node's buffer budget
    credit: int  # bytes it may send now (window minus what is unacknowledged)
    more: asyncio.Event = field(default_factory=asyncio.Event)
    task: asyncio.Task[None] | None = None
    cancelled: str = ""  # why the coordinator cancelled it
    answer: Answer | None = None  # the engine's, while its body is piped here
    pending: bytes = b""  # decoded text (as UTF-8) waiting for credit; the engine is paused
    over: bool = False  # ended: nothing more is sent for it


class Serving:
    """The replicas this node runs and the streams open to them. `send` queues a message
    for the coordinator (dropped while not registered); handlers are synchronous."""

    def __init__(
        self, send: Callable[[Msg], None], *, state_dir: Path, health_s: float = 5.0,
        max_streams: int = 256, buffer_bytes: int = 256 << 20,
    ) -> None:
        self._send_raw = send
        self._dir = state_dir / "replicas"
        self.health_s = health_s
        self.max_streams = max_streams
        self.buffer_bytes = buffer_bytes
        self.replicas: dict[Key, Replica] = {}
        self.streams: dict[int, Stream] = {}
        self.reserved = 0  # bytes of the buffer budget held by open streams
        self.enabled = False  # the coordinator took the "serve" feature on this connection
        self._tasks: set[asyncio.Task[None]] = set()
        # kept-alive loopback connections to the engines (gpu_client/enginehttp.py)
        self.engines = EngineClient(connect_timeout_s=CONNECT_TIMEOUT_S,
                                    read_timeout_s=STREAM_IDLE_S)

    # --- replicas -----------------------------------------------------------------------

    def prepare(self, a: Assign) -> Assign | str:
        """Before a replica's attempt runs: its port picked and filled in; or why not."""
        assert a.service is not None
        if why := health_path_problem(a.service.health_path):
            return why
        try:
            port = free_port({r.port for r in self.replicas.values()})
        except OSError as exc:
            return f"no free loopback port for the replica on this node: {exc}"
        r = Replica(a.task_id, a.attempt, port, a.service.health_path, a.service.service,
                    a.service.model)
        self.replicas[r.key] = r
        return fill_port(a, port)

    def launching(self, key: Key, work: Work) -> Work:
        """`work` that first records the replica (port, health path) in the state dir, so a
        client started after this one re-adopts its health checks and its streams."""
        async def run(on_output: OnOutput) -> RunOutcome:
            r = self.replicas.get(key)
            if r is not None:
                try:
                    await asyncio.to_thread(self._record, r)
                except OSError as exc:
                    log.warning("replica %s.%d: cannot record it in %s: %s", *key, self._dir, exc)
            return await work(on_output)
        return run

    def started(self, key: Key) -> None:
        """The executor says the replica's process (container) runs: report and watch it."""
        r = self.replicas.get(key)
        if r is None or r.watcher is not None:
            return
        self._report(r)
        r.watcher = self._spawn(self._watch(r))

    def ended(self, key: Key) -> None:
        """The attempt ended, was cancelled or fenced: stop watching, end its streams."""
        r = self.replicas.pop(key, None)
        if r is None:
            return
        if r.watcher is not None:
            r.watcher.cancel()
        for sid in list(r.streams):
            self._end(sid, "the replica stopped")
        self.engines.forget(r.port)
        self._spawn(asyncio.to_thread(self._forget, r.key))

    async def adopt(self, running: set[Key]) -> None:
        """At client start: replicas a previous client started that still run, from their
        records (others' records are removed). Watched from now on."""
        found = await asyncio.to_thread(self._records)
        for key, doc in found.items():
            if key not in running:
                await asyncio.to_thread(self._forget, key)
                continue
            try:
                r = Replica(key[0], key[1], int(doc["port"]), str(doc["health_path"]),
                            str(doc.get("service", "")), str(doc.get("model", "")))
            except (KeyError, TypeError, ValueError):
                continue
            self.replicas[key] = r
            log.info("re-adopted replica %s.%d on port %d", *key, r.port)
            self.started(key)

    def registered(self, enabled: bool) -> None:
        """A new session: the coordinator hears the state of every replica this node runs."""
        self.enabled = enabled
        for r in self.replicas.values():
            if r.watcher is not None:
                self._report(r)

    def _report(self, r: Replica) -> None:
        if self.enabled:
            self._send_raw(r.report())

    def _set(self, r: Replica, state: State, reason: str = "") -> None:
        if r.state == state:
            return
        log.info("replica %s.%d (%s) %s -> %s%s", r.task_id, r.attempt, r.service, r.state,
                 state, f": {reason}" if reason else "",
                 extra={"task": r.task_id, "attempt": r.attempt})
        r.state, r.reason = state, reason
        self._report(r)

    async def _watch(self, r: Replica) -> None:
        delay = FIRST_CHECK_S
        fails = 0
        while True:
            await asyncio.sleep(delay)
            why = await self._check(r)
            if not why:
                fails = 0
                self._set(r, "ready")
            elif r.state == "ready":
                fails += 1
                if fails >= UNHEALTHY_AFTER:
                    self._set(r, "unhealthy", why)
            if r.state == "starting":
                delay = min(delay * 1.5, self.health_s)
            else:
                delay = self.health_s

    async def _check(self, r: Replica) -> str:
        """"" if the health path answers 2xx now, else why not."""
        try:
            async with asyncio.timeout(max(1.0, min(self.health_s, 5.0))):
                async with self.engines.request(r.port, "GET", r.health_path) as answer:
                    await answer.read(MAX_HEALTH_BODY)
        except (EngineError, TimeoutError) as exc:
            return f"health check failed: {str(exc) or 'no answer in time'}"[:MAX_REASON]
        if not 200 <= answer.status < 300:
            return f"health check answered {answer.status}"
        return ""

    # --- the records that outlive a client ----------------------------------------------

    def _path(self, key: Key) -> Path:
        safe = re.sub(r"[^A-Za-z0-9_.-]", "_", key[0])
        return self._dir / f"{safe}.{key[1]}.json"

    def _record(self, r: Replica) -> None:
        self._dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        doc = {"task_id": r.task_id, "attempt": r.attempt, "port": r.port,
               "health_path": r.health_path, "service": r.service, "model": r.model}
        tmp = self._path(r.key).with_suffix(".tmp")
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self._path(r.key))

    def _forget(self, key: Key) -> None:
        try:
            self._path(key).unlink()
        except FileNotFoundError:
            pass
        except OSError as exc:
            log.warning("cannot remove the record of replica %s.%d: %s", *key, exc)

    def _records(self) -> dict[Key, dict[str, Any]]:
        out: dict[Key, dict[str, Any]] = {}
        try:
            names = sorted(self._dir.glob("*.json"))
        except OSError:
            return out
        for path in names:
            try:
                doc = json.loads(path.read_text())
                out[(str(doc["task_id"]), int(doc["attempt"]))] = doc
            except (OSError, ValueError, KeyError, TypeError):
                log.warning("unreadable replica record %s removed", path)
                path.unlink(missing_ok=True)
        return out

    # --- streams ------------------------------------------------------------------------

    def on_open(self, m: StreamOpen) -> None:
        if m.stream in self.streams:
            log.warning("stream %d opened twice: the second open is ignored", m.stream)
            return
        r = self.replicas.get((m.task_id, m.attempt))
        reserve = m.window + len(m.body.encode())
        why = ""
        if r is None or r.watcher is None:
            why = "unknown replica"
        elif bad := path_problem(m.path):
            why = f"refused: {bad}"
        elif len(m.content_type) > MAX_CONTENT_TYPE or _has_control(m.content_type):
            why = "refused: bad content type"
        elif m.window < MIN_WINDOW:
            why = f"refused: a window under {MIN_WINDOW} bytes cannot carry a character"
        elif len(self.streams) >= self.max_streams:
            why = f"node at its cap of {self.max_streams} open streams (MESH_NODE_MAX_STREAMS)"
        elif self.reserved + reserve > self.buffer_bytes:
            why = (f"node stream buffer full: {self.reserved} of {self.buffer_bytes} bytes "
                   "held by open streams (MESH_NODE_STREAM_BUFFER_MB)")
        if why or r is None:
            self._send_raw(StreamEnd(stream=m.stream, error=why))
            return
        s = Stream(m.stream, r, m.window, reserve, m.window)
        self.streams[s.id] = s
        r.streams.add(s.id)
        self.reserved += reserve
        s.task = self._spawn(self._relay(s, m))

    def on_credit(self, m: StreamCredit) -> None:
        s = self.streams.get(m.stream)
        if s is None:
            return  # ended already: credit for it means nothing
        s.credit = min(s.window, s.credit + m.bytes)
        if s.pending:
            self._flush(s)
        s.more.set()

    def on_cancel(self, m: StreamCancel) -> None:
        s = self.streams.get(m.stream)
        if s is None:
            return
        s.cancelled = m.reason or "cancelled"
        self._end(s.id, f"cancelled: {s.cancelled}"[:MAX_REASON])

    def connection_lost(self) -> None:
        """The link went: every stream ends here (the coordinator fails its side)."""
        self.enabled = False
        for sid in list(self.streams):
            self._end(sid, None)

    def _end(self, sid: int, error: str | None) -> None:
        """Forget stream `sid`, abort its engine request; send `stream_end` unless None."""
        s = self.streams.pop(sid, None)
        if s is None:
            return
        s.over = True
        s.replica.streams.discard(sid)
        self.reserved -= s.reserved
        if s.task is not None and s.task is not asyncio.current_task():
            s.task.cancel()  # leaving `async with stream()` closes the engine's connection
        if error is not None:
            self._send_raw(StreamEnd(stream=sid, error=error[:MAX_REASON]))

    async def _relay(self, s: Stream, m: StreamOpen) -> None:
        post = m.method == "POST"
        error = ""
        try:
            async with self.engines.request(
                s.replica.port, m.method, m.path, content_type=m.content_type if post else "",
                body=m.body.encode() if post else b"",
            ) as answer:
                self._send_raw(StreamHead(stream=s.id, status=answer.status,
                                          content_type=answer.content_type[:MAX_CONTENT_TYPE]))
                decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
                s.answer = answer
                try:  # each read's bytes go out from the engine connection's callback
                    await answer.pipe(lambda raw: self._feed(s, _text(decoder, raw)))
                except EngineError as exc:
                    error = f"engine request failed: {exc}"
                self._feed(s, decoder.decode(b"", True))
                while s.pending:  # what came before the end (or the break) waits for credit
                    s.more.clear()
                    await s.more.wait()
        except EngineError as exc:
            error = f"engine request failed: {exc}"
        except Exception as exc:  # noqa: BLE001 - the stream ends with the reason, never hangs
            log.exception("stream %d to replica %s.%d failed", s.id, *s.replica.key)
            error = f"node error: {exc!r}"
        # CancelledError goes through: ended by the coordinator, the replica's end, the link's
        self._end(s.id, error)

    def _feed(self, s: Stream, text: str) -> None:
        """Send `text` (one read's worth, whole characters) at once when it fits the credit
        and one chunk, else as chunks within the window, the rest held (reading the engine
        paused) until credit comes."""
        if not text or s.over:
            return
        if s.pending:
            s.pending += text.encode()
            return
        n = len(text) if text.isascii() else len(text.encode())
        if n <= s.credit and n <= MAX_STREAM_CHUNK:
            self._send_raw(StreamData(stream=s.id, data=text))
            s.credit -= n
            return
        s.pending = text.encode()
        self._flush(s)

    def _flush(self, s: Stream) -> None:
        """Send what of `s.pending` the credit allows; pause the engine while some is left."""
        data, pos = s.pending, 0
        while pos < len(data) and not s.over:
            n = piece(data, pos, s.credit)
            if n == 0:
                break
            self._send_raw(StreamData(stream=s.id, data=data[pos:pos + n].decode()))
            s.credit -= n
            pos += n
        s.pending = data[pos:] if not s.over else b""
        if s.answer is not None:
            if s.pending:
                s.answer.pause()
            else:
                s.answer.resume()

    # --- plumbing -----------------------------------------------------------------------

    async def close(self) -> None:
        """Client shutdown: end every stream and watcher (replicas keep running)."""
        self.connection_lost()
        tasks = list(self._tasks)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.engines.close()

    def _spawn(self, coro: Coroutine[Any, Any, Any]) -> asyncio.Task[None]:
        task: asyncio.Task[None] = asyncio.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("serving task failed", exc_info=task.exception())


def _text(decoder: codecs.IncrementalDecoder, raw: bytes) -> str:
    """`raw` as text: at once when it is whole valid UTF-8 (the usual case), else through
    `decoder`, which holds a character split by the read and replaces invalid bytes."""
    if not decoder.getstate()[0]:
        try:
            return raw.decode()
        except UnicodeDecodeError:
            pass
    return decoder.decode(raw)


def _has_control(text: str) -> bool:
    return _CONTROL.search(text) is not None

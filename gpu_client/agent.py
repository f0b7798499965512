"""The connection loop: register, heartbeat, run what is assigned, report results until acked.

One `Agent` per client process. It keeps the attempts it holds in `_runs` (running, or
finished with a result the coordinator has not acked) and nothing else: executors (the process
table, Docker) are the truth about what runs. Handlers of coordinator messages are
synchronous, so each checks and changes `_runs` with no `await` in between; all sends go
through one outbox per session, so they leave in the order they were made.
"""

from __future__ import annotations

import asyncio
import logging
import os
import random
import socket
import ssl
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus
from websockets.protocol import State

from gpu_client.artifacts import result_fields, ship
from gpu_client.credential import credential_paths, join_token, load_any, save_all
from gpu_client.detect import GpuSource
from gpu_client.discover import serve_discovered
from gpu_client.endpoints import Endpoints, reconnect_delays
from gpu_client.executors.base import Executor, OnOutput, RunOutcome
from gpu_client.fencing import Fence
from gpu_client.gang import with_rendezvous
from gpu_client.handshake import Unproven, proving, signed
from gpu_client.health import NodeHealth
from gpu_client.isolation import level as isolation_level
from gpu_client.isolation import owner_tenant
from gpu_client.logstream import LogStream
from gpu_client.policy import assign_refusal, node_policy
from gpu_client.serving import Serving
from gpu_client.settings import ClientSettings
from gpu_client.telemetry import Telemetry
from shared import __version__
from shared.protocol import (
    BUNDLE,
    FATAL_CLOSE_CODES,
    FEATURES,
    MAX_FRAME_BYTES,
    SERVE,
    Ack,
    Assign,
    BadMessage,
    Cancel,
    CloseCode,
    Drain,
    Error,
    Heartbeat,
    Msg,
    Register,
    Registered,
    ServerBundle,
    ServerMsg,
    StreamCancel,
    StreamCredit,
    StreamData,
    StreamOpen,
    TaskAccepted,
    TaskOutcome,
    TaskRef,
    TaskResult,
    TaskStarted,
    bundle_frame,
    decode_server,
    encode,
)

log = logging.getLogger(__name__)

REGISTER_TIMEOUT_S = 10.0
BUNDLE_MSGS = 256  # at most this many messages, and BUNDLE_BYTES, in one `bundle` frame
BUNDLE_BYTES = 256 << 10
EXIT_FATAL = 2
Key = tuple[str, int]


class FatalClose(Exception):
    """The coordinator refused this node for good (bad token, protocol unsupported)."""

    def __init__(self, code: int, reason: str) -> None:
        super().__init__(f"coordinator closed the connection with {code}: {reason or 'no reason'}")
        self.code, self.reason = code, reason


def classify_error(exc: Exception) -> Exception | None:
    """For `connect`: None retries; an exception is fatal. Only 401/403, bad URLs and a
    coordinator whose join-token proof is wrong are."""
    if isinstance(exc, Unproven):
        return exc
    if isinstance(exc, InvalidStatus):
        return exc if exc.response.status_code in (401, 403) else None
    if isinstance(exc, ssl.SSLCertVerificationError):
        return exc  # an unverified certificate is refused for good: fix MESH_CA_FILE or the URL
    if isinstance(exc, InvalidHandshake | OSError | TimeoutError | ConnectionClosed):
        return None
    return exc


def _tls(s: ClientSettings, url: str) -> dict[str, Any]:
    """`connect` keywords for wss://: verify against MESH_CA_FILE when set (else the system CAs)."""
    if s.ca_file is None or not url.startswith("wss://"):
        return {}
    return {"ssl": ssl.create_default_context(cafile=str(s.ca_file))}


@dataclass(eq=False)
class Run:
    """One attempt this node holds. `result` set: finished, pending until acked."""

    task_id: str
    attempt: int
    executor: Executor | None
    stream: LogStream
    task: asyncio.Task[None] | None = None
    result: TaskResult | None = None
    started: asyncio.Event = field(default_factory=asyncio.Event)  # the executor said so

    @property
    def key(self) -> Key:
        return (self.task_id, self.attempt)

    def ref(self) -> TaskRef:
        state: Literal["running", "finished"] = (
            "finished" if self.result is not None else "running"
        )
        return TaskRef(task_id=self.task_id, attempt=self.attempt, state=state)


class Agent:
    def __init__(
        self, settings: ClientSettings, source: GpuSource, executors: Mapping[str, Executor],
        isolation: str = "",
    ) -> None:
        self._settings = settings
        # user+cgroup | user | none (gpu_client/isolation.py); "": judged without a cgroup probe
        self.isolation = isolation or isolation_level(settings, cgroups=False)
        self._source = source
        self._executors = dict(executors)
        self._runs: dict[Key, Run] = {}
        self._outbox: asyncio.Queue[Msg] | None = None  # set while registered
        self._bundle = False  # the coordinator takes several messages in one frame
        self._ws: ClientConnection | None = None
        self._draining = False
        self._assigns = 0  # `assign` messages this connection delivered (Heartbeat.assigns)
        self._heartbeat_s = 5.0
        self._stop = asyncio.Event()
        self._background: set[asyncio.Task[None]] = set()
        self.registrations = 0  # sessions that got `registered`; tests wait on it
        self._policy = node_policy(  # what it was built with
            settings, self._executors, owner_tenant(settings, self.isolation))
        self._credential_paths = credential_paths(  # one credential per mesh (HA: every URL)
            settings.state_dir, settings.urls, settings.node_name
        )
        self._endpoints = Endpoints(settings.urls)
        self.telemetry = Telemetry(source)
        self.health = NodeHealth(self._executors, settings.work_dir, settings.min_free_mb)
        self.fence = Fence(settings.fence_after_s, self._self_fence)
        self._probe_now = asyncio.Event()  # an infra error: re-probe executors and health now
        self.serving = Serving(  # model service replicas and the streams to them (issue 27)
            self._send, state_dir=settings.state_dir, health_s=settings.serve_health_s,
            max_streams=settings.serve_max_streams, buffer_bytes=settings.serve_buffer_mb << 20)

    # --- lifecycle --------------------------------------------------------------------

    def stop(self) -> None:
        """Ask `run()` to close the socket with 1000 and return 0 (signal handlers call it)."""
        self._stop.set()

    async def run(self) -> int:
        """Serve until `stop()` (returns 0) or a fatal refusal by the coordinator (returns 2)."""
        await self._adopt()
        await self.health.probe()
        self._spawn(self.fence.watch())
        self._spawn(self._probe_loop())
        loop_task = asyncio.create_task(self._connect_loop())
        stop_task = asyncio.create_task(self._stop.wait())
        await asyncio.wait({loop_task, stop_task}, return_when=asyncio.FIRST_COMPLETED)
        stop_task.cancel()
        code = 0
        if loop_task.done():
            code = self._exit_code(loop_task)
        else:
            log.info("stopping: closing the connection; process tasks keep running")
            if self._ws is not None:
                await self._ws.close(1000, "client shutting down")
            loop_task.cancel()
            await asyncio.gather(loop_task, return_exceptions=True)
        await self._detach()
        return code

    def _exit_code(self, loop_task: asyncio.Task[None]) -> int:
        exc = loop_task.exception()
        if isinstance(exc, FatalClose | InvalidStatus | ssl.SSLCertVerificationError | Unproven):
            log.error("stopping: the coordinator refused node %s: %s", self._settings.node_name,
                      exc, extra={"node": self._settings.node_name})
            if isinstance(exc, FatalClose) and exc.code == CloseCode.NAME_TAKEN:
                log.error("node name %s belongs to another node: set another NODE_NAME, or "
                          "have an admin run `gpumesh node forget %s` if that node is gone",
                          self._settings.node_name, self._settings.node_name)
            return EXIT_FATAL
        log.error("stopping: connection loop failed", exc_info=exc)
        return 1

    async def _detach(self) -> None:
        """Stop watching running attempts; processes and containers keep running."""
        running = [r for r in self._runs.values() if r.task is not None and not r.task.done()]
        tasks = list(self._background)
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.serving.close()
        if running:
            log.info("stopped watching %d running task(s): %s", len(running),
                     ", ".join(f"{r.task_id}.{r.attempt}" for r in running))

    async def _adopt(self) -> None:
        for executor in self._executors.values():
            if not await executor.available():
                continue  # nothing to ask it now (Docker down, work dir unusable)
            for found in await executor.adopt():
                run = self._new_run(found.task_id, found.attempt, executor)
                run.started.set()
                run.task = self._spawn(self._complete(run, found.follow, run.stream.feed))
        await self.serving.adopt({run.key for run in self._runs.values() if run.result is None})

    # --- connection -------------------------------------------------------------------

    async def _connect_loop(self) -> None:
        """Connect to the coordinators of MESH_COORDINATOR_URL in turn, backing off after a
        round in which none registered us; follow a standby's 4010 to the leader."""
        s = self._settings
        if s.discover:  # no URL: find the coordinator by mDNS; it must prove the join token
            await serve_discovered(self, s)
            return
        backoff = reconnect_delays(s.reconnect_max_s)
        while True:
            url = self._endpoints.current
            try:
                ws = await self._open(url)
            except Exception as exc:  # noqa: BLE001 - classified: a fatal one stops the node
                if (fatal := classify_error(exc)) is not None:
                    raise fatal from exc
                log.info("cannot connect to %s (%s)", url, exc)
                if self._endpoints.failed():
                    await asyncio.sleep(next(backoff))
                continue
            self._ws = ws
            before = self.registrations
            redirected = False
            try:
                await self._session(ws)
            except ConnectionClosed as exc:
                code = exc.rcvd.code if exc.rcvd is not None else None
                if exc.rcvd is not None and code in FATAL_CLOSE_CODES:
                    raise FatalClose(exc.rcvd.code, exc.rcvd.reason) from exc
                if exc.rcvd is not None and code == CloseCode.NOT_LEADER:
                    log.info("%s is a standby; the leader is %s", url, exc.rcvd.reason)
                    redirected = self._endpoints.redirect(exc.rcvd.reason)
                else:
                    log.info("connection closed (%s); reconnecting", exc)
            except Exception:
                log.exception("session failed; reconnecting")
            finally:
                self._ws = None
                self._outbox = None
                await ws.close()
            if self.registrations > before:  # it served us: retry it first, from a fresh backoff
                self._endpoints.served()
                backoff = reconnect_delays(s.reconnect_max_s)
                await asyncio.sleep(next(backoff))
            elif redirected:
                await asyncio.sleep(random.uniform(0.0, 0.2))
            elif self._endpoints.failed():
                await asyncio.sleep(next(backoff))

    async def _open(self, url: str) -> ClientConnection:
        # No permessage-deflate: frames are small JSON, and inflating every heartbeat cost
        # the coordinator ~12 % of its CPU and ~40 KB of memory per node at 10,000 nodes.
        return await connect(
            f"{url}/ws/{self._settings.node_name}", max_size=MAX_FRAME_BYTES, open_timeout=10,
            close_timeout=5, compression=None, **_tls(self._settings, url),
            # offer the join-token proof; checked if the coordinator answers with one
            create_connection=proving(self.read_join_token, self._settings.node_name,
                                      discovered=False),
        )

    async def read_join_token(self) -> str:
        s = self._settings
        return await asyncio.to_thread(join_token, s.token, s.token_file)

    def use_coordinator(self, url: str, credential_key: str) -> None:
        """Talk to `url` (a discovered coordinator); its credential is kept under the key."""
        self._endpoints = Endpoints((url,))
        self._credential_paths = credential_paths(
            self._settings.state_dir, (credential_key,), self._settings.node_name
        )

    async def serve_connection(self, ws: ClientConnection) -> bool:
        """One session on an open `ws` until it closes; True if it registered. Raises
        FatalClose when the coordinator refuses this node for good."""
        self._ws = ws
        before = self.registrations
        try:
            await self._session(ws)
        except ConnectionClosed as exc:
            if exc.rcvd is not None and exc.rcvd.code in FATAL_CLOSE_CODES:
                raise FatalClose(exc.rcvd.code, exc.rcvd.reason) from exc
            log.info("connection closed (%s)", exc)
        except Exception:
            log.exception("session failed")
        finally:
            self._ws = None
            self._outbox = None
            await ws.close()
        return self.registrations > before

    async def _session(self, ws: ClientConnection) -> None:
        await ws.send(encode(signed(await self._register_message(), ws)))  # proof, not token
        registered = await self._wait_registered(ws)
        if registered is None:
            log.warning("no `registered` within %.0fs; reconnecting", REGISTER_TIMEOUT_S)
            return
        if registered.credential:  # first join: keep it before anything else happens
            await asyncio.to_thread(save_all, self._credential_paths, registered.credential)
            log.info("node credential issued; kept in %s", self._credential_paths[0])
        self.registrations += 1
        self._heartbeat_s = registered.heartbeat_interval_s
        self._draining = False
        self._assigns = 0
        self._bundle = BUNDLE in registered.features
        outbox: asyncio.Queue[Msg] = asyncio.Queue()
        self._outbox = outbox
        log.info("registered with %s as %s", self._endpoints.current, registered.node_id,
                 extra={"node": registered.node_id})
        self._apply_registered(registered)
        writer = asyncio.create_task(self._write(ws, outbox))
        beat = asyncio.create_task(self._heartbeats(ws))
        try:
            while True:
                frame = await ws.recv()
                self.fence.touch()
                self._handle(decode_server(frame))
        finally:
            self.serving.connection_lost()  # its streams end; the coordinator fails its side
            writer.cancel()
            beat.cancel()
            await asyncio.gather(writer, beat, return_exceptions=True)

    async def _wait_registered(self, ws: ClientConnection) -> Registered | None:
        try:
            async with asyncio.timeout(REGISTER_TIMEOUT_S):
                while True:
                    msg = decode_server(await ws.recv())
                    self.fence.touch()
                    if isinstance(msg, Registered):
                        return msg
                    if isinstance(msg, Error):
                        self._on_error(msg)
                    else:
                        log.warning("ignoring %s before `registered`", type(msg).__name__)
        except TimeoutError:
            return None

    async def _register_message(self) -> Register:
        s = self._settings
        reading = await self.telemetry.reading(REGISTER_TIMEOUT_S)
        host = reading.host
        return Register(
            hostname=socket.gethostname(), role=s.role, version=__version__,
            gpus=reading.gpus, cpu_count=host.cpu_count if host else os.cpu_count() or 1,
            memory_mb=host.memory_total_mb if host else 0,
            executors=list(self.health.usable), slots=s.slots, labels=dict(s.labels),
            running=self._refs(), policy=self._policy, features=sorted(FEATURES),
            address=s.node_address,
            isolation=self.isolation,  # type: ignore[arg-type]  # one of isolation.LEVELS
            credential=await asyncio.to_thread(load_any, self._credential_paths),
            token=await asyncio.to_thread(join_token, s.token, s.token_file),
        )

    async def _write(self, ws: ClientConnection, outbox: asyncio.Queue[Msg]) -> None:
        try:
            while True:
                first = await outbox.get()
                if self._bundle and type(first) is not StreamData:
                    # One turn of the loop first: an instant task's result, set off by the
                    # assign that queued this `task_accepted`, then leaves in the same frame
                    # and the accepted is dropped (_bundles): one frame per task, not two.
                    # Not for a token of a stream (nothing follows from it; the other
                    # streams' tokens of the same turn of the loop are queued already).
                    await asyncio.sleep(0)
                if not self._bundle or outbox.empty():
                    frame = encode(first)
                    if not _send_now(ws, frame):
                        await ws.send(frame)
                    continue
                msgs = [first]  # what queued up meanwhile leaves together (negotiated)
                while not outbox.empty() and len(msgs) < BUNDLE_MSGS:
                    msgs.append(outbox.get_nowait())
                for frame in _bundles(msgs):
                    if not _send_now(ws, frame):
                        await ws.send(frame)
        except ConnectionClosed:
            return  # the reader sees the close too
        except Exception:
            log.exception("sending failed; closing the connection")
            await ws.close(1011, "client failed to send")

    async def _heartbeats(self, ws: ClientConnection) -> None:
        """On a fixed timer; telemetry gets half an interval, else the last reading goes."""
        loop = asyncio.get_running_loop()
        next_at = loop.time()
        while True:
            next_at = max(next_at + self._heartbeat_s, loop.time())
            await asyncio.sleep(next_at - loop.time())
            r = await self.telemetry.reading(self._heartbeat_s / 2)
            host = r.host
            self._send(Heartbeat(
                gpus=r.gpus, cpu_pct=host.cpu_pct if host else 0.0,
                load1=round(host.load1, 2) if host else 0.0,
                memory_used_mb=host.memory_used_mb if host else 0, running=self._refs(),
                executors=list(self.health.usable), health=self.health.health,
                assigns=self._assigns,
            ))
            try:  # a pong is contact too: a coordinator with nothing to say is not gone
                # ping() hands back a Future, typed as an Awaitable; ensure_future returns it
                pong = asyncio.ensure_future(await ws.ping())
            except ConnectionClosed:
                return
            pong.add_done_callback(self._on_pong)

    def _on_pong(self, pong: asyncio.Future[float]) -> None:
        if not pong.cancelled() and pong.exception() is None:
            self.fence.touch()

    async def _probe_loop(self) -> None:
        """Re-probe executors and node health every probe_interval_s, and after infra errors."""
        while True:
            try:  # asyncio.timeout, not wait_for: 3.11's wait_for can swallow a cancel
                async with asyncio.timeout(self._settings.probe_interval_s):
                    await self._probe_now.wait()
            except TimeoutError:
                pass
            self._probe_now.clear()
            await self.health.probe()

    def _self_fence(self, silent_s: float) -> None:
        running = [r for r in self._runs.values() if r.result is None]
        log.error(
            "SELF-FENCING: no word from the coordinator for %.1fs (MESH_FENCE_AFTER_S=%g): "
            "stopping %d running task(s) it has requeued elsewhere: %s", silent_s,
            self._settings.fence_after_s, len(running),
            ", ".join(f"{r.task_id}.{r.attempt}" for r in running) or "none",
            extra={"node": self._settings.node_name},
        )
        for run in running:
            self._on_cancel(run.task_id, run.attempt, "self-fenced: cut off from the coordinator")

    def _send(self, msg: Msg) -> None:
        """Queue `msg` if registered; otherwise drop it (results are re-sent on register)."""
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def _refs(self) -> list[TaskRef]:
        return [run.ref() for run in self._runs.values()]

    # --- coordinator messages (synchronous: no await between check and change) --------

    def _handle(self, msg: ServerMsg | ServerBundle | BadMessage) -> None:
        match msg:
            case ServerBundle():
                for one in msg.msgs:
                    self._handle(one)
            case Assign():
                if self._assigns >= 0:  # -1: this connection stopped counting
                    self._assigns += 1
                self._on_assign(msg)
            case Cancel():
                self._on_cancel(msg.task_id, msg.attempt, f"cancel: {msg.reason or 'no reason'}",
                                msg.grace_s or None)
            case Ack():
                self._on_ack(msg)
            case Drain(lifted=True):
                log.info("drain lifted: %s; taking new work again", msg.reason or "-")
                self._draining = False
            case Drain():
                log.info("draining: %s; new assignments will be refused", msg.reason or "-")
                self._draining = True
            case Error():
                self._on_error(msg)
            case StreamOpen():
                self.serving.on_open(msg)
            case StreamCredit():
                self.serving.on_credit(msg)
            case StreamCancel():
                self.serving.on_cancel(msg)
            case BadMessage():
                log.warning("undecodable frame from the coordinator: %s", msg.reason)
                self._assigns = -1  # it may have held assigns: heartbeats stop counting them
            case Registered():
                log.warning("ignoring a second `registered`")

    def _apply_registered(self, reg: Registered) -> None:
        for ref in reg.stop:
            self._on_cancel(ref.task_id, ref.attempt, "fenced off at register")
        for run in list(self._runs.values()):
            if run.result is not None:
                self._send(run.result)  # `keep`ers, and any the coordinator did not list
        self.serving.registered(SERVE in reg.features)  # replicas it runs: their state again

    def _on_assign(self, a: Assign) -> None:
        key = (a.task_id, a.attempt)
        extra = {"task": a.task_id, "attempt": a.attempt, "node": self._settings.node_name}
        if key in self._runs:
            log.debug("duplicate assign of %s.%d ignored", *key, extra=extra)
            return
        executor = self._executors.get(a.executor)
        run = self._new_run(a.task_id, a.attempt, executor)
        # A gang member's env gets its rendezvous, past policy: it is the mesh's, not the
        # task's (gpu_client/gang.py); rank 0 reports the MASTER_PORT it found.
        ran, port = with_rendezvous(a, self._settings.node_address)
        self._send(TaskAccepted(task_id=a.task_id, attempt=a.attempt, master_port=port))
        if self._draining:
            self._finish(run, RunOutcome(exit_code=None, error="node draining", infra=True))
        elif executor is None or a.executor not in self.health.usable:
            why = f"executor {a.executor} not offered by node {self._settings.node_name}"
            if executor is not None:
                why = f"executor {a.executor} unavailable on node {self._settings.node_name} now"
            self._finish(run, RunOutcome(exit_code=None, error=why, infra=True))
        elif refused := assign_refusal(self._policy, a):
            log.warning("refused task %s.%d: %s", *key, refused, extra=extra)
            self._finish(run, RunOutcome(exit_code=None, error=refused))
        else:
            if a.service is not None:  # a service replica: a port of its own, then watched
                if isinstance(prepared := self.serving.prepare(a), str):
                    self._finish(run, RunOutcome(exit_code=None, error=prepared))
                    return
                a = prepared
            log.info("running task %s.%d with %s", *key, a.executor, extra=extra)
            work: Callable[[OnOutput], Awaitable[RunOutcome]]
            work = partial(executor.run, ran if a.gang is not None else a,
                           lambda: self._on_started(run))
            if a.service is not None:
                work = self.serving.launching(key, work)
            run.task = self._spawn(self._complete(run, work, run.stream.feed))

    def _on_cancel(
        self, task_id: str, attempt: int, cause: str, grace_s: float | None = None
    ) -> None:
        extra = {"task": task_id, "attempt": attempt, "cause": cause}
        run = self._runs.pop((task_id, attempt), None)
        if run is None:
            log.debug("%s for unknown attempt %s.%d ignored", cause, task_id, attempt, extra=extra)
            return
        log.info("stopping task %s.%d (%s)", task_id, attempt, cause, extra=extra)
        self.serving.ended(run.key)
        self._spawn(self._stop_run(run, grace_s))

    def _on_ack(self, ack: Ack) -> None:
        run = self._runs.get((ack.task_id, ack.attempt))
        if run is None or run.result is None:
            log.debug("ack for %s.%d that holds no result ignored", ack.task_id, ack.attempt)
            return
        del self._runs[run.key]
        self._spawn(self._release(run))

    def _on_error(self, err: Error) -> None:
        log.warning("coordinator error %s: %s (task %s, attempt %s)", err.code, err.reason,
                    err.task_id, err.attempt, extra={"task": err.task_id, "attempt": err.attempt})

    # --- runs -------------------------------------------------------------------------

    def _new_run(self, task_id: str, attempt: int, executor: Executor | None) -> Run:
        run = Run(task_id, attempt, executor, LogStream(task_id, attempt, self._send))
        self._runs[run.key] = run
        return run

    def _on_started(self, run: Run) -> None:
        run.started.set()
        if self._runs.get(run.key) is run:
            self._send(TaskStarted(task_id=run.task_id, attempt=run.attempt))
            self.serving.started(run.key)  # a replica: reported starting, its health watched

    async def _complete(
        self, run: Run, work: Callable[[OnOutput], Awaitable[RunOutcome]], on_output: OnOutput
    ) -> None:
        try:
            outcome = await work(on_output)
        except Exception as exc:
            log.exception("executor failed on task %s.%d", *run.key,
                          extra={"task": run.task_id, "attempt": run.attempt})
            outcome = RunOutcome(exit_code=None, error=f"executor error: {exc!r}", infra=True)
        if self._runs.get(run.key) is run:  # its artifacts reach the coordinator before its result
            outcome = await ship(self._settings, self._endpoints.current, self._credential_paths,
                                 *run.key, outcome)
        self._finish(run, outcome)

    def _finish(self, run: Run, outcome: RunOutcome) -> None:
        run.stream.close()
        self.serving.ended(run.key)
        if self._runs.get(run.key) is not run:  # cancelled or fenced while it ran
            return
        run.result = TaskResult(
            task_id=run.task_id, attempt=run.attempt,
            status="completed" if outcome.ok else "failed", error=outcome.error,
            result=TaskOutcome(exit_code=outcome.exit_code, output=outcome.output,
                               duration_s=outcome.duration_s, data=outcome.data,
                               **result_fields(outcome)),
            infra=outcome.infra and not outcome.ok,
        )
        if run.result.infra:
            self._probe_now.set()
        log.info("task %s.%d %s%s", run.task_id, run.attempt, run.result.status,
                 f": {outcome.error}" if outcome.error else "",
                 extra={"task": run.task_id, "attempt": run.attempt})
        self._send(run.result)

    async def _stop_run(self, run: Run, grace_s: float | None = None) -> None:
        task = run.task
        if run.executor is not None and task is not None and not task.done():
            # An executor can only stop work it has started: wait for that, or for the end.
            started = asyncio.create_task(run.started.wait())
            await asyncio.wait({task, started}, return_when=asyncio.FIRST_COMPLETED)
            started.cancel()
            if not task.done() and grace_s is None:
                await run.executor.cancel(run.task_id, run.attempt)
            elif not task.done():  # the coordinator's grace (a preemption)
                await run.executor.cancel(run.task_id, run.attempt, grace_s=grace_s)
            await asyncio.gather(task, return_exceptions=True)
        await self._release(run)

    async def _release(self, run: Run) -> None:
        if run.executor is not None:
            await run.executor.release(run.task_id, run.attempt)

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._reap)
        return task

    def _reap(self, task: asyncio.Task[None]) -> None:
        self._background.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("background task failed", exc_info=task.exception())


def _send_now(ws: ClientConnection, frame: bytes) -> bool:
    """Write `frame` to the socket at once, through websockets' Sans-I/O protocol, when the
    connection is open and nothing waits in its write buffer: `ws.send` does the same plus
    an async context and a drain, which cost more than the frame on a streamed token. False
    (nothing done) otherwise: then `ws.send` waits for room or raises ConnectionClosed."""
    transport = ws.transport
    if ws.protocol.state is not State.OPEN or transport.get_write_buffer_size():
        return False
    ws.protocol.send_binary(frame)
    for data in ws.protocol.data_to_send():
        transport.write(data)
    return True


def _bundles(msgs: list[Msg]) -> list[bytes]:
    """`msgs` as few frames as the caps allow, in order. A `task_accepted` whose attempt's
    result leaves with it is dropped: the result says as much (the coordinator only fences
    on it)."""
    done = {(m.task_id, m.attempt) for m in msgs if isinstance(m, TaskResult)}
    frames: list[list[bytes]] = [[]]
    size = 0
    for m in msgs:
        if isinstance(m, TaskAccepted) and (m.task_id, m.attempt) in done:
            continue
        raw = encode(m)
        if frames[-1] and size + len(raw) > BUNDLE_BYTES:
            frames.append([])
            size = 0
        frames[-1].append(raw)
        size += len(raw)
    return [f[0] if len(f) == 1 else bundle_frame(f) for f in frames if f]

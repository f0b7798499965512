"""The node side of model serving (gpu_client/serving.py): a real client process, a stand-in
engine it runs as a replica, and a coordinator end driven by hand over a real WebSocket.

The hand-driven end speaks the coordinator's side of the protocol (registered with the
"serve" feature, assign with `service`, stream_open/credit/cancel, cancel) and checks, on
every `stream_data` it receives, that the node never has more than the window unacknowledged.
The engine is a small stdlib HTTP server (ENGINE below) that the replica's command starts on
the `{port}` the node fills in; it notes requests, finished answers and disconnects in a
file, answers its health path 503 while a `sick` file exists, and holds a gated answer
until a `go` file appears.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import shutil
import signal
import socket
import tempfile
import threading
from collections import defaultdict
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.exceptions import ConnectionClosed

from gpu_client.executors.docker_spec import container_spec
from gpu_client.serving import fill_port, path_problem, piece
from gpu_client.settings import ClientSettings
from shared.config import ConfigError
from shared.protocol import (
    MAX_STREAM_CHUNK,
    SERVE,
    Assign,
    BadMessage,
    Cancel,
    ClientBundle,
    Msg,
    Register,
    Registered,
    ReplicaState,
    ServiceRun,
    StreamCancel,
    StreamCredit,
    StreamData,
    StreamEnd,
    StreamHead,
    StreamOpen,
    TaskRef,
    TaskResult,
    decode_client,
    encode,
)
from tests.conftest import Proc, wait_until
from tests.netns import ADDR, Netns

ENGINE = r"""
import json, os, sys, time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

port, home, model = int(sys.argv[1]), sys.argv[2], sys.argv[3]
with open(os.path.join(home, "engine.pid"), "w") as f:
    f.write(str(os.getpid()))

def note(**kw):
    with open(os.path.join(home, "engine.log"), "a") as f:
        f.write(json.dumps(kw) + "\n")

TEXT = "é€😀a"  # 2, 3, 4 and 1 bytes of UTF-8

class H(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive; answers to POST are chunked, as uvicorn's are

    def log_message(self, *args):
        pass

    def do_GET(self):
        if self.path != "/v1/models":
            self.send_error(404)
            return
        if os.path.exists(os.path.join(home, "sick")):
            self.send_error(503)
            return
        body = json.dumps({"object": "list", "data": [{"id": model}]}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self):
        req = json.loads(self.rfile.read(int(self.headers.get("Content-Length", 0))) or b"{}")
        note(event="request", path=self.path, req=req, ctype=self.headers.get("Content-Type"))
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        mode = req.get("mode")

        def send(data):
            self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
            self.wfile.flush()

        try:
            if mode == "gated":  # one chunk, then the rest once the test says go
                send(b"data: first\n\n")
                while not os.path.exists(os.path.join(home, "go")):
                    time.sleep(0.01)
                for i in range(3):
                    send(f"data: {i}\n\n".encode())
            elif mode == "endless":  # until the caller goes away
                for i in range(100000):
                    send(f"data: tick {i}\n\n".encode())
                    time.sleep(0.01)
            else:  # bulk: `size` bytes of multibyte text in writes that split characters
                data = (TEXT * (req["size"] // 10 + 1)).encode()[: req["size"]]
                for at in range(0, len(data), 997):
                    send(data[at : at + 997])
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (BrokenPipeError, ConnectionResetError):
            note(event="disconnect")
            self.close_connection = True
            return
        note(event="done")

ThreadingHTTPServer(("127.0.0.1", port), H).serve_forever()
"""


class HandCoordinator:
    """The coordinator's end of one node's link, driven by the test."""

    def __init__(self) -> None:
        self.inbox: list[tuple[int, Msg]] = []  # (session, message) as they came
        self.registers: list[Register] = []
        self.ws: ServerConnection | None = None
        self.keep: list[TaskRef] = []
        self.windows: dict[int, int] = {}
        self.sent: dict[int, int] = defaultdict(int)  # stream_data bytes received per stream
        self.credited: dict[int, int] = defaultdict(int)
        self.violations: list[str] = []
        self.server: Server | None = None

    async def start(self, sock: socket.socket | None = None) -> int:
        if sock is None:
            self.server = await serve(self._handler, "127.0.0.1", 0)
        else:
            self.server = await serve(self._handler, sock=sock)
        port: int = self.server.sockets[0].getsockname()[1]
        return port

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _handler(self, ws: ServerConnection) -> None:
        reg = decode_client(await ws.recv())
        assert isinstance(reg, Register), reg
        self.registers.append(reg)
        session = len(self.registers)
        await ws.send(encode(Registered(node_id="n", heartbeat_interval_s=0.5, keep=self.keep,
                                        features=[f for f in reg.features if f == SERVE])))
        self.ws = ws
        try:
            async for frame in ws:
                msg = decode_client(frame)
                assert not isinstance(msg, BadMessage), msg
                for one in msg.msgs if isinstance(msg, ClientBundle) else [msg]:
                    self._check(one)
                    self.inbox.append((session, one))
        except ConnectionClosed:
            pass

    def _check(self, m: Msg) -> None:
        if isinstance(m, StreamData):
            n = len(m.data.encode())
            if n > MAX_STREAM_CHUNK:
                self.violations.append(f"chunk of {n} bytes")
            self.sent[m.stream] += n
            window = self.windows.get(m.stream, 1 << 20)
            if self.sent[m.stream] - self.credited[m.stream] > window:
                self.violations.append(f"stream {m.stream}: {self.sent[m.stream]} sent, "
                                       f"{self.credited[m.stream]} credited, window {window}")

    async def send(self, msg: Msg) -> None:
        assert self.ws is not None
        if isinstance(msg, StreamOpen):
            self.windows[msg.stream] = msg.window
        if isinstance(msg, StreamCredit):
            self.credited[msg.stream] += msg.bytes
        await self.ws.send(encode(msg))

    def of(self, kind: type[Any], session: int = 0, **match: Any) -> list[Any]:
        return [m for s, m in self.inbox if isinstance(m, kind) and (not session or s == session)
                and all(getattr(m, k) == v for k, v in match.items())]

    def data(self, stream: int) -> str:
        return "".join(m.data for m in self.of(StreamData, stream=stream))

    def ended(self, stream: int) -> StreamEnd | None:
        ends = self.of(StreamEnd, stream=stream)
        return ends[0] if ends else None

    async def replica_state(self, state: str, session: int = 0) -> ReplicaState:
        found = await wait_until(
            lambda: [m for m in self.of(ReplicaState, session) if m.state == state][-1:],
            30, f"replica {state}")
        state_msg: ReplicaState = found[0]
        return state_msg

    async def stream(self, sid: int, *, credit_every: int = 0) -> StreamEnd:
        """Wait for stream `sid` to end, granting credit for what arrives (a reading caller)."""
        async def done() -> StreamEnd | None:
            if credit_every and self.sent[sid] - self.credited[sid] >= credit_every:
                await self.send(StreamCredit(stream=sid, bytes=self.sent[sid] - self.credited[sid]))
            return self.ended(sid)
        end: StreamEnd = await wait_until(done, 60, f"stream {sid} to end")
        return end


class Engine:
    """Where the stand-in engine keeps its notes; killed at the end (it outlives clients).

    Its dir is made in the system's temp dir, not the test's: the task runs as a uid of its
    own, and any pytest that starts meanwhile sets /tmp/pytest-of-root back to 0700."""

    def __init__(self) -> None:
        self.home = Path(tempfile.mkdtemp(prefix="gpumesh-engine-"))
        self.home.chmod(0o777)
        self.script = self.home / "engine.py"
        self.script.write_text(ENGINE)
        self.script.chmod(0o644)
        self.model = f"tiny-{secrets.token_hex(4)}"

    def assign(self, task_id: str = "svc-1", attempt: int = 1) -> Assign:
        return Assign(
            task_id=task_id, attempt=attempt, task_type="service", executor="process",
            command=["python", str(self.script), "{port}", str(self.home), self.model],
            env={"ENGINE_PORT": "{port}"}, tenant="default",
            service=ServiceRun(service="tiny", model=self.model),
        )

    def notes(self) -> list[dict[str, Any]]:
        log = self.home / "engine.log"
        if not log.exists():
            return []
        return [json.loads(line) for line in log.read_text().splitlines()]

    def noted(self, event: str) -> int:
        return sum(1 for n in self.notes() if n["event"] == event)

    def kill(self) -> None:
        pid_file = self.home / "engine.pid"
        if pid_file.exists():
            try:
                os.kill(int(pid_file.read_text()), signal.SIGKILL)
            except (ProcessLookupError, ValueError):
                pass
        shutil.rmtree(self.home, ignore_errors=True)


@pytest.fixture
async def hand() -> AsyncIterator[HandCoordinator]:
    h = HandCoordinator()
    yield h
    await h.stop()


@pytest.fixture
def engines() -> Any:
    made: list[Engine] = []

    def make() -> Engine:
        made.append(Engine())
        return made[-1]

    yield make
    for e in made:
        e.kill()


# A root client ends whatever runs under a task's uid when that task ends, and every client
# on this machine (other test runs' too) starts at the same default range: these get their own.
_UIDS = 100_000 + (os.getpid() % 50_000) * 4
FAST_HEALTH = {"MESH_REPLICA_HEALTH_S": "0.2", "MESH_TASK_UIDS": f"{_UIDS}-{_UIDS + 3}"}


async def _running_replica(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engine: Engine, **env: str
) -> tuple[Proc, ReplicaState]:
    port = await hand.start()
    client = spawn_client("n1", f"ws://127.0.0.1:{port}", **(FAST_HEALTH | env))
    await wait_until(lambda: hand.ws is not None, 30, "the client registered")
    await hand.send(engine.assign())
    try:
        ready = await hand.replica_state("ready")
    except AssertionError:
        raise AssertionError(f"no ready replica; client log:\n{client.output()[-3000:]}\n"
                             f"engine dir: {sorted(p.name for p in engine.home.iterdir())}"
                             ) from None
    return client, ready


# --- pure parts ---------------------------------------------------------------------------


def test_port_is_filled_everywhere_and_other_braces_stay() -> None:
    a = Assign(task_id="t", attempt=1, task_type="service", executor="process",
               command=["serve", "--port={port}"], script="echo {port} ${HOME} {x}",
               env={"P": "{port}", "K": "v"}, params={"url": "http://h:{port}/", "n": 3},
               service=ServiceRun(service="s", model="m"))
    b = fill_port(a, 4321)
    assert b.command == ["serve", "--port=4321"]
    assert b.script == "echo 4321 ${HOME} {x}"
    assert b.env == {"P": "4321", "K": "v", "MESH_SERVICE_PORT": "4321"}
    assert b.params == {"url": "http://h:4321/", "n": 3}


@pytest.mark.parametrize("path", [
    "/v2/models", "v1/models", "/v1/../admin", "/v1//x", "/v1/a\\b", "/v1/a\x01", "/v1/a b",
    "/v1/%2e%2e/x", "/v1/a%2Fb", "/v1/a#frag", "/v1/" + "a" * 3000,
])
def test_bad_paths_are_refused(path: str) -> None:
    assert path_problem(path)


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/models", "/v1/models?x=1"])
def test_good_paths_pass(path: str) -> None:
    assert path_problem(path) == ""


def test_pieces_never_split_a_character_nor_pass_the_credit_or_chunk_cap() -> None:
    data = ("a€😀" * 40000).encode()
    for credit in (4, 5, 7, 100, 1 << 20):
        pos, out = 0, []
        while pos < len(data):
            n = piece(data, pos, credit)
            assert 0 < n <= min(credit, MAX_STREAM_CHUNK)
            out.append(data[pos : pos + n].decode())  # raises if split inside a character
            pos += n
        assert "".join(out) == data.decode()
    assert piece("😀".encode(), 0, 3) == 0  # waits for credit rather than split it


def test_docker_replica_publishes_its_port_on_loopback_only() -> None:
    a = fill_port(Assign(task_id="t", attempt=1, task_type="service", executor="docker",
                         image="vllm/vllm-openai", command=["--port", "{port}"],
                         service=ServiceRun(service="s", model="m")), 4321)
    spec = container_spec(a, "n1", [])
    assert spec["ports"] == {"4321/tcp": ("127.0.0.1", 4321)}
    assert spec["entrypoint"] == ["--port", "4321"]
    plain = container_spec(msgspec.structs.replace(a, service=None), "n1", [])
    assert "ports" not in plain


def test_serving_settings_from_env() -> None:
    s = ClientSettings.from_env({"NODE_NAME": "n"})
    assert (s.serve_health_s, s.serve_max_streams, s.serve_buffer_mb) == (5.0, 256, 256)
    s = ClientSettings.from_env({"NODE_NAME": "n", "MESH_REPLICA_HEALTH_S": "0.5",
                                 "MESH_NODE_MAX_STREAMS": "8", "MESH_NODE_STREAM_BUFFER_MB": "4"})
    assert (s.serve_health_s, s.serve_max_streams, s.serve_buffer_mb) == (0.5, 8, 4)
    for name, value in (("MESH_REPLICA_HEALTH_S", "0"), ("MESH_NODE_MAX_STREAMS", "0"),
                        ("MESH_NODE_STREAM_BUFFER_MB", "-1")):
        with pytest.raises(ConfigError, match="MESH_NODE_MAX_STREAMS"):
            ClientSettings.from_env({"NODE_NAME": "n", name: value})


# --- a real client, a stand-in engine ----------------------------------------------------


async def test_port_filled_ready_then_unhealthy_and_back(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engines: Callable[[], Engine],
) -> None:
    engine = engines()
    client, ready = await _running_replica(hand, spawn_client, engine)
    assert hand.registers[0].features and SERVE in hand.registers[0].features
    starting = hand.of(ReplicaState, state="starting")
    assert starting and starting[0].port == ready.port > 0
    async with httpx.AsyncClient(trust_env=False) as http:  # the engine runs on that port
        r = await http.get(f"http://127.0.0.1:{ready.port}/v1/models")
        assert r.json()["data"][0]["id"] == engine.model
    (engine.home / "sick").touch()
    sick = await hand.replica_state("unhealthy")
    assert "503" in sick.reason and sick.task_id == "svc-1" and sick.attempt == 1
    (engine.home / "sick").unlink()
    await wait_until(lambda: hand.of(ReplicaState)[-1].state == "ready", 30, "ready again")
    # the replica is a task otherwise: cancel stops it, and the engine with it
    await hand.send(Cancel(task_id="svc-1", attempt=1, reason="scaled down"))
    await wait_until(lambda: _gone(engine), 30, "the engine stopped")
    assert client.popen is not None and client.popen.poll() is None


async def test_streamed_chunk_by_chunk_within_the_window(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engines: Callable[[], Engine],
) -> None:
    engine = engines()
    await _running_replica(hand, spawn_client, engine)
    # gated: the first chunk reaches the coordinator while the engine still holds the rest
    await hand.send(StreamOpen(stream=1, task_id="svc-1", attempt=1, path="/v1/chat/completions",
                               body=json.dumps({"mode": "gated"})))
    head = (await wait_until(lambda: hand.of(StreamHead, stream=1), 30, "head"))[0]
    assert (head.status, head.content_type) == (200, "text/event-stream")
    await wait_until(lambda: hand.data(1) == "data: first\n\n", 30, "the first chunk alone")
    assert engine.noted("done") == 0 and hand.ended(1) is None
    (engine.home / "go").touch()
    end = await hand.stream(1)
    assert end.error == ""
    assert hand.data(1) == "data: first\n\n" + "".join(f"data: {i}\n\n" for i in range(3))
    assert engine.notes()[0]["ctype"] == "application/json"

    # bulk, multibyte text in writes that split characters, a 16 KiB window, no credit yet
    size, window = 300_000, 16_384
    await hand.send(StreamOpen(stream=2, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"size": size}), window=window))
    await wait_until(lambda: hand.sent[2] >= window - 3, 30, "a full window")
    assert hand.sent[2] <= window and hand.ended(2) is None  # it waits for credit
    end = await hand.stream(2, credit_every=4096)  # a caller reading as it comes
    assert end.error == "" and not hand.violations
    text = ("é€😀a" * (size // 10 + 1)).encode()[:size].decode()
    assert hand.data(2) == text and "\ufffd" not in hand.data(2)

    # a large window: chunks stay within MAX_STREAM_CHUNK
    await hand.send(StreamOpen(stream=3, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"size": size}), window=1 << 20))
    assert (await hand.stream(3, credit_every=1 << 18)).error == ""
    assert hand.data(3) == text and not hand.violations


async def test_cancel_aborts_the_engine_request_and_bad_streams_are_refused(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engines: Callable[[], Engine],
) -> None:
    engine = engines()
    await _running_replica(hand, spawn_client, engine, MESH_NODE_MAX_STREAMS="2",
                           MESH_NODE_STREAM_BUFFER_MB="1")
    await hand.send(StreamOpen(stream=7, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"mode": "endless"}), window=65536))
    await wait_until(lambda: "tick 3" in hand.data(7), 30, "ticks")
    await hand.send(StreamCancel(stream=7, reason="caller went away"))
    end = await hand.stream(7)
    assert end.error.startswith("cancelled")
    await wait_until(lambda: engine.noted("disconnect") == 1, 30, "the engine saw the cancel")

    refused = {
        10: ("/v2/models", "refused"), 11: ("/v1/../admin", "refused"),
        12: ("/v1//chat", "refused"), 13: ("/v1/a\\b", "refused"), 14: ("/v1/a\x00", "refused"),
    }
    for sid, (path, _) in refused.items():
        await hand.send(StreamOpen(stream=sid, task_id="svc-1", attempt=1, path=path))
    await hand.send(StreamOpen(stream=20, task_id="svc-1", attempt=2, path="/v1/models",
                               method="GET"))  # another attempt: not what it runs
    await hand.send(StreamOpen(stream=21, task_id="nope", attempt=1, path="/v1/models",
                               method="GET"))
    for sid, (_, why) in refused.items():
        assert (await hand.stream(sid)).error.startswith(why)
    assert (await hand.stream(20)).error == "unknown replica"
    assert (await hand.stream(21)).error == "unknown replica"
    assert [n["path"] for n in engine.notes() if n["event"] == "request"] == ["/v1/completions"]

    # the cap on open streams (MESH_NODE_MAX_STREAMS=2): a third open one is refused
    for sid in (30, 31, 32):
        await hand.send(StreamOpen(stream=sid, task_id="svc-1", attempt=1, window=65536,
                                   path="/v1/completions", body=json.dumps({"mode": "endless"})))
    assert "cap of 2 open streams" in (await hand.stream(32)).error
    await wait_until(lambda: "tick 1" in hand.data(30) and "tick 1" in hand.data(31), 30, "both")
    for sid in (30, 31):
        await hand.send(StreamCancel(stream=sid))
        await hand.stream(sid)
    # the cap on bytes held (MESH_NODE_STREAM_BUFFER_MB=1): a 1 MiB window and a body do not fit
    await hand.send(StreamOpen(stream=33, task_id="svc-1", attempt=1, window=1 << 20,
                               path="/v1/completions", body=json.dumps({"size": 10})))
    assert "buffer full" in (await hand.stream(33)).error
    # a replica whose health path could leave the engine's tree is refused, not run
    bad = msgspec.structs.replace(engine.assign("svc-2"), service=ServiceRun(
        service="tiny", model=engine.model, health_path="/v1/../admin"))
    await hand.send(bad)
    failed = (await wait_until(lambda: hand.of(TaskResult, task_id="svc-2"), 30, "refusal"))[0]
    assert failed.status == "failed" and "health path" in failed.error
    # GET through a stream
    await hand.send(StreamOpen(stream=40, task_id="svc-1", attempt=1, path="/v1/models",
                               method="GET"))
    assert (await hand.stream(40)).error == ""
    assert json.loads(hand.data(40))["data"][0]["id"] == engine.model


async def test_an_engine_that_dies_ends_its_streams_and_its_task(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engines: Callable[[], Engine],
) -> None:
    engine = engines()
    await _running_replica(hand, spawn_client, engine)
    await hand.send(StreamOpen(stream=1, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"mode": "endless"})))
    await wait_until(lambda: "tick 2" in hand.data(1), 30, "ticks")
    engine.kill()
    end = await hand.stream(1)
    assert end.error  # the engine's answer broke off, or its replica stopped: never ""
    result = (await wait_until(lambda: hand.of(TaskResult, task_id="svc-1"), 30, "a result"))[0]
    assert result.status == "failed"
    # the replica is gone with its task: a new stream to it is refused
    await hand.send(StreamOpen(stream=2, task_id="svc-1", attempt=1, path="/v1/models",
                               method="GET"))
    assert (await hand.stream(2)).error == "unknown replica"


async def test_reconnect_resends_state_and_ends_open_streams(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engines: Callable[[], Engine],
) -> None:
    engine = engines()
    await _running_replica(hand, spawn_client, engine)
    await hand.send(StreamOpen(stream=1, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"mode": "endless"})))
    await wait_until(lambda: "tick 2" in hand.data(1), 30, "ticks")
    assert hand.ws is not None
    await hand.ws.close(1001, "coordinator restarting")
    await wait_until(lambda: len(hand.registers) == 2, 30, "the node registered again")
    again = await hand.replica_state("ready", session=2)  # no change, yet said again
    assert (again.task_id, again.attempt) == ("svc-1", 1)
    assert [r.task_id for r in hand.registers[1].running] == ["svc-1"]
    await wait_until(lambda: engine.noted("disconnect") == 1, 30, "the stream's request ended")
    # and it serves on the new link
    await hand.send(StreamOpen(stream=2, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"size": 1000})))
    assert (await hand.stream(2)).error == ""


async def test_a_restarted_client_readopts_its_replica(
    hand: HandCoordinator, spawn_client: Callable[..., Proc], engines: Callable[[], Engine],
) -> None:
    engine = engines()
    client, ready = await _running_replica(hand, spawn_client, engine)
    await asyncio.to_thread(client.stop)  # the process task keeps running
    assert not _gone(engine)
    hand.keep = [TaskRef(task_id="svc-1", attempt=1)]
    second = spawn_client("n1", f"ws://127.0.0.1:{hand_port(hand)}", **FAST_HEALTH)
    await wait_until(lambda: len(hand.registers) == 2, 30, "the new client registered")
    try:
        again = await hand.replica_state("ready", session=2)
    except AssertionError:
        raise AssertionError(f"not ready again; {hand.inbox[-5:]}; client log:\n"
                             f"{second.output()[-4000:]}") from None
    assert again.port == ready.port
    await hand.send(StreamOpen(stream=5, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"size": 500})))
    assert (await hand.stream(5)).error == ""
    assert len(hand.data(5).encode()) == 500
    await hand.send(Cancel(task_id="svc-1", attempt=1))
    await wait_until(lambda: _gone(engine), 30, "the engine stopped")


def hand_port(hand: HandCoordinator) -> int:
    assert hand.server is not None
    port: int = hand.server.sockets[0].getsockname()[1]
    return port


def _gone(engine: Engine) -> bool:
    pid_file = engine.home / "engine.pid"
    try:
        pid = int(pid_file.read_text())
    except (OSError, ValueError):
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return _zombie(pid)


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


# --- through the link only: an engine in a network namespace ------------------------------


@pytest.fixture
async def netns(tmp_path: Path) -> AsyncIterator[Netns]:
    if os.geteuid() != 0:
        pytest.skip("network namespaces need root")
    for p in (tmp_path, *tmp_path.parents):  # tasks run as uids of their own
        if p == Path(tempfile.gettempdir()) or p == p.parent:
            break
        p.chmod(p.stat().st_mode | 0o001)
    tmp_path.chmod(0o1777)
    ns = Netns(tmp_path)
    ns.create()
    try:
        yield ns
    finally:
        await asyncio.to_thread(ns.remove)


def _socket_in(ns: Netns) -> socket.socket:
    """A listening socket on ADDR inside the namespace, made by a thread that joined it; the
    test's loop (outside) serves on it."""
    made: list[socket.socket | BaseException] = []

    def make() -> None:
        try:
            ns._enter()
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            sock.bind((ADDR, 0))
            sock.listen(16)
            made.append(sock)
        except BaseException as exc:  # noqa: BLE001 - handed to the test
            made.append(exc)

    t = threading.Thread(target=make)
    t.start()
    t.join(10)
    if isinstance(made[0], BaseException):
        raise made[0]
    return made[0]


async def test_an_engine_only_the_node_can_reach_serves_through_the_link(
    hand: HandCoordinator, netns: Netns, engines: Callable[[], Engine],
) -> None:
    engine = engines()
    port = await hand.start(_socket_in(netns))
    netns.client("inside", MESH_COORDINATOR_URL=f"ws://{ADDR}:{port}", **FAST_HEALTH)
    await wait_until(lambda: hand.ws is not None, 30, "the client in the namespace registered")
    await hand.send(engine.assign())
    ready = await hand.replica_state("ready")
    # out here, the engine's loopback port is not the engine (refused, or someone else)
    async with httpx.AsyncClient(trust_env=False, timeout=5) as http:
        try:
            r = await http.get(f"http://127.0.0.1:{ready.port}/v1/models")
            assert engine.model not in r.text
        except httpx.HTTPError:
            pass
    await hand.send(StreamOpen(stream=1, task_id="svc-1", attempt=1, path="/v1/models",
                               method="GET"))
    assert (await hand.stream(1)).error == ""
    assert json.loads(hand.data(1))["data"][0]["id"] == engine.model
    await hand.send(StreamOpen(stream=2, task_id="svc-1", attempt=1, path="/v1/completions",
                               body=json.dumps({"size": 5000}), window=1024))
    assert (await hand.stream(2, credit_every=512)).error == ""
    assert len(hand.data(2).encode()) == 5000 and not hand.violations

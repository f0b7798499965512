"""Issue 25 item 6: a network stranger cannot hold the coordinator's doors.

Sockets that never send `register` have their own small cap and a deadline, so they cannot
keep a real node out; HTTP connections that never finish a request head are closed; a standby
forwards only paths it parsed itself, so a request target cannot send it to another host.
Real servers and processes throughout: an in-process coordinator with hand-driven sockets, a
coordinator process for raw TCP, a PostgreSQL leader process with standbys (h11 in-process,
httptools as a process) for the forwarding.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import uvicorn
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from coordinator.settings import Settings
from coordinator.web.app import create_app
from shared.protocol import MAX_FRAME_BYTES, CloseCode
from tests.conftest import (
    ADMIN_HEADERS,
    FAST,
    Proc,
    bound_socket,
    free_port,
    run_coordinator,
    wait_until,
)
from tests.pgserver import PgServer, pg_dsn, pg_server  # noqa: F401 - the fixtures
from tests.security.handnode import healthy

Spawn = Callable[..., Proc]


async def _close_code(ws: ClientConnection, within: float) -> int | None:
    """The close code the server sends this socket (which sends nothing) within `within` s."""
    try:
        await asyncio.wait_for(ws.recv(), within)
    except ConnectionClosed as exc:
        return exc.rcvd.code if exc.rcvd is not None else None
    raise AssertionError("the socket got a frame instead of a close")


async def _node_online(live: Any, name: str) -> bool:
    r = await live.http.get("/mesh/nodes")
    node = r.json()["nodes"].get(name)
    return node is not None and node.get("status") == "online"


# --- WebSockets that never register -------------------------------------------------------


async def test_sockets_that_never_register_cannot_keep_a_real_node_out(
    settings: Settings, spawn_client: Spawn
) -> None:
    """40 squatters against a cap of 4 nodes: they hold only the small waiting pool (8, the
    oldest pushed out with 1013), and a real client process registers while they wait."""
    limits = replace(settings, max_connections=4, max_unregistered=8, register_timeout_s=60.0)
    async with run_coordinator(limits) as live, contextlib.AsyncExitStack() as stack:
        squatters = [await stack.enter_async_context(connect(f"{live.ws_url}/ws/squat{i}"))
                     for i in range(40)]
        conns = live.server.config.loaded_app.app.state.connections  # type: ignore[attr-defined]
        spawn_client("real", live.ws_url)
        await wait_until(lambda: _node_online(live, "real"), 20,
                         "the real node to register while squatters hold their sockets")
        # 8 waited, the oldest pushed out as each newer socket came, one more for the node.
        await wait_until(lambda: sum(ws.close_code is not None for ws in squatters) >= 33, 10,
                         "33 squatters pushed out")
        codes = [ws.close_code for ws in squatters if ws.close_code is not None]
        assert codes == [CloseCode.TRY_AGAIN_LATER] * 33, codes
        assert conns.open == 1 and conns.waiting == 7 and conns.pushed_out == 33


async def test_a_socket_that_never_sends_register_is_closed_with_4006(
    coordinator: Any,
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/silent") as ws:
        assert await _close_code(ws, coordinator.settings.register_timeout_s + 15) == 4006
    conns = coordinator.server.config.loaded_app.app.state.connections
    assert conns.register_timeouts == 1 and conns.waiting == 0 and conns.open == 0


# --- HTTP connections that never finish a request head ------------------------------------


async def _closed_by_server(reader: asyncio.StreamReader, within: float) -> bool:
    try:
        while await asyncio.wait_for(reader.read(4096), within):
            pass  # a 4xx the server chose to send first
    except (ConnectionResetError, BrokenPipeError):
        pass
    except TimeoutError:
        return False
    return True


async def _trickle(writer: asyncio.StreamWriter, data: bytes) -> None:
    """A byte at a time, one every 0.3 s: a head that never ends, but never quite idle."""
    with contextlib.suppress(ConnectionError, OSError):
        for b in data:
            writer.write(bytes([b]))
            await writer.drain()
            await asyncio.sleep(0.3)


async def test_raw_connections_that_never_finish_a_request_head_are_closed(
    spawn_coordinator: Spawn, tmp_path: Path
) -> None:
    """200 raw TCP connections to a coordinator process: silent, a partial head, a head
    trickled a byte at a time. Each is closed by the server (MESH_HTTP_HEAD_TIMEOUT_S 2, at
    most MESH_MAX_HTTP_PENDING 120 waiting), while honest requests, a long poll longer than
    the deadline included, are answered."""
    port = free_port()
    spawn_coordinator(port, tmp_path / "data", MESH_HTTP_HEAD_TIMEOUT_S="2",
                      MESH_MAX_HTTP_PENDING="120")
    url = f"http://127.0.0.1:{port}"
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=ADMIN_HEADERS) as http:
        await wait_until(lambda: healthy(http), 30, "the coordinator to answer")
        opened: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        trickles = []
        for i in range(200):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            opened.append((reader, writer))
            if i % 10 == 1:  # a head trickled for 30 s
                trickles.append(asyncio.create_task(_trickle(
                    writer, b"GET /health HTTP/1.1\r\nHost: x\r\n" + b"X-A: b\r\n" * 10)))
            elif i % 2:
                writer.write(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # no blank line: no end
        # Meanwhile honest callers are served, and a long poll that outlasts the deadline is
        # not cut short: the deadline is for the head, not for the answer.
        task_id = (await http.post("/tasks/submit", json={"task_type": "test"})).json()["task_id"]
        r = await http.get(f"/tasks/{task_id}", params={"wait": "4"}, timeout=30)
        assert r.status_code == 200 and r.json()["status"] == "queued", r.text
        assert (await http.get("/health")).status_code == 200  # the same kept-alive connection
        closed = await asyncio.gather(*(_closed_by_server(rd, 30) for rd, _ in opened))
        assert all(closed), f"{closed.count(False)} of 200 connections still open"
        for task in trickles:
            task.cancel()
        for _, writer in opened:
            writer.close()
        assert (await http.get("/health")).status_code == 200


# --- a standby forwards paths, never targets ----------------------------------------------


@contextlib.asynccontextmanager
async def _h11_standby(settings: Settings) -> AsyncIterator[int]:
    """A standby coordinator in this loop, served by uvicorn's h11 parser, which hands the
    request target to the app as it came."""
    sock = bound_socket()
    port = sock.getsockname()[1]
    app = create_app(replace(settings, port=port, advertise_url=f"http://127.0.0.1:{port}"))
    config = uvicorn.Config(app, http="h11", ws="websockets-sansio", ws_max_size=MAX_FRAME_BYTES,
                            log_level="warning", lifespan="on", timeout_graceful_shutdown=2)
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        await wait_until(lambda: server.started or task.done(), 20, "the h11 standby to start")
        if task.done():
            task.result()
        yield port
    finally:
        server.should_exit = True
        await task


async def _status_of(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 20)
        status = int(head.split(b" ", 2)[1])
        length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await asyncio.wait_for(reader.readexactly(length), 20) if length else b""
        return status, body
    finally:
        writer.close()


def _role_is(http: httpx.AsyncClient, port: int, role: str, leader: str) -> Callable[..., Any]:
    async def check() -> bool:
        try:
            doc = (await http.get(f"http://127.0.0.1:{port}/health", timeout=2)).json()
        except httpx.HTTPError:
            return False
        return bool(doc.get("role") == role and doc.get("leader") == leader)
    return check


async def test_a_standby_forwards_only_paths_it_parsed_itself(
    pg_dsn: str, spawn_coordinator: Spawn, tmp_path: Path  # noqa: F811
) -> None:
    """Request targets `@127.0.0.1:PORT/x`, `*` and `http://127.0.0.1:PORT/x` sent to a
    standby (h11 in this loop; httptools as a process) are refused and never reach PORT, where
    a listener counts connections; a plain path still reaches the leader."""
    seen: list[int] = []

    async def count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        seen.append(1)
        writer.close()

    listener = await asyncio.start_server(count, "127.0.0.1", 0)
    other = listener.sockets[0].getsockname()[1]
    pa, pb = free_port(), free_port()
    leader = f"http://127.0.0.1:{pa}"

    def env(port: int, app: str) -> dict[str, str]:
        return {"MESH_STORE": f"{pg_dsn}?application_name={app}", "MESH_LEASE_S": "5",
                "MESH_ADVERTISE_URL": f"http://127.0.0.1:{port}"}

    spawn_coordinator(pa, tmp_path / "a", **env(pa, "coord-a"))
    async with httpx.AsyncClient(timeout=30, headers=ADMIN_HEADERS) as http:
        await wait_until(_role_is(http, pa, "leader", leader), 30, "A to lead")
        spawn_coordinator(pb, tmp_path / "b", **env(pb, "coord-b"))
        h11 = replace(FAST, data_dir=tmp_path / "s", store=pg_dsn, lease_s=5.0,
                      admin_token=ADMIN_HEADERS["Authorization"].split()[1])
        async with _h11_standby(h11) as ps, listener:
            for port in (pb, ps):
                await wait_until(_role_is(http, port, "standby", leader), 30, "a standby")
            for port in (pb, ps):
                for target, method in ((f"@127.0.0.1:{other}/x", "GET"), ("*", "OPTIONS")):
                    status, body = await _status_of(port, (
                        f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
                        f"Connection: close\r\n\r\n").encode())
                    assert status == 400, (port, target, status, body)
                status, body = await _status_of(port, (
                    f"GET http://127.0.0.1:{other}/x HTTP/1.1\r\nHost: 127.0.0.1:{other}\r\n"
                    f"Connection: close\r\n\r\n").encode())
                assert status in (400, 401, 404), (port, status, body)  # never the other host
                r = await http.get(f"http://127.0.0.1:{port}/mesh/status")
                assert r.status_code == 200 and "nodes" in r.json(), r.text  # the leader's
            status, body = await _status_of(ps, (
                f"GET @127.0.0.1:{other}/x HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
            ).encode())
            assert status == 400 and b"origin form" in body, body  # the gate's own refusal
    assert seen == [], "a request reached the other port"


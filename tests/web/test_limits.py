"""Limits at the edge (issue 10 items 2 and 3): what the store or a peer cannot hold is refused
before anything changes, naming the field and the limit; every queue and count is bounded."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import replace
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks.limits import DeafPeer
from coordinator.link.ws import WsLink
from coordinator.model import TaskState
from coordinator.settings import Settings
from coordinator.web.edge import MAX_OFFSET
from shared.limits import MAX_DEPTH, Throttled, message_refusal, refusal
from shared.protocol import MAX_FRAME_BYTES, TaskOutcome, TaskResult
from tests.conftest import LiveCoordinator, run_coordinator, wait_until

REGISTER = {"type": "register", "executors": ["builtin"],
            "cpu_count": 4, "slots": 4}


def deep(levels: int) -> Any:
    value: Any = 1
    for _ in range(levels - 1):
        value = {"x": value}
    return {"x": value} if levels else value


# --- shared/limits.py: the walk ---------------------------------------------------------


def test_refusal_names_path_and_limit() -> None:
    assert refusal({"a": [1, 2, {"b": 2**63}]}) == (
        "$.a[2].b: integer outside the signed 64-bit range [-2**63, 2**63-1]"
    )
    assert refusal({"a": -(2**63)}) is None and refusal({"a": 2**63 - 1}) is None
    assert refusal(deep(MAX_DEPTH)) is None
    why = refusal(deep(MAX_DEPTH + 1))
    assert why is not None and why.endswith(f": nesting deeper than {MAX_DEPTH}")
    assert refusal({"s": "x" * 11}, max_string=10) == "$.s: string longer than 10 characters"
    assert refusal(["x" * 100] * 100, max_bytes=1000) is not None
    assert refusal({"odd key": 1.5, "ok": [None, True, "é"]}) is None
    assert refusal({"k": {1, 2}}) == "$.k: set is not a JSON value"


def test_refusal_walks_a_hostile_depth_without_recursion() -> None:
    value: Any = []
    for _ in range(100_000):
        value = [value]
    assert refusal(value) == "$" + "[0]" * MAX_DEPTH + f": nesting deeper than {MAX_DEPTH}"


def test_message_refusal_covers_stored_fields() -> None:
    big = TaskResult(task_id="t", attempt=1, status="completed",
                     result=TaskOutcome(data={"n": [2**64]}))
    assert message_refusal(big) == (
        "$.result.data.n[0]: integer outside the signed 64-bit range [-2**63, 2**63-1]"
    )
    ok = TaskResult(task_id="t", attempt=1, status="completed", result=TaskOutcome(data={"n": 1}))
    assert message_refusal(ok) is None


def test_throttled_logs_once_per_interval_per_key(caplog: pytest.LogCaptureFixture) -> None:
    throttled = Throttled(logging.getLogger("test.throttled"), interval_s=60)
    with caplog.at_level(logging.WARNING, "test.throttled"):
        for _ in range(500):
            throttled.warning("node-a", "bad frame")
        throttled.warning("node-b", "bad frame")
    assert len(caplog.records) == 2


# --- POST /tasks/submit ------------------------------------------------------------------


async def _refused(live: LiveCoordinator, body: Any, status: int) -> str:
    r = await live.http.post(
        "/tasks/submit", content=json.dumps(body), headers={"Content-Type": "application/json"}
    )
    assert r.status_code == status, r.text
    doc = r.json()
    assert set(doc) == {"error", "reason"}
    reason: str = doc["reason"]
    return reason


async def test_submission_limits_name_the_field(coordinator: LiveCoordinator) -> None:
    # orjson reads integers up to 2**64-1 exactly (larger ones as floats); SQLite holds 2**63-1
    reason = await _refused(coordinator, {"task_type": "test", "seed": 2**63}, 422)
    assert reason.startswith("$.seed: integer outside the signed 64-bit range")
    reason = await _refused(coordinator, {"task_type": "test", "cfg": deep(40)}, 422)
    assert reason.startswith("$.cfg.x") and reason.endswith("nesting deeper than 32")
    reason = await _refused(coordinator, {"task_type": "test", "name": "n" * 300}, 422)
    assert reason == "$.name: longer than 256 characters"
    assert not coordinator.mesh.tasks


async def test_batch_is_all_or_nothing(coordinator: LiveCoordinator) -> None:
    batch = [{"task_type": "test"}, {"task_type": "test", "cfg": deep(300)}]
    reason = await _refused(coordinator, batch, 422)
    assert reason.startswith("$[1].cfg") and "nesting deeper than 32" in reason
    assert not coordinator.mesh.tasks
    r = await coordinator.http.get("/tasks/completed")
    assert r.json()["count"] == 0


async def test_a_task_whose_assign_would_not_fit_a_frame_is_refused(
    coordinator: LiveCoordinator,
) -> None:
    body = {"task_type": "test", "prompt": "p" * (MAX_FRAME_BYTES - 100)}
    reason = await _refused(coordinator, body, 413)
    assert f"{MAX_FRAME_BYTES}-byte WebSocket frame limit" in reason
    env = {f"K{i}": "v" * 1000 for i in range(1100)}
    reason = await _refused(coordinator, {"task_type": "custom", "script": "true", "env": env}, 413)
    assert "MAX_FRAME_BYTES" in reason
    assert not coordinator.mesh.tasks
    ok = await coordinator.http.post(
        "/tasks/submit", json={"task_type": "test", "prompt": "p" * (MAX_FRAME_BYTES // 2)}
    )
    assert ok.status_code == 200, ok.text


async def test_body_cap_is_enforced_while_streaming(coordinator: LiveCoordinator) -> None:
    """A chunked body that never ends: the 413 comes once the cap is passed, not at its end
    (reading the whole body first, as the seed did, would wait here forever)."""
    cap = coordinator.settings.max_body_bytes
    reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.port)
    auth = coordinator.http.headers.get("Authorization", "")
    writer.write(
        b"POST /tasks/submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Transfer-Encoding: chunked\r\nAuthorization: " + auth.encode() + b"\r\n\r\n"
    )
    chunk = b"x" * (1 << 16)
    try:
        for _ in range(cap // len(chunk) + 8):  # past the cap, and no final chunk ever
            writer.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
            await writer.drain()
    except ConnectionError:
        pass  # it answered and closed while the body was still coming
    head = await asyncio.wait_for(reader.read(4096), 10)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    assert b"MESH_MAX_BODY_BYTES" in head
    writer.close()
    reader, writer = await asyncio.open_connection("127.0.0.1", coordinator.port)
    writer.write(  # a declared length over the cap is refused before a byte of body
        b"POST /tasks/submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
        b"Content-Length: %d\r\nAuthorization: %s\r\n\r\n" % (cap + 1, auth.encode())
    )
    head = await asyncio.wait_for(reader.read(4096), 10)
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    writer.close()
    assert not coordinator.mesh.tasks


async def test_full_queue_answers_429_with_retry_after(settings: Settings) -> None:
    async with run_coordinator(replace(settings, max_queued=3)) as live:
        r = await live.http.post("/tasks/submit", json=[{"task_type": "test"}] * 3)
        assert r.status_code == 200, r.text
        r = await live.http.post("/tasks/submit", json={"task_type": "test"})
        assert r.status_code == 429 and r.headers["Retry-After"]
        assert "MESH_MAX_QUEUED" in r.json()["reason"]
        assert live.mesh.state_counts[TaskState.QUEUED] == 3


# --- /tasks/active and /tasks/completed ----------------------------------------------------


async def test_completed_pages_by_cursor(coordinator: LiveCoordinator) -> None:
    r = await coordinator.http.post("/tasks/submit", json=[{"task_type": "test"}] * 7)
    ids = [t["task_id"] for t in r.json()["tasks"]]
    for task_id in ids:
        assert (await coordinator.http.post(f"/tasks/{task_id}/cancel")).status_code == 200
    seen: list[str] = []
    params: dict[str, str] = {"limit": "3"}
    for _ in range(5):
        page = (await coordinator.http.get("/tasks/completed", params=params)).json()
        seen += list(page["tasks"])
        if page["next"] is None:
            break
        params = {"limit": "3", "cursor": page["next"]}
    assert sorted(seen) == sorted(ids) and len(seen) == len(set(seen))
    finished = [(await coordinator.task(i))["finished_at"] for i in seen]
    assert finished == sorted(finished, reverse=True)
    bad = await coordinator.http.get("/tasks/completed", params={"cursor": "nonsense!"})
    assert bad.status_code == 400 and bad.json()["reason"]
    deep_offset = await coordinator.http.get(
        "/tasks/completed", params={"offset": str(MAX_OFFSET + 1)}
    )
    assert deep_offset.status_code == 400
    old = (await coordinator.http.get("/tasks/completed", params={"limit": 2, "offset": 2})).json()
    assert list(old["tasks"]) == seen[2:4] and old["next_offset"] == 4


async def test_active_streams_the_seed_shape(coordinator: LiveCoordinator) -> None:
    r = await coordinator.http.post("/tasks/submit", json=[{"task_type": "test"}] * 300)
    ids = {t["task_id"] for t in r.json()["tasks"]}
    doc = (await coordinator.http.get("/tasks/active")).json()
    assert set(doc["tasks"]) == ids and doc["count"] == 300
    assert doc["tasks"][next(iter(ids))]["status"] == "queued"


# --- WebSocket -------------------------------------------------------------------------------


_credentials: dict[tuple[int, str], str] = {}  # issued on a node's first register


async def _node(live: LiveCoordinator, name: str, **kw: Any) -> ClientConnection:
    ws = await connect(f"{live.ws_url}/ws/{name}", **kw)
    credential = _credentials.get((live.port, name), "")
    token = live.settings.token  # the join token
    await ws.send(json.dumps({**REGISTER, "token": token, "credential": credential}))
    registered = json.loads(await ws.recv())
    assert registered["type"] == "registered", registered
    if registered.get("credential"):
        _credentials[(live.port, name)] = registered["credential"]
    return ws


async def _next(ws: ClientConnection, kind: str) -> dict[str, Any]:
    while True:
        doc: dict[str, Any] = json.loads(await asyncio.wait_for(ws.recv(), 10))
        if doc["type"] == kind:
            return doc


async def test_oversize_result_is_refused_and_the_connection_lives(
    coordinator: LiveCoordinator,
) -> None:
    ws = await _node(coordinator, "node-a")
    task_id = await coordinator.submit(task_type="test")
    assign = await _next(ws, "assign")
    bad = {"type": "task_result", "task_id": task_id, "attempt": assign["attempt"],
           "status": "completed", "result": {"data": {"deep": deep(50)}}}
    await ws.send(json.dumps(bad))
    err = await _next(ws, "error")
    assert err["code"] == "too_large" and err["task_id"] == task_id
    assert err["reason"].startswith("$.result.data.deep")
    assert "nesting deeper than 32" in err["reason"]
    assert coordinator.mesh.tasks[task_id].state is TaskState.ASSIGNED  # nothing changed
    await ws.send(json.dumps({"type": "heartbeat", "health": "h" * 5000}))
    assert "$.health" in (await _next(ws, "error"))["reason"]
    good = {**bad, "result": {"data": {"n": 2**63 - 1}}}
    await ws.send(json.dumps(good))
    assert (await _next(ws, "ack"))["task_id"] == task_id
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "completed" and doc["result"]["data"]["n"] == 2**63 - 1
    await ws.close()


async def test_repeated_refusals_are_logged_once_per_interval(
    coordinator: LiveCoordinator, caplog: pytest.LogCaptureFixture
) -> None:
    ws = await _node(coordinator, "noisy")
    with caplog.at_level(logging.WARNING, "coordinator.link.ws"):
        for _ in range(200):
            await ws.send("{not json")
        for _ in range(200):
            await _next(ws, "error")
    lines = [r for r in caplog.records if "refused a frame from noisy" in r.getMessage()]
    assert len(lines) == 1
    await ws.close()


async def test_connection_cap_closes_with_1013(settings: Settings) -> None:
    async with run_coordinator(replace(settings, max_connections=1)) as live:
        first = await _node(live, "first")
        async with connect(f"{live.ws_url}/ws/second") as second:
            with pytest.raises(ConnectionClosed) as info:
                await second.send(json.dumps({**REGISTER, "token": live.settings.token}))
                await second.recv()
            assert info.value.rcvd is not None and info.value.rcvd.code == 1013
        await first.close()


async def test_a_peer_that_does_not_read_is_closed_with_4005(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    limits = replace(settings, ws_queue_frames=50, ws_queue_bytes=1 << 20)
    # its replies fill the queue here; their own bound is tests/security/test_node_input.py's
    monkeypatch.setattr(WsLink, "ERROR_FRAMES", 1 << 30)
    async with run_coordinator(limits) as live:
        # A raw socket that reads nothing after the handshake (a library client would keep
        # reading into its own memory); blocking, so off this loop, which runs the server.
        peer = await asyncio.to_thread(DeafPeer, live.port, "/ws/deaf")
        await asyncio.to_thread(peer.send, json.dumps({**REGISTER, "token": live.settings.token}))
        await wait_until(lambda: "deaf" in live.mesh.nodes, 10, "deaf registered")
        conns = live.server.config.loaded_app.app.state.connections  # type: ignore[attr-defined]

        def flood() -> None:
            for _ in range(200):
                peer.send("{not json")

        frames = 0
        while conns.slow_consumers == 0 and frames < 200_000:  # it sends, never reads
            await asyncio.to_thread(flood)
            frames += 200
        assert conns.slow_consumers == 1, f"no slow consumer after {frames} frames"
        assert await asyncio.to_thread(peer.close_code, 15) == 4005  # once it does read
        await wait_until(lambda: not live.mesh.nodes["deaf"].online, 10, "deaf node offline")


async def test_log_followers_are_capped(settings: Settings) -> None:
    async with run_coordinator(replace(settings, max_log_followers=1, max_wait_s=5)) as live:
        task_id = await live.submit(task_type="test")  # no node: it stays queued, unfinished
        async with live.http.stream("GET", f"/tasks/{task_id}/logs?follow=true") as first:
            assert first.status_code == 200
            await wait_until(lambda: live.mesh.logs.followers == 1, 5, "one follower")
            second = await live.http.get(f"/tasks/{task_id}/logs?follow=true")
            assert second.status_code == 429 and second.headers["Retry-After"]
        await wait_until(lambda: live.mesh.logs.followers == 0, 10, "the follower gone")
        async with live.http.stream("GET", f"/tasks/{task_id}/logs?follow=true") as third:
            assert third.status_code == 200


async def test_offline_nodes_are_forgotten(settings: Settings) -> None:
    async with run_coordinator(replace(settings, forget_node_s=0.5)) as live:
        ws = await _node(live, "passing")
        assert "passing" in live.mesh.nodes
        await ws.close()
        await wait_until(lambda: "passing" not in live.mesh.nodes, 15, "node forgotten")
        ws = await _node(live, "passing")  # it may come back as new
        assert live.mesh.nodes["passing"].online
        await ws.close()


async def test_register_past_the_limits_is_refused_naming_the_field(
    coordinator: LiveCoordinator,
) -> None:
    labels = {f"k{i}": "v" for i in range(100)}
    async with connect(f"{coordinator.ws_url}/ws/labelled") as ws:
        await ws.send(json.dumps({**REGISTER, "token": coordinator.settings.token,
                                  "labels": labels}))
        err = json.loads(await ws.recv())
        assert err["type"] == "error" and err["reason"] == (
            "register refused: $.labels: more than 64 labels"
        )
        with pytest.raises(ConnectionClosed) as info:
            await ws.recv()
        assert info.value.rcvd is not None and info.value.rcvd.code == 1008
    assert "labelled" not in coordinator.mesh.nodes

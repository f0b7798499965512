"""The node WebSocket with a raw client: register forms, bad frames, close codes, fencing."""

from __future__ import annotations

import asyncio
import json
from dataclasses import replace
from typing import Any

import pytest
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from coordinator.settings import Settings
from shared.protocol import MAX_FRAME_BYTES
from tests.conftest import TEST_JOIN_TOKEN, LiveCoordinator, run_coordinator, wait_until

FULL = {"type": "register", "executors": ["builtin"], "cpu_count": 2, "slots": 2}


# Credentials the coordinators issued, by (coordinator address, node path): a raw client
# presents its node's credential on every later register, as the real client does.
_credentials: dict[tuple[str, str], str] = {}


def _node_of(ws: ClientConnection) -> tuple[str, str]:
    assert ws.request is not None
    return (str(ws.remote_address), ws.request.path)


async def send(ws: ClientConnection, doc: dict[str, Any] | str) -> None:
    if isinstance(doc, dict) and doc.get("type") == "register":
        doc = {"token": TEST_JOIN_TOKEN, **doc}
        credential = _credentials.get(_node_of(ws))
        if credential:
            doc.setdefault("credential", credential)
    await ws.send(doc if isinstance(doc, str) else json.dumps(doc))


async def recv(ws: ClientConnection) -> dict[str, Any]:
    doc: dict[str, Any] = json.loads(await ws.recv())
    if doc.get("type") == "registered" and doc.get("credential"):
        _credentials[_node_of(ws)] = doc["credential"]
    return doc


async def closed_with(ws: ClientConnection) -> int:
    with pytest.raises(ConnectionClosed) as info:
        while True:
            await ws.recv()
    assert info.value.rcvd is not None
    return info.value.rcvd.code


async def test_seed_short_register_form_is_accepted(coordinator: LiveCoordinator) -> None:
    async with connect(f"{coordinator.ws_url}/ws/seed-node") as ws:
        await send(ws, {"type": "register",
                        "node_info": {"gpu_count": 2, "gpu_type": "RTX 4090", "gpu_memory": 24}})
        assert (await recv(ws))["type"] == "registered"
        status = (await coordinator.http.get("/mesh/status")).json()
        node = status["nodes"]["seed-node"]
        assert (node["gpu_count"], node["gpu_type"], node["gpu_memory"]) == (2, "RTX 4090", 24)
        assert node["status"] == "online" and status["total_vram"] == 48


@pytest.mark.parametrize(
    ("first", "code"),
    [
        ({"type": "heartbeat"}, 1008),
        ("not json at all", 1008),
        ({"type": "register", "protocol": 99, "executors": []}, 4002),
    ],
)
async def test_bad_first_frames_close_with_a_documented_code(
    coordinator: LiveCoordinator, first: dict[str, Any] | str, code: int
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/bad") as ws:
        await send(ws, first)
        err = await recv(ws)
        assert err["type"] == "error" and err["reason"]
        assert await closed_with(ws) == code


async def test_bad_token_is_refused(settings: Settings) -> None:
    async with run_coordinator(replace(settings, token="s3cret")) as live:
        async with connect(f"{live.ws_url}/ws/intruder") as ws:
            await send(ws, {**FULL, "token": "guess"})
            assert (await recv(ws))["reason"].startswith("bad token")
            assert await closed_with(ws) == 1008
        async with connect(f"{live.ws_url}/ws/friend") as ws:
            await send(ws, {**FULL, "token": "s3cret"})
            assert (await recv(ws))["type"] == "registered"


async def test_malformed_frames_get_errors_and_the_connection_lives(
    coordinator: LiveCoordinator,
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/n1") as ws:
        await send(ws, FULL)
        assert (await recv(ws))["type"] == "registered"
        for bad, needle in [
            ("{oops", "malformed"),
            ({"type": "launch_missiles"}, "$.type"),
            ({"type": "task_result", "task_id": "t", "attempt": "one", "status": "completed"},
             "$.attempt"),
            ({"type": "task_result", "task_id": "t", "attempt": 1, "status": "meh"}, "$.status"),
            ([1, 2, 3], "Expected `object`"),
        ]:
            await send(ws, bad if isinstance(bad, str | dict) else json.dumps(bad))
            err = await recv(ws)
            assert err["type"] == "error" and needle in err["reason"], err
        await send(ws, {"type": "heartbeat", "cpu_pct": 12.5})
        await wait_until(lambda: coordinator.mesh.nodes["n1"].cpu_pct == 12.5, 5, "heartbeat")


async def test_a_node_sending_only_refused_frames_is_not_judged_silent(
    settings: Settings,
) -> None:
    """Refused frames still show the node is there: a node whose every frame is refused
    for twice the node timeout stays online (it was 'lost: silent' before)."""
    tuned = replace(settings, node_timeout_s=1.0)
    async with run_coordinator(tuned) as live, connect(f"{live.ws_url}/ws/n1") as ws:
        await send(ws, FULL)
        assert (await recv(ws))["type"] == "registered"
        for _ in range(10):  # 2 s of frames that never reach the Mesh, 0.2 s apart
            await send(ws, "{oops")
            assert (await recv(ws))["type"] == "error"
            await asyncio.sleep(0.2)
        assert live.mesh.nodes["n1"].online


async def test_oversize_frame_closes_1009_and_others_carry_on(
    coordinator: LiveCoordinator,
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/calm") as calm:
        await send(calm, FULL)
        assert (await recv(calm))["type"] == "registered"
        async with connect(f"{coordinator.ws_url}/ws/big", max_size=None) as big:
            await send(big, FULL)
            assert (await recv(big))["type"] == "registered"
            await big.send("x" * (MAX_FRAME_BYTES + 1))
            assert await closed_with(big) == 1009
        task_id = await coordinator.submit(task_type="test")
        assign = await recv(calm)
        assert assign["type"] == "assign" and assign["task_id"] == task_id


async def test_stale_result_is_refused_and_the_sender_told_to_stop(
    coordinator: LiveCoordinator,
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/n1") as ws:
        await send(ws, FULL)
        await recv(ws)
        task_id = await coordinator.submit(task_type="test")
        assign = await recv(ws)
        await send(ws, {"type": "task_result", "task_id": task_id, "attempt": 7,
                        "status": "completed"})
        err, cancel = await recv(ws), await recv(ws)
        assert err["code"] == "stale_attempt" and err["attempt"] == 7
        assert cancel == {"type": "cancel", "task_id": task_id, "attempt": 7,
                          "reason": "fenced: not current"}
        assert (await coordinator.task(task_id))["status"] == "assigned"
        await send(ws, {"type": "task_result", "task_id": task_id, "attempt": assign["attempt"],
                        "status": "completed", "result": {"exit_code": 0, "output": "ok"}})
        assert await recv(ws) == {"type": "ack", "task_id": task_id, "attempt": 1}
        doc = await coordinator.task(task_id)
        assert doc["status"] == "completed" and doc["result"]["output"] == "ok"
        # The same result sent again (its ack was lost) is acknowledged, not applied twice.
        await send(ws, {"type": "task_result", "task_id": task_id, "attempt": 1,
                        "status": "completed"})
        assert (await recv(ws))["type"] == "ack"
        assert coordinator.mesh.finished_counts["completed"] == 1


async def test_same_node_reconnecting_supersedes_the_old_socket(
    coordinator: LiveCoordinator,
) -> None:
    async with connect(f"{coordinator.ws_url}/ws/twin") as old:
        await send(old, FULL)
        await recv(old)
        async with connect(f"{coordinator.ws_url}/ws/twin") as new:
            await send(new, FULL)
            assert (await recv(new))["type"] == "registered"
            assert await closed_with(old) == 4001
            assert coordinator.mesh.nodes["twin"].online


async def test_register_reconciles_reported_tasks(coordinator: LiveCoordinator) -> None:
    async with connect(f"{coordinator.ws_url}/ws/n1") as ws:
        await send(ws, FULL)
        await recv(ws)
        task_id = await coordinator.submit(task_type="test")
        assign = await recv(ws)
    # Reconnect within the grace, reporting the task and one the coordinator never gave.
    async with connect(f"{coordinator.ws_url}/ws/n1") as ws:
        await send(ws, {**FULL, "running": [
            {"task_id": task_id, "attempt": assign["attempt"]},
            {"task_id": "ghost", "attempt": 3},
        ]})
        reg = await recv(ws)
        assert reg["keep"] == [{"task_id": task_id, "attempt": 1}]
        assert reg["stop"] == [{"task_id": "ghost", "attempt": 3}]
        assert (await coordinator.task(task_id))["status"] == "running"

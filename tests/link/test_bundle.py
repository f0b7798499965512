"""Several protocol messages in one WebSocket frame (`bundle`), offered in `register.features`.

A real coordinator in this loop and raw WebSocket nodes: one that offers "bundle" gets its
assigns and acks several to a frame and may send its results that way; one that does not
offers nothing and never sees a bundle. The agent's side: what it packs into its frames.
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from websockets.asyncio.client import ClientConnection, connect

from gpu_client.agent import BUNDLE_BYTES, _bundles
from shared.protocol import (
    MAX_BUNDLE,
    TaskAccepted,
    TaskLog,
    TaskResult,
    decode_client,
)
from tests.conftest import LiveCoordinator

WAIT_S = 10.0


async def _register(live: LiveCoordinator, name: str, features: list[str],
                    slots: int = 8) -> tuple[ClientConnection, dict[str, Any]]:
    ws = await connect(f"{live.ws_url}/ws/{name}")
    register = {"type": "register", "executors": ["builtin"], "cpu_count": 2, "slots": slots,
                "token": live.settings.token, "features": features}
    await ws.send(json.dumps(register))
    reg = json.loads(await ws.recv())
    assert reg["type"] == "registered", reg
    return ws, reg


async def _frames(ws: ClientConnection, want: int, kind: str) -> list[list[dict[str, Any]]]:
    """Frames until `want` messages of `kind` arrived; each frame as its list of messages."""
    frames, got = [], 0
    async with asyncio.timeout(WAIT_S):
        while got < want:
            doc = json.loads(await ws.recv())
            msgs = doc["msgs"] if doc["type"] == "bundle" else [doc]
            frames.append(msgs)
            got += sum(1 for m in msgs if m["type"] == kind)
    return frames


def _result(assign: dict[str, Any]) -> dict[str, Any]:
    return {"type": "task_result", "task_id": assign["task_id"], "attempt": assign["attempt"],
            "status": "completed", "result": {"exit_code": 0, "output": "ok"}}


async def test_a_node_that_offers_bundles_gets_and_sends_several_per_frame(
    coordinator: LiveCoordinator,
) -> None:
    ws, reg = await _register(coordinator, "b1", ["bundle", "no-such-feature"])
    try:
        assert reg["features"] == ["bundle"]  # only what the coordinator speaks
        r = await coordinator.http.post("/tasks/submit", json=[{"task_type": "test"}] * 8)
        ids = {t["task_id"] for t in r.json()["tasks"]}
        frames = await _frames(ws, 8, "assign")
        assigns = [m for f in frames for m in f if m["type"] == "assign"]
        assert {a["task_id"] for a in assigns} == ids
        assert len(frames) < 8  # placed in one pass, committed together: bundled
        results = [_result(a) for a in assigns]
        accepted = [{"type": "task_accepted", "task_id": a["task_id"],
                     "attempt": a["attempt"]} for a in assigns]
        await ws.send(json.dumps({"type": "bundle", "msgs": accepted + results}))
        acks = [m for f in await _frames(ws, 8, "ack") for m in f if m["type"] == "ack"]
        assert {a["task_id"] for a in acks} == ids
        for task_id in ids:
            assert (await coordinator.task(task_id))["status"] == "completed"
    finally:
        await ws.close()


async def test_a_node_that_does_not_offer_never_gets_a_bundle(
    coordinator: LiveCoordinator,
) -> None:
    ws, reg = await _register(coordinator, "plain", [])
    try:
        assert reg.get("features", []) == []
        await coordinator.http.post("/tasks/submit", json=[{"task_type": "test"}] * 6)
        frames = await _frames(ws, 6, "assign")
        assert all(len(f) == 1 for f in frames) and len(frames) == 6
        await ws.send(json.dumps({"type": "bundle", "msgs": [_result(f[0]) for f in frames]}))
        acks = await _frames(ws, 6, "ack")  # it may still send them; replies stay single
        assert all(len(f) == 1 for f in acks)
    finally:
        await ws.close()


async def test_a_bad_bundle_is_refused_and_the_connection_lives(
    coordinator: LiveCoordinator,
) -> None:
    ws, _ = await _register(coordinator, "b2", ["bundle"])
    try:
        for bad in (
            {"type": "bundle", "msgs": [{"type": "register"}]},  # register only alone
            {"type": "bundle", "msgs": [{"type": "task_accepted", "task_id": "x",
                                         "attempt": 1}] * (MAX_BUNDLE + 1)},
        ):
            await ws.send(json.dumps(bad))
            doc = json.loads(await asyncio.wait_for(ws.recv(), WAIT_S))
            assert doc["type"] == "error" and "msgs" in doc["reason"], doc
        await coordinator.submit(task_type="test")
        (assign,) = [m for f in await _frames(ws, 1, "assign") for m in f]
        await ws.send(json.dumps({"type": "bundle", "msgs": [_result(assign)]}))
        assert [m["type"] for f in await _frames(ws, 1, "ack") for m in f] == ["ack"]
    finally:
        await ws.close()


def test_the_agent_packs_messages_in_order_and_drops_accepted_with_its_result() -> None:
    accepted = [TaskAccepted(task_id=f"t{i}", attempt=1) for i in range(3)]
    done = TaskResult(task_id="t1", attempt=1, status="completed")
    log = TaskLog(task_id="t2", attempt=1, data="x")
    (frame,) = _bundles([*accepted, log, done])
    msg = decode_client(frame)
    assert msg.msgs == [accepted[0], accepted[2], log, done]  # type: ignore[union-attr]
    (single,) = _bundles([accepted[0]])  # one message: a plain frame
    assert decode_client(single) == accepted[0]
    big = [TaskLog(task_id=f"t{i}", attempt=1, data="y" * 50_000) for i in range(12)]
    frames = _bundles(big)
    assert len(frames) > 1 and all(len(f) <= BUNDLE_BYTES + 60_000 for f in frames)
    unpacked = []
    for f in frames:
        m = decode_client(f)
        unpacked += m.msgs if hasattr(m, "msgs") else [m]
    assert unpacked == big

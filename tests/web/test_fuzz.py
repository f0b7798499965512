"""Hypothesis against a real server: arbitrary JSON at POST /tasks/submit and arbitrary
client frames from a registered node, while a real client process runs a task beside them.

No 5xx, every refusal a JSON `{"error", "reason"}`, the fuzzing node's connection lives on,
and the real client's task still completes. Examples are drawn by hypothesis first and then
sent (a function-scoped live server cannot sit inside `@given`); a failure prints the input.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from typing import Any

import msgspec
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from websockets.asyncio.client import ClientConnection, connect

from coordinator.web.edge import assign_size
from shared.limits import refusal
from shared.protocol import MAX_FRAME_BYTES
from tests.conftest import LiveCoordinator, Proc, wait_until

JSON_HEADERS = {"Content-Type": "application/json"}

scalars = (
    st.none() | st.booleans() | st.floats(allow_nan=False, allow_infinity=False)
    | st.integers() | st.integers(min_value=2**62, max_value=2**70)
    | st.integers(min_value=-(2**70), max_value=-(2**62)) | st.text(max_size=40)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                 max_size=4),
    max_leaves=20,
)


@st.composite
def nested(draw: st.DrawFn) -> Any:
    """A value wrapped in 1..300 lists/objects: around the 32-level limit and far past it."""
    value = draw(values)
    for i in range(draw(st.integers(1, 300))):
        value = [value] if i % 2 else {"k": value}
    return value


task_fields = st.fixed_dictionaries(
    {"task_type": st.sampled_from(["test", "custom", "training", "nope", 5])},
    optional={
        "priority": st.integers(-3, 12) | values, "script": st.text(max_size=20) | values,
        "command": st.lists(st.text(max_size=5), max_size=3) | values,
        "requirements": st.dictionaries(
            st.sampled_from(["gpu_count", "memory_gb", "gpu_type", "labels", "x"]), values,
            max_size=3,
        ) | values,
        "env": st.dictionaries(st.text(max_size=5), st.text(max_size=5) | values, max_size=3),
        "timeout_s": values, "max_attempts": values, "name": st.text(max_size=300),
        "params": values | nested(), "prompt": st.text(max_size=50) | nested(),
        "huge": st.just("x" * (MAX_FRAME_BYTES + 10)),
    },
)
# Tasks that validate, carrying what the store or a node could not hold in their params.
plausible = st.fixed_dictionaries(
    {"task_type": st.just("test")},
    optional={
        "priority": st.integers(0, 10), "name": st.text(max_size=300),
        "prompt": values | nested(), "seed": st.integers(min_value=2**62, max_value=2**64 - 1),
        "cfg": nested(),
        "pad": st.sampled_from([10, 1000, MAX_FRAME_BYTES - 40, MAX_FRAME_BYTES + 10])
        .map(lambda n: "p" * n),
    },
)
bodies = (
    plausible | st.lists(plausible, min_size=1, max_size=3) | task_fields
    | st.lists(task_fields, max_size=4) | values | nested()
    | st.lists(task_fields | values | plausible, min_size=1, max_size=3)
)


def draw_all(strategy: st.SearchStrategy[Any], n: int) -> list[Any]:
    drawn: list[Any] = []

    @settings(max_examples=n, deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(strategy)
    def collect(example: Any) -> None:
        drawn.append(example)

    collect()
    return drawn


async def test_fuzz_submit(coordinator: LiveCoordinator) -> None:
    edges = [  # the boundaries, always tried
        {"task_type": "test", "pad": "p" * (MAX_FRAME_BYTES - 40)},
        {"task_type": "test", "n": 2**63 - 1, "m": -(2**63)}, {"task_type": "test", "n": 2**63},
        [{"task_type": "test"}, {"task_type": "test", "cfg": [[[[]]]] * 2 + [1] * 300}],
    ]
    for body in edges + draw_all(bodies, 200):
        raw = json.dumps(body)  # the stdlib writes integers of any size
        r = await coordinator.http.post("/tasks/submit", content=raw, headers=JSON_HEADERS)
        assert r.status_code < 500, (raw[:500], r.text)
        doc = r.json()
        if r.status_code >= 400:
            assert set(doc) == {"error", "reason"} and doc["reason"], (raw[:500], doc)
    coordinator.mesh.check_invariants()
    for t in list(coordinator.mesh.tasks.values()):  # everything accepted reads back ...
        r = await coordinator.http.get(f"/tasks/{t.id}")
        assert r.status_code == 200, r.text
        params = msgspec.json.decode(t.params_raw)  # ... is within what peers can hold ...
        assert refusal(params) is None, t.params_raw[:300]
        assert assign_size(t.spec, params) <= MAX_FRAME_BYTES  # ... and fits its assign frame
    r = await coordinator.http.get("/tasks/active")
    assert r.status_code == 200 and r.json()["count"] == len(coordinator.mesh.tasks)


def frames(task_ids: list[str]) -> st.SearchStrategy[str]:
    ids = st.sampled_from(task_ids) | st.text(max_size=10) | st.just("t" * 300)
    attempts = st.integers(-1, 3) | st.integers(min_value=2**63, max_value=2**70)
    result = st.fixed_dictionaries({}, optional={
        "exit_code": values, "output": st.text(max_size=50) | values,
        "data": st.dictionaries(st.text(max_size=5), values | nested(), max_size=3) | values,
        "duration_s": values,
    })
    message = st.one_of(
        st.fixed_dictionaries({"type": st.just("task_result"), "task_id": ids,
                               "attempt": attempts,
                               "status": st.sampled_from(["completed", "failed", "?"])},
                              optional={"result": result | values, "error": values}),
        st.fixed_dictionaries({"type": st.just("task_log"), "task_id": ids, "attempt": attempts,
                               "data": st.text(max_size=30) | values}),
        st.fixed_dictionaries({"type": st.sampled_from(["task_started", "task_accepted"]),
                               "task_id": ids, "attempt": attempts}),
        st.fixed_dictionaries({"type": st.just("heartbeat")}, optional={
            "gpus": st.lists(st.fixed_dictionaries(
                {"index": st.integers(0, 3) | values},
                optional={"name": st.text(max_size=300), "memory_total_mb": values},
            ), max_size=2) | values,
            "cpu_pct": values, "health": st.text(max_size=20), "executors": values,
            "running": values,
        }),
        st.fixed_dictionaries({"type": st.sampled_from(["register", "assign", "nope"])},
                              optional={"labels": values}),
        values, nested(),
    )
    return message.map(json.dumps) | st.text(max_size=30)


async def _fuzz_node(live: LiveCoordinator) -> ClientConnection:
    ws = await connect(f"{live.ws_url}/ws/fuzzer", max_size=None)
    # No executors: it is never given the real client's work, only lies about it.
    await ws.send(json.dumps({"type": "register", "token": live.settings.token,
                              "executors": [], "cpu_count": 1}))
    assert json.loads(await ws.recv())["type"] == "registered"
    return ws


async def _drain(ws: ClientConnection, seen: Callable[[dict[str, Any]], None]) -> None:
    while True:
        try:
            raw = await asyncio.wait_for(ws.recv(), 0.05)
        except TimeoutError:
            return
        seen(json.loads(raw))


async def test_fuzz_client_frames_beside_a_real_client(
    coordinator: LiveCoordinator, spawn_client: Callable[..., Proc]
) -> None:
    spawn_client("real", coordinator.ws_url)
    await wait_until(lambda: "real" in coordinator.mesh.nodes and
                     coordinator.mesh.nodes["real"].online, 30, "the real client")
    task_id = await coordinator.submit(task_type="custom", script="sleep 1; echo survived")
    ws = await _fuzz_node(coordinator)
    replies: list[dict[str, Any]] = []
    for frame in draw_all(frames([task_id]), 200):
        await ws.send(frame)
        await _drain(ws, replies.append)
    errors = [r for r in replies if r.get("type") == "error"]
    assert errors and all(e.get("reason") for e in errors)
    # refusals, stale-attempt cancels, perhaps a drain if its health reads bad; never work
    assert all(r.get("type") in ("error", "cancel", "ack", "drain") for r in replies), [
        r for r in replies if r.get("type") not in ("error", "cancel", "ack", "drain")
    ][:3]
    # the fuzzing node is still connected and answered
    await ws.send("{not json")
    while (json.loads(await asyncio.wait_for(ws.recv(), 10)))["type"] != "error":
        pass
    assert coordinator.mesh.nodes["fuzzer"].online
    doc = await coordinator.wait_finished(task_id, 60)
    assert doc["status"] == "completed" and "survived" in doc["result"]["output"], doc
    assert doc["node"] == "real" and doc["attempt"] == 1
    await ws.close()

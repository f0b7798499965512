"""Replicas of model services (issue 27 items 2 and 5): placed like tasks and held for life.

A real coordinator on loopback. Where a replica must report readiness on cue, its node is
driven by hand over a real WebSocket (tests/security/handnode.py); where it must crash or
its node die, it is a real `python -m gpu_client` process running a stand-in command.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.core.services import Service
from coordinator.settings import Settings
from tests.conftest import (
    ADMIN_HEADERS,
    LiveCoordinator,
    Proc,
    free_port,
    run_coordinator,
    wait_until,
)
from tests.security.handnode import HandNode, healthy

SERVE = {"executors": ["process"], "features": ["serve"], "isolation": "user+cgroup",
         "cpu_count": 4, "slots": 4}
SLEEPER = ["python3", "-c", "import sys, time; time.sleep(600)", "{port}"]
CRASHER = ["python3", "-c", "import sys; sys.exit(3)", "{port}"]


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveCoordinator]:
    fast = replace(settings, service_restart_s=0.2, service_restart_max_s=0.8)
    async with run_coordinator(fast) as live:
        yield live


async def hand_node(live: LiveCoordinator, name: str) -> HandNode:
    node = HandNode(name, live.ws_url)
    node.register_extra = dict(SERVE)
    await node.connect()
    return node


async def run_replica(node: HandNode, skip: int = 0, state: str = "ready") -> dict[str, Any]:
    """Take the node's next `assign`, start it by hand and report it (ready by default)."""
    assign = (await wait_until(lambda: node.seen(type="assign")[skip:], 20,
                               f"an assign to {node.name}"))[0]
    ref = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
    node.running.append(ref)
    await node.send({"type": "task_accepted", **ref})
    await node.send({"type": "task_started", **ref})
    await node.send({"type": "replica", **ref, "state": state, "port": 8000})
    return assign


async def create(live: LiveCoordinator, **more: Any) -> dict[str, Any]:
    doc = {"name": "chat", "model": "tiny", "command": SLEEPER,
           "replicas": {"min": 1, "max": 1}, **more}
    r = await live.http.post("/services", json=doc)
    assert r.status_code == 201, r.text
    body: dict[str, Any] = r.json()
    return body


def service(live: LiveCoordinator, name: str = "chat") -> Service:
    found = [s for s in live.mesh.services.all(None) if s.name == name]
    assert found, f"no service {name}"
    return found[0]


async def history(live: LiveCoordinator, name: str = "chat") -> list[dict[str, Any]]:
    r = await live.http.get(f"/services/{name}", params={"history": "1000"})
    assert r.status_code == 200, r.text
    events: list[dict[str, Any]] = r.json()["history"]
    return events


def kinds(events: list[dict[str, Any]]) -> list[str]:
    return [e["kind"] for e in events]


async def test_min_replicas_placed_ready_and_fenced(live: LiveCoordinator) -> None:
    node = await hand_node(live, "n1")
    await create(live, replicas={"min": 2, "max": 2}, health_path="/health")
    first = await run_replica(node)
    second = await run_replica(node, skip=1)
    assert first["service"] == {"service": "chat", "model": "tiny", "health_path": "/health"}
    assert first.get("timeout_s") is None and "{port}" in first["command"]
    svc = service(live)
    await wait_until(lambda: len(live.mesh.services.ready(svc)) == 2, 10, "two ready")
    view = (await live.http.get("/services/chat")).json()
    assert {r["task_id"] for r in view["replicas"]} == {first["task_id"], second["task_id"]}
    assert {r["node"] for r in view["replicas"]} == {"n1"}
    assert view["scale"]["ready"] == 2
    # a report of an attempt that is not current changes nothing
    await node.send({"type": "replica", "task_id": first["task_id"],
                     "attempt": first["attempt"] + 1, "state": "unhealthy"})
    await node.send({"type": "replica", "task_id": "no-such-task", "attempt": 1,
                     "state": "ready"})
    await wait_until(lambda: live.mesh.services.metrics.stale_reports >= 2, 10, "stale seen")
    assert len(live.mesh.services.ready(svc)) == 2
    # unhealthy is not ready; ready again is
    ref = {"task_id": first["task_id"], "attempt": first["attempt"]}
    await node.send({"type": "replica", **ref, "state": "unhealthy", "reason": "503"})
    await wait_until(lambda: len(live.mesh.services.ready(svc)) == 1, 10, "one unhealthy")
    await node.send({"type": "replica", **ref, "state": "ready"})
    await wait_until(lambda: len(live.mesh.services.ready(svc)) == 2, 10, "ready again")
    assert "replica unhealthy" in kinds(await history(live))
    await node.close()


async def test_a_submitted_task_cannot_pose_as_a_replica(live: LiveCoordinator) -> None:
    node = await hand_node(live, "n1")
    forged = {"service": "chat", "model": "tiny", "health_path": "/v1/models"}
    task_id = await live.submit(task_type="custom", command=SLEEPER, service=forged)
    assign = await node.frame(type="assign", task_id=task_id)
    assert assign.get("service") is None  # a param, never the frame's field
    assert live.mesh.services.run_for(task_id) is None
    await node.close()


async def test_a_crashing_replica_restarts_with_backoff(
    live: LiveCoordinator, spawn_client: Callable[..., Proc]
) -> None:
    spawn_client("c1", live.ws_url)
    await create(live, command=CRASHER)

    async def restarts() -> list[float]:
        return [e["detail"]["in_s"] for e in await history(live)
                if e["kind"] == "replica restart"]

    delays = await wait_until(lambda: _at_least(restarts(), 4), 60, "four restarts")
    assert delays[:4] == [0.2, 0.4, 0.8, 0.8]  # doubling, capped at MESH_SERVICE_RESTART_MAX_S
    events = await history(live)
    ended = [e for e in events if e["kind"] == "replica ended"]
    assert ended and all(e["detail"]["status"] == "failed" and e["detail"]["wanted"]
                         for e in ended)
    tasks = {e["detail"]["task_id"] for e in ended}
    assert len(tasks) == len(ended)  # each restart is a new task
    assert service(live).desired == 1
    assert (await live.http.delete("/services/chat")).status_code == 200


async def _at_least(values: Any, n: int) -> list[float] | None:
    got: list[float] = await values
    return got if len(got) >= n else None


async def test_a_killed_nodes_replica_is_placed_elsewhere(
    live: LiveCoordinator, spawn_client: Callable[..., Proc]
) -> None:
    a = spawn_client("a", live.ws_url)
    await wait_until(lambda: "a" in live.mesh.nodes, 20, "node a")
    await create(live)
    svc = service(live)

    def placed_on() -> str:
        return next((r.node for r in svc.replicas.values() if r.node), "")

    assert await wait_until(placed_on, 20, "the replica placed") == "a"
    (task_id,) = svc.replicas
    spawn_client("b", live.ws_url)
    await wait_until(lambda: live.mesh.nodes.get("b") and live.mesh.nodes["b"].online, 20, "b")
    a.kill9()
    await wait_until(lambda: placed_on() == "b", 30, "the replica placed on b")
    assert list(svc.replicas) == [task_id]  # the same task, its next attempt
    assert live.mesh.tasks[task_id].attempt == 2
    assert {"replica lost", "replica placed"} <= set(kinds(await history(live)))


async def test_scale_from_zero_up_and_down_after_idle(live: LiveCoordinator) -> None:
    node = await hand_node(live, "n1")
    await create(live, replicas={"min": 0, "max": 2}, idle_s=1, target_ongoing=1)
    services = live.mesh.services
    svc = service(live)
    assert svc.replicas == {} and svc.desired == 0
    waiting = asyncio.create_task(services.wait_ready(svc, 20))
    first = await run_replica(node)
    ready = await waiting
    assert [r.task_id for r in ready] == [first["task_id"]]
    # two requests in flight on one replica with target_ongoing 1: one more replica
    services.started(svc, ready[0])
    services.started(svc, ready[0])
    assert svc.desired == 2
    second = await run_replica(node, skip=1)
    await wait_until(lambda: len(services.ready(svc)) == 2, 10, "two ready")
    for _ in range(2):
        services.finished(svc, ready[0], status=200, ttft_s=0.01, duration_s=0.1,
                          completion_tokens=5)
    # idle_s without requests: back to min (0), both replicas' tasks cancelled
    await wait_until(lambda: not svc.replicas, 20, "scaled down to zero")
    for assign in (first, second):
        await node.frame(type="cancel", task_id=assign["task_id"])
    events = await history(live)
    scaled = [(e["kind"], e["detail"]["to"]) for e in events if e["kind"].startswith("scaled")]
    assert scaled == [("scaled up", 1), ("scaled up", 2), ("scaled down", 0)]
    assert "from zero" in events[kinds(events).index("scaled up")]["detail"]["why"]
    body = (await live.http.get("/metrics")).text
    assert 'gpumesh_service_requests_total{service="chat",status="2xx",tenant=' in body
    assert 'gpumesh_service_scale_events_total{kind="up",service="chat"' in body
    assert 'gpumesh_service_replicas{service="chat",state="ready"' in body
    assert service(live).desired == 0
    await node.close()


async def test_a_drained_nodes_replica_is_replaced_before_it_stops(
    live: LiveCoordinator,
) -> None:
    a = await hand_node(live, "a")
    await create(live)
    old = await run_replica(a)
    svc = service(live)
    await wait_until(lambda: live.mesh.services.ready(svc), 10, "ready on a")
    b = await hand_node(live, "b")
    r = await live.http.post("/mesh/nodes/a/drain", json={"reason": "maintenance"})
    assert r.status_code == 200, r.text
    new = await run_replica(b, state="starting")
    assert not a.seen(type="cancel")  # the old one serves until the new one is ready
    assert [x.task_id for x in live.mesh.services.ready(svc)] == [old["task_id"]]
    await b.send({"type": "replica", "task_id": new["task_id"], "attempt": new["attempt"],
                  "state": "ready"})
    await a.frame(type="cancel", task_id=old["task_id"])
    await wait_until(lambda: list(svc.replicas) == [new["task_id"]], 10, "old one gone")
    await a.close()
    await b.close()


async def test_a_restart_keeps_services_and_replicas(settings: Settings, tmp_path: Path) -> None:
    async with run_coordinator(settings) as live:
        node = await hand_node(live, "n1")
        await create(live, replicas={"min": 1, "max": 3})
        assign = await run_replica(node)
        svc = service(live)
        await wait_until(lambda: live.mesh.services.ready(svc), 10, "ready")
        await node.close()
    async with run_coordinator(settings) as live:
        svc = service(live)
        assert list(svc.replicas) == [assign["task_id"]]
        assert live.mesh.services.ready(svc) == []  # until its node says so again
        ref = {"task_id": assign["task_id"], "attempt": assign["attempt"], "state": "running"}
        await node.connect(live.ws_url, running=[ref])  # the same node, its credential
        await node.send({"type": "replica", "task_id": ref["task_id"],
                         "attempt": ref["attempt"], "state": "ready"})
        await wait_until(lambda: live.mesh.services.ready(svc), 10, "ready after restart")
        assert list(svc.replicas) == [assign["task_id"]] and svc.desired == 1
        assert not node.seen(type="assign")  # nothing new placed: the replica was kept
        await node.close()


async def test_quotas_count_replica_gpus(
    live: LiveCoordinator, spawn_client: Callable[..., Proc]
) -> None:
    r = await live.http.post("/admin/tokens", json={"tenant": "alice", "role": "submit"})
    token = r.json()["token"]
    r = await live.http.put("/admin/tenants/alice", json={"max_gpus": 1})
    assert r.status_code == 200, r.text
    spawn_client("g", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
    doc = {"name": "big", "model": "big", "command": SLEEPER,
           "requirements": {"gpu_count": 1}, "replicas": {"min": 2, "max": 2}}
    r = await live.http.post("/services", json=doc, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 201, r.text
    svc = service(live, "big")
    tasks = live.mesh.tasks
    await wait_until(lambda: any(r.node for r in svc.replicas.values()), 20, "one placed")
    placed = [t for t in svc.replicas if tasks[t].node]
    waiting = [t for t in svc.replicas if not tasks[t].node]
    assert len(placed) == 1 and len(waiting) == 1
    assert tasks[placed[0]].tenant == "alice" and len(tasks[placed[0]].gpu_indices) == 1
    await wait_until(lambda: "GPU quota" in live.mesh.queued_reason(tasks[waiting[0]]), 10,
                     "held by the quota")


async def test_a_real_client_runs_a_replica_and_reports_it_ready(
    live: LiveCoordinator, spawn_client: Callable[..., Proc]
) -> None:
    """With the node side of serving (gpu_client/serving.py): the client fills `{port}`,
    health-checks the stand-in server and reports it ready; deleting the service stops it."""
    client = spawn_client("c1", live.ws_url)
    standin = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
    await create(live, command=standin, health_path="/")
    svc = service(live)
    ready = await wait_until(lambda: live.mesh.services.ready(svc), 30,
                             f"a ready replica; the client's log:\n{client.output()[-2000:]}")
    assert ready[0].node == "c1" and 0 < ready[0].port < 65536
    (task_id,) = svc.replicas
    assert (await live.http.delete("/services/chat")).status_code == 200
    done = await live.wait_finished(task_id)
    assert done["status"] == "cancelled"


async def test_replicas_go_only_to_nodes_that_serve(live: LiveCoordinator) -> None:
    """A node that does not offer the "serve" feature (an older client) is never sent a
    replica it could run but never report; the replica waits, saying why."""
    old = HandNode("old", live.ws_url)
    old.register_extra = {k: v for k, v in SERVE.items() if k != "features"}
    await old.connect()
    await create(live)
    svc = service(live)
    (task_id,) = await wait_until(lambda: list(svc.replicas), 10, "the replica")
    await wait_until(lambda: "lacks the required labels" in live.mesh.queued_reason(
        live.mesh.tasks[task_id]), 10, "a reason: the label a replica needs")
    assert live.mesh.tasks[task_id].spec.requirements.labels == {"gpumesh.serve": "1"}
    assert not old.seen(type="assign")
    new = await hand_node(live, "new")
    assign = await run_replica(new)
    assert assign["task_id"] == task_id
    nodes = (await live.http.get("/mesh/nodes")).json()["nodes"]
    assert nodes["new"]["labels"] == {"gpumesh.serve": "1"} and nodes["old"]["labels"] == {}
    await old.close()
    await new.close()


async def test_an_update_replaces_replicas_new_ones_first(live: LiveCoordinator) -> None:
    node = await hand_node(live, "n1")
    await create(live)
    old = await run_replica(node)
    svc = service(live)
    await wait_until(lambda: live.mesh.services.ready(svc), 10, "ready")
    # the same command: nothing is replaced
    r = await live.http.put("/services/chat", json={
        "name": "chat", "model": "tiny", "command": SLEEPER, "target_ongoing": 4})
    assert r.status_code == 200, r.text
    assert list(svc.replicas) == [old["task_id"]] and not svc.replicas[old["task_id"]].retiring
    # another command: a new replica first; the old one serves until it is ready
    r = await live.http.put("/services/chat", json={
        "name": "chat", "model": "tiny", "command": [*SLEEPER, "--v2"]})
    assert r.status_code == 200, r.text
    new = await run_replica(node, skip=1, state="starting")
    assert new["command"][-1] == "--v2" and not node.seen(type="cancel")
    await node.send({"type": "replica", "task_id": new["task_id"], "attempt": new["attempt"],
                     "state": "ready"})
    await node.frame(type="cancel", task_id=old["task_id"])
    await wait_until(lambda: list(svc.replicas) == [new["task_id"]], 10, "only the new one")
    await node.close()


async def test_kill9_of_the_coordinator_keeps_the_service_and_its_running_replica(
    spawn_coordinator: Callable[..., Proc], spawn_client: Callable[..., Proc], tmp_path: Path
) -> None:
    """The coordinator is killed with SIGKILL while a real client runs a ready replica: the
    next coordinator reloads the service and the same replica task, the client re-reports
    it, and it is ready again without a second replica being started."""
    port, data = free_port(), tmp_path / "data"
    coord = spawn_coordinator(port, data)
    standin = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]

    async def view() -> dict[str, Any] | None:
        try:
            r = await http.get("/services/chat", params={"history": "100"})
        except httpx.TransportError:
            return None
        return r.json() if r.status_code == 200 else None

    async def ready() -> dict[str, Any] | None:
        v = await view()
        return v if v and v["scale"]["ready"] == 1 else None

    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 headers=ADMIN_HEADERS) as http:
        await wait_until(lambda: healthy(http), 20, "coordinator up")
        spawn_client("c1", f"ws://127.0.0.1:{port}")
        doc = {"name": "chat", "model": "tiny", "command": standin, "health_path": "/"}
        assert (await http.post("/services", json=doc)).status_code == 201
        before = await wait_until(ready, 30, "the replica ready")
        coord.kill9()
        spawn_coordinator(port, data)
        after = await wait_until(ready, 40, "the replica ready again after the restart")
        assert [r["task_id"] for r in after["replicas"]] == \
            [r["task_id"] for r in before["replicas"]]
        assert after["replicas"][0]["attempt"] == before["replicas"][0]["attempt"]
        def started(v: dict[str, Any]) -> list[Any]:
            return [e for e in v["history"] if e["kind"] == "replica started"]

        # no replica was started after the kill (a replica that crashed at start before it,
        # e.g. its port taken under load, was restarted then, and that is in `before` too)
        assert started(after) == started(before), after["history"]


async def test_a_burst_scales_up_to_max_and_never_past_it(live: LiveCoordinator) -> None:
    """Many requests in one turn of the loop: each may ask for one more replica, but the
    replicas being submitted count, so the service ends at `max`, not beyond."""
    node = await hand_node(live, "n1")
    await create(live, replicas={"min": 1, "max": 3}, target_ongoing=1)
    await run_replica(node)
    services, svc = live.mesh.services, service(live)
    (first,) = await wait_until(lambda: services.ready(svc), 10, "ready")
    for _ in range(10):
        services.started(svc, first)
    assert svc.desired == 3
    await wait_until(lambda: len(node.seen(type="assign")) == 3, 10, "two more assigns")
    await live.mesh.settled()
    assert len(svc.replicas) == 3 and svc.adding == 0
    scaled = [e for e in await history(live) if e["kind"] == "scaled up"]
    assert [e["detail"]["to"] for e in scaled] == [2, 3]
    await node.close()


async def test_a_replica_never_ready_is_replaced_like_a_crash(settings: Settings) -> None:
    """An engine that hangs while loading (placed, started, never healthy) is stopped after
    MESH_SERVICE_READY_S and a new replica follows after the crash backoff."""
    fast = replace(settings, service_ready_s=1.0, service_restart_s=0.2)
    async with run_coordinator(fast) as live:
        node = await hand_node(live, "n1")
        await create(live)
        first = await run_replica(node, state="starting")
        await node.frame(type="cancel", task_id=first["task_id"])
        second = await run_replica(node, skip=1)  # the next one, after the backoff
        assert second["task_id"] != first["task_id"]
        svc = service(live)
        await wait_until(lambda: live.mesh.services.ready(svc), 10, "the new one ready")
        events = kinds(await history(live))
        assert "replica not ready" in events and "replica restart" in events
        await node.close()


async def test_a_replica_unhealthy_too_long_is_replaced_one_that_recovers_is_kept(
    settings: Settings,
) -> None:
    """An engine wedged without exiting: its node reports it unhealthy and it stays so for
    MESH_SERVICE_UNHEALTHY_S; it is replaced as a drained node's replica is, a new one first
    and the old one cancelled once the new one is ready. A replica that is ready again
    before its deadline is kept: `keep` goes unhealthy first and recovers, `wedged` goes
    unhealthy after it and stays so, so `keep`'s deadline, were it still armed, would pass
    before `wedged`'s is seen to."""
    fast = replace(settings, service_unhealthy_s=2.0)
    async with run_coordinator(fast) as live:
        node = await hand_node(live, "n1")
        await create(live, replicas={"min": 2, "max": 2})
        keep, wedged = await run_replica(node), await run_replica(node, skip=1)
        svc = service(live)
        services = live.mesh.services
        await wait_until(lambda: len(services.ready(svc)) == 2, 10, "two ready")
        ref_keep = {"task_id": keep["task_id"], "attempt": keep["attempt"]}
        ref_wedged = {"task_id": wedged["task_id"], "attempt": wedged["attempt"]}
        await node.send({"type": "replica", **ref_keep, "state": "unhealthy",
                         "reason": "GET /v1/models: 503"})
        await node.send({"type": "replica", **ref_keep, "state": "ready"})
        await node.send({"type": "replica", **ref_wedged, "state": "unhealthy",
                         "reason": "GET /v1/models: timed out"})
        await wait_until(lambda: [r.task_id for r in services.ready(svc)] == [keep["task_id"]],
                         10, "the wedged one unhealthy, the other ready again")
        assert svc.replicas[keep["task_id"]].unhealthy_timer is None  # disarmed on recovery
        # the deadline passes: a replacement is placed; the wedged one is not cancelled yet
        new = await run_replica(node, skip=2, state="starting")
        assert svc.replicas[wedged["task_id"]].retiring
        assert not svc.replicas[keep["task_id"]].retiring
        assert not node.seen(type="cancel")
        events = await history(live)
        retiring = [e["detail"] for e in events if e["kind"] == "replica retiring"]
        assert retiring == [{"task_id": wedged["task_id"], "node": "n1",
                             "attempt": wedged["attempt"],
                             "why": "unhealthy for 2 s: GET /v1/models: timed out"}]
        # the new one ready: the wedged one is cancelled, the recovered one kept
        await node.send({"type": "replica", "task_id": new["task_id"],
                         "attempt": new["attempt"], "state": "ready"})
        await node.frame(type="cancel", task_id=wedged["task_id"])
        await wait_until(lambda: set(svc.replicas) == {keep["task_id"], new["task_id"]}, 10,
                         "the wedged one gone")
        assert [c["task_id"] for c in node.seen(type="cancel")] == [wedged["task_id"]]
        assert svc.desired == 2
        body = (await live.http.get("/metrics")).text
        restarts = [line for line in body.splitlines() if line.startswith(
            'gpumesh_service_scale_events_total{kind="restart",service="chat"')]
        assert len(restarts) == 1 and restarts[0].endswith(" 1.0"), restarts
        await node.close()


async def test_an_unhealthy_replicas_deadline_ends_with_it(settings: Settings) -> None:
    """The deadline is disarmed when the replica stops (its service deleted) or its task
    moves on (its node lost it): no timer outlives what it watches."""
    fast = replace(settings, service_unhealthy_s=600.0)
    async with run_coordinator(fast) as live:
        node = await hand_node(live, "n1")
        await create(live, replicas={"min": 1, "max": 1})
        first = await run_replica(node)
        svc = service(live)
        ref = {"task_id": first["task_id"], "attempt": first["attempt"]}
        await node.send({"type": "replica", **ref, "state": "unhealthy", "reason": "503"})
        replica = svc.replicas[first["task_id"]]
        await wait_until(lambda: replica.unhealthy_timer is not None, 10, "the deadline armed")
        # unhealthy again with another reason: the same spell, the same deadline
        armed = replica.unhealthy_timer
        await node.send({"type": "replica", **ref, "state": "unhealthy", "reason": "timed out"})
        await wait_until(lambda: replica.reason == "timed out", 10, "the new reason")
        assert replica.unhealthy_timer is armed
        assert (await live.http.delete("/services/chat")).status_code == 200
        assert replica.unhealthy_timer is None and armed is not None and armed.cancelled()
        await node.frame(type="cancel", task_id=first["task_id"])
        await node.close()


# Answers its health path with 200, or 503 while a file named after its port exists in the
# directory given: a stand-in engine that wedges (and recovers) on cue, and never exits.
WEDGING = """
import http.server, os, sys
port, wedges = int(sys.argv[1]), sys.argv[2]
class Health(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        wedged = os.path.exists(os.path.join(wedges, str(port)))
        self.send_response(503 if wedged else 200)
        self.send_header("Content-Length", "0")
        self.end_headers()
    def log_message(self, *args):
        pass
http.server.ThreadingHTTPServer(("127.0.0.1", port), Health).serve_forever()
"""
# A root client ends whatever runs under a task's uid when that task ends: uids of our own.
_UIDS = 300_000 + (os.getpid() % 50_000) * 4


async def test_a_real_clients_wedged_replica_is_replaced(
    settings: Settings, spawn_client: Callable[..., Proc], tmp_path: Path
) -> None:
    """With the node side of serving (gpu_client/serving.py): the stand-in engine's health
    path fails and stays failing, its process lives on; the client reports it unhealthy, and
    after MESH_SERVICE_UNHEALTHY_S the coordinator starts a new replica, which the client
    health-checks and reports ready, and then cancels the wedged one."""
    wedges = tmp_path / "wedges"
    wedges.mkdir()
    wedges.chmod(0o1777)
    fast = replace(settings, service_unhealthy_s=1.0)
    async with run_coordinator(fast) as live:
        client = spawn_client("c1", live.ws_url, MESH_REPLICA_HEALTH_S="0.2",
                              MESH_TASK_UIDS=f"{_UIDS}-{_UIDS + 3}")
        await create(live, command=["python3", "-c", WEDGING, "{port}", str(wedges)],
                     health_path="/")
        svc = service(live)
        services = live.mesh.services
        (old,) = await wait_until(lambda: services.ready(svc), 30,
                                  f"a ready replica; the client's log:\n{client.output()[-2000:]}")
        (wedges / str(old.port)).touch()
        new = await wait_until(
            lambda: [r for r in services.ready(svc) if r.task_id != old.task_id], 60,
            f"a new replica ready; the client's log:\n{client.output()[-2000:]}")
        done = await live.wait_finished(old.task_id)
        assert done["status"] == "cancelled"
        assert list(svc.replicas) == [new[0].task_id]
        events = await history(live)
        (retiring,) = [e["detail"] for e in events if e["kind"] == "replica retiring"
                       and e["detail"]["task_id"] == old.task_id]
        assert retiring["why"] == "unhealthy for 1 s: health check answered 503", retiring
        assert (await live.http.delete("/services/chat")).status_code == 200
        await live.wait_finished(new[0].task_id)

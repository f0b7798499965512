"""Nodes that fail well (issue 11), the coordinator's side: infrastructure errors requeue
without spending attempts, quarantine and its lifting, GPU faults, reconciliation of
heartbeats' `running` lists, and liveness that does not blame nodes for its own stalls.

Nodes are real WebSocket clients speaking the protocol frames (`RawNode`), so each case is
driven exactly; the end-to-end cases run real `python -m gpu_client` processes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from websockets.asyncio.client import ClientConnection, connect

from coordinator.settings import Settings
from tests.conftest import (
    ADMIN_HEADERS,
    LiveCoordinator,
    Proc,
    free_port,
    run_coordinator,
    wait_for,
    wait_until,
)

log = logging.getLogger(__name__)
Spawn = Callable[..., Proc]


@dataclass
class RawNode:
    """A node made of protocol frames: heartbeats on a timer, whatever they should say."""

    ws: ClientConnection
    name: str
    frames: asyncio.Queue[dict[str, Any]] = field(default_factory=asyncio.Queue)
    running: list[dict[str, Any]] = field(default_factory=list)
    health: str = ""
    executors: list[str] | None = None
    gpus: list[dict[str, Any]] = field(default_factory=list)
    beats: int = 0
    report: bool = True  # list assigned attempts in `running` until their result is sent
    assigns: int | None = None  # the heartbeats' count of delivered assigns; None: none sent

    async def send(self, doc: dict[str, Any]) -> None:
        await self.ws.send(json.dumps(doc))

    async def next(self, kind: str, timeout: float = 10) -> dict[str, Any]:
        """The next frame of this type (others are dropped)."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise AssertionError(f"{self.name}: no {kind} frame within {timeout}s")
            try:
                doc = await asyncio.wait_for(self.frames.get(), left)
            except TimeoutError:
                continue
            if doc["type"] == kind:
                return doc

    async def result(self, assign: dict[str, Any], *, infra: bool = False,
                     error: str = "") -> None:
        key = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
        if key in self.running:
            self.running.remove(key)
        await self.send({"type": "task_accepted", **key})
        status = "failed" if infra or error else "completed"
        await self.send({"type": "task_result", **key, "status": status, "infra": infra,
                         "error": error, "result": {"exit_code": 0 if not error else None}})

    def heartbeat(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"type": "heartbeat", "running": self.running,
                               "health": self.health, "gpus": self.gpus}
        if self.executors is not None:
            doc["executors"] = self.executors
        if self.assigns is not None:
            doc["assigns"] = self.assigns
        return doc

    async def _read(self) -> None:
        async for raw in self.ws:
            doc = json.loads(raw)
            if doc["type"] == "assign" and self.report:
                self.running.append({"task_id": doc["task_id"], "attempt": doc["attempt"]})
            await self.frames.put(doc)

    async def _beat(self, interval: float) -> None:
        while True:
            await self.send(self.heartbeat())
            self.beats += 1
            await asyncio.sleep(interval)


@asynccontextmanager
async def raw_node(
    live: LiveCoordinator, name: str, *, executors: tuple[str, ...] = ("builtin",),
    gpus: list[dict[str, Any]] | None = None, labels: dict[str, str] | None = None,
    beat_s: float = 0.25,
) -> AsyncIterator[RawNode]:
    async with connect(f"{live.ws_url}/ws/{name}") as ws:
        node = RawNode(ws, name, gpus=gpus or [])
        await node.send({"type": "register", "executors": list(executors), "cpu_count": 2,
                         "slots": 2, "gpus": node.gpus, "labels": labels or {},
                         "token": live.settings.token})
        reg = json.loads(await ws.recv())
        assert reg["type"] == "registered", reg
        tasks = [asyncio.create_task(node._read()), asyncio.create_task(node._beat(beat_s))]
        try:
            yield node
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def node_doc(live: LiveCoordinator, name: str) -> dict[str, Any]:
    doc: dict[str, Any] = (await live.http.get("/mesh/nodes")).json()["nodes"][name]
    return doc


async def metric(live: LiveCoordinator, line_start: str) -> float | None:
    text = (await live.http.get("/metrics")).text
    for line in text.splitlines():
        if line.startswith(line_start + " "):
            return float(line.rsplit(" ", 1)[1])
    return None


# --- infrastructure errors -----------------------------------------------------------------


async def test_infra_errors_requeue_without_spending_attempts(settings: Settings) -> None:
    async with run_coordinator(replace(settings, quarantine_errors=100)) as live, \
            raw_node(live, "a") as a:
        task_id = await live.submit(task_type="test", max_attempts=1)
        for attempt in (1, 2, 3):
            assign = await a.next("assign")
            assert (assign["task_id"], assign["attempt"]) == (task_id, attempt)
            await a.result(assign, infra=True, error=f"work dir unusable ({attempt})")
            ack = await a.next("ack")
            assert (ack["task_id"], ack["attempt"]) == (task_id, attempt)
        assign = await a.next("assign")
        doc = await live.task(task_id)
        assert doc["status"] in ("assigned", "running") and doc["attempt"] == 4
        assert "node fault 3 of 20" in doc["error"] and "work dir unusable (3)" in doc["error"]
        await a.result(assign)
        doc = await live.wait_finished(task_id)
        assert doc["status"] == "completed" and doc["attempt"] == 4 and doc["max_attempts"] == 1
        logs = (await live.http.get(f"/tasks/{task_id}/logs")).text
        assert logs.count("ended by a node fault on a") == 3, logs
        assert await metric(live, 'gpumesh_infra_failures_total{node="a"}') == 3.0


async def test_infra_requeues_are_bounded(settings: Settings) -> None:
    custom = replace(settings, quarantine_errors=100, max_infra_retries=2)
    async with run_coordinator(custom) as live, raw_node(live, "a") as a:
        task_id = await live.submit(task_type="test")
        for _ in range(3):
            await a.result(await a.next("assign"), infra=True, error="docker daemon gone")
        doc = await live.wait_finished(task_id)
        assert doc["status"] == "failed" and doc["attempt"] == 3
        assert doc["error"].startswith("gave up after 3 node faults"), doc["error"]
        assert "docker daemon gone" in doc["error"]


async def test_task_failure_is_not_an_infra_error(coordinator: LiveCoordinator) -> None:
    async with raw_node(coordinator, "a") as a:
        task_id = await coordinator.submit(task_type="test")
        await a.result(await a.next("assign"), error="exit code 3")
        doc = await coordinator.wait_finished(task_id)
        assert doc["status"] == "failed" and doc["attempt"] == 1
        assert (await node_doc(coordinator, "a"))["infra_failures"] == 0


# --- quarantine ----------------------------------------------------------------------------


async def test_repeated_infra_errors_quarantine_until_a_healthy_heartbeat(
    settings: Settings,
) -> None:
    custom = replace(settings, quarantine_errors=3, quarantine_probe_s=1.0)
    async with run_coordinator(custom) as live, \
            raw_node(live, "bad", labels={"zone": "x"}) as bad:
        ids = [await live.submit(task_type="test", name=f"t{i}") for i in range(6)]
        first = await bad.next("assign")
        started = time.monotonic()
        await bad.result(first, infra=True, error="NotADirectoryError: /w")
        # From here on what it is assigned is never reported: reconciled away. (Set before
        # the requeued attempts can arrive, however fast the coordinator sends them.)
        bad.report = False
        for _ in range(2):
            await bad.result(await bad.next("assign"), infra=True, error="NotADirectoryError")
        bad.health = "work dir /w is not a directory"  # its re-probe finds out, and says so
        await wait_until(lambda: live.mesh.nodes["bad"].quarantine_reason, 5, "quarantine")
        to_quarantine = time.monotonic() - started
        doc = await node_doc(live, "bad")
        assert doc["quarantined"] and "3 infrastructure errors" in doc["quarantine_reason"]
        assert doc["eligible"] is False and doc["infra_failures"] == 3
        assert (await live.http.get("/mesh/status")).json()["nodes"]["bad"]["quarantined"]
        assert await metric(live, 'gpumesh_node_quarantined{node="bad"}') == 1.0
        # Nothing more goes to it; a healthy node beside it gets all the work.
        async with raw_node(live, "good") as good:
            for _ in ids:
                await good.result(await good.next("assign"))
            for task_id in ids:
                doc = await live.wait_finished(task_id)
                assert doc["status"] == "completed" and doc["node"] == "good", doc
        # A task only the quarantined node could run says why it waits.
        pinned = await live.submit(task_type="test", requirements={"labels": {"zone": "x"}})
        reason = (await live.task(pinned, wait=0.3))["reason"]
        assert "quarantined" in reason and "NotADirectoryError" in reason, reason
        # The node fixes itself: its next healthy heartbeat past the probe time lifts it.
        bad.running, bad.report = [], True
        bad.health = ""
        fixed = time.monotonic()
        assign = await bad.next("assign", timeout=10)
        while assign["task_id"] != pinned:  # assigns it got before the quarantine
            assign = await bad.next("assign", timeout=10)
        to_recover = time.monotonic() - fixed
        await bad.result(assign)
        assert (await live.wait_finished(pinned))["node"] == "bad"
        doc = await node_doc(live, "bad")
        assert not doc["quarantined"] and doc["eligible"] and doc["quarantine_reason"] == ""
        assert await metric(live, 'gpumesh_node_quarantined{node="bad"}') == 0.0
        log.warning("time to quarantine %.3fs; to recover %.3fs (probe %.1fs)",
                    to_quarantine, to_recover, custom.quarantine_probe_s)


async def test_unhealthy_heartbeat_and_executor_changes_steer_placement(
    coordinator: LiveCoordinator,
) -> None:
    async with raw_node(coordinator, "a", executors=("builtin", "docker")) as a:
        a.health = "work dir full: 3 MB free"
        await wait_until(lambda: coordinator.mesh.nodes["a"].health, 5, "health reported")
        task_id = await coordinator.submit(task_type="test")
        reason = (await coordinator.task(task_id, wait=0.3))["reason"]
        assert "unhealthy (work dir full: 3 MB free)" in reason, reason
        assert (await node_doc(coordinator, "a"))["eligible"] is False
        a.health = ""
        await a.result(await a.next("assign"))
        assert (await coordinator.wait_finished(task_id))["status"] == "completed"
        # Docker went away on the node: it stops offering it, and comes back.
        a.executors = ["builtin"]
        await wait_until(
            lambda: coordinator.mesh.nodes["a"].executors == {"builtin"}, 5, "docker gone"
        )
        boxed = await coordinator.submit(task_type="custom", image="alpine", command=["true"])
        reason = (await coordinator.task(boxed, wait=0.3))["reason"]
        assert "do not offer the docker executor" in reason or "does not offer" in reason
        a.executors = ["builtin", "docker"]
        assign = await a.next("assign")
        assert assign["task_id"] == boxed and assign["executor"] == "docker"
        await a.result(assign)
        await coordinator.wait_finished(boxed)


# --- GPU faults ----------------------------------------------------------------------------


def _gpu(index: int, fault: str = "") -> dict[str, Any]:
    doc: dict[str, Any] = {"index": index, "name": "A100", "vendor": "nvidia",
                           "memory_total_mb": 81920}
    if fault:
        doc["fault"] = fault
    return doc


async def test_a_faulted_gpu_is_taken_out_alone(coordinator: LiveCoordinator) -> None:
    async with raw_node(coordinator, "g", gpus=[_gpu(0), _gpu(1)]) as g:
        g.gpus = [_gpu(0, "XID 79: fallen off the bus"), _gpu(1)]
        await wait_until(lambda: coordinator.mesh.nodes["g"].gpus[0].fault, 5, "fault seen")
        one = await coordinator.submit(task_type="test", requirements={"gpu_count": 1})
        assign = await g.next("assign")
        assert assign["task_id"] == one and assign["gpu_indices"] == [1]
        two = await coordinator.submit(task_type="test", requirements={"gpu_count": 2})
        reason = (await coordinator.task(two, wait=0.3))["reason"]
        assert "1 GPU out with a fault" in reason, reason
        doc = await node_doc(coordinator, "g")
        assert doc["faulted_gpus"] == {"0": "XID 79: fallen off the bus"} and doc["eligible"]
        assert doc["free_gpus"] == 0
        assert await metric(coordinator, 'gpumesh_gpu_faulted{gpu="0",node="g"}') == 1.0
        await g.result(assign)
        g.gpus = [_gpu(0), _gpu(1)]  # the fault cleared (the node was serviced)
        assign = await g.next("assign")
        assert assign["task_id"] == two and assign["gpu_indices"] == [0, 1]
        await g.result(assign)
        await coordinator.wait_finished(two)


# --- reconciliation ------------------------------------------------------------------------


async def test_heartbeat_running_list_is_reconciled(coordinator: LiveCoordinator) -> None:
    async with raw_node(coordinator, "a") as a:
        a.report = False
        # The node runs an attempt the coordinator never gave it: it is told to stop.
        a.running = [{"task_id": "f" * 32, "attempt": 7}]
        cancel = await a.next("cancel")
        assert (cancel["task_id"], cancel["attempt"]) == ("f" * 32, 7)
        assert "reconciled" in cancel["reason"]
        a.running = []
        # A task placed on it that it never reports goes back to the queue (attempt 2).
        task_id = await coordinator.submit(task_type="test")
        first = await a.next("assign")
        assert first["attempt"] == 1
        beats = a.beats
        cancel = await a.next("cancel", timeout=10)
        assert (cancel["task_id"], cancel["attempt"]) == (task_id, 1)
        assert a.beats - beats >= 2  # a short confirmation, not a single heartbeat
        second = await a.next("assign")
        assert (second["task_id"], second["attempt"]) == (task_id, 2)
        a.running = [{"task_id": task_id, "attempt": 2}]
        beats = a.beats  # a few heartbeats report it now: nothing more may happen
        await wait_until(lambda: a.beats >= beats + 8, 10, "more heartbeats")
        doc = await coordinator.task(task_id)
        assert doc["attempt"] == 2 and doc["status"] in ("assigned", "running")
        await a.result(second)
        assert (await coordinator.wait_finished(task_id))["attempt"] == 2


async def test_a_heartbeat_made_before_the_assign_never_counts_against_it(
    coordinator: LiveCoordinator,
) -> None:
    """Heartbeats read late (after a coordinator stall) were made before the node had
    assigns sent on waking: their `assigns` count says so, and the task stays put."""
    async with raw_node(coordinator, "a", beat_s=0.1) as a:
        a.report, a.assigns = False, 0
        task_id = await coordinator.submit(task_type="test")
        first = await a.next("assign")
        beats = a.beats
        await wait_until(lambda: a.beats >= beats + 15, 10, "heartbeats")
        assert (await coordinator.task(task_id))["attempt"] == 1
        a.assigns = 1  # made after the assign, without the task: it is missing after all
        cancel = await a.next("cancel")
        assert (cancel["task_id"], cancel["attempt"]) == (task_id, first["attempt"])
        second = await a.next("assign")
        assert second["attempt"] == 2
        a.assigns = 2
        await a.result(second)
        assert (await coordinator.wait_finished(task_id))["attempt"] == 2


async def test_reported_tasks_are_never_requeued(coordinator: LiveCoordinator) -> None:
    async with raw_node(coordinator, "a", beat_s=0.1) as a:
        task_id = await coordinator.submit(task_type="test")
        assign = await a.next("assign")
        beats = a.beats
        await wait_until(lambda: a.beats >= beats + 15, 10, "heartbeats")
        assert (await coordinator.task(task_id))["attempt"] == 1
        await a.result(assign)
        assert (await coordinator.wait_finished(task_id))["status"] == "completed"


# --- liveness and stalls: real processes ---------------------------------------------------


def _http(port: int) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=ADMIN_HEADERS, timeout=10)


@pytest.mark.slow
async def test_coordinator_stall_does_not_blame_a_healthy_node(
    spawn_coordinator: Spawn, spawn_client: Spawn, tmp_path: Path
) -> None:
    port = free_port()
    coord = spawn_coordinator(port, tmp_path / "data")
    http = _http(port)
    wait_for(lambda: _ok(http, "/health"), 20, "coordinator up")
    spawn_client("a", f"ws://127.0.0.1:{port}", MESH_FENCE_AFTER_S="30")
    wait_for(lambda: _ok(http, "/mesh/nodes") and _online(http, "a"), 20, "node a online")
    flag = tmp_path / "started"
    r = http.post("/tasks/submit", json={
        "task_type": "custom", "script": f"touch {flag}; sleep 8; echo attempt $MESH_ATTEMPT",
    })
    task_id = r.json()["task_id"]
    wait_for(flag.exists, 20, "task running")
    stopped = time.monotonic()
    os.kill(coord.pid, signal.SIGSTOP)
    try:
        await asyncio.to_thread(time.sleep, 5.0)  # past MESH_NODE_TIMEOUT_S=3
    finally:
        os.kill(coord.pid, signal.SIGCONT)
    log.warning("coordinator stopped for %.1fs", time.monotonic() - stopped)

    def finished() -> dict[str, Any] | None:
        doc: dict[str, Any] = http.get(f"/tasks/{task_id}").json()
        return doc if doc["status"] in ("completed", "failed", "cancelled") else None

    doc = await asyncio.to_thread(wait_for, finished, 30, "task finished")
    assert doc["status"] == "completed" and doc["attempt"] == 1 and doc["node"] == "a", doc
    assert doc["result"]["output"].strip() == "attempt 1"
    text = http.get("/metrics").text
    stalls = [ln for ln in text.splitlines() if ln.startswith("gpumesh_loop_stalls_total ")]
    assert stalls and float(stalls[0].split()[1]) >= 1, stalls
    lag = [ln for ln in text.splitlines() if ln.startswith("gpumesh_loop_lag_max_seconds ")]
    assert lag and float(lag[0].split()[1]) >= 4.0, lag
    http.close()


def _ok(http: httpx.Client, path: str) -> bool:
    try:
        return http.get(path).status_code == 200
    except httpx.HTTPError:
        return False


def _online(http: httpx.Client, name: str) -> bool:
    nodes = http.get("/mesh/nodes").json()["nodes"]
    return name in nodes and nodes[name]["status"] == "online"


@pytest.mark.slow
async def test_a_node_with_a_broken_work_dir_is_quarantined_then_back(
    settings: Settings, spawn_client: Spawn, tmp_path: Path
) -> None:
    custom = replace(settings, quarantine_probe_s=1.0)
    async with run_coordinator(custom) as live:
        spawn_client("bad", live.ws_url, MESH_PROBE_INTERVAL_S="0.5")
        await wait_until(lambda: "bad" in live.mesh.nodes and live.mesh.nodes["bad"].online,
                         20, "bad online")
        work = tmp_path / "work-bad"  # the client fixture's MESH_WORK_DIR for node "bad"
        shutil.rmtree(work, ignore_errors=True)
        work.write_text("not a directory")  # broken under the running node
        started = time.monotonic()
        ids = [await live.submit(task_type="custom", script=f"echo {i}") for i in range(6)]
        good = spawn_client("good", live.ws_url)
        for task_id in ids:
            doc = await live.wait_finished(task_id, 60)
            assert doc["status"] == "completed" and doc["node"] == "good", doc
        done = time.monotonic() - started
        bad = live.mesh.nodes["bad"]
        assert bad.unavailable, "the bad node must be out of placement"
        work.unlink()
        work.mkdir()
        fixed = time.monotonic()
        await wait_until(lambda: not bad.unavailable and "process" in bad.executors, 30,
                         "bad node healthy again, offering the process executor")
        log.warning("6 tasks done on the healthy node in %.2fs; bad node back %.2fs after "
                    "its dir was fixed", done, time.monotonic() - fixed)
        await asyncio.to_thread(good.stop)  # only the mended node is left to run it
        pinned = await live.submit(task_type="custom", script="echo back")
        doc = await live.wait_finished(pinned, 30)
        assert doc["status"] == "completed" and doc["node"] == "bad", doc


@pytest.mark.slow
async def test_a_node_that_starts_with_a_broken_work_dir_offers_process_once_mended(
    coordinator: LiveCoordinator, spawn_client: Spawn, tmp_path: Path
) -> None:
    """The executor is not dropped for good at start: the health probe offers it once the
    work dir is usable (a black hole the other way round: a node that never takes work)."""
    work = tmp_path / "work-late"  # the client fixture's MESH_WORK_DIR for node "late"
    work.write_text("not a directory")
    spawn_client("late", coordinator.ws_url, MESH_PROBE_INTERVAL_S="0.5")
    mesh = coordinator.mesh
    await wait_until(lambda: "late" in mesh.nodes and mesh.nodes["late"].online, 20, "online")
    node = mesh.nodes["late"]
    assert "process" not in node.executors or node.health, (node.executors, node.health)
    task_id = await coordinator.submit(task_type="custom", script="echo mended")
    work.unlink()
    work.mkdir()
    doc = await coordinator.wait_finished(task_id, 30)
    assert doc["status"] == "completed" and doc["node"] == "late", doc
    assert "process" in node.executors

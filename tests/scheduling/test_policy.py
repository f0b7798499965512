"""MESH_POLICY in the live coordinator (coordinator/scheduling/policy.py): a real coordinator,
a real client process with simulated GPUs (MESH_FAKE_GPUS), tasks served in the policy's order.
The simulator runs the same code (tests/sim/test_engine.py works a trace out by hand)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from typing import Any

import pytest

from coordinator.model import TaskState
from coordinator.settings import POLICIES, ConfigError, Settings
from tests.conftest import LiveCoordinator, Proc, run_coordinator, wait_until

Spawn = Callable[..., Proc]


def gpu_task(gpus: int, **more: Any) -> dict[str, Any]:
    return {"task_type": "test", "requirements": {"gpu_count": gpus}, "sleep_s": 0.05, **more}


async def online(coordinator: LiveCoordinator, name: str, gpus: int) -> None:
    def ready() -> bool:
        node = coordinator.mesh.nodes.get(name)
        return node is not None and node.online and len(node.gpus) == gpus

    await wait_until(ready, 20, f"node {name} online with {gpus} GPUs")


def test_mesh_policy_is_read_and_checked() -> None:
    assert Settings.from_env({}).policy == "priority"
    assert Settings.from_env({"MESH_POLICY": "FIFO"}).policy == "fifo"
    with pytest.raises(ConfigError, match="MESH_POLICY"):
        Settings.from_env({"MESH_POLICY": "sjf"})


@pytest.mark.parametrize("policy", POLICIES)
async def test_two_tasks_are_served_in_the_policys_order(
    settings: Settings, spawn_client: Spawn, policy: str
) -> None:
    """Low (priority 1) is submitted before high (priority 7), both queued before the one-GPU
    node joins: `priority` and `sef` (same estimates) serve high first; `fifo` and `backfill`
    serve in submission order."""
    async with run_coordinator(replace(settings, policy=policy)) as coordinator:
        r = await coordinator.http.post("/tasks/submit", json=[
            gpu_task(1, priority=1, name="low"), gpu_task(1, priority=7, name="high"),
        ])
        assert r.status_code == 200, r.text
        low, high = (t["task_id"] for t in r.json()["tasks"])
        spawn_client("g1", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
        docs = {i: await coordinator.wait_finished(i) for i in (low, high)}
        assert {d["status"] for d in docs.values()} == {"completed"}
        first, second = (high, low) if policy in ("priority", "sef") else (low, high)
        assert docs[first]["finished_at"] <= docs[second]["started_at"], docs


async def test_backfill_lets_by_only_what_cannot_delay_the_head(
    settings: Settings, spawn_client: Spawn
) -> None:
    """Two GPUs; `running` holds one (timeout_s 120: expected to let go by start + 120). The
    head `wide` wants both: reserved for then. `short` (timeout_s 10) ends before that and
    starts now; `long` (timeout_s 600) would hold the reserved GPU past it and waits for
    `wide`, with the reason saying so."""
    async with run_coordinator(replace(settings, policy="backfill")) as coordinator:
        spawn_client("g2", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
        await online(coordinator, "g2", 2)
        running = await coordinator.submit(**gpu_task(1, sleep_s=300, timeout_s=120))
        mesh = coordinator.mesh
        await wait_until(lambda: mesh.tasks[running].state is TaskState.RUNNING, 20, "running")
        r = await coordinator.http.post("/tasks/submit", json=[
            gpu_task(2, name="wide", timeout_s=5), gpu_task(1, name="long", timeout_s=600),
            gpu_task(1, name="short", timeout_s=10),
        ])
        wide, long, short = (t["task_id"] for t in r.json()["tasks"])
        assert (await coordinator.wait_finished(short))["status"] == "completed"
        held = await coordinator.task(long)
        assert (await coordinator.task(wide))["status"] == "queued"
        assert held["status"] == "queued" and "backfill" in held["reason"], held
        r = await coordinator.http.delete(f"/tasks/{running}")
        assert r.status_code == 200, r.text
        docs = {i: await coordinator.wait_finished(i) for i in (wide, long)}
        assert {d["status"] for d in docs.values()} == {"completed"}
        assert docs[wide]["finished_at"] <= docs[long]["started_at"], docs


async def test_sef_serves_the_shorter_estimate_first(
    settings: Settings, spawn_client: Spawn
) -> None:
    """Same priority; `long` (timeout_s 3600) submitted before `short` (timeout_s 60), both
    queued before the one-GPU node joins: `sef` serves short first."""
    async with run_coordinator(replace(settings, policy="sef")) as coordinator:
        r = await coordinator.http.post("/tasks/submit", json=[
            gpu_task(1, name="long", timeout_s=3600), gpu_task(1, name="short", timeout_s=60),
        ])
        long, short = (t["task_id"] for t in r.json()["tasks"])
        spawn_client("g1", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
        docs = {i: await coordinator.wait_finished(i) for i in (long, short)}
        assert {d["status"] for d in docs.values()} == {"completed"}
        assert docs[short]["finished_at"] <= docs[long]["started_at"], docs


async def test_fifo_holds_what_fits_behind_a_head_that_does_not_and_says_why(
    settings: Settings, spawn_client: Spawn
) -> None:
    """Two GPUs, one held by `running`. The head `wide` wants both; `small` would fit now but
    waits behind it, its reason naming the head; both run once `running` is cancelled."""
    async with run_coordinator(replace(settings, policy="fifo")) as coordinator:
        spawn_client("g2", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
        await online(coordinator, "g2", 2)
        running = await coordinator.submit(**gpu_task(1, sleep_s=300))
        mesh = coordinator.mesh
        await wait_until(lambda: mesh.tasks[running].state is TaskState.RUNNING, 20, "running")
        wide = await coordinator.submit(**gpu_task(2, name="wide"))
        small = await coordinator.submit(**gpu_task(1, name="small"))

        async def reason() -> str:
            doc = await coordinator.task(small)
            assert doc["status"] == "queued", doc
            return str(doc["reason"])

        await wait_until(lambda: mesh.tasks[small].state is TaskState.QUEUED
                         and f"behind task {wide}" in mesh.queued_reason(mesh.tasks[small]),
                         10, "small held behind wide")
        assert "MESH_POLICY=fifo" in await reason()
        r = await coordinator.http.delete(f"/tasks/{running}")
        assert r.status_code == 200, r.text
        docs = {i: await coordinator.wait_finished(i) for i in (wide, small)}
        assert {d["status"] for d in docs.values()} == {"completed"}
        assert docs[wide]["started_at"] <= docs[small]["started_at"], docs


@pytest.mark.parametrize("policy", ["fifo", "backfill"])
async def test_a_head_no_node_could_ever_run_holds_no_one_back(
    settings: Settings, spawn_client: Spawn, policy: str
) -> None:
    """First in the queue: a task for an H100 on a mesh of one A100 node. It waits, saying
    why; the task submitted after it runs."""
    async with run_coordinator(replace(settings, policy=policy)) as coordinator:
        spawn_client("g1", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
        await online(coordinator, "g1", 1)
        r = await coordinator.http.post("/tasks/submit", json=[
            {**gpu_task(1), "requirements": {"gpu_count": 1, "gpu_type": "H100"}},
            gpu_task(1, timeout_s=60),
        ])
        never, runs = (t["task_id"] for t in r.json()["tasks"])
        assert (await coordinator.wait_finished(runs))["status"] == "completed"
        doc = await coordinator.task(never)
        assert doc["status"] == "queued" and "holds no one back" in doc["reason"], doc

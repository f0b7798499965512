"""End to end: a real coordinator, real `python -m gpu_client` processes, real signals."""

from __future__ import annotations

import sqlite3
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import psutil
import pytest

from coordinator.settings import Settings
from tests.conftest import (
    ADMIN_HEADERS,
    LiveCoordinator,
    Proc,
    free_port,
    run_coordinator,
    wait_until,
)

Spawn = Callable[..., Proc]


async def online(live: LiveCoordinator, *names: str) -> None:
    await wait_until(
        lambda: all(n in live.mesh.nodes and live.mesh.nodes[n].online for n in names),
        20, f"nodes {names} online",
    )


async def test_submit_to_complete_on_two_nodes(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("a", coordinator.ws_url, MESH_SLOTS="1")
    spawn_client("b", coordinator.ws_url, MESH_SLOTS="1")
    await online(coordinator, "a", "b")
    slow = [
        await coordinator.submit(task_type="test", sleep_s=1.0, name=f"slow{i}") for i in range(2)
    ]
    script = await coordinator.submit(task_type="custom", script="echo from $MESH_TASK_ID")
    docs = [await coordinator.wait_finished(t) for t in [*slow, script]]
    assert [d["status"] for d in docs] == ["completed"] * 3
    assert {docs[0]["node"], docs[1]["node"]} == {"a", "b"}  # idle node preferred
    assert docs[0]["result"]["data"]["params"] == {"sleep_s": 1.0}
    assert docs[2]["result"]["output"].strip() == f"from {script}"
    status = (await coordinator.http.get("/mesh/status")).json()
    assert status["completed_tasks"] == 3 and status["nodes"]["a"]["status"] == "online"
    assert (await coordinator.http.get("/tasks/active")).json()["tasks"] == {}


async def test_failed_script_reports_exit_code_and_output(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("a", coordinator.ws_url)
    task_id = await coordinator.submit(
        task_type="custom", script="echo out; echo err >&2; exit 3"
    )
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "failed" and doc["result"]["exit_code"] == 3
    assert "out" in doc["result"]["output"] and "err" in doc["result"]["output"]
    assert "exit code 3" in doc["error"]


def _pid_alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_kill9_client_mid_task_finishes_on_the_other_exactly_once(
    coordinator: LiveCoordinator, spawn_client: Spawn, tmp_path: Path
) -> None:
    marks = tmp_path / "marks"
    marks.mkdir(mode=0o1777)
    marks.chmod(0o1777)  # a root client's tasks run as uids of their own
    a = spawn_client("a", coordinator.ws_url)
    await online(coordinator, "a")
    script = f'echo $$ > {marks}/pid.$MESH_ATTEMPT; sleep 2; echo done.$MESH_ATTEMPT'
    task_id = await coordinator.submit(task_type="custom", script=script)
    await wait_until(lambda: (marks / "pid.1").exists(), 20, "attempt 1 running on a")
    spawn_client("b", coordinator.ws_url)
    await online(coordinator, "b")
    a.kill9()
    doc = await coordinator.wait_finished(task_id, 30)
    assert doc["status"] == "completed", doc
    assert doc["node"] == "b" and doc["attempt"] == 2
    assert doc["result"]["output"].strip() == "done.2"
    assert coordinator.mesh.finished_counts["completed"] == 1
    # The client comes back: the old attempt is fenced off and its process stopped.
    orphan = int((marks / "pid.1").read_text())
    if _pid_alive(orphan):
        spawn_client("a", coordinator.ws_url)
        await wait_until(lambda: not _pid_alive(orphan), 20, "stale attempt stopped")
    assert (await coordinator.task(task_id))["attempt"] == 2


async def test_client_restart_readopts_its_running_process(
    settings: Settings, spawn_client: Spawn, tmp_path: Path
) -> None:
    async with run_coordinator(replace(settings, reconnect_grace_s=20)) as live:
        a = spawn_client("a", live.ws_url)
        await online(live, "a")
        flag = tmp_path / "started"
        task_id = await live.submit(
            task_type="custom", script=f"touch {flag}; sleep 2; echo survived"
        )
        await wait_until(flag.exists, 20, "task started")
        a.kill9()
        spawn_client("a", live.ws_url)
        doc = await live.wait_finished(task_id, 30)
        assert doc["status"] == "completed" and doc["attempt"] == 1, doc
        assert doc["result"]["output"].strip() == "survived"


async def test_cancel_running_kills_the_process_group(
    coordinator: LiveCoordinator, spawn_client: Spawn, tmp_path: Path
) -> None:
    spawn_client("a", coordinator.ws_url)
    pidfile = tmp_path / "pid"
    task_id = await coordinator.submit(
        task_type="custom", script=f"sleep 60 & echo $! > {pidfile}; wait"
    )
    await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 20, "running")
    child = int(pidfile.read_text())
    r = await coordinator.http.post(f"/tasks/{task_id}/cancel")
    assert r.json()["status"] == "cancelled"
    await wait_until(lambda: not _pid_alive(child), 20, "the task's child killed")
    assert not coordinator.mesh.nodes["a"].tasks


async def test_queued_gpu_task_runs_when_a_fitting_node_joins(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("cpu", coordinator.ws_url)
    await online(coordinator, "cpu")
    task_id = await coordinator.submit(
        task_type="test", requirements={"gpu_count": 1, "memory_gb": 40}
    )
    doc = await coordinator.task(task_id, wait=0.5)
    assert doc["status"] == "queued" and "fewer than 1 free GPU" in doc["reason"]
    spawn_client("gpu", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
    doc = await coordinator.wait_finished(task_id)
    assert doc["node"] == "gpu" and doc["gpu_indices"] == [0]
    gpus = doc["result"]["data"]["gpus"]
    assert gpus[0]["name"] == "A100" and gpus[0]["memory_total_mb"] == 80 * 1024


@pytest.mark.slow
async def test_kill9_coordinator_with_200_queued_all_complete_once(
    spawn_coordinator: Spawn, spawn_client: Spawn, tmp_path: Path
) -> None:
    port, data = free_port(), tmp_path / "data"
    url = f"http://127.0.0.1:{port}"
    coord = spawn_coordinator(port, data)
    async with httpx.AsyncClient(base_url=url, timeout=30, headers=ADMIN_HEADERS) as http:
        await wait_until(lambda: _healthy(http), 20, "coordinator up")
        spawn_client("a", f"ws://127.0.0.1:{port}", MESH_SLOTS="2")
        body = [{"task_type": "test", "sleep_s": 0.05, "name": f"t{i}"} for i in range(200)]
        ids = [t["task_id"] for t in (await http.post("/tasks/submit", json=body)).json()["tasks"]]
        await wait_until(lambda: _completed_at_least(http, 5), 20, "some tasks done")
        coord.kill9()
        spawn_coordinator(port, data)
        await wait_until(lambda: _healthy(http), 20, "coordinator back")
        spawn_client("b", f"ws://127.0.0.1:{port}", MESH_SLOTS="2")
        await wait_until(lambda: _completed_at_least(http, 200), 90, "all 200 completed")
        status = (await http.get("/mesh/status")).json()
        assert status["completed_tasks"] == 200 and status["queued_tasks"] == 0
    rows = sqlite3.connect(data / "mesh.sqlite3").execute(
        "SELECT id, state, attempt FROM tasks"
    ).fetchall()
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert {r[1] for r in rows} == {"completed"}


async def _healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.TransportError:
        return False


async def _completed_at_least(http: httpx.AsyncClient, n: int) -> bool:
    try:
        return int((await http.get("/mesh/status")).json()["completed_tasks"]) >= n
    except httpx.TransportError:
        return False


async def test_two_clients_never_run_one_task_twice_under_load(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("a", coordinator.ws_url)
    spawn_client("b", coordinator.ws_url)
    await online(coordinator, "a", "b")
    r = await coordinator.http.post("/tasks/submit", json=[{"task_type": "test"}] * 300)
    ids = [t["task_id"] for t in r.json()["tasks"]]
    await wait_until(
        lambda: coordinator.mesh.finished_counts["completed"] == 300, 60, "300 completed"
    )
    nodes = {coordinator.mesh.finished[i].node for i in ids}
    assert nodes == {"a", "b"}
    assert all(coordinator.mesh.finished[i].attempt == 1 for i in ids)

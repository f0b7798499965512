"""End to end with Docker: a real coordinator, real `python -m gpu_client` processes, real
containers of the locally built busybox image, and `kill -9` of a client mid-task."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import docker
import pytest

from coordinator.settings import Settings
from tests.conftest import LiveCoordinator, Proc, run_coordinator, wait_until
from tests.docker_images import busybox_image, requires_docker

pytestmark = requires_docker()

Spawn = Callable[..., Proc]
DOCKER = {"MESH_EXECUTORS": "process,docker"}


@pytest.fixture
def names() -> Iterator[Callable[[str], str]]:
    """Node names no other test (or engineer) uses; their containers are removed after."""
    used: list[str] = []
    suffix = uuid.uuid4().hex[:6]

    def name(base: str) -> str:
        used.append(f"{base}-{suffix}")
        return used[-1]

    yield name
    client = docker.from_env()
    try:
        for node in used:
            for c in client.containers.list(all=True, filters={"label": f"gpumesh.node={node}"}):
                c.remove(force=True)
    finally:
        client.close()


def containers(node: str, task_id: str | None = None) -> list[Any]:
    labels = [f"gpumesh.node={node}"] + ([f"gpumesh.task_id={task_id}"] if task_id else [])
    client = docker.from_env()
    try:
        found: list[Any] = client.containers.list(
            all=True, filters={"label": labels}, sparse=True
        )
        return found
    finally:
        client.close()


def running(node: str, task_id: str) -> bool:
    return any(c.status == "running" for c in containers(node, task_id))


async def online(live: LiveCoordinator, *names: str) -> None:
    await wait_until(
        lambda: all(n in live.mesh.nodes and live.mesh.nodes[n].online for n in names),
        20, f"nodes {names} online",
    )


async def submit_box(live: LiveCoordinator, **body: Any) -> str:
    return await live.submit(task_type="custom", image=busybox_image(), **body)


async def test_docker_task_output_streams_to_the_logs_endpoint_while_it_runs(
    coordinator: LiveCoordinator, spawn_client: Spawn, names: Callable[[str], str],
    tmp_path: Path,
) -> None:
    a = names("a")
    # Bind mounts are refused unless the node allows their host path (node policy).
    spawn_client(a, coordinator.ws_url, **DOCKER, MESH_ALLOWED_VOLUMES=str(tmp_path))
    await online(coordinator, a)
    assert coordinator.mesh.nodes[a].executors >= {"docker", "process"}
    task_id = await submit_box(
        coordinator, volumes=[f"{tmp_path}:/x"], env={"WHO": "box"},
        script="echo first $WHO $MESH_TASK_ID; until [ -e /x/go ]; do sleep 0.05; done; "
               "echo second; exit 4",
    )
    # The endpoint follows a task once it has output (before that it answers at once).
    await wait_until(lambda: _logs_have(coordinator, task_id, "first"), 20, "first output")
    assert (await coordinator.task(task_id))["status"] == "running"
    seen = ""
    async with coordinator.http.stream(
        "GET", f"/tasks/{task_id}/logs", params={"follow": "true"}, timeout=30
    ) as r:
        assert r.status_code == 200
        async for chunk in r.aiter_text():
            seen += chunk
            if "first" in seen and not (tmp_path / "go").exists():
                assert (await coordinator.task(task_id))["status"] == "running"
                (tmp_path / "go").touch()  # it goes on only once its output has arrived
    assert seen == f"first box {task_id}\nsecond\n"
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "failed" and doc["result"]["exit_code"] == 4
    assert doc["error"] == "exit code 4" and doc["node"] == a
    assert doc["result"]["output"] == seen
    after = await coordinator.http.get(f"/tasks/{task_id}/logs")
    assert after.text == seen
    await wait_until(lambda: not containers(a, task_id), 20, "the acked container removed")


async def _logs_have(live: LiveCoordinator, task_id: str, needle: str) -> bool:
    return needle in (await live.http.get(f"/tasks/{task_id}/logs")).text


async def test_missing_image_fails_with_the_reason_and_cancel_stops_the_container(
    coordinator: LiveCoordinator, spawn_client: Spawn, names: Callable[[str], str]
) -> None:
    a = names("a")
    spawn_client(a, coordinator.ws_url, **DOCKER)
    await online(coordinator, a)
    missing = await coordinator.submit(task_type="custom", image="gpumesh-nope:1", script="true")
    doc = await coordinator.wait_finished(missing)
    assert doc["status"] == "failed"
    assert doc["error"].startswith(f"image gpumesh-nope:1 not found on node {a}; pulling it")
    task_id = await submit_box(coordinator, script="sleep 60")
    await wait_until(lambda: running(a, task_id), 20, "the container running")
    r = await coordinator.http.post(f"/tasks/{task_id}/cancel")
    assert r.json()["status"] == "cancelled"
    await wait_until(lambda: not containers(a, task_id), 20, "the cancelled container removed")


async def test_node_without_a_reachable_docker_does_not_offer_it(
    coordinator: LiveCoordinator, spawn_client: Spawn, names: Callable[[str], str],
    tmp_path: Path,
) -> None:
    a = names("nodocker")
    proc = spawn_client(a, coordinator.ws_url, DOCKER_HOST=f"unix://{tmp_path}/dead.sock",
                        **DOCKER)
    await online(coordinator, a)
    assert coordinator.mesh.nodes[a].executors == {"builtin", "process"}
    task_id = await submit_box(coordinator, script="true")
    doc = await coordinator.task(task_id, wait=0.5)
    assert doc["status"] == "queued"  # no node offers docker: it waits, it does not fail
    assert "executor off" in proc.output() and "dead.sock" in proc.output()


async def test_client_kill9_readopts_its_container_and_finishes_the_same_attempt(
    settings: Settings, spawn_client: Spawn, names: Callable[[str], str], tmp_path: Path
) -> None:
    a = names("a")
    async with run_coordinator(replace(settings, reconnect_grace_s=20)) as live:
        allowed = {**DOCKER, "MESH_ALLOWED_VOLUMES": str(tmp_path)}  # node policy
        first = spawn_client(a, live.ws_url, **allowed)
        await online(live, a)
        task_id = await submit_box(
            live, volumes=[f"{tmp_path}:/x"],
            script="echo before; until [ -e /x/go ]; do sleep 0.05; done; echo survived",
        )
        await wait_until(lambda: running(a, task_id), 20, "the container running")
        first.kill9()
        assert running(a, task_id)  # the container outlives its client
        spawn_client(a, live.ws_url, **allowed)
        await wait_until(lambda: live.mesh.nodes[a].epoch >= 2 and live.mesh.nodes[a].online,
                         20, "the client back")
        (tmp_path / "go").touch()
        doc = await live.wait_finished(task_id, 30)
        assert doc["status"] == "completed" and doc["attempt"] == 1, doc
        assert doc["result"]["output"] == "before\nsurvived\n"
        await wait_until(lambda: not containers(a, task_id), 20, "the acked container removed")


async def test_fenced_attempt_s_container_is_stopped_and_removed(
    coordinator: LiveCoordinator, spawn_client: Spawn, names: Callable[[str], str]
) -> None:
    a, b = names("a"), names("b")
    first = spawn_client(a, coordinator.ws_url, **DOCKER)
    await online(coordinator, a)
    task_id = await submit_box(
        coordinator, script='if [ "$MESH_ATTEMPT" = 1 ]; then sleep 60; fi; echo $MESH_NODE',
    )
    await wait_until(lambda: running(a, task_id), 20, "attempt 1 running on a")
    spawn_client(b, coordinator.ws_url, **DOCKER)
    await online(coordinator, b)
    first.kill9()  # the reconnect grace (1.5 s) runs out: the task moves to b as attempt 2
    doc = await coordinator.wait_finished(task_id, 30)
    assert (doc["status"], doc["node"], doc["attempt"]) == ("completed", b, 2), doc
    assert doc["result"]["output"] == f"{b}\n"
    assert running(a, task_id)  # attempt 1 still runs: nobody has told a yet
    spawn_client(a, coordinator.ws_url, **DOCKER)  # register reports it; the answer is stop
    await wait_until(lambda: not containers(a, task_id), 20, "the fenced container removed")
    assert (await coordinator.task(task_id))["attempt"] == 2
    assert coordinator.mesh.finished_counts["completed"] == 1

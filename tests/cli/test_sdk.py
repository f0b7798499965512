"""The Python SDK (gpumesh/sdk.py) against a real coordinator and real client processes, sync
and async; node drain and undrain, and a drain surviving a coordinator restart."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path

import httpx
import pytest

from coordinator.settings import Settings
from gpumesh.sdk import AsyncClient, Client, MeshError, MeshUnreachable
from tests.conftest import (
    TEST_ADMIN_TOKEN,
    LiveCoordinator,
    Proc,
    admin_token,
    free_port,
    run_coordinator,
    wait_until,
)

Spawn = Callable[..., Proc]


async def _online(live: LiveCoordinator, *names: str) -> None:
    await wait_until(
        lambda: all(n in live.mesh.nodes and live.mesh.nodes[n].online for n in names),
        20, f"nodes {names} online",
    )


def _sync(live: LiveCoordinator) -> Client:
    return Client(live.url, admin_token(live.settings))


async def test_sync_client_submits_waits_lists_and_reads_nodes(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("n1", coordinator.ws_url, MESH_FAKE_GPUS="2xA100-80GB", GPU_ENABLED="true")
    await _online(coordinator, "n1")

    def drive() -> None:  # blocking calls: in a thread, the coordinator runs on this loop
        with _sync(coordinator) as mesh:
            sub = mesh.submit(task_type="test", name="hello", priority=7)
            done = mesh.wait(sub.task_id, timeout=30)
            assert done.finished and done.status == "completed", done
            assert (done.name, done.priority, done.node) == ("hello", 7, "n1")
            assert mesh.get(sub.task_id).status == "completed"
            many = mesh.submit_many([{"task_type": "test"}, {"task_type": "test"}])
            assert len(many) == 2
            for s in many:
                assert mesh.wait(s.task_id, 30).status == "completed"
            listed = mesh.tasks(state="completed", limit=10)
            assert {sub.task_id, *(s.task_id for s in many)} <= {
                t.task_id for t in listed.tasks}
            assert mesh.tasks(state="completed", node="nope").tasks == []
            nodes = {n.name: n for n in mesh.nodes()}
            assert nodes["n1"].status == "online" and nodes["n1"].gpu_count == 2
            assert [g.memory_total_mb for g in nodes["n1"].gpus] == [80 * 1024] * 2
            assert mesh.status().completed_tasks == 3

    await asyncio.to_thread(drive)


async def test_async_client_errors_carry_the_server_reason(
    coordinator: LiveCoordinator,
) -> None:
    async with AsyncClient(coordinator.url, admin_token(coordinator.settings)) as mesh:
        with pytest.raises(MeshError) as bad:
            await mesh.submit(task_type="no-such-type")
        assert bad.value.status == 422 and bad.value.error == "invalid task"
        assert "task_type" in bad.value.reason
        with pytest.raises(MeshError) as missing:
            await mesh.get("0" * 32)
        assert (missing.value.status, missing.value.error) == (404, "unknown task")
        # No node joined: the task waits, and says why; cancelling ends it.
        sub = await mesh.submit(task_type="test", requirements={"gpu_count": 4})
        queued = await mesh.wait(sub.task_id, timeout=0.2)
        assert queued.status == "queued" and not queued.finished
        assert "no node" in queued.reason
        page = await mesh.tasks(state="queued")
        assert [t.task_id for t in page.tasks] == [sub.task_id]
        assert (await mesh.cancel(sub.task_id)).status == "cancelled"
        with pytest.raises(MeshError) as again:
            await mesh.cancel(sub.task_id)
        assert again.value.status == 409 and "already" in again.value.reason
    async with AsyncClient(coordinator.url, "gm_not-a-token") as stranger:
        with pytest.raises(MeshError) as refused:
            await stranger.nodes()
        assert refused.value.status == 401


async def test_async_logs_follow_a_running_task_to_its_end(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("n1", coordinator.ws_url)
    await _online(coordinator, "n1")
    script = "for i in 1 2 3 4; do echo line$i; sleep 0.3; done"
    async with AsyncClient(coordinator.url, admin_token(coordinator.settings)) as mesh:
        sub = await mesh.submit(task_type="custom", script=script)
        lines = [line async for line in mesh.logs(sub.task_id, follow=True)]
        assert lines == ["line1", "line2", "line3", "line4"]
        assert (await mesh.get(sub.task_id)).status == "completed"  # it ended with the task
        again = [line async for line in mesh.logs(sub.task_id)]
        assert again == lines


async def test_a_url_list_skips_a_coordinator_that_does_not_answer(
    coordinator: LiveCoordinator,
) -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    async with AsyncClient(f"{dead}, {coordinator.url}", admin_token(coordinator.settings)
                           ) as mesh:
        assert (await mesh.status()).total_nodes == 0
        assert mesh.url == coordinator.url  # asked first from now on
        sub = await mesh.submit(task_type="test", requirements={"gpu_count": 1})
        assert [line async for line in mesh.logs(sub.task_id)] == []
    with pytest.raises(MeshUnreachable) as both, Client(f"{dead},{dead}/") as mesh2:
        mesh2.nodes()
    assert both.value.error == f"cannot reach {dead}"  # the same one twice: listed once


async def test_unreachable_coordinator_is_a_connection_error() -> None:
    url = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(MeshUnreachable) as sync_err, Client(url, "t") as mesh:
        mesh.nodes()
    assert isinstance(sync_err.value, ConnectionError) and sync_err.value.status == 0
    assert url in str(sync_err.value)
    async with AsyncClient(url, "t") as amesh:
        with pytest.raises(ConnectionError):
            await amesh.status()


async def test_drain_finishes_running_work_and_takes_no_more(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    client = spawn_client("n1", coordinator.ws_url)
    await _online(coordinator, "n1")
    async with AsyncClient(coordinator.url, admin_token(coordinator.settings)) as mesh:
        long = await mesh.submit(task_type="custom", script="sleep 1.5; echo done")
        await wait_until(lambda: coordinator.mesh.tasks[long.task_id].state == "running", 20,
                         "the long task running")
        state = await mesh.drain("n1", "kernel upgrade")
        assert state.draining and state.status == "draining" and state.active_tasks == 1
        assert state.drain is not None and state.drain.reason == "kernel upgrade"
        new = await mesh.submit(task_type="test")
        done = await mesh.wait(long.task_id, 30)
        assert done.status == "completed" and done.node == "n1"  # running work finishes
        queued = await mesh.wait(new.task_id, 0.5)
        assert queued.status == "queued" and "draining" in queued.reason, queued
        nodes = {n.name: n for n in await mesh.nodes()}
        assert nodes["n1"].status == "drained"
        assert nodes["n1"].drain is not None and nodes["n1"].drain.reason == "kernel upgrade"
        status = await mesh.status()
        assert status.nodes["n1"]["status"] == "drained"
        await wait_until(lambda: "draining: kernel upgrade" in client.output(), 10,
                         "the client logging its drain")
        lifted = await mesh.undrain("n1")
        assert not lifted.draining and lifted.status == "online"
        ran = await mesh.wait(new.task_id, 30)
        # The node hears "lifted" before any assign: the queued task runs on its first
        # attempt, with no false "node draining" refusal charged to the node.
        assert ran.status == "completed" and ran.attempt == 1, ran
        assert "node draining" not in client.output()
        await wait_until(lambda: "drain lifted" in client.output(), 10, "the client told")
        audit = (await coordinator.http.get("/admin/audit")).json()["records"]
        assert [r["action"] for r in audit if r["action"].startswith("node.")][-2:] == [
            "node.drain", "node.undrain"]
        with pytest.raises(MeshError) as unknown:
            await mesh.drain("no-such-node")
        assert unknown.value.status == 404


async def test_drain_needs_an_admin(coordinator: LiveCoordinator, spawn_client: Spawn) -> None:
    spawn_client("n1", coordinator.ws_url)
    await _online(coordinator, "n1")
    r = await coordinator.http.post("/admin/tokens", json={"tenant": "t", "role": "submit"})
    async with AsyncClient(coordinator.url, r.json()["token"]) as tenant:
        with pytest.raises(MeshError) as refused:
            await tenant.drain("n1")
    assert refused.value.status == 403
    assert coordinator.mesh.nodes["n1"].drain is None


async def test_drain_survives_a_coordinator_restart_and_the_node_reconnecting(
    spawn_coordinator: Spawn, spawn_client: Spawn, tmp_path: Path
) -> None:
    port, data = free_port(), tmp_path / "mesh-data"
    url = f"http://127.0.0.1:{port}"
    coord = spawn_coordinator(port, data)
    async with AsyncClient(url, TEST_ADMIN_TOKEN) as mesh:

        async def node_status() -> str:
            try:
                nodes = {n.name: n for n in await mesh.nodes()}
            except (MeshError, httpx.HTTPError):
                return ""
            return nodes["n1"].status if "n1" in nodes else ""

        client = spawn_client("n1", f"ws://127.0.0.1:{port}")
        await wait_until(lambda: node_status(), 30, "n1 joined")
        await mesh.drain("n1", "disk swap")
        # The `drain` frame may leave after the HTTP reply (best effort; the durable mark and the
        # re-send on register are the guarantee): a kill -9 right after the reply can beat it
        # on a busy machine. Wait for the first telling, so that the second below can only be
        # the re-send on re-register.
        await wait_until(lambda: "draining: disk swap" in client.output(), 10, "client told")
        coord.kill9()
        coord = spawn_coordinator(port, data)
        await wait_until(lambda: _is(node_status(), "drained"), 30, "n1 back, still drained")
        sub = await mesh.submit(task_type="test")
        queued = await mesh.wait(sub.task_id, 0.5)
        assert queued.status == "queued" and "draining" in queued.reason, queued
        await wait_until(lambda: client.output().count("draining: disk swap") >= 2, 10,
                         "the client told again after it re-registered")
        await mesh.undrain("n1")
        assert (await mesh.wait(sub.task_id, 30)).status == "completed"
        coord.stop()
        coord = spawn_coordinator(port, data)  # the undrain is durable too
        await wait_until(lambda: _is(node_status(), "online"), 30, "n1 back, online")


async def _is(value: object, want: str) -> bool:
    got = await value if asyncio.iscoroutine(value) else value
    return got == want


async def test_wait_fits_a_server_whose_long_poll_is_shorter(settings: Settings) -> None:
    async with run_coordinator(replace(settings, max_wait_s=0.5)) as live:
        async with AsyncClient(live.url, admin_token(live.settings)) as mesh:
            sub = await mesh.submit(task_type="test", requirements={"gpu_count": 4})
            t = await mesh.wait(sub.task_id, timeout=1.2)  # polls of 0.5 s, not a 400
            assert t.status == "queued" and not t.finished


async def test_drain_refuses_bad_bodies_with_reasons(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("n1", coordinator.ws_url)
    await _online(coordinator, "n1")
    http, path = coordinator.http, "/mesh/nodes/n1/drain"
    big = await http.post(path, json={"reason": "x" * 20_000})
    assert big.status_code == 413 and big.json()["error"] == "body too large"
    bad = await http.post(path, content=b"{nope", headers={"Content-Type": "application/json"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid JSON"
    odd = await http.post(path, json={"reason": 7})
    assert odd.status_code == 422 and "`reason`" in odd.json()["reason"]
    assert coordinator.mesh.drains == {}  # nothing refused changed anything
    long = await http.post(path, json={"reason": "y" * 600})
    assert long.status_code == 200 and long.json()["drain"]["reason"] == "y" * 512

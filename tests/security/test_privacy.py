"""Tenant privacy (issue 25, item 5): a caller who is not an admin never sees another tenant's
task ids, name, counts or usage: not on nodes, in `/mesh/status`, in `/metrics`, in a task
list, nor in free text (quarantine and queued reasons, a preempted task's history).

Two tenants' `submit` tokens (alice, bob), a `read` token (carol), a `metrics` token, and the
admin token, against a real coordinator with a real client process running both tenants'
work; where a node must lie (its errors name a task), a hand-driven WebSocket node.
"""

from __future__ import annotations

import asyncio
import json
import re
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

from coordinator.model import ACTIVE
from coordinator.settings import Settings
from tests.conftest import LiveCoordinator, Proc, run_coordinator, wait_until

Spawn = Callable[..., Proc]
SEED_NODE_FIELDS = ("gpu_count", "gpu_type", "gpu_memory", "status", "active_tasks",
                    "completed_tasks")


def gpu_task(sleep_s: float, **more: Any) -> dict[str, Any]:
    return {"task_type": "test", "requirements": {"gpu_count": 1}, "sleep_s": sleep_s, **more}


def spellings(task_id: str) -> list[str]:
    """The ways a task id could be written into text: as is, upper case, with a UUID's dashes."""
    dashed = str(uuid.UUID(hex=task_id))
    return [task_id, task_id.upper(), dashed, dashed.upper()]


def leaks(text: str, task_ids: list[str], names: tuple[str, ...] = ()) -> list[str]:
    """What of `task_ids` (any spelling) and `names` occurs in `text`."""
    found = [s for i in task_ids for s in spellings(i) if s in text]
    return found + [n for n in names if re.search(rf"\b{re.escape(n)}\b", text)]


@asynccontextmanager
async def callers(live: LiveCoordinator) -> AsyncIterator[dict[str, httpx.AsyncClient]]:
    """An httpx client per caller: alice and bob (submit), carol (read), scraper (metrics),
    admin (the coordinator's own admin token)."""
    kinds = {"alice": ("alice", "submit"), "bob": ("bob", "submit"), "carol": ("carol", "read"),
             "scraper": ("monitoring", "metrics")}
    clients = {"admin": live.http}
    try:
        for who, (tenant, role) in kinds.items():
            r = await live.http.post("/admin/tokens", json={"tenant": tenant, "role": role})
            assert r.status_code == 200, r.text
            clients[who] = httpx.AsyncClient(
                base_url=live.url, timeout=30,
                headers={"Authorization": f"Bearer {r.json()['token']}"})
        yield clients
    finally:
        for who, c in clients.items():
            if who != "admin":
                await c.aclose()


async def submit(c: httpx.AsyncClient, **body: Any) -> str:
    r = await c.post("/tasks/submit", json=body)
    assert r.status_code == 200, r.text
    task_id: str = r.json()["task_id"]
    return task_id


async def get(c: httpx.AsyncClient, path: str, **params: Any) -> tuple[Any, str]:
    r = await c.get(path, params=params)
    assert r.status_code == 200, (path, r.status_code, r.text)
    return (r.json() if "json" in r.headers["content-type"] else None), r.text


async def online(live: LiveCoordinator, name: str, gpus: int) -> None:
    def ready() -> bool:
        node = live.mesh.nodes.get(name)
        return node is not None and node.online and len(node.gpus) == gpus

    await wait_until(ready, 20, f"node {name} online with {gpus} GPUs")


# --- nodes, status, task lists ----------------------------------------------------------------


async def test_a_tenant_sees_only_its_own_task_ids_on_nodes_and_only_its_own_usage(
    settings: Settings, spawn_client: Spawn
) -> None:
    async with run_coordinator(settings) as live, callers(live) as c:
        spawn_client("g2", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
        await online(live, "g2", 2)
        mesh = live.mesh
        # GPU-seconds for both tenants (a finished GPU task each), then one running each
        done = [await submit(c["alice"], **gpu_task(0.2, name="alice-secret-job")),
                await submit(c["bob"], **gpu_task(0.2))]
        await wait_until(lambda: all(i in mesh.finished for i in done), 20, "short tasks done")
        a_run = await submit(c["alice"], **gpu_task(60, name="alice-secret-job"))
        b_run = await submit(c["bob"], **gpu_task(60))
        await wait_until(lambda: all(mesh.tasks[i].state in ACTIVE and mesh.tasks[i].node
                                     for i in (a_run, b_run)), 20, "both running on g2")
        alice_ids = [done[0], a_run]

        # bob: his own running task on g2, alice's only as a count
        for path in ("/mesh/nodes", "/mesh/nodes/g2"):
            doc, text = await get(c["bob"], path)
            g2 = doc["nodes"]["g2"] if path == "/mesh/nodes" else doc
            assert g2["tasks"] == [b_run], g2["tasks"]
            assert g2["active_tasks"] == 2 and g2["completed_tasks"] == 2
            assert not leaks(text, alice_ids, ("alice", "alice-secret-job")), path
        doc, text = await get(c["bob"], "/mesh/status")
        assert all(k in doc["nodes"]["g2"] for k in SEED_NODE_FIELDS), doc["nodes"]["g2"]
        assert doc["nodes"]["g2"]["active_tasks"] == 2 and doc["active_tasks"] == 2
        assert doc["completed_tasks"] == 2  # global counts stay public
        assert set(doc["fairness"]["gpu_seconds_by_tenant"]) == {"bob"}, doc["fairness"]
        assert set(doc["fairness"]["weights"]) <= {"bob"}, doc["fairness"]
        assert doc["fairness"]["jain_index"] is not None  # an index over all: anonymous
        assert not leaks(text, alice_ids, ("alice",)), "/mesh/status"
        doc, text = await get(c["bob"], "/tasks/active")
        assert set(doc["tasks"]) == {b_run} and not leaks(text, alice_ids, ("alice",))
        doc, text = await get(c["bob"], "/tasks/completed", tenant="alice")
        assert set(doc["tasks"]) == {done[1]} and not leaks(text, alice_ids, ("alice",))
        for i in alice_ids:
            assert (await c["bob"].get(f"/tasks/{i}")).status_code == 404
            assert (await c["bob"].get(f"/tasks/{i}", params={"wait": "0.1"})).status_code == 404
            assert (await c["bob"].get(f"/tasks/{i}/logs")).status_code == 404

        # carol (read, a third tenant): no task ids at all, the same counts
        doc, text = await get(c["carol"], "/mesh/nodes")
        assert doc["nodes"]["g2"]["tasks"] == [] and doc["nodes"]["g2"]["active_tasks"] == 2
        assert not leaks(text, alice_ids + [b_run, done[1]], ("alice", "bob"))
        doc, text = await get(c["carol"], "/mesh/status")
        assert doc["fairness"]["gpu_seconds_by_tenant"] == {}
        assert not leaks(text, alice_ids + [b_run, done[1]], ("alice", "bob"))

        # alice sees hers; the admin sees everyone's
        doc, _ = await get(c["alice"], "/mesh/nodes/g2")
        assert doc["tasks"] == [a_run]
        doc, _ = await get(c["admin"], "/mesh/nodes/g2")
        assert doc["tasks"] == sorted([a_run, b_run])
        doc, _ = await get(c["admin"], "/mesh/status")
        assert set(doc["fairness"]["gpu_seconds_by_tenant"]) == {"alice", "bob"}

        for i in (a_run, b_run):
            assert (await c["admin"].post(f"/tasks/{i}/cancel")).status_code == 200


async def test_per_tenant_metrics_need_an_admin_or_a_metrics_token(
    settings: Settings, spawn_client: Spawn, tmp_path: Path
) -> None:
    scrape_file = tmp_path / "metrics" / "token"  # as the monitoring profile's Prometheus has
    async with run_coordinator(replace(settings, metrics_token_file=scrape_file)) as live, \
            callers(live) as c:
        spawn_client("g1", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
        await online(live, "g1", 1)
        ran = await submit(c["alice"], **gpu_task(0.1))
        await wait_until(lambda: ran in live.mesh.finished, 20, "alice's task done")
        held = await submit(c["alice"], **gpu_task(0.1, requirements={"gpu_count": 8}))
        bob_held = await submit(c["bob"], **gpu_task(0.1, requirements={"gpu_count": 8}))
        wanted = 'gpumesh_tenant_queued{tenant="alice"} 1.0'

        for who in ("bob", "carol"):
            _, text = await get(c[who], "/metrics")
            assert "tenant=" not in text and not leaks(text, [ran, held], ("alice", "bob")), who
            for series in ("gpumesh_tasks{", "gpumesh_queue_depth{", "gpumesh_preemptions_total",
                           "gpumesh_fairness_weighted_jain", "gpumesh_tasks_finished_total{"):
                assert series in text, (who, series)  # global counts stay public to read
        scraper = httpx.AsyncClient(base_url=live.url, headers={
            "Authorization": f"Bearer {scrape_file.read_text().strip()}"})
        async with scraper:
            for who, client in (("admin", c["admin"]), ("scraper", c["scraper"]),
                                ("profile's file", scraper)):
                _, text = await get(client, "/metrics")
                assert wanted in text, who
                assert 'gpumesh_tenant_usage_gpu_seconds{tenant="alice"}' in text, who
        # the metrics role is a scraper's: it reads, it does not submit nor administer, and
        # it is not an admin anywhere else
        assert (await c["scraper"].post("/tasks/submit", json={"task_type": "test"})
                ).status_code == 403
        assert (await c["scraper"].get("/admin/tenants")).status_code == 403
        _, text = await get(c["scraper"], "/tasks/active")
        assert not leaks(text, [held, bob_held], ("alice", "bob"))
        _, text = await get(c["scraper"], "/mesh/status")
        assert not leaks(text, [held, bob_held], ("alice", "bob"))
        for i in (held, bob_held):
            assert (await c["admin"].post(f"/tasks/{i}/cancel")).status_code == 200


# --- free text: quarantine reasons, queued reasons, a preempted task's history ---------------


class LyingNode:
    """A hand-driven node whose infrastructure errors name the task they are about (as a
    container name or a cgroup path would), in every spelling of its id."""

    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self.assigns: asyncio.Queue[dict[str, Any]] = asyncio.Queue()

    async def read(self) -> None:
        async for raw in self.ws:
            doc = json.loads(raw)
            if doc["type"] == "assign":
                await self.assigns.put(doc)

    async def beat(self) -> None:
        while True:
            await self.ws.send(json.dumps({"type": "heartbeat", "running": [], "gpus": []}))
            await asyncio.sleep(0.25)

    async def fail(self, assign: dict[str, Any]) -> None:
        tid, key = assign["task_id"], {"task_id": assign["task_id"],
                                       "attempt": assign["attempt"]}
        error = (f"container gpumesh-{tid} died; cgroup /sys/fs/cgroup/gpumesh/"
                 f"{uuid.UUID(hex=tid)} is gone (TASK {tid.upper()})")
        await self.ws.send(json.dumps({"type": "task_accepted", **key}))
        await self.ws.send(json.dumps({"type": "task_result", **key, "status": "failed",
                                       "infra": True, "error": error, "result": {}}))


@asynccontextmanager
async def lying_node(live: LiveCoordinator, name: str) -> AsyncIterator[LyingNode]:
    async with connect(f"{live.ws_url}/ws/{name}") as ws:
        await ws.send(json.dumps({"type": "register", "executors": ["builtin"], "cpu_count": 2,
                                  "slots": 2, "gpus": [], "labels": {"pool": "liar"},
                                  "token": live.settings.token}))
        assert json.loads(await ws.recv())["type"] == "registered"
        node = LyingNode(ws)
        tasks = [asyncio.create_task(node.read()), asyncio.create_task(node.beat())]
        try:
            yield node
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)


async def test_quarantine_and_queued_reasons_never_name_another_tenants_task(
    settings: Settings,
) -> None:
    tuned = replace(settings, quarantine_errors=2, quarantine_probe_s=3600)
    async with run_coordinator(tuned) as live, callers(live) as c, \
            lying_node(live, "liar") as liar:
        pinned = {"task_type": "test", "requirements": {"labels": {"pool": "liar"}}}
        a_task = await submit(c["alice"], **pinned)
        for _ in range(2):  # two node faults on alice's task: the node is quarantined
            await liar.fail(await asyncio.wait_for(liar.assigns.get(), 10))
        await wait_until(lambda: live.mesh.nodes["liar"].quarantine_reason, 10, "quarantine")
        b_task = await submit(c["bob"], **pinned)  # waits: only the quarantined node fits

        for path in ("/mesh/nodes", "/mesh/nodes/liar", "/mesh/status"):
            doc, text = await get(c["bob"], path)
            node = doc if path == "/mesh/nodes/liar" else doc["nodes"]["liar"]
            assert node["quarantined"] and "a task" in node["quarantine_reason"], node
            assert not leaks(text, [a_task], ("alice",)), (path, node["quarantine_reason"])
        for path, params in ((f"/tasks/{b_task}", {}), (f"/tasks/{b_task}", {"wait": "0.2"}),
                             ("/tasks/active", {})):
            doc, text = await get(c["bob"], path, **params)
            view = doc if "task_id" in doc else doc["tasks"][b_task]
            assert view["status"] == "queued" and "quarantined" in view["reason"], view
            assert not leaks(text, [a_task], ("alice",)), (path, view["reason"])
        doc, text = await get(c["carol"], "/mesh/nodes")
        assert not leaks(text, [a_task], ("alice",))

        # an admin sees what the node said, the id included
        doc, _ = await get(c["admin"], "/mesh/nodes/liar")
        assert a_task in doc["quarantine_reason"], doc["quarantine_reason"]
        doc, _ = await get(c["admin"], f"/tasks/{b_task}")
        assert a_task in doc["reason"], doc["reason"]
        for i in (a_task, b_task):
            assert (await c["admin"].post(f"/tasks/{i}/cancel")).status_code == 200


async def test_a_preempted_task_does_not_learn_the_critical_tasks_id(
    settings: Settings, spawn_client: Spawn
) -> None:
    tuned = replace(settings, preemption=True, preempt_grace_s=0.5)
    async with run_coordinator(tuned) as live, callers(live) as c:
        spawn_client("g1", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
        await online(live, "g1", 1)
        low = await submit(c["bob"], **gpu_task(1.0, priority=1))
        await wait_until(lambda: live.mesh.tasks[low].started_at, 20, "bob's task running")
        crit = await submit(c["alice"], **gpu_task(0.1, priority=9))
        await wait_until(lambda: crit in live.mesh.finished and low in live.mesh.finished, 30,
                         "both finished")
        r = await c["bob"].get(f"/tasks/{low}")
        doc = r.json()
        assert doc["status"] == "completed" and doc["attempt"] == 2, doc
        assert "preempted by critical task of another tenant" in doc["history"][0]["cause"]
        assert not leaks(r.text, [crit], ("alice",))
        _, logs = await get(c["bob"], f"/tasks/{low}/logs")
        assert "preempted" in logs and not leaks(logs, [crit], ("alice",)), logs


# --- MESH_AUTH=off: one trusted desk, everything visible as before ---------------------------


async def test_with_auth_off_everything_stays_visible(
    settings: Settings, spawn_client: Spawn
) -> None:
    async with run_coordinator(replace(settings, auth="off")) as live:
        spawn_client("g2", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
        await online(live, "g2", 2)
        mesh = live.mesh
        done = await live.submit(**gpu_task(0.1, tenant="alice"))
        await wait_until(lambda: done in mesh.finished, 20, "alice's short task done")
        ids = [await live.submit(**gpu_task(60, tenant=t)) for t in ("alice", "bob")]
        await wait_until(lambda: all(mesh.tasks[i].state in ACTIVE and mesh.tasks[i].node
                                     for i in ids), 20, "both running")
        doc, _ = await get(live.http, "/mesh/nodes/g2")
        assert doc["tasks"] == sorted(ids)
        doc, _ = await get(live.http, "/mesh/status")
        assert "alice" in doc["fairness"]["gpu_seconds_by_tenant"]
        doc, _ = await get(live.http, "/tasks/active")
        assert set(ids) <= set(doc["tasks"])
        _, text = await get(live.http, "/metrics")
        assert 'gpumesh_tenant_gpus{tenant="alice"} 1.0' in text
        for i in ids:
            assert (await live.http.post(f"/tasks/{i}/cancel")).status_code == 200

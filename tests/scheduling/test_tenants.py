"""Tenants end to end (issue 17): quotas, rate limits, weighted fair share and preemption,
with a real coordinator, real client processes and simulated GPUs (MESH_FAKE_GPUS)."""

from __future__ import annotations

import asyncio
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import psutil

from coordinator.model import ACTIVE
from coordinator.settings import Settings
from tests.conftest import ROOT, LiveCoordinator, Proc, admin_token, run_coordinator, wait_until

Spawn = Callable[..., Proc]


async def online(coordinator: LiveCoordinator, name: str, gpus: int) -> None:
    def ready() -> bool:
        node = coordinator.mesh.nodes.get(name)
        return node is not None and node.online and len(node.gpus) == gpus

    await wait_until(ready, 20, f"node {name} online with {gpus} GPUs")


async def put_tenant(coordinator: LiveCoordinator, name: str, **config: Any) -> dict[str, Any]:
    r = await coordinator.http.put(f"/admin/tenants/{name}", json=config)
    assert r.status_code == 200, r.text
    doc: dict[str, Any] = r.json()
    return doc


def gpu_task(tenant: str, sleep_s: float, **more: Any) -> dict[str, Any]:
    return {"task_type": "test", "tenant": tenant, "requirements": {"gpu_count": 1},
            "sleep_s": sleep_s, **more}


async def test_tenant_config_is_validated_audited_and_durable(settings: Settings) -> None:
    async with run_coordinator(settings) as coordinator:
        doc = await put_tenant(coordinator, "lab", weight=3, max_gpus=2, rate=5.5)
        assert doc["weight"] == 3 and doc["quota"]["max_gpus"] == 2 and doc["configured"]
        for bad in ({"weight": 0}, {"max_gpus": -1}, {"colour": "red"}, {"rate": "fast"}):
            r = await coordinator.http.put("/admin/tenants/lab", json=bad)
            assert r.status_code == 422 and r.json()["error"] == "invalid tenant config", bad
        r = await coordinator.http.put("/admin/tenants/bad name!", json={})
        assert r.status_code == 422
        audit = (await coordinator.http.get("/admin/audit")).json()
        assert any(e["action"] == "tenant.set" and e["target"] == "lab"
                   for e in audit["records"])
    async with run_coordinator(settings) as coordinator:  # the same data dir: restarted
        r = await coordinator.http.get("/admin/tenants")
        tenants = {t["name"]: t for t in r.json()["tenants"]}
        assert tenants["lab"]["quota"] == {"weight": 3.0, "max_gpus": 2, "rate": 5.5}
        assert (await coordinator.http.get("/admin/tenants/other")).json()["configured"] is False


async def test_burst_over_the_rate_gets_429_with_retry_after(
    coordinator: LiveCoordinator,
) -> None:
    await put_tenant(coordinator, "bursty", rate=1, burst=3)
    ok = [await coordinator.http.post("/tasks/submit", json=gpu_task("bursty", 0))
          for _ in range(3)]
    assert [r.status_code for r in ok] == [200, 200, 200]
    r = await coordinator.http.post("/tasks/submit", json=gpu_task("bursty", 0))
    assert r.status_code == 429, r.text
    assert "rate of 1 submissions/s" in r.json()["reason"]
    assert 1 <= int(r.headers["Retry-After"]) <= 2
    big = await coordinator.http.post("/tasks/submit", json=[gpu_task("bursty", 0)] * 4)
    assert big.status_code == 429 and "Retry-After" not in big.headers  # never fits the burst
    assert coordinator.mesh.fair.ledger.use["bursty"].queued == 3  # the refused: not stored
    other = await coordinator.http.post("/tasks/submit", json=gpu_task("calm", 0))
    assert other.status_code == 200  # another tenant has its own bucket


async def test_max_queued_refuses_past_the_quota(coordinator: LiveCoordinator) -> None:
    await put_tenant(coordinator, "small", max_queued=2)
    r = await coordinator.http.post("/tasks/submit", json=[gpu_task("small", 0)] * 2)
    assert r.status_code == 200
    r = await coordinator.http.post("/tasks/submit", json=gpu_task("small", 0))
    assert r.status_code == 429 and "max_queued" in r.json()["reason"]
    assert len(coordinator.mesh.tasks) == 2


async def test_gpu_quota_is_never_exceeded_and_named_as_the_reason(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("g4", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="4xA100-80GB")
    await online(coordinator, "g4", 4)
    await put_tenant(coordinator, "lab", max_gpus=2)
    mesh = coordinator.mesh
    r = await coordinator.http.post("/tasks/submit", json=[gpu_task("lab", 0.3)] * 8)
    ids = [t["task_id"] for t in r.json()["tasks"]]
    seen_reason, peak, samples = False, 0, 0
    deadline = time.monotonic() + 30
    while any(i in mesh.tasks for i in ids):
        held = sum(len(t.gpu_indices) for t in mesh.tasks.values()
                   if t.tenant == "lab" and t.state in ACTIVE)
        peak, samples = max(peak, held), samples + 1
        assert held <= 2, f"tenant lab holds {held} GPUs; its quota is 2"
        if not seen_reason:
            active = (await coordinator.http.get("/tasks/active")).json()["tasks"]
            seen_reason = any("GPU quota" in (v.get("reason") or "") for v in active.values())
        assert time.monotonic() < deadline, "tasks did not finish"
        await asyncio.sleep(0.01)
    assert peak == 2 and seen_reason and samples > 20
    docs = [await coordinator.wait_finished(i) for i in ids]
    assert {d["status"] for d in docs} == {"completed"}
    # another tenant is not held by lab's quota: the other two GPUs are its to use
    await put_tenant(coordinator, "lab", max_gpus=0)
    held_id = await coordinator.submit(**gpu_task("lab", 0))
    free_id = await coordinator.submit(**gpu_task("other", 0))
    assert (await coordinator.wait_finished(free_id))["status"] == "completed"
    doc = await coordinator.task(held_id)
    assert doc["status"] == "queued" and "GPU quota (0 of 0" in doc["reason"]
    await put_tenant(coordinator, "lab", max_gpus=1)  # raising it lets the work through
    assert (await coordinator.wait_finished(held_id))["status"] == "completed"


async def keep_queued(coordinator: LiveCoordinator, tenant: str, depth: int,
                      stop: asyncio.Event, rng: random.Random) -> None:
    """Top `tenant` up to `depth` queued GPU tasks of 0.05-0.2 s until `stop`."""
    while not stop.is_set():
        use = coordinator.mesh.fair.ledger.use.get(tenant)
        missing = depth - (use.queued if use is not None else 0)
        if missing > 0:
            batch = [gpu_task(tenant, round(rng.uniform(0.05, 0.2), 3)) for _ in range(missing)]
            r = await coordinator.http.post("/tasks/submit", json=batch)
            assert r.status_code == 200, r.text
        await asyncio.sleep(0.1)


async def test_weights_one_to_three_split_gpu_seconds_25_75(
    settings: Settings, spawn_client: Spawn
) -> None:
    async with run_coordinator(replace(settings, fairshare_halflife_s=120.0)) as coordinator:
        spawn_client("g8", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="8xA100-80GB")
        await online(coordinator, "g8", 8)
        await put_tenant(coordinator, "light", weight=1)
        await put_tenant(coordinator, "heavy", weight=3)
        stop, rng = asyncio.Event(), random.Random(17)
        feeders = [asyncio.create_task(keep_queued(coordinator, t, 200, stop, rng))
                   for t in ("light", "heavy")]
        mesh = coordinator.mesh
        notes: set[str] = set()

        def done() -> bool:  # and, meanwhile, who waits for fair share says so
            queued = [t for t in mesh.tasks.values() if t.state.value == "queued"]
            notes.update(t.tenant for t in queued[:50] if "fair share" in mesh.queued_reason(t))
            return sum(mesh.gpu_seconds.values()) >= 40

        try:
            await wait_until(done, 60, "40 GPU-seconds of work done")
        finally:
            stop.set()
            await asyncio.gather(*feeders)
        used = dict(mesh.gpu_seconds)
        share = used["light"] / (used["light"] + used["heavy"])
        status = (await coordinator.http.get("/mesh/status")).json()["fairness"]
        print(f"light {used['light']:.1f} GPU-s, heavy {used['heavy']:.1f} GPU-s: "
              f"{share:.3f} / {1 - share:.3f}; weighted Jain {status['weighted_jain_index']}")
        assert 0.225 <= share <= 0.275, used
        assert status["weighted_jain_index"] >= 0.95
        assert notes, "no queued task's reason named the fair share that held it"
        assert status["jain_index"] < 0.9  # unweighted, the split is (rightly) uneven
        metrics = (await coordinator.http.get("/metrics")).text
        assert "gpumesh_fairness_weighted_jain" in metrics


async def test_critical_task_preempts_low_work_which_completes_after_requeue(
    settings: Settings, spawn_client: Spawn
) -> None:
    grace = 1.0
    tuned = replace(settings, preemption=True, preempt_grace_s=grace)
    async with run_coordinator(tuned) as coordinator:
        spawn_client("g2", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
        await online(coordinator, "g2", 2)
        mesh = coordinator.mesh
        low = await coordinator.submit(**gpu_task("batch", 2.0, priority=1, max_attempts=1))
        pinned = await coordinator.submit(**gpu_task("batch", 2.0, priority=0,
                                                     preemptible=False))
        await wait_until(lambda: all(mesh.tasks[i].started_at for i in (low, pinned)), 10,
                         "both running")
        asked = time.monotonic()
        crit = await coordinator.submit(**gpu_task("ops", 0.2, priority=9))
        await wait_until(lambda: crit not in mesh.tasks or mesh.tasks[crit].started_at, 10,
                         "the critical task started")
        took = time.monotonic() - asked
        print(f"critical task started {took:.2f}s after submit (grace {grace:g}s)")
        assert took <= grace + 1.0
        assert (await coordinator.wait_finished(crit))["status"] == "completed"
        victim = await coordinator.wait_finished(low)
        assert victim["status"] == "completed"
        assert victim["attempt"] == 2 and victim["max_attempts"] == 1  # no attempt spent
        assert "preempted by critical task" in victim["history"][0]["cause"]
        metrics = (await coordinator.http.get("/metrics")).text
        assert "gpumesh_preemptions_total 1.0" in metrics
        doc = await coordinator.wait_finished(pinned)  # lower priority, but not preemptible
        assert doc["status"] == "completed" and doc["attempt"] == 1 and not doc["history"]


def _cli(argv: list[str], coordinator: LiveCoordinator) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env |= {"MESH_URL": coordinator.url, "MESH_API_TOKEN": admin_token(coordinator.settings),
            "COLUMNS": "200"}
    return subprocess.run([sys.executable, "-m", "gpumesh.cli.main", *argv], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def test_cli_sets_and_lists_tenants(coordinator: LiveCoordinator) -> None:
    res = await asyncio.to_thread(
        _cli, ["tenant", "set", "lab", "--weight", "3", "--max-gpus", "4", "--rate", "10"],
        coordinator)
    assert res.returncode == 0, res.stderr
    assert "lab" in res.stdout and "gpus=4 rate=10" in res.stdout
    await coordinator.submit(**gpu_task("lab", 0))
    res = await asyncio.to_thread(_cli, ["tenants"], coordinator)
    assert res.returncode == 0, res.stderr
    line = next(ln for ln in res.stdout.splitlines() if ln.startswith("lab"))
    assert line.split()[1:3] == ["3", "0.0%"] and " 1 " in line  # weight, share, queued
    res = await asyncio.to_thread(_cli, ["tenants", "--json"], coordinator)
    doc = json.loads(res.stdout)
    assert doc["tenants"][0]["quota"]["max_gpus"] == 4 and doc["tenants"][0]["queued"] == 1
    res = await asyncio.to_thread(_cli, ["tenant", "set", "lab", "--weight", "0"], coordinator)
    assert res.returncode == 1 and "invalid tenant config" in res.stderr


async def test_defaults_from_env_bound_unknown_tenants(settings: Settings) -> None:
    env = {"MESH_TENANT_DEFAULT_MAX_QUEUED": "1", "MESH_TENANT_DEFAULT_WEIGHT": "2",
           "MESH_FAIRSHARE_HALFLIFE_S": "60", "MESH_PREEMPTION": "on",
           "MESH_PREEMPT_GRACE_S": "2.5"}
    from_env = Settings.from_env(env)
    assert (from_env.tenant_default_max_queued, from_env.fairshare_halflife_s,
            from_env.preemption, from_env.preempt_grace_s) == (1, 60.0, True, 2.5)
    tuned = replace(settings, tenant_default_max_queued=1, tenant_default_weight=2.0)
    async with run_coordinator(tuned) as coordinator:
        assert (await coordinator.http.post("/tasks/submit", json=gpu_task("new", 0))).is_success
        r = await coordinator.http.post("/tasks/submit", json=gpu_task("new", 0))
        assert r.status_code == 429 and "tenant new has 1 tasks queued" in r.json()["reason"]
        await put_tenant(coordinator, "new", max_queued=5)  # a stored config replaces defaults
        assert (await coordinator.http.post("/tasks/submit", json=gpu_task("new", 0))).is_success
        doc = (await coordinator.http.get("/admin/tenants")).json()
        assert doc["defaults"] == {"weight": 2.0, "max_queued": 1}


def _alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


async def test_preemption_grace_reaches_the_node(
    settings: Settings, spawn_client: Spawn, tmp_path: Path
) -> None:
    """A victim that ignores SIGTERM is killed after MESH_PREEMPT_GRACE_S (1 s), not after
    the node's own 5 s: the grace travels in `cancel`."""
    tuned = replace(settings, preemption=True, preempt_grace_s=1.0)
    pidfile = tmp_path / "victim.pid"
    script = (f'if [ "$MESH_ATTEMPT" = 1 ]; then trap "" TERM; echo $$ > {pidfile}; '
              "sleep 30; fi; echo done")
    async with run_coordinator(tuned) as coordinator:
        spawn_client("p1", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
        await online(coordinator, "p1", 1)
        victim = await coordinator.submit(task_type="custom", script=script, priority=1,
                                          requirements={"gpu_count": 1}, max_attempts=1)
        await wait_until(lambda: pidfile.exists() and pidfile.read_text().strip(), 15,
                         "the victim running")
        pid = int(pidfile.read_text())
        asked = time.monotonic()
        crit = await coordinator.submit(**gpu_task("ops", 0, priority=10))
        await wait_until(lambda: not _alive(pid), 10, "the victim's process gone")
        gone = time.monotonic() - asked
        print(f"victim ignoring SIGTERM gone {gone:.2f}s after the critical submit (grace 1s)")
        assert 0.9 <= gone <= 3.0
        assert (await coordinator.wait_finished(crit))["status"] == "completed"
        doc = await coordinator.wait_finished(victim)
        assert doc["status"] == "completed" and doc["result"]["output"].strip() == "done"


async def test_nonpreemptible_work_counts_against_its_own_quota(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("np", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="3xA100-80GB")
    await online(coordinator, "np", 3)
    await put_tenant(coordinator, "svc", max_nonpreemptible=1)
    pinned = [await coordinator.submit(**gpu_task("svc", 1.0, preemptible=False))
              for _ in range(2)]
    loose = await coordinator.submit(**gpu_task("svc", 0.2))
    assert (await coordinator.wait_finished(loose))["status"] == "completed"
    docs = [await coordinator.task(i) for i in pinned]
    assert sorted(d["status"] for d in docs) in (["queued", "running"], ["assigned", "queued"])
    held = next(d for d in docs if d["status"] == "queued")
    assert "quota of 1 GPUs for non-preemptible work" in held["reason"]
    assert {(await coordinator.wait_finished(i))["status"] for i in pinned} == {"completed"}

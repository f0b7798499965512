"""Gangs and preemption (issue 28 item 5), with a real coordinator, real clients and simulated
GPUs: a gang is preempted as one unit (every member stopped, requeued as one, no attempt
spent), and a critical gang preempts lower work only when every member's room is found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec

from coordinator.core.preempt import plan, plan_gang
from coordinator.model import ACTIVE, Node, Task, TaskState
from coordinator.settings import Settings
from shared.protocol import GpuInfo
from shared.tasks import GangRef, Requirements, TaskSubmit
from tests.conftest import LiveCoordinator, Proc, run_coordinator, wait_until
from tests.gang import task_uids

Spawn = Callable[..., Proc]


def _once_long(flags: Path, name: str) -> list[str]:
    """A command that runs 60 s the first time (preempted meanwhile) and ends 0 after."""
    flag = flags / name
    return ["sh", "-c", f'test -e "{flag}$NODE_RANK" && exit 0; touch "{flag}$NODE_RANK"; '
            "exec sleep 60"]


def _gpu(command: list[str], **more: Any) -> dict[str, Any]:
    return {"task_type": "custom", "command": command, "requirements": {"gpu_count": 1},
            **more}


async def _gpu_nodes(live: LiveCoordinator, spawn: Spawn, names: list[str]) -> None:
    for i, name in enumerate(names):
        spawn(name, live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB",
              MESH_NODE_ADDRESS="127.0.0.1", MESH_TASK_UIDS=task_uids(i))
    mesh = live.mesh
    await wait_until(lambda: all(n in mesh.nodes and mesh.nodes[n].online
                                 and len(mesh.nodes[n].gpus) == 1 for n in names),
                     20, f"{names} online with a GPU each")


async def test_a_gang_is_preempted_as_one_unit_and_spends_no_attempt(
    settings: Settings, spawn_client: Spawn, tmp_path: Path
) -> None:
    tuned = replace(settings, preemption=True, preempt_grace_s=0.5)
    async with run_coordinator(tuned) as live:
        await _gpu_nodes(live, spawn_client, ["p0", "p1"])
        mesh = live.mesh
        gang = await live.submit(**_gpu(_once_long(tmp_path, "g"), nodes=2, priority=1,
                                        max_attempts=1, tenant="lab"))
        await wait_until(lambda: mesh.tasks[gang].state.value == "running", 30,
                         "the gang running")
        first = [m["task_id"] for m in (await live.task(gang))["gang"]["members"]]
        crit = await live.submit(**_gpu(["true"], priority=9, tenant="ops"))
        done = await live.wait_finished(crit, 30)
        assert done["status"] == "completed", done
        # both members stopped, on both nodes, though the critical task needed one GPU
        for member in first:
            m = await live.task(member)
            assert m["status"] == "cancelled", m
            assert "preempted by critical task of another tenant" in m["error"], m
            assert crit not in m["error"]  # another tenant's task id stays out
        finished = await live.wait_finished(gang, 60)
        assert finished["status"] == "completed", finished
        assert finished["attempt"] == 2 and finished["max_attempts"] == 1  # no attempt spent
        cause = finished["history"][0]["cause"]
        assert "preempted by critical task of another tenant" in cause and crit not in cause
        assert [r["exit_code"] for r in finished["result"]["ranks"]] == [0, 0]
        assert not set(first) & {r["task_id"] for r in finished["result"]["ranks"]}
        metrics = (await live.http.get("/metrics")).text
        assert "gpumesh_preemptions_total 1.0" in metrics  # a gang counts once


async def test_a_critical_gang_preempts_only_when_every_member_fits(
    settings: Settings, spawn_client: Spawn, tmp_path: Path
) -> None:
    tuned = replace(settings, preemption=True, preempt_grace_s=0.5)
    async with run_coordinator(tuned) as live:
        await _gpu_nodes(live, spawn_client, ["c0", "c1"])
        mesh = live.mesh
        low = await live.submit(**_gpu(_once_long(tmp_path, "low"), priority=1))
        pinned = await live.submit(**_gpu(["sleep", "60"], priority=1, preemptible=False))
        await wait_until(lambda: all(mesh.tasks[i].state.value == "running"
                                     for i in (low, pinned)), 30, "both running")
        # one node could be freed, the other not: nothing is stopped, the gang waits
        crit = await live.submit(**_gpu(["true"], nodes=2, priority=9))
        doc = await wait_until(lambda: _reason(live, crit), 10, "the gang's queued reason")
        assert doc["status"] == "queued" and doc["reason"].startswith("0 of 2 nodes fit"), doc
        assert mesh.tasks[low].state in ACTIVE and mesh.tasks[low].attempt == 1
        assert not mesh.tasks[low].history and mesh.preempted_total == 0
        # once the pinned task ends, both nodes can be had: the low task is preempted
        r = await live.http.post(f"/tasks/{pinned}/cancel")
        assert r.status_code == 200, r.text
        done = await live.wait_finished(crit, 30)
        assert done["status"] == "completed", done
        assert {r["node"] for r in done["result"]["ranks"]} == {"c0", "c1"}
        victim = await live.wait_finished(low, 60)
        assert victim["status"] == "completed" and victim["attempt"] == 2, victim
        assert "preempted by critical gang" in victim["history"][0]["cause"]


async def _reason(live: LiveCoordinator, task_id: str) -> dict[str, Any] | None:
    doc = await live.task(task_id)
    return doc if doc.get("reason") else None


# --- the plans, pure: what is stopped, and that a gang is costed whole ---------------------


def _plain_node(name: str, gpus: int) -> Node:
    node = Node(name=name, executors=frozenset({"process"}), labels={}, slots=4, cpu_count=4)
    node.gpus = [GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", vendor="nvidia",
                         memory_total_mb=81920) for i in range(gpus)]
    return node


def _task(tid: str, priority: int, gpus: int = 1, nodes: int = 1,
          gang: GangRef | None = None, preemptible: bool = True) -> Task:
    req = Requirements(gpu_count=gpus)
    spec = TaskSubmit(task_type="custom", command=["x"], priority=priority, requirements=req,
                      nodes=nodes, gang=gang, preemptible=preemptible)
    return Task(id=tid, seq=0, task_type="custom", priority=priority, executor="process",
                req_raw=msgspec.json.encode(req), spec_raw=msgspec.json.encode(spec),
                params_raw=b"{}", max_attempts=1, tenant="", submitted_at=0.0, _spec=spec)


def _running(t: Task, node: Node, gpus: tuple[int, ...], tasks: dict[str, Task]) -> Task:
    t.state, t.node, t.gpu_indices, t.assigned_at = TaskState.RUNNING, node.name, gpus, 1.0
    node.hold(t)
    tasks[t.id] = t
    return t


def test_a_gang_member_is_costed_at_its_whole_gang_and_plan_gang_is_all_or_nothing() -> None:
    a, b, c = _plain_node("a", 1), _plain_node("b", 1), _plain_node("c", 1)
    tasks: dict[str, Task] = {}
    # a low gang of 2 holds a and b; a single low task of the same priority holds c
    ref = GangRef(id="g", rank=0, nodes=2)
    _running(_task("m0", 1, gang=ref), a, (0,), tasks)
    _running(_task("m1", 1, gang=GangRef(id="g", rank=1, nodes=2)), b, (0,), tasks)
    _running(_task("solo", 1), c, (0,), tasks)
    crit = _task("crit", 9)
    found = plan(crit, [a, b, c], tasks, "balanced")
    assert found is not None and found.node == "c"  # 1 GPU stopped, not the gang's 2
    assert [v.id for v in found.victims] == ["solo"]
    # a critical gang of 3 needs all three nodes: a plan for each, the gang's two included
    crit_gang = _task("cg", 9, nodes=3)
    whole = plan_gang(crit_gang, 3, [a, b, c], tasks, "balanced")
    assert whole is not None and sorted(p.node for p in whole) == ["a", "b", "c"]
    assert {v.id for p in whole for v in p.victims} == {"m0", "m1", "solo"}
    # one node it may not free (non-preemptible work): nothing is planned at all
    c.release(tasks.pop("solo"))
    _running(_task("pinned", 1, preemptible=False), c, (0,), tasks)
    assert plan_gang(crit_gang, 3, [a, b, c], tasks, "balanced") is None
    # a free node counts as room, without victims
    d = _plain_node("d", 1)
    mixed = plan_gang(crit_gang, 3, [a, b, c, d], tasks, "balanced")
    assert mixed is not None and sorted(p.node for p in mixed) == ["a", "b", "d"]
    assert {p.node: len(p.victims) for p in mixed} == {"d": 0, "a": 1, "b": 1}

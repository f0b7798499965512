"""Gangs and preemption (issue 28 item 5), with a real coordinator, real clients and simulated
GPUs: a gang is preempted as one unit (every member stopped, requeued as one, no attempt
spent), and a critical gang preempts lower work only when every member's room is found."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

from coordinator.model import ACTIVE
from coordinator.settings import Settings
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
                                        max_attempts=1))
        await wait_until(lambda: mesh.tasks[gang].state.value == "running", 30,
                         "the gang running")
        first = [m["task_id"] for m in (await live.task(gang))["gang"]["members"]]
        crit = await live.submit(**_gpu(["true"], priority=9))
        done = await live.wait_finished(crit, 30)
        assert done["status"] == "completed", done
        # both members stopped, on both nodes, though the critical task needed one GPU
        for member in first:
            m = await live.task(member)
            assert m["status"] == "cancelled", m
            assert "preempted by critical task" in m["error"], m
        finished = await live.wait_finished(gang, 60)
        assert finished["status"] == "completed", finished
        assert finished["attempt"] == 2 and finished["max_attempts"] == 1  # no attempt spent
        assert "preempted by critical task" in finished["history"][0]["cause"]
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

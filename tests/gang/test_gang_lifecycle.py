"""Gang tasks (issue 28) through a real coordinator and real clients, with quick tasks:
all or nothing, one result, the gang's view, a failing rank, logs per rank."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial

from tests.cli.test_cli import gpumesh
from tests.conftest import LiveCoordinator, Proc, wait_until
from tests.gang import task_uids

Spawn = Callable[..., Proc]


def _online(live: LiveCoordinator, n: int) -> Callable[[], bool]:
    return lambda: sum(1 for x in live.mesh.nodes.values() if x.online) >= n


async def test_too_few_nodes_start_no_member_and_say_so(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    for i in range(2):
        spawn_client(f"g{i}", coordinator.ws_url, MESH_NODE_ADDRESS="127.0.0.1",
                     MESH_TASK_UIDS=task_uids(i))
    await wait_until(_online(coordinator, 2), 20, "2 nodes")
    gang = await coordinator.submit(task_type="custom", command=["true"], nodes=3)
    doc = await wait_until(
        lambda: _queued_with_reason(coordinator, gang), 10, "the gang's queued reason"
    )
    assert doc["status"] == "queued"
    assert doc["reason"].startswith("2 of 3 nodes fit; waiting for 1 more node"), doc["reason"]
    assert doc["gang"] == {"nodes": 3, "attempt": 0, "members": []}
    # no member exists, so none holds a node
    assert list(coordinator.mesh.tasks) == [gang]
    assert all(not n.tasks for n in coordinator.mesh.nodes.values())
    spawn_client("g2", coordinator.ws_url, MESH_NODE_ADDRESS="127.0.0.1",
                 MESH_TASK_UIDS=task_uids(2))
    done = await coordinator.wait_finished(gang, 60)
    assert done["status"] == "completed", done
    ranks = done["result"]["ranks"]
    assert [r["rank"] for r in ranks] == [0, 1, 2]
    assert {r["node"] for r in ranks} == {"g0", "g1", "g2"}
    assert all(r["exit_code"] == 0 and r["state"] == "completed" for r in ranks)
    assert done["gang"]["members"] == ranks and done["attempt"] == 1


async def _queued_with_reason(live: LiveCoordinator, task_id: str) -> dict[str, object] | None:
    doc = await live.task(task_id)
    return doc if doc.get("reason") and "nodes fit" in str(doc["reason"]) else None


async def test_rendezvous_env_and_logs_per_rank(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    for i in range(2):
        spawn_client(f"r{i}", coordinator.ws_url, MESH_NODE_ADDRESS=f"127.0.0.{i + 1}",
                     MESH_TASK_UIDS=task_uids(i))
    await wait_until(_online(coordinator, 2), 20, "2 nodes")
    script = ("echo rank=$NODE_RANK nnodes=$NNODES world=$WORLD_SIZE per=$GPUS_PER_NODE "
              "addr=$MASTER_ADDR port=$MASTER_PORT addrs=$GPUMESH_NODE_ADDRS")
    # the task's own env cannot point the ranks elsewhere: the rendezvous is set over it
    gang = await coordinator.submit(task_type="custom", command=["sh", "-c", script], nodes=2,
                                    env={"MASTER_ADDR": "10.9.9.9", "NODE_RANK": "7"})
    done = await coordinator.wait_finished(gang, 60)
    assert done["status"] == "completed", done
    ranks = {r["rank"]: r for r in done["result"]["ranks"]}
    master = "127.0.0.1" if ranks[0]["node"] == "r0" else "127.0.0.2"
    addrs = ",".join("127.0.0.1" if ranks[i]["node"] == "r0" else "127.0.0.2" for i in (0, 1))
    out0 = done["result"]["output"]
    port = int(out0.split("port=")[1].split()[0])
    assert 0 < port < 65536
    assert f"rank=0 nnodes=2 world=2 per=0 addr={master} port={port} addrs={addrs}" in out0
    r1 = await coordinator.http.get(f"/tasks/{gang}/logs", params={"rank": "1"})
    assert r1.status_code == 200, r1.text
    assert f"rank=1 nnodes=2 world=2 per=0 addr={master} port={port} addrs={addrs}" in r1.text
    bad = await coordinator.http.get(f"/tasks/{gang}/logs", params={"rank": "2"})
    assert bad.status_code == 404 and "no member of rank" in bad.text
    cli = await gpumesh("logs", gang, "--rank", "1", live=coordinator)  # the command line
    assert cli.returncode == 0, cli.stderr
    assert f"rank=1 nnodes=2 world=2 per=0 addr={master} port={port}" in cli.stdout


async def test_a_failing_rank_stops_the_others_and_spends_attempts(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    for i in range(2):
        spawn_client(f"f{i}", coordinator.ws_url, MESH_NODE_ADDRESS="127.0.0.1",
                     MESH_TASK_UIDS=task_uids(i))
    await wait_until(_online(coordinator, 2), 20, "2 nodes")
    # rank 1 fails at once; rank 0 would sleep for a minute: it is stopped, twice
    script = 'if [ "$NODE_RANK" = 1 ]; then exit 3; fi; sleep 60'
    gang = await coordinator.submit(task_type="custom", command=["sh", "-c", script], nodes=2,
                                    max_attempts=2)
    done = await coordinator.wait_finished(gang, 60)
    assert done["status"] == "failed", done
    assert done["attempt"] == 2 and "gave up after 2 attempts" in done["error"]
    ranks = {r["rank"]: r for r in done["result"]["ranks"]}
    assert ranks[1]["exit_code"] == 3 and ranks[1]["state"] == "failed"
    assert ranks[0]["state"] == "cancelled"
    # nothing of it holds a node any more
    await wait_until(lambda: all(not n.tasks for n in coordinator.mesh.nodes.values()), 10,
                     "nodes freed")


def test_gang_refusals_at_the_edge() -> None:
    import msgspec
    import pytest

    from shared.tasks import MAX_GANG_NODES, TaskSubmit, launch_problem, split_submission

    with pytest.raises(msgspec.ValidationError, match="<= 64"):
        split_submission({"task_type": "custom", "command": ["x"], "nodes": MAX_GANG_NODES + 1})
    with pytest.raises(msgspec.ValidationError, match=">= 1"):
        split_submission({"task_type": "custom", "command": ["x"], "nodes": 0})
    with pytest.raises(msgspec.ValidationError, match="shared"):
        split_submission({"task_type": "custom", "command": ["x"], "nodes": 2,
                          "requirements": {"shared": True, "gpu_count": 1}})
    spec, _ = split_submission({"task_type": "custom", "command": ["x"],
                                "gang": {"id": "x", "rank": 0, "nodes": 2}})
    assert isinstance(spec, TaskSubmit)
    assert "set by the coordinator" in (launch_problem(spec) or "")


async def test_a_stream_of_small_tasks_does_not_starve_a_whole_cluster_gang(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    """Three one-slot nodes kept busy by a steady stream of short tasks (timeout_s 60): the
    gang of three waits at the head of the queue, keeps nodes as they free up (a new small
    task would end after the gang's expected start, so it may not take them), and starts."""
    for i in range(3):
        spawn_client(f"s{i}", coordinator.ws_url, MESH_SLOTS="1", MESH_TASK_UIDS=task_uids(i))
    await wait_until(_online(coordinator, 3), 20, "3 nodes")
    small = {"task_type": "custom", "command": ["sleep", "0.5"], "timeout_s": 60}
    stream = [await coordinator.submit(**small) for _ in range(4)]
    await wait_until(lambda: all(n.tasks for n in coordinator.mesh.nodes.values()), 20,
                     "every node busy")
    gang = await coordinator.submit(task_type="custom", command=["true"], nodes=3)
    before = len(stream)
    held_reason = ""
    while coordinator.mesh.tasks.get(gang) is not None and \
            coordinator.mesh.tasks[gang].state.value == "queued":
        # keep the stream going: always a few small tasks queued behind the gang
        queued = [t for t in stream if (x := coordinator.mesh.tasks.get(t)) is not None
                  and x.state.value == "queued"]
        if len(queued) < 3:
            stream.append(await coordinator.submit(**small))
        elif "kept for gang" not in held_reason:
            held_reason = coordinator.mesh.queued_reason(coordinator.mesh.tasks[queued[-1]])
        assert len(stream) < 400, "the gang starved behind the stream"
        await asyncio.sleep(0.05)  # the stream's pace, not a wait for a condition
    done = await coordinator.wait_finished(gang, 60)
    assert done["status"] == "completed", done
    # Not one small task submitted after the gang started before it (without the
    # reservation each would take a node the moment one freed, and the gang would wait on).
    later = [await coordinator.wait_finished(t, 60) for t in stream[before:]]
    assert len(later) >= 2 and all(d["status"] == "completed" for d in later)
    assert all(d["assigned_at"] >= done["assigned_at"] for d in later), (
        done["assigned_at"], [d["assigned_at"] for d in later])
    print(f"\n[gang] stream of {len(stream)} small tasks; a held one's reason: {held_reason!r}")


async def test_a_caller_cannot_pose_as_a_gang_member_nor_ask_too_big_a_gang(
    coordinator: LiveCoordinator,
) -> None:
    member = {"task_type": "custom", "command": ["true"],
              "gang": {"id": "0" * 32, "rank": 0, "nodes": 2}}
    r = await coordinator.http.post("/tasks/submit", json=member)
    assert r.status_code == 422 and "$.gang: set by the coordinator" in r.text, r.text
    big = {"task_type": "custom", "command": ["true"], "nodes": 65}
    r = await coordinator.http.post("/tasks/submit", json=big)
    assert r.status_code == 422 and "nodes" in r.text, r.text
    shared = {"task_type": "custom", "command": ["true"], "nodes": 2,
              "requirements": {"gpu_count": 1, "shared": True}}
    r = await coordinator.http.post("/tasks/submit", json=shared)
    assert r.status_code == 422 and "shared" in r.text, r.text
    assert not coordinator.mesh.tasks


async def test_a_gangs_gpus_count_in_full_against_its_tenants_quota(
    coordinator: LiveCoordinator,
) -> None:
    r = await coordinator.http.put("/admin/tenants/lab", json={"max_gpus": 3, "max_running": 3})
    assert r.status_code == 200, r.text
    big = await coordinator.submit(task_type="custom", command=["true"], tenant="lab", nodes=2,
                                   requirements={"gpu_count": 2})
    wide = await coordinator.submit(task_type="custom", command=["true"], tenant="lab",
                                    nodes=4)
    small = await coordinator.submit(task_type="custom", command=["true"], tenant="lab",
                                     nodes=2, requirements={"gpu_count": 1})
    reasons: dict[str, str] = {}
    for task_id in (big, wide, small):
        reasons[task_id] = await wait_until(partial(_reason, coordinator, task_id), 10,
                                            "a reason")
    assert "GPU quota (0 of 3 GPUs held, this task needs 4)" in reasons[big], reasons[big]
    assert "quota of 3 running tasks (this gang runs 4)" in reasons[wide], reasons[wide]
    assert reasons[small].startswith("0 of 2 nodes fit"), reasons[small]  # within its quota


async def _reason(live: LiveCoordinator, task_id: str) -> str:
    doc = await live.task(task_id)
    return str(doc.get("reason") or "")


async def test_a_drained_node_takes_no_member_and_a_running_gang_keeps_its_drained_node(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    for i in range(3):
        spawn_client(f"d{i}", coordinator.ws_url, MESH_TASK_UIDS=task_uids(i))
    await wait_until(_online(coordinator, 3), 20, "3 nodes")
    r = await coordinator.http.post("/mesh/nodes/d2/drain", json={"reason": "disk swap"})
    assert r.status_code == 200, r.text
    gang = await coordinator.submit(task_type="custom", command=["true"], nodes=3)
    reason = await wait_until(partial(_reason, coordinator, gang), 10, "its reason")
    assert reason.startswith("2 of 3 nodes fit; waiting for 1 more node to fit"), reason
    assert "1 is draining" in reason, reason
    assert not any(n.tasks for n in coordinator.mesh.nodes.values())  # no member holds a node
    # a running gang is not stopped by a drain: it finishes where it runs
    two = await coordinator.submit(task_type="custom", command=["sleep", "1"], nodes=2)
    await wait_until(lambda: coordinator.mesh.tasks.get(two) is not None
                     and coordinator.mesh.tasks[two].state.value == "running", 20, "running")
    node = coordinator.mesh.gangs.attempts[two].members[0].node
    r = await coordinator.http.post(f"/mesh/nodes/{node}/drain", json={"reason": "later"})
    assert r.status_code == 200, r.text
    assert (await coordinator.wait_finished(two, 30))["status"] == "completed"
    cancelled = await coordinator.http.delete(f"/tasks/{gang}")
    assert cancelled.status_code == 200

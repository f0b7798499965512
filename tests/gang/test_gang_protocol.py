"""A gang's rendezvous on the wire and its readiness timeout, with hand-driven nodes (they
answer only what the test says, so a member can be made never to start)."""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from coordinator.settings import Settings
from tests.conftest import LiveCoordinator, run_coordinator, wait_until
from tests.security.handnode import HandNode


async def test_rank0_reports_master_port_first_and_a_member_that_never_starts_stops_all(
    settings: Settings,
) -> None:
    async with run_coordinator(replace(settings, gang_ready_s=1.5)) as live:
        nodes = [HandNode(f"h{i}", live.ws_url) for i in range(2)]
        for i, node in enumerate(nodes):
            node.register_extra = {"address": f"10.0.0.{i + 1}"}
            await node.connect()
        await wait_until(lambda: len(live.mesh.nodes) == 2, 10, "2 nodes")
        gang = await live.submit(task_type="test", nodes=2)
        first = await wait_until(lambda: [f for n in nodes for f in n.seen(type="assign")],
                                 10, "the first assign")
        assert len(first) == 1, first  # rank 0 alone, until its node reports a port
        a0 = first[0]
        assert a0["gang"]["rank"] == 0 and a0["gang"].get("master_port", 0) == 0
        rank0 = next(n for n in nodes if n.seen(type="assign"))
        rank1 = next(n for n in nodes if n is not rank0)
        assert a0["gang"]["master_addr"] == rank0.register_extra["address"]
        await rank0.send({"type": "task_accepted", "task_id": a0["task_id"],
                          "attempt": a0["attempt"], "master_port": 41234})
        a1 = await rank1.frame(type="assign")
        assert a1["gang"] == {
            "gang_id": gang, "rank": 1, "nnodes": 2, "master_port": 41234,
            "master_addr": rank0.register_extra["address"],
            "node_addrs": [rank0.register_extra["address"], rank1.register_extra["address"]],
        }
        rank0.running = [{"task_id": a0["task_id"], "attempt": a0["attempt"]}]
        rank1.running = [{"task_id": a1["task_id"], "attempt": a1["attempt"]}]
        await rank0.send({"type": "task_started", "task_id": a0["task_id"],
                          "attempt": a0["attempt"]})
        # rank 1 never starts: past MESH_GANG_READY_S both are stopped, the gang goes back
        await rank0.frame(type="cancel", task_id=a0["task_id"])
        await rank1.frame(type="cancel", task_id=a1["task_id"])
        doc = await wait_until(lambda: _requeued(live, gang), 10, "the gang requeued")
        cause = doc["history"][0]["cause"]
        assert "not every member started within 1.5s" in cause and "rank 1 on" in cause
        assert doc["history"][0]["infra"] is True and doc["infra_losses"] == 1
        # after its backoff (1 s the first time) the gang is placed again, rank 0 first
        again = await wait_until(
            lambda: [f for n in nodes for f in n.seen(type="assign")
                     if f["task_id"] not in (a0["task_id"], a1["task_id"])], 20,
            "the second attempt")
        assert again[0]["gang"]["rank"] == 0 and again[0]["gang"]["gang_id"] == gang
        for node in nodes:
            node.running = []
            await node.close()


async def _requeued(live: LiveCoordinator, gang: str) -> dict[str, Any] | None:
    doc = await live.task(gang)
    return doc if doc["history"] else None

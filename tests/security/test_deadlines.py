"""Deadlines the coordinator keeps (coordinator/core/deadlines.py), against a node that lies.

The node here is driven by hand over a real WebSocket to a real coordinator: it heartbeats
and lists its attempts as running (so reconciliation never takes them back), but never
reports an end, or accepts a task and never starts it. The coordinator must end such
attempts itself, durably, tell the node to stop, refuse the node's later word on them, and
keep those deadlines across a restart.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest

from coordinator.core.deadlines import COMPACT_SLACK, EXPIRE_BATCH, ended_by_coordinator
from coordinator.core.mesh import Mesh
from coordinator.model import TaskState
from coordinator.settings import Settings
from coordinator.storage.store import Store
from shared.protocol import Assign, Cancel, Msg, Register, TaskResult, TaskStarted
from shared.tasks import TaskSubmit
from tests.conftest import FAST, LiveCoordinator, run_coordinator, wait_until
from tests.security.handnode import HandNode


def _msg(kind: str, task_id: str, attempt: int, **more: Any) -> dict[str, Any]:
    return {"type": kind, "task_id": task_id, "attempt": attempt, **more}


FORGED = {"status": "completed", "result": {"exit_code": 0, "output": "forged: all done"}}


async def _start_lying(node: HandNode, live: LiveCoordinator, **spec: Any) -> tuple[str, int]:
    """Submit a task only `node` runs; the node accepts it, starts it, lists it as running."""
    task_id = await live.submit(task_type="test", sleep_s=600, **spec)
    attempt = int((await node.frame(type="assign", task_id=task_id))["attempt"])
    node.running = [{"task_id": task_id, "attempt": attempt}]
    await node.send(_msg("task_accepted", task_id, attempt))
    await node.send(_msg("task_started", task_id, attempt))
    return task_id, attempt


def _timed_out(doc: dict[str, Any], timeout_s: float) -> None:
    assert doc["status"] == "failed", doc
    assert doc["error"].startswith(f"timed out after {timeout_s:g}s"), doc["error"]
    assert doc["result"]["enforced_by"] == "coordinator", doc["result"]
    assert "forged" not in json.dumps(doc["result"])


async def test_a_node_cannot_keep_a_task_running_past_its_timeout(settings: Settings) -> None:
    """Past timeout_s + MESH_TIMEOUT_GRACE_S the coordinator ends the attempt as timed out,
    sends `cancel`, and refuses the node's later "completed": from memory, and after a
    restart from the store."""
    tuned = replace(settings, timeout_grace_s=0.5)
    node = HandNode("liar")
    async with run_coordinator(tuned) as live:
        await node.connect(live.ws_url)
        task_id, attempt = await _start_lying(node, live, timeout_s=1, max_attempts=3)
        cancel = await node.frame(type="cancel", task_id=task_id, attempt=attempt)
        assert cancel["reason"] == "timed out after 1s"
        node.running = []  # so every later cancel is the fencing's, not reconciliation's
        _timed_out(await live.task(task_id), 1)
        assert live.mesh.finished_counts["failed"] == 1  # failed for good: no retry

        await node.send(_msg("task_result", task_id, attempt, **FORGED))
        err = await node.frame(type="error", task_id=task_id)
        assert err["code"] == "stale_attempt" and err["attempt"] == attempt
        await node.frame(type="cancel", task_id=task_id, reason="fenced: not current")
        assert not node.seen(type="ack")
        _timed_out(await live.task(task_id), 1)
        await node.close()

    async with run_coordinator(tuned) as live:  # the same data dir: only the store knows
        ref = {"task_id": task_id, "attempt": attempt, "state": "finished"}
        registered = await node.connect(live.ws_url, running=[ref])
        assert registered["stop"] == [ref] and not registered.get("keep")
        await node.send(_msg("task_result", task_id, attempt, **FORGED))
        err = await node.frame(type="error", task_id=task_id)
        assert err["code"] == "stale_attempt"
        await node.frame(type="cancel", task_id=task_id, reason="fenced: not current")
        assert not node.seen(type="ack")
        _timed_out(await live.task(task_id), 1)
        await node.close()


async def test_a_node_cannot_hold_an_assigned_task_without_starting_it(
    settings: Settings,
) -> None:
    """An accepted task not started within MESH_START_DEADLINE_S is taken back as that
    node's fault: cancelled there, requeued without spending an attempt (max_attempts=1),
    counted as the node's infrastructure error; a late start of it is refused."""
    tuned = replace(settings, start_deadline_s=1.5)
    node = HandNode("sitter")
    async with run_coordinator(tuned) as live:
        await node.connect(live.ws_url)
        task_id = await live.submit(task_type="test", sleep_s=600, max_attempts=1)
        first = int((await node.frame(type="assign", task_id=task_id))["attempt"])
        node.running = [{"task_id": task_id, "attempt": first}]
        await node.send(_msg("task_accepted", task_id, first))  # ... and never starts it

        cancel = await node.frame(type="cancel", task_id=task_id, attempt=first)
        assert "not started within 1.5s" in cancel["reason"]
        second = await node.frame(type="assign", task_id=task_id, attempt=first + 1)
        node.running = [{"task_id": task_id, "attempt": second["attempt"]}]
        await node.send(_msg("task_started", task_id, first))  # too late: fenced off
        err = await node.frame(type="error", task_id=task_id, attempt=first)
        assert err["code"] == "stale_attempt"

        await node.send(_msg("task_started", task_id, first + 1))
        await node.send(_msg("task_result", task_id, first + 1, status="completed"))
        await node.frame(type="ack", task_id=task_id, attempt=first + 1)
        doc = await live.task(task_id)
        assert doc["status"] == "completed" and doc["attempt"] == first + 1, doc
        assert doc["infra_losses"] == 1
        assert "not started within 1.5s" in doc["history"][0]["cause"]
        assert doc["history"][0]["infra"] is True
        assert live.mesh.nodes["sitter"].infra_total == 1  # towards its quarantine
        await node.close()


async def test_a_coordinator_restart_keeps_the_deadline(settings: Settings) -> None:
    """A running attempt's deadline comes back from its stored `started_at`, not from the
    restart; it then ends the attempt as timed out and cancels it on its node."""
    timeout_s, grace = 6.0, 0.5
    tuned = replace(settings, timeout_grace_s=grace, restart_grace_s=2.0)
    node = HandNode("liar")
    async with run_coordinator(tuned) as live:
        await node.connect(live.ws_url)
        task_id, attempt = await _start_lying(node, live, timeout_s=timeout_s)
        await wait_until(lambda: live.mesh.tasks[task_id].state is TaskState.RUNNING, 10,
                         "the task running")
        assert (await live.task(task_id))["status"] == "running"  # durable
        started_at = live.mesh.tasks[task_id].started_at
        assert started_at is not None
        await node.close()

    async with run_coordinator(tuned) as live:
        ref = {"task_id": task_id, "attempt": attempt}
        registered = await node.connect(live.ws_url, running=[ref])
        assert registered["keep"] == [ref]
        assert live.mesh.tasks[task_id].started_at == started_at
        due = live.mesh.deadlines.due(task_id)
        assert due == pytest.approx(started_at + timeout_s + grace)
        await node.frame(type="cancel", task_id=task_id, attempt=attempt)
        _timed_out(await live.task(task_id), timeout_s)
        assert live.mesh.deadlines.due(task_id) is None
        await node.close()


async def test_an_honest_nodes_own_timeout_is_what_is_recorded(
    coordinator: LiveCoordinator, spawn_client: Callable[..., Any]
) -> None:
    """With the default MESH_TIMEOUT_GRACE_S a real client reports its own timeout first:
    the stored result is the node's (its output, no `enforced_by`), and the coordinator's
    deadline is cancelled with the attempt's end."""
    assert coordinator.settings.timeout_grace_s == Settings().timeout_grace_s
    spawn_client("honest", coordinator.ws_url)
    await wait_until(lambda: "honest" in coordinator.mesh.nodes, 30, "node honest online")
    task_id = await coordinator.submit(
        task_type="custom", script="echo begun; sleep 60", timeout_s=1, max_attempts=1
    )
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "failed" and doc["error"] == "timed out after 1s", doc
    assert "enforced_by" not in doc["result"] and "begun" in doc["result"]["output"]
    assert coordinator.mesh.deadlines.due(task_id) is None and not coordinator.mesh.deadlines


@dataclass
class _Link:
    """Where a Mesh driven directly (no socket) sends a node's messages."""

    sent: list[Msg] = field(default_factory=list)

    def send(self, msg: Msg) -> None:
        self.sent.append(msg)

    def close(self, code: int, reason: str) -> None:
        pass


async def test_many_deadlines_at_once_end_in_batches_and_the_heap_stays_bounded(
    tmp_path: Path,
) -> None:
    """3 x EXPIRE_BATCH running attempts falling due together all end timed out and are
    cancelled (in batches of EXPIRE_BATCH per turn of the loop); 2,000 attempts that end
    before their deadline leave no more than twice the live deadlines (+ slack) in the heap."""
    tuned = replace(FAST, data_dir=tmp_path, timeout_grace_s=0.0, start_deadline_s=60.0,
                    node_timeout_s=600.0)  # the node sends no heartbeats here
    store = Store(tmp_path / "mesh.sqlite3")
    await store.open()
    mesh = Mesh(store, tuned)
    await mesh.start()
    try:
        link = _Link()
        n = 3 * EXPIRE_BATCH
        mesh.register("wide", Register(executors=["builtin"], cpu_count=n, slots=n), link)
        specs = [(TaskSubmit(task_type="test", timeout_s=0.5), {}) for _ in range(n)]
        ids = {t.id for t in await mesh.submit(specs)}

        def assigns(of: set[str]) -> list[Assign]:
            return [m for m in link.sent if isinstance(m, Assign) and m.task_id in of]

        await wait_until(lambda: len(assigns(ids)) == n, 20, f"{n} assigns")
        for a in assigns(ids):
            mesh.handle("wide", link, TaskStarted(task_id=a.task_id, attempt=a.attempt))
        await wait_until(
            lambda: len([m for m in link.sent if isinstance(m, Cancel)]) == n, 20, "n cancels"
        )
        await mesh.settled()
        for task_id in ids:
            row = await store.get(task_id)
            assert row is not None and row.state is TaskState.FAILED
            assert ended_by_coordinator(row.result), row.result
        assert len(mesh.deadlines) == 0

        for _ in range(4):  # churn: 2,000 attempts end long before their start deadline
            done = {t.id for t in await mesh.submit(
                [(TaskSubmit(task_type="test"), {}) for _ in range(500)])}
            placed = await wait_until(
                lambda of=done: len(got := assigns(of)) == 500 and got, 20, "500 assigns")
            for m in placed:
                mesh.handle("wide", link, TaskResult(task_id=m.task_id, attempt=m.attempt,
                                                     status="completed"))
                assert mesh.deadlines.held <= 2 * len(mesh.deadlines) + COMPACT_SLACK
        assert len(mesh.deadlines) == 0
        mesh.check_invariants()
    finally:
        await mesh.stop()
        await store.close()

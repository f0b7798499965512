"""The Mesh's transition table, edge by edge, with a real store and a recording link.

The link is the transport seam (what the WebSocket handler would send); everything
behind it, the Mesh, the queue, placement and SQLite, is the real code.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest

from coordinator.core.mesh import AlreadyFinished, InvalidTransition, Mesh, UnknownTask
from coordinator.model import TaskState
from coordinator.storage.store import Store
from shared.protocol import (
    Ack,
    Assign,
    Cancel,
    Msg,
    Register,
    TaskRef,
    TaskResult,
    TaskStarted,
)
from shared.tasks import TaskSubmit
from tests.conftest import FAST, wait_until

S = TaskState


@dataclass
class RecordingLink:
    sent: list[Msg] = field(default_factory=list)
    closed: tuple[int, str] | None = None

    def send(self, msg: Msg) -> None:
        self.sent.append(msg)

    def close(self, code: int, reason: str) -> None:
        self.closed = (code, reason)

    def of(self, kind: type[Msg]) -> list[Msg]:
        return [m for m in self.sent if isinstance(m, kind)]


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    settings = replace(FAST, data_dir=tmp_path, reconnect_grace_s=0.2, restart_grace_s=0.3)
    store = Store(tmp_path / "mesh.sqlite3")
    await store.open()
    m = Mesh(store, settings)
    await m.start()
    yield m
    m.check_invariants()
    await m.stop()
    await store.close()


def join(mesh: Mesh, name: str, slots: int = 2, running: list[TaskRef] | None = None,
         ) -> RecordingLink:
    link = RecordingLink()
    mesh.register(
        name, Register(executors=["builtin", "process"], cpu_count=slots, slots=slots,
                       running=running or []), link,
    )
    return link


async def submit(mesh: Mesh, **fields: object) -> str:
    spec = TaskSubmit(**{"task_type": "test", **fields})  # type: ignore[arg-type]
    (t,) = await mesh.submit([(spec, {})])
    return t.id


async def assigned(mesh: Mesh, link: RecordingLink, task_id: str) -> Assign:
    def find() -> Assign | None:
        for m in link.of(Assign):
            assert isinstance(m, Assign)
            if m.task_id == task_id:
                return m
        return None

    msg: Assign = await wait_until(find, 5, f"assign of {task_id}")
    return msg


async def settle(mesh: Mesh) -> None:
    """Let dispatch and pending store writes run."""
    for _ in range(5):
        await asyncio.sleep(0.01)


async def state_of(mesh: Mesh, task_id: str) -> TaskState:
    t = await mesh.lookup(task_id)
    assert t is not None
    return t.state


async def stored_state(mesh: Mesh, task_id: str) -> str:
    await settle(mesh)
    t = await mesh.store.get(task_id)
    assert t is not None
    return t.state.value


async def test_queued_assigned_running_completed(mesh: Mesh) -> None:
    link = join(mesh, "a")
    task_id = await submit(mesh)
    msg = await assigned(mesh, link, task_id)
    assert msg.attempt == 1 and await stored_state(mesh, task_id) == "assigned"
    mesh.handle("a", link, TaskStarted(task_id=task_id, attempt=1))
    assert await stored_state(mesh, task_id) == "running"
    mesh.handle("a", link, TaskResult(task_id=task_id, attempt=1, status="completed"))
    await wait_until(lambda: link.of(Ack), 5, "ack")
    assert await stored_state(mesh, task_id) == "completed"
    assert mesh.nodes["a"].completed == 1 and not mesh.nodes["a"].tasks


async def test_assigned_straight_to_failed(mesh: Mesh) -> None:
    link = join(mesh, "a")
    task_id = await submit(mesh)
    await assigned(mesh, link, task_id)
    mesh.handle("a", link, TaskResult(task_id=task_id, attempt=1, status="failed", error="boom"))
    await settle(mesh)
    t = await mesh.lookup(task_id)
    assert t is not None and t.state is S.FAILED and t.error == "boom"
    assert await stored_state(mesh, task_id) == "failed"


@pytest.mark.parametrize("before", ["queued", "assigned", "running"])
async def test_cancel_from_each_unfinished_state(mesh: Mesh, before: str) -> None:
    link = join(mesh, "a") if before != "queued" else None
    task_id = await submit(mesh)
    if link is not None:
        await assigned(mesh, link, task_id)
        if before == "running":
            mesh.handle("a", link, TaskStarted(task_id=task_id, attempt=1))
    assert (await state_of(mesh, task_id)).value == before
    await mesh.cancel(task_id)
    assert await stored_state(mesh, task_id) == "cancelled"
    if link is not None:
        assert Cancel(task_id=task_id, attempt=1, reason="cancelled by user") in link.sent
    with pytest.raises(AlreadyFinished):
        await mesh.cancel(task_id)
    with pytest.raises(UnknownTask):
        await mesh.cancel("nope")


async def test_lost_node_requeues_ahead_of_newer_work(mesh: Mesh) -> None:
    link_a = join(mesh, "a", slots=1)
    first = await submit(mesh)
    await assigned(mesh, link_a, first)
    newer = await submit(mesh)  # same priority, submitted later; "a" is full
    mesh.disconnected("a", link_a, "test")
    await wait_until(lambda: mesh.nodes["a"].status == "lost", 5, "grace expiry")
    t = await mesh.lookup(first)
    assert t is not None and t.state is S.QUEUED and t.attempt == 1
    link_b = join(mesh, "b", slots=1)
    again = await assigned(mesh, link_b, first)
    assert again.attempt == 2
    assert await state_of(mesh, newer) is S.QUEUED
    # The old attempt's result, arriving late, is refused and told to stop.
    link_a2 = join(mesh, "a", slots=1)
    mesh.handle("a", link_a2, TaskResult(task_id=first, attempt=1, status="completed"))
    assert Cancel(task_id=first, attempt=1, reason="fenced: not current") in link_a2.sent
    assert await state_of(mesh, first) is S.ASSIGNED


async def test_lost_after_max_attempts_fails_with_the_reason(mesh: Mesh) -> None:
    task_id = await submit(mesh, max_attempts=1)
    link = join(mesh, "a")
    await assigned(mesh, link, task_id)
    mesh.node_gone(mesh.nodes["a"], "test")
    t = await mesh.lookup(task_id)
    assert t is not None and t.state is S.FAILED
    assert "gave up after 1 attempts" in t.error
    assert await stored_state(mesh, task_id) == "failed"


async def test_register_without_a_task_requeues_it(mesh: Mesh) -> None:
    link = join(mesh, "a")
    task_id = await submit(mesh)
    await assigned(mesh, link, task_id)
    link2 = join(mesh, "a", running=[])  # a restarted client: it does not have the task
    again = await assigned(mesh, link2, task_id)
    assert again.attempt == 2
    t = await mesh.lookup(task_id)
    assert t is not None and t.attempt == 2 and t.state is S.ASSIGNED


async def test_register_with_the_task_keeps_it(mesh: Mesh) -> None:
    link = join(mesh, "a")
    task_id = await submit(mesh)
    await assigned(mesh, link, task_id)
    mesh.disconnected("a", link, "blip")
    link2 = join(mesh, "a", running=[TaskRef(task_id=task_id, attempt=1)])
    assert link.closed is None  # it was already gone; nothing to supersede
    assert await state_of(mesh, task_id) is S.RUNNING
    await asyncio.sleep(0.4)  # past the 0.2 s grace: the kept task must stay
    mesh.handle("a", link2, TaskResult(task_id=task_id, attempt=1, status="completed"))
    await wait_until(lambda: link2.of(Ack), 5, "ack")


@pytest.mark.parametrize(
    ("frm", "to"),
    [(S.QUEUED, S.RUNNING), (S.QUEUED, S.COMPLETED), (S.QUEUED, S.LOST),
     (S.COMPLETED, S.QUEUED), (S.CANCELLED, S.RUNNING), (S.FAILED, S.COMPLETED),
     (S.RUNNING, S.ASSIGNED), (S.RUNNING, S.QUEUED)],
)
async def test_edges_outside_the_table_raise(mesh: Mesh, frm: TaskState, to: TaskState) -> None:
    task_id = await submit(mesh)
    t = mesh.tasks[task_id]
    saved = t.state
    t.state = frm
    with pytest.raises(InvalidTransition):
        mesh._transition(t, to, cause="test")
    t.state = saved


async def test_priority_order_and_restart_reload(tmp_path: Path, mesh: Mesh) -> None:
    low = await submit(mesh, priority=1)
    crit = await submit(mesh, priority=9)
    norm = await submit(mesh, priority=5)
    link = join(mesh, "a", slots=1)
    first = await wait_until(lambda: link.of(Assign), 5, "first assign")
    assert first[0].task_id == crit
    # A second Mesh on the same store sees the running task and the queued ones.
    await settle(mesh)
    mesh2 = Mesh(mesh.store, replace(mesh.settings, restart_grace_s=30))
    await mesh2.start()
    await asyncio.wait_for(mesh2.loaded.wait(), 5)  # queued tasks stream in after start
    try:
        assert mesh2.tasks[crit].state is S.ASSIGNED and mesh2.nodes["a"].status == "disconnected"
        assert {mesh2.tasks[low].state, mesh2.tasks[norm].state} == {S.QUEUED}
        mesh2.check_invariants()
    finally:
        await mesh2.stop()

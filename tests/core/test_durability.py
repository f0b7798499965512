"""Durable before visible: faults injected at the Store seam, driving the real Mesh.

`FaultyStore` is the real SQLite store with one write made to go wrong: an engine error,
a guarded UPDATE that matches no row, a value SQLite cannot hold, or a stall. After every
step the Mesh must be consistent (`check_invariants`), its memory must equal what the
store committed, and nothing it told a node (an `assign`, an `ack`) may be missing from
the store. Hypothesis chooses which write fails and what the steps are.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.core.mesh import Mesh
from coordinator.model import FINISHED, TaskState
from coordinator.storage.store import Insert, Store, Update, Write
from shared.protocol import Ack, Assign, Cancel, Register, Registered, TaskRef, TaskResult
from shared.tasks import TaskSubmit
from tests.conftest import FAST, wait_until
from tests.core.test_mesh import RecordingLink

FAULTS = ("error", "short", "encode", "stall")


class FaultyWrites:
    """Mixed into a real store engine: the `fail_at`-th write (counting from 1) goes wrong as
    `kind` says. Set `fail_at`, `kind`, `stall_s` and `seen` before use (see FaultyStore)."""

    fail_at: int
    kind: str
    stall_s: float
    seen: int

    async def _commit(self, ops: list[Write]) -> None:
        commit = super()._commit  # type: ignore[misc]
        doomed = None
        for op in ops:
            self.seen += 1
            if self.seen == self.fail_at:
                doomed = op
        if doomed is None:
            return await commit(ops)
        if self.kind == "error":
            raise OSError("injected: disk I/O error")
        if self.kind == "stall":
            await asyncio.sleep(self.stall_s)
            return await commit(ops)
        if self.kind == "short" and isinstance(doomed, Update):
            bad = replace(doomed, prev_attempt=doomed.prev_attempt + 1000)
            return await commit([bad if op is doomed else op for op in ops])
        # encode (and short on an insert): a value the engine cannot hold
        if isinstance(doomed, Insert):
            bad_insert = Insert((*doomed.task[:3], 1 << 70, *doomed.task[4:]))
            return await commit([bad_insert if op is doomed else op for op in ops])
        assert isinstance(doomed, Update)
        bad_update = replace(doomed, values=(*doomed.values[:1], 1 << 70, *doomed.values[2:]))
        return await commit([bad_update if op is doomed else op for op in ops])


class FaultyStore(FaultyWrites, Store):
    """The real SQLite store with a fault at the `fail_at`-th write."""

    def __init__(self, path: Path, fail_at: int, kind: str, stall_s: float = 0.3) -> None:
        super().__init__(path)
        self.fail_at, self.kind, self.stall_s = fail_at, kind, stall_s
        self.seen = 0


class Node:
    """A well-behaved node seen from the Mesh: it runs what it is assigned, reports results,
    and re-registers with what it still runs when its connection is closed."""

    def __init__(self, mesh: Mesh, name: str) -> None:
        self.mesh, self.name = mesh, name
        self.links: list[RecordingLink] = []
        self.finished: set[tuple[str, int]] = set()
        self.join()

    @property
    def link(self) -> RecordingLink:
        return self.links[-1]

    def sent(self, kind: type) -> list[Any]:
        return [m for link in self.links for m in link.of(kind)]

    def running(self) -> list[TaskRef]:
        """What this node would report: its attempts not stopped, finished ones not acked."""
        gone = {(m.task_id, m.attempt) for m in self.sent(Cancel)}
        gone |= {(r.task_id, r.attempt) for m in self.sent(Registered) for r in m.stop}
        acked = {(m.task_id, m.attempt) for m in self.sent(Ack)}
        return [
            TaskRef(task_id=a.task_id, attempt=a.attempt,
                    state="finished" if (a.task_id, a.attempt) in self.finished else "running")
            for a in self.sent(Assign)
            if (a.task_id, a.attempt) not in gone | acked
        ]

    def unfinished(self) -> list[TaskRef]:
        return [r for r in self.running() if r.state == "running"]

    def join(self) -> None:
        running = self.running() if self.links else []
        self.links.append(RecordingLink())
        self.mesh.register(
            self.name,
            Register(executors=["builtin", "process"], cpu_count=2, slots=2, running=running),
            self.link,
        )

    def report(self, task_id: str, attempt: int, ok: bool = True) -> None:
        self.finished.add((task_id, attempt))
        self.mesh.handle(self.name, self.link, TaskResult(
            task_id=task_id, attempt=attempt, status="completed" if ok else "failed",
        ))


async def quiesce(mesh: Mesh, nodes: list[Node]) -> None:
    """Wait until every write is settled and any rebuild is over; rejoin closed nodes."""
    for _ in range(50):
        try:
            await mesh.store.barrier()
        except Exception:  # noqa: BLE001 - a failed write: the rebuild follows
            pass
        if mesh._rebuilding is not None and not mesh._rebuilding.done():
            await asyncio.wait_for(asyncio.shield(mesh._rebuilding), 10)
        await asyncio.sleep(0.01)
        for node in nodes:
            if node.link.closed is not None and not mesh.broken:
                node.join()
        if (not mesh.broken and not mesh.store._pending and mesh.store._flusher is None
                and all(n.link.closed is None for n in nodes)):
            await mesh.loaded.wait()
            return
    raise AssertionError("the mesh did not settle")


async def check_memory_is_store(mesh: Mesh, nodes: list[Node]) -> None:
    mesh.check_invariants()
    rows = {t.id: t for t in await mesh.store.load_unfinished()}
    mem = {t.id: t for t in mesh.tasks.values()}
    assert rows.keys() == mem.keys(), (sorted(rows.keys() ^ mem.keys()))
    for task_id, row in rows.items():
        t = mem[task_id]
        assert (t.state, t.attempt, t.node) == (row.state, row.attempt, row.node), task_id
    for node in nodes:
        for a in node.sent(Assign):  # an assign went out only for a committed attempt
            row = await mesh.store.get(a.task_id)
            assert row is not None and row.attempt >= a.attempt, (a.task_id, a.attempt)
        for ack in node.sent(Ack):  # an ack went out only for a committed result
            row = await mesh.store.get(ack.task_id)
            assert row is not None and row.state in FINISHED, (ack.task_id, row)
            assert row.attempt == ack.attempt and row.result is not None


Step = tuple[str, int]
steps = st.lists(
    st.tuples(st.sampled_from(["submit", "batch", "result", "fail", "cancel", "rejoin"]),
              st.integers(0, 7)),
    min_size=3, max_size=12,
)


async def scenario(
    data_dir: Path, fail_at: int, kind: str, plan: list[Step], store: Store | None = None
) -> None:
    """`store`: an unopened faulty store of another engine (test_store_contract.py)."""
    store = store or FaultyStore(data_dir / "mesh.sqlite3", fail_at, kind)
    await store.open()
    mesh = Mesh(store, replace(FAST, data_dir=data_dir, restart_grace_s=30,
                               reconnect_grace_s=30))
    await mesh.start()
    nodes = [Node(mesh, "n1"), Node(mesh, "n2")]
    submitted: list[str] = []
    try:
        for op, arg in plan:
            node = nodes[arg % 2]
            try:
                if op in ("submit", "batch"):
                    specs = [(TaskSubmit(task_type="test", priority=arg), {})] * (
                        1 if op == "submit" else 3)
                    submitted += [t.id for t in await mesh.submit(specs)]
                elif op in ("result", "fail"):
                    todo = node.unfinished()
                    if todo:
                        ref = todo[arg % len(todo)]
                        node.report(ref.task_id, ref.attempt, ok=op == "result")
                elif op == "cancel" and submitted:
                    await mesh.cancel(submitted[arg % len(submitted)])
                elif op == "rejoin":
                    node.join()
            except Exception as exc:  # noqa: BLE001 - refusals are allowed, lies are not
                assert type(exc).__name__ in (
                    "StoreError", "ShortWrite", "StoreBroken", "MeshUnavailable",
                    "AlreadyFinished", "UnknownTask",
                ), repr(exc)
            await quiesce(mesh, nodes)
            await check_memory_is_store(mesh, nodes)
        # Whatever happened, the work still gets done once the faults are over.
        for _ in range(40):
            for node in nodes:
                for ref in node.running():  # finished ones are re-sent until acked
                    node.report(ref.task_id, ref.attempt)
            await quiesce(mesh, nodes)
            if not mesh.tasks:
                break
        await check_memory_is_store(mesh, nodes)
        assert not mesh.tasks, {t.id: t.state for t in mesh.tasks.values()}
    finally:
        await mesh.stop()
        await store.close()


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fail_at=st.integers(1, 25), kind=st.sampled_from(FAULTS), plan=steps)
def test_any_failed_write_leaves_memory_equal_to_the_store(
    fail_at: int, kind: str, plan: list[Step]
) -> None:
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario(Path(d), fail_at, kind, plan))


async def test_a_failed_result_write_is_not_acked_and_the_resend_is(tmp_path: Path) -> None:
    store = FaultyStore(tmp_path / "mesh.sqlite3", fail_at=3, kind="error")  # 3: the result
    await store.open()
    mesh = Mesh(store, replace(FAST, data_dir=tmp_path, restart_grace_s=30))
    await mesh.start()
    try:
        node = Node(mesh, "n1")
        (t,) = await mesh.submit([(TaskSubmit(task_type="test"), {})])  # write 1
        await wait_until(lambda: node.link.of(Assign), 5, "assign")  # write 2
        node.report(t.id, 1)  # write 3 fails: no ack, the mesh rebuilds
        await quiesce(mesh, [node])
        assert not node.sent(Ack)
        assert mesh.rebuilds == 1
        row = await store.get(t.id)
        assert row is not None and row.state is TaskState.ASSIGNED
        node.report(t.id, 1)  # the client re-sends until acked
        await quiesce(mesh, [node])
        assert [(a.task_id, a.attempt) for a in node.sent(Ack)] == [(t.id, 1)]
        await check_memory_is_store(mesh, [node])
        # And once more after it is stored and forgotten by memory: still acked, once stored.
        mesh.finished.clear()
        node.report(t.id, 1)
        await wait_until(lambda: len(node.sent(Ack)) == 2, 5, "second ack")
    finally:
        await mesh.stop()
        await store.close()


async def test_lookup_never_shows_an_uncommitted_state(tmp_path: Path) -> None:
    store = FaultyStore(tmp_path / "mesh.sqlite3", fail_at=2, kind="stall", stall_s=1.0)
    await store.open()
    mesh = Mesh(store, replace(FAST, data_dir=tmp_path))
    await mesh.start()
    try:
        (t,) = await mesh.submit([(TaskSubmit(task_type="test"), {})])
        Node(mesh, "n1")  # the assignment's write stalls for 1 s
        await asyncio.sleep(0.05)
        assert mesh.tasks[t.id].state is TaskState.ASSIGNED  # memory ran ahead...
        started = time.monotonic()
        seen = await mesh.lookup(t.id)  # ...but a reader waits for the commit
        assert seen is not None and seen.state is TaskState.ASSIGNED
        assert time.monotonic() - started > 0.5
        row = await store.get(t.id)
        assert row is not None and row.state is TaskState.ASSIGNED
    finally:
        await mesh.stop()
        await store.close()


LOCKER = """
import sqlite3, sys, time
conn = sqlite3.connect(sys.argv[1], isolation_level=None)
conn.execute("BEGIN IMMEDIATE")
print("locked", flush=True)
time.sleep(float(sys.argv[2]))
conn.execute("ROLLBACK")
"""


async def test_a_sqlite_lock_held_by_another_process(
    coordinator: Any, spawn_client: Any
) -> None:
    """A real lock from another process while nodes join, tasks are submitted and cancelled:
    refusals are 503s, nothing accepted is lost, and memory equals the store after."""
    mesh: Mesh = coordinator.mesh
    spawn_client("a", coordinator.ws_url)
    await wait_until(lambda: "a" in mesh.nodes and mesh.nodes["a"].online, 20, "node a")
    db = coordinator.settings.data_dir / "mesh.sqlite3"
    before = await coordinator.submit(task_type="test")
    await coordinator.wait_finished(before)
    locker = subprocess.Popen([sys.executable, "-c", LOCKER, str(db), "7"],
                              stdout=subprocess.PIPE, text=True)
    try:
        assert locker.stdout is not None
        assert (await asyncio.to_thread(locker.stdout.readline)).strip() == "locked"
        spawn_client("b", coordinator.ws_url)  # a node joins while the store is locked
        accepted, refused = [], 0
        client = coordinator.http
        for i in range(6):
            r = await client.post("/tasks/submit", json={"task_type": "test", "priority": i})
            if r.status_code == 200:
                accepted.append(r.json()["task_id"])
            else:
                assert r.status_code == 503, r.text
                assert r.json()["error"] == "not stored"
                refused += 1
        assert refused >= 1  # the lock outlasts SQLite's busy timeout
        r = await client.post(f"/tasks/{before}/cancel")
        assert r.status_code in (409, 503), r.text
    finally:
        await asyncio.to_thread(locker.wait)
        assert locker.stdout is not None
        locker.stdout.close()
    after = await coordinator.submit(task_type="test")
    for task_id in [*accepted, after]:
        done = await coordinator.wait_finished(task_id)
        assert done["status"] == "completed", done
    await wait_until(lambda: not mesh.broken, 10, "rebuilt")
    rows = {t.id: t.state for t in await mesh.store.load_unfinished()}
    assert rows.keys() == mesh.tasks.keys()
    mesh.check_invariants()

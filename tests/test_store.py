"""The SQLite store: group commit, guarded updates, reload, pages of finished tasks."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import msgspec
import pytest

from coordinator.model import Task, TaskState
from coordinator.store import ShortWrite, Store, StoreBroken, StoreError, insert_of, update_of


def make_task(i: int, state: TaskState = TaskState.QUEUED) -> Task:
    return Task(
        id=f"t{i}", seq=i, task_type="test", priority=5, executor="builtin",
        req_raw=b"{}", spec_raw=msgspec.json.encode({"task_type": "test"}), params_raw=b"{}",
        max_attempts=3, tenant="", submitted_at=time.time(), state=state,
    )


async def test_writes_made_together_commit_together(tmp_path: Path) -> None:
    batches: list[int] = []
    store = Store(tmp_path / "s.db", on_commit=lambda _s, n: batches.append(n))
    await store.open()
    try:
        await asyncio.gather(*(store.write(insert_of(make_task(i))) for i in range(500)))
        assert sum(batches) == 500
        assert len(batches) < 500  # group commit: far fewer transactions than writes
        loaded = await store.load_unfinished()
        assert [t.id for t in loaded] == [f"t{i}" for i in range(500)]
    finally:
        await store.close()


async def test_guarded_update_applies_only_from_the_expected_state(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    await store.open()
    try:
        t = make_task(1)
        await store.write(insert_of(t))
        t.state, t.attempt, t.node = TaskState.ASSIGNED, 1, "a"
        await store.write(update_of(t, TaskState.QUEUED, 0))
        # A stale writer that thinks the task is still queued changes nothing, and is told:
        # the short write fails, as does everything after it until the store is reset.
        failures: list[StoreError] = []
        store.on_failure = failures.append
        t.state, t.attempt = TaskState.CANCELLED, 0
        with pytest.raises(ShortWrite, match="matched 0 rows"):
            await store.write(update_of(t, TaskState.QUEUED, 0))
        assert len(failures) == 1
        with pytest.raises(StoreBroken):
            await store.write(insert_of(make_task(2)))
        got = await store.get("t1")
        assert got is not None and got.state is TaskState.ASSIGNED and got.attempt == 1
        assert await store.get("t2") is None
        await store.reset()
        await store.write(insert_of(make_task(2)))
        assert await store.get("t2") is not None
    finally:
        await store.close()


async def test_reopen_sees_everything_and_pages_finished(tmp_path: Path) -> None:
    store = Store(tmp_path / "s.db")
    await store.open()
    for i in range(5):
        t = make_task(i)
        await store.write(insert_of(t))
        if i % 2 == 0:
            t.state, t.finished_at = TaskState.COMPLETED, 1000.0 + i
            t.result = {"exit_code": 0, "output": f"out {i}"}
            await store.write(update_of(t, TaskState.QUEUED, 0))
    await store.close()

    again = Store(tmp_path / "s.db")
    await again.open()
    try:
        counts, top = await again.counts()
        assert counts == {"completed": 3} and top == 4
        assert [t.id for t in await again.load_unfinished()] == ["t1", "t3"]
        page = await again.finished(limit=2, offset=0)
        assert [t.id for t in page] == ["t4", "t2"]
        assert page[0].result == {"exit_code": 0, "output": "out 4"}
        assert [t.id for t in await again.finished(limit=2, offset=2)] == ["t0"]
    finally:
        await again.close()

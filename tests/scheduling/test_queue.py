"""The queue of requirement classes: ready classes in a heap, blocked ones parked until
capacity that could fit them appears.

The unit half drives `TaskQueue` against a naive model (hypothesis chooses the
operations). The Mesh half runs the real Mesh, store and placement with a recording link
(the transport seam) and counts calls of the real `place()`: blocked classes must cost
nothing per decision, and a freed GPU must wake only the classes it could fit.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from msgspec import structs

import coordinator.core.dispatch as dispatch_module
from coordinator.core.mesh import Mesh
from coordinator.model import TaskState
from coordinator.scheduling.queue import ClassKey, TaskQueue
from coordinator.scheduling.wake import class_wake_key, node_wake_keys
from coordinator.storage.store import Store
from shared.protocol import Assign, GpuInfo, Heartbeat, Register, TaskResult
from shared.tasks import Requirements, TaskSubmit
from tests.conftest import FAST, wait_until
from tests.core.test_mesh import RecordingLink


class Why:
    reason = "nothing fits"


def key(n: int) -> ClassKey:
    return ("builtin", str(n).encode())


# --- TaskQueue alone -------------------------------------------------------------------


def test_next_is_the_first_head_across_classes_and_pop_requeues_the_class() -> None:
    live: set[str] = {"a1", "a2", "b1"}
    q = TaskQueue(live.__contains__)
    q.push(key(1), 5.0, 1, "a1")
    q.push(key(1), 5.0, 3, "a2")
    q.push(key(2), 5.0, 2, "b1")
    order = []
    while (found := q.next()) is not None:
        k, entry = found
        assert q.pop(k) == entry
        live.discard(entry[2])
        order.append(entry[2])
        q.check()
    assert order == ["a1", "b1", "a2"]
    assert len(q) == 0


def test_cancelled_heads_are_skipped_and_a_better_task_comes_first() -> None:
    live = {"a1", "a2", "b1"}
    q = TaskQueue(live.__contains__)
    q.push(key(1), 1.0, 1, "a1")
    q.push(key(2), 2.0, 2, "b1")
    q.push(key(1), 3.0, 3, "a2")
    live.discard("a1")  # cancelled while queued: its entry stays until it surfaces
    assert q.next() == (key(2), (2.0, 2, "b1"))
    live.add("b0")
    q.push(key(2), 0.5, 4, "b0")  # better than the class's head: it surfaces first
    assert q.next() == (key(2), (0.5, 4, "b0"))
    q.check()


def test_a_blocked_class_waits_until_its_wake_key_and_keeps_its_reason() -> None:
    live = {"a1", "b1", "b2"}
    q = TaskQueue(live.__contains__)
    q.push(key(1), 1.0, 1, "a1")
    q.push(key(2), 2.0, 2, "b1")
    q.block(key(1), Why(), [("builtin", "type", "A100")])
    assert q.next() == (key(2), (2.0, 2, "b1")) and q.blocked == 1
    q.push(key(1), 0.1, 3, "a0")  # same needs, same NoFit: it stays blocked
    live.add("a0")
    assert q.next() == (key(2), (2.0, 2, "b1"))
    assert q.wake({("builtin", "type", "H100"), ("builtin", "cpu")}) == 0
    assert q.reasons[key(1)].reason == "nothing fits"
    assert q.wake({("builtin", "type", "A100")}) == 1
    assert q.next() == (key(1), (0.1, 3, "a0")) and q.blocked == 0
    assert key(1) in q.reasons  # readable until the class is tried again
    q.pop(key(1))
    assert key(1) not in q.reasons
    q.check()


def test_a_blocked_class_whose_tasks_all_left_is_forgotten_on_wake() -> None:
    live = {"a1"}
    q = TaskQueue(live.__contains__)
    q.push(key(1), 1.0, 1, "a1")
    q.block(key(1), Why(), [("x",)])
    live.clear()
    assert q.wake({("x",)}) == 0
    assert len(q) == 0 and q.blocked == 0 and key(1) not in q.reasons
    q.check()


_ops = st.lists(
    st.one_of(
        st.tuples(st.just("push"), st.integers(0, 5), st.integers(0, 3)),
        st.tuples(st.just("cancel"), st.integers(0, 40), st.just(0)),
        st.tuples(st.just("take"), st.just(0), st.just(0)),
        st.tuples(st.just("block"), st.just(0), st.integers(0, 2)),
        st.tuples(st.just("wake"), st.integers(0, 2), st.just(0)),
    ),
    max_size=60,
)


@settings(max_examples=200, deadline=None)
@given(_ops)
def test_the_queue_agrees_with_a_naive_model(ops: list[tuple[str, int, int]]) -> None:
    """next() is always the least live head among unblocked classes; nothing is lost."""
    live: set[str] = set()
    q = TaskQueue(live.__contains__)
    model: dict[ClassKey, set[tuple[float, int, str]]] = {}
    blocked: dict[ClassKey, int] = {}
    seq = 0
    for op, a, b in ops:
        if op == "push":
            seq += 1
            task_id = f"t{seq}"
            live.add(task_id)
            q.push(key(a), float(b), seq, task_id)
            model.setdefault(key(a), set()).add((float(b), seq, task_id))
        elif op == "cancel":
            live.discard(f"t{a}")
        elif op in ("take", "block"):
            found = q.next()
            heads = {
                k: min(e for e in es if e[2] in live)
                for k, es in model.items()
                if k not in blocked and any(e[2] in live for e in es)
            }
            expected = min(heads.items(), key=lambda kv: kv[1]) if heads else None
            assert found == (expected[0], expected[1]) if expected else found is None
            if found is not None and op == "take":
                q.pop(found[0])
                live.discard(found[1][2])
            elif found is not None:
                q.block(found[0], Why(), [("w", b)])
                blocked[found[0]] = b
        else:
            q.wake({("w", a)})
            blocked = {k: w for k, w in blocked.items() if w != a}
        q.check()
    q.wake_all()
    drained = set()
    while (found := q.next()) is not None:
        drained.add(q.pop(found[0])[2])
        live.discard(found[1][2])
    assert not live and q.blocked == 0, (live, drained)


# --- wake keys -------------------------------------------------------------------------


def test_wake_keys_match_what_placement_matches() -> None:
    node = _node_with(["NVIDIA GeForce RTX 4090"], executors=("builtin", "docker"))
    keys = node_wake_keys(node)
    fits = [
        Requirements(gpu_count=1, gpu_type="rtx 4090"),
        Requirements(gpu_count=1, gpu_type="4090"),
        Requirements(gpu_count=1, gpu_type="GeForce-RTX"),
        Requirements(gpu_count=1, vendor="NVIDIA"),
        Requirements(gpu_count=1),
        Requirements(),
    ]
    for req in fits:
        assert class_wake_key(req, "builtin") in keys, req
    misses = [
        (Requirements(gpu_count=1, gpu_type="A100"), "builtin"),
        (Requirements(gpu_count=2), "builtin"),
        (Requirements(gpu_count=1, vendor="amd"), "builtin"),
        (Requirements(gpu_count=1), "process"),
    ]
    for req, executor in misses:
        assert class_wake_key(req, executor) not in keys, req
    assert ("builtin", "cpu") not in node_wake_keys(node, gpus_only=True)
    node.status = "lost"
    assert not node_wake_keys(node)


def _node_with(names: list[str], executors: tuple[str, ...] = ("builtin",)) -> Any:
    from coordinator.model import Node

    gpus = [GpuInfo(index=i, name=n, vendor="nvidia", memory_total_mb=24_000)
            for i, n in enumerate(names)]
    return Node(name="n", executors=frozenset(executors), gpus=gpus)


# --- the Mesh: placement calls counted -------------------------------------------------


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    store = Store(tmp_path / "mesh.sqlite3")
    await store.open()
    m = Mesh(store, replace(FAST, data_dir=tmp_path, node_timeout_s=60))
    await m.start()
    yield m
    m.check_invariants()
    await m.stop()
    await store.close()


@pytest.fixture
def place_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every call of the real `place()` by the Mesh's dispatch pass (coordinator/core/dispatch.py),
    as the gpu_type it was asked for."""
    calls: list[str] = []
    real: Callable[..., Any] = dispatch_module.place

    def counting(req: Requirements, *args: Any, **kwargs: Any) -> Any:
        calls.append(req.gpu_type)
        return real(req, *args, **kwargs)

    monkeypatch.setattr(dispatch_module, "place", counting)
    return calls


def gpu_node(mesh: Mesh, name: str, gpu: str, used_mb: int = 0) -> RecordingLink:
    link = RecordingLink()
    mesh.register(name, Register(
        executors=["builtin"], cpu_count=8, slots=8,
        gpus=[GpuInfo(index=0, name=gpu, vendor="nvidia", memory_total_mb=24_000,
                      memory_used_mb=used_mb)],
    ), link)
    return link


async def submit(mesh: Mesh, **req: Any) -> str:
    spec = TaskSubmit(task_type="test", requirements=Requirements(**req))
    (t,) = await mesh.submit([(spec, {})])
    return t.id


async def idle(mesh: Mesh) -> None:
    """Until the dispatcher has nothing left to do."""
    await wait_until(lambda: not mesh._wake.is_set(), 5, "the dispatcher to run")
    await asyncio.sleep(0)


async def assigned_to(mesh: Mesh, task_id: str) -> str:
    def where() -> str | None:
        t = mesh.tasks.get(task_id)
        return t.node if t is not None and t.state is TaskState.ASSIGNED else None

    node: str = await wait_until(where, 5, f"task {task_id} assigned")
    return node


async def test_blocked_classes_cost_no_placement_calls(mesh: Mesh, place_calls: list[str]) -> None:
    gpu_node(mesh, "a", "NVIDIA GeForce RTX 4090")
    n = 1000
    specs = [
        (TaskSubmit(task_type="test", requirements=Requirements(gpu_count=1, gpu_type=f"NOPE{i}")),
         {})
        for i in range(n)
    ]
    await mesh.submit(specs)
    await wait_until(lambda: mesh.queue.blocked == n, 10, f"{n} blocked classes")
    assert len(place_calls) == n  # each tried once, then parked
    assert "no node fits" in mesh.queued_reason(mesh.tasks[next(iter(mesh.tasks))])
    for _ in range(3):  # every submission runs a pass; the blocked ones are not retried
        place_calls.clear()
        task_id = await submit(mesh)
        await assigned_to(mesh, task_id)
        await idle(mesh)
        assert place_calls == [""], place_calls
    mesh.queue.check()


async def test_a_freed_gpu_wakes_only_the_classes_it_could_fit(
    mesh: Mesh, place_calls: list[str]
) -> None:
    link = gpu_node(mesh, "a", "NVIDIA GeForce RTX 4090")
    first = await submit(mesh, gpu_count=1, gpu_type="4090")
    assert await assigned_to(mesh, first) == "a"
    waiting = await submit(mesh, gpu_count=1, gpu_type="rtx4090")  # the GPU is taken
    elsewhere = await submit(mesh, gpu_count=1, gpu_type="A100")
    too_many = await submit(mesh, gpu_count=2)
    await wait_until(lambda: mesh.queue.blocked == 3, 5, "three blocked classes")
    await idle(mesh)
    place_calls.clear()
    woken = mesh.queue.woken
    mesh.handle("a", link, TaskResult(task_id=first, attempt=1, status="completed"))
    assert await assigned_to(mesh, waiting) == "a"
    await idle(mesh)
    assert place_calls == ["rtx4090"] and mesh.queue.woken == woken + 1
    assert mesh.tasks[elsewhere].state is TaskState.QUEUED
    assert mesh.tasks[too_many].state is TaskState.QUEUED
    # a node with an A100 joins: only the A100 class is tried
    place_calls.clear()
    gpu_node(mesh, "b", "NVIDIA A100-SXM4-80GB")
    assert await assigned_to(mesh, elsewhere) == "b"
    await idle(mesh)
    assert place_calls == ["A100"], place_calls
    assert [m.task_id for m in link.of(Assign)] == [first, waiting]  # type: ignore[attr-defined]


async def test_more_free_vram_in_a_heartbeat_wakes_a_class_blocked_on_memory(
    mesh: Mesh, place_calls: list[str]
) -> None:
    link = gpu_node(mesh, "a", "NVIDIA L40S", used_mb=20_000)
    task_id = await submit(mesh, gpu_count=1, memory_gb=10)
    await wait_until(lambda: mesh.queue.blocked == 1, 5, "the class blocked on memory")
    gpus = mesh.nodes["a"].gpus
    mesh.handle("a", link, Heartbeat(gpus=[structs.replace(gpus[0], memory_used_mb=21_000)]))
    await idle(mesh)
    assert mesh.tasks[task_id].state is TaskState.QUEUED and mesh.queue.blocked == 1
    mesh.handle("a", link, Heartbeat(gpus=[structs.replace(gpus[0], memory_used_mb=1_000)]))
    assert await assigned_to(mesh, task_id) == "a"

"""Cross-checks of the Mesh's registry, queue and tasks, run after every integration test
(as dask's validate_state): a hang or a wrong answer is reported as the invariant behind it."""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from typing import TYPE_CHECKING, Protocol

from coordinator.model import ACTIVE, FINISHED, DrainMark, Node, Task, TaskState
from coordinator.scheduling.policy import queue_class

Q, A, R, LOST = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING, TaskState.LOST

if TYPE_CHECKING:
    from coordinator.scheduling.fairqueue import FairQueue
    from coordinator.scheduling.tenants import Tenants
    from coordinator.settings import Settings


class Checked(Protocol):
    """What the cross-checks read on the Mesh (coordinator/core/mesh.py)."""

    @property
    def nodes(self) -> Mapping[str, Node]: ...
    @property
    def tasks(self) -> Mapping[str, Task]: ...
    @property
    def drains(self) -> Mapping[str, DrainMark]: ...
    @property
    def state_counts(self) -> Mapping[TaskState, int]: ...
    @property
    def queued_by_band(self) -> Mapping[str, int]: ...
    @property
    def queue(self) -> FairQueue: ...
    @property
    def fair(self) -> Tenants: ...
    @property
    def settings(self) -> Settings: ...


def check_invariants(mesh: Checked) -> None:
    """Raises AssertionError naming the first broken invariant."""
    held: Counter[str] = Counter()
    for node in mesh.nodes.values():
        for task_id in node.tasks:
            t = mesh.tasks.get(task_id)
            assert t is not None and t.state in ACTIVE, (node.name, task_id)
            assert t.node == node.name, (task_id, t.node, node.name)
            held[task_id] += 1
        for index, holders in node.gpu_tasks.items():
            assert holders, (node.name, index)
            assert holders <= node.tasks, (node.name, index)
        assert node.cpu_tasks <= node.tasks
        assert node.drain is mesh.drains.get(node.name), (node.name, node.drain)  # drain.py
    for t in mesh.tasks.values():
        assert t.state not in FINISHED and t.state is not LOST, (t.id, t.state)
        if t.state in ACTIVE:  # a gang task holds no node: its members do (core/gangs.py)
            assert held[t.id] == (1 if t.gang_size == 1 else 0), (t.id, held[t.id])
    by_state = Counter(t.state for t in mesh.tasks.values())
    for state in (Q, A, R):
        assert by_state[state] == mesh.state_counts[state], (state, by_state[state])
    assert sum(mesh.queued_by_band.values()) == by_state[Q]
    _check_queue(mesh)
    # tenants' usage ledger (coordinator/scheduling/tenants.py)
    mesh.fair.check(mesh.tasks.values())


def _check_queue(mesh: Checked) -> None:
    """Every queued task has exactly one live entry, in its own class (ready or blocked),
    and the queue's heaps and wake index agree. O(queue entries)."""
    mesh.queue.check()
    entries: Counter[str] = Counter()
    for key, (_, _, task_id) in mesh.queue.entries():
        t = mesh.tasks.get(task_id)
        if t is not None and t.state is Q:
            assert key == queue_class(t, mesh.settings.policy), (
                "queued task in another class", task_id)
            entries[task_id] += 1
    for t in mesh.tasks.values():
        if t.state is Q:
            assert entries[t.id] == 1, ("queued task not in the queue once", t.id, entries[t.id])

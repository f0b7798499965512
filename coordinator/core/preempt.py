"""Preemption for critical work (opt-in: `MESH_PREEMPTION=on`).

When a critical task (priority >= 8) fits nowhere, `plan` looks for the running work of
lower priority whose GPUs would make it fit: per node, candidates lowest priority first
(then the most recently placed, which loses the least), adding one at a time until
placement (coordinator/scheduling/placement.py, the same `place`) says the task fits on what they
hold plus what is free. Of all nodes, the plan that stops the lowest-priority work, then
the fewest GPUs, wins. Work that is critical itself, or was submitted `preemptible: false`,
is never stopped.

Carrying it out (`Preemption.preempt_for`, a part the Mesh holds as `mesh.preemption`,
synchronous inside a dispatch pass): each victim goes back to the queue without spending
an attempt (its history says by whom it was preempted; like a node fault, it counts as an
infrastructure requeue, coordinator/core/faults.py), its node is sent `cancel` (the client
SIGTERMs it, then kills it after its own grace), and the critical task is assigned to the
freed GPUs at once but its `assign` goes out `MESH_PREEMPT_GRACE_S` later, the time the
victims have to checkpoint and leave. Its `assigned_at` is that moment.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

from coordinator.core.faults import Transition, note_history
from coordinator.model import ACTIVE, Node, Task, TaskState
from coordinator.scheduling.placement import NoFit, Placement, place
from shared.protocol import Cancel, GpuInfo, NodePolicy

if TYPE_CHECKING:
    from coordinator.core.logs import TaskLogs
    from coordinator.settings import Settings

log = logging.getLogger("coordinator.core.mesh")

CRITICAL = 8  # priorities 8-10


@dataclass(frozen=True, slots=True)
class Plan:
    node: str
    victims: tuple[Task, ...]
    placement: Placement

    @property
    def cost(self) -> tuple[int, int, int]:
        stopped = sum(len(v.gpu_indices) for v in self.victims)
        return (max(v.priority for v in self.victims), stopped, len(self.victims))


class _Without:
    """A node as placement would see it if `gone` tasks let go of their GPUs."""

    def __init__(self, node: Node, gone: set[str]) -> None:
        self._node = node
        self.gpu_tasks: dict[int, object] = {}
        self.gpu_shared_mb: dict[int, int] = {}
        for i, holders in node.gpu_tasks.items():
            left = holders - gone
            if left:
                self.gpu_tasks[i] = left
                if left == holders and i in node.gpu_shared_mb:
                    self.gpu_shared_mb[i] = node.gpu_shared_mb[i]

    name = property(lambda self: self._node.name)
    online = property(lambda self: self._node.online)
    executors = property(lambda self: self._node.executors)
    labels = property(lambda self: self._node.labels)
    free_slots = property(lambda self: self._node.free_slots)
    load = property(lambda self: self._node.load)
    unavailable = property(lambda self: self._node.unavailable)

    @property
    def gpus(self) -> Sequence[GpuInfo]:
        return self._node.gpus

    @property
    def policy(self) -> NodePolicy | None:
        return self._node.policy


def stoppable(v: Task, crit: Task) -> bool:
    return (v.state in ACTIVE and bool(v.gpu_indices) and v.priority < crit.priority
            and v.priority < CRITICAL and v.spec.preemptible
            and v.member_of is None)  # a gang is never stopped piecemeal (core/gangs.py)


def plan(crit: Task, nodes: Iterable[Node], tasks: Mapping[str, Task], mode: str) -> Plan | None:
    """The cheapest set of running tasks to stop so that `crit` fits; None if none does."""
    req, best = crit.spec.requirements, None
    if not req.gpu_count:
        return None  # CPU slots are not preempted
    for node in nodes:
        if not node.online or node.unavailable:
            continue
        cands = sorted(
            (tasks[i] for i in node.tasks if i in tasks and stoppable(tasks[i], crit)),
            key=lambda v: (v.priority, -(v.assigned_at or 0.0)),
        )
        chosen: list[Task] = []
        for v in cands:
            chosen.append(v)
            fit = place(req, crit.executor, [_Without(node, {c.id for c in chosen})],
                        crit.priority, mode, ask=crit.policy_ask)
            if isinstance(fit, Placement):
                used = set(fit.gpu_indices)
                victims = tuple(c for c in chosen if used & set(c.gpu_indices))
                found = Plan(node.name, victims, fit)
                if best is None or found.cost < best.cost:
                    best = found
                break
    return best


class PreemptHost(Protocol):
    """What preemption reads on the Mesh, at the time of each call."""

    @property
    def settings(self) -> Settings: ...
    @property
    def nodes(self) -> Mapping[str, Node]: ...
    @property
    def tasks(self) -> Mapping[str, Task]: ...
    @property
    def logs(self) -> TaskLogs: ...


class Preemption:
    """Carries out a `plan` through the Mesh's transition table (`transition`). Held by the
    Mesh for its whole life: `preempted_total` counts across rebuilds."""

    def __init__(self, mesh: PreemptHost, transition: Transition) -> None:
        self._mesh = mesh
        self._transition = transition
        self.preempted_total = 0

    def preempt_for(self, crit: Task, nofit: NoFit) -> tuple[Placement | NoFit, float]:
        """Free GPUs for a critical task that fits nowhere; returns where it goes and how
        long its `assign` waits, or the NoFit (and 0) when nothing may be stopped."""
        mesh = self._mesh
        settings = mesh.settings
        if crit.priority < CRITICAL or not settings.preemption:
            return nofit, 0.0
        found = plan(crit, mesh.nodes.values(), mesh.tasks, settings.balancing)
        if found is None:
            return nofit, 0.0
        node = mesh.nodes[found.node]
        for v in found.victims:
            self._stop_victim(v, node, crit)
        return found.placement, settings.preempt_grace_s

    def _stop_victim(self, v: Task, node: Node, crit: Task) -> None:
        # The victim's tenant reads this (history, logs): another tenant's task id stays out
        by = crit.id if crit.tenant == v.tenant else "of another tenant"
        cause = f"preempted by critical task {by} (priority {crit.priority}) on {node.name}"
        attempt = v.attempt
        self.preempted_total += 1
        self._mesh.logs.open(v.id).append(f"[gpumesh] attempt {attempt} {cause}\n")
        v.infra_retries += 1  # not the task's fault: it spends no attempt
        note_history(v, node.name, cause, infra=True)
        self._transition(v, TaskState.LOST, cause=cause)
        self._transition(v, TaskState.QUEUED, cause=cause)
        log.info("task %s %s", v.id, cause, extra={"task": v.id, "node": node.name})
        if node.link is not None:
            node.link.send(Cancel(task_id=v.id, attempt=attempt, reason=cause,
                                  grace_s=self._mesh.settings.preempt_grace_s))

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

Gangs (issue 28) are preempted and preempt as one unit. A running gang member is a victim
like any task, but stopping it stops its whole gang (`stop_gang`, coordinator/core/gangs.py
`Gangs.preempted`: every member is cancelled with the grace, the gang requeued as one
without spending an attempt), and a plan that stops it is costed at all of its gang's GPUs.
A critical gang that fits nowhere (`preempt_gang_for`) gets N distinct nodes, each either
free for a member or freed by a plan on that node (`plan_gang`, cheapest first), or nothing
is stopped: every member's room is found before any victim is touched.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping, Sequence
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
        stopped = sum(_unit_gpus(v) for v in self.victims)
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


def _unit_gpus(v: Task) -> int:
    """The GPUs stopping `v` frees in all: a gang member stops its whole gang."""
    ref = v.member_of
    return len(v.gpu_indices) * (ref.nodes if ref is not None else 1)


def stoppable(v: Task, crit: Task) -> bool:
    # a gang member is stoppable, but only with its whole gang (core/gangs.py `preempted`)
    return (v.state in ACTIVE and bool(v.gpu_indices) and v.priority < crit.priority
            and v.priority < CRITICAL and v.spec.preemptible)


def _plan_node(crit: Task, node: Node, tasks: Mapping[str, Task], mode: str) -> Plan | None:
    """The fewest lowest-priority tasks on `node` to stop so that one `crit` fits there."""
    req = crit.spec.requirements
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
            return Plan(node.name, tuple(c for c in chosen if used & set(c.gpu_indices)), fit)
    return None


def plan(crit: Task, nodes: Iterable[Node], tasks: Mapping[str, Task], mode: str) -> Plan | None:
    """The cheapest set of running tasks to stop so that `crit` fits; None if none does."""
    req, best = crit.spec.requirements, None
    if not req.gpu_count:
        return None  # CPU slots are not preempted
    for node in nodes:
        if not node.online or node.unavailable:
            continue
        found = _plan_node(crit, node, tasks, mode)
        if found is not None and (best is None or found.cost < best.cost):
            best = found
    return best


def plan_gang(crit: Task, n: int, nodes: Iterable[Node], tasks: Mapping[str, Task],
              mode: str) -> list[Plan] | None:
    """`n` distinct nodes for gang `crit`'s members, rank 0 first: nodes where a member fits
    as they are (a Plan with no victims) before the cheapest plans; None unless all `n` are
    found (then nothing may be stopped). Stopping more than one node's victims only frees
    more, so each node's placement still holds once all of them are stopped."""
    req = crit.spec.requirements
    if not req.gpu_count:
        return None
    free: list[Plan] = []
    costly: list[Plan] = []
    for node in nodes:
        if not node.online or node.unavailable:
            continue
        fit = place(req, crit.executor, [node], crit.priority, mode, ask=crit.policy_ask)
        if isinstance(fit, Placement):
            free.append(Plan(node.name, (), fit))
        elif (found := _plan_node(crit, node, tasks, mode)) is not None:
            costly.append(found)
    if len(free) >= n or len(free) + len(costly) < n:
        return None  # it fits without stopping anything, or it cannot fit at all
    costly.sort(key=lambda p: p.cost)
    return free + costly[: n - len(free)]


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
        # Stops a gang member's whole gang (coordinator/core/gangs.py `Gangs.preempted`);
        # set by the Mesh. Returns whether the gang was stopped.
        self.stop_gang: Callable[[Task, str, float], bool] | None = None
        # gang task id -> how long its members' assigns wait (victims leaving), read by
        # the Mesh when it starts the gang that `preempt_gang_for` found room for.
        self.gang_hold: dict[str, float] = {}

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

    def preempt_gang_for(self, crit: Task, nofit: NoFit) -> list[Placement] | NoFit:
        """Room for every member of a critical gang that fits nowhere, found at once before
        any victim is stopped; the NoFit (nothing stopped) when not all of it can be found.
        Its members' assigns wait MESH_PREEMPT_GRACE_S (`gang_hold`)."""
        mesh = self._mesh
        settings = mesh.settings
        if crit.priority < CRITICAL or not settings.preemption:
            return nofit
        found = plan_gang(crit, crit.gang_size, mesh.nodes.values(), mesh.tasks,
                          settings.balancing)
        if found is None:
            return nofit
        for p in found:
            node = mesh.nodes[p.node]
            for v in p.victims:
                self._stop_victim(v, node, crit)
        self.gang_hold[crit.id] = settings.preempt_grace_s
        return [p.placement for p in found]

    def _stop_victim(self, v: Task, node: Node, crit: Task) -> None:
        if v.state not in ACTIVE:
            return  # stopped already, with its gang (another node's plan named it too)
        # The victim's tenant reads this (history, logs): another tenant's task id stays out
        by = crit.id if crit.tenant == v.tenant else "of another tenant"
        what = "critical gang" if crit.gang_size > 1 else "critical task"
        cause = f"preempted by {what} {by} (priority {crit.priority}) on {node.name}"
        if v.member_of is not None:  # its whole gang stops, as one unit (core/gangs.py)
            if self.stop_gang is not None and self.stop_gang(
                v, cause, self._mesh.settings.preempt_grace_s
            ):
                self.preempted_total += 1  # a gang counts once
            return
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

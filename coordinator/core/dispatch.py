"""One dispatch pass: which queued task goes where, decided without I/O.

The Mesh (`Mesh._dispatch_pass`, coordinator/core/mesh.py) and the simulator
(coordinator/sim/engine.py) run this same code; each hands in what differs:

- `host`: where the queue, the tenants, placement's index, the tasks and the settings are
  read (the Mesh itself; the simulator's cluster). Read at each call, so a Mesh rebuilt
  from its store is seen as it is now.
- `assign(task, placement, hold_s)`: carry a decision out. The Mesh writes the transition
  queued -> assigned and sends the `assign` once it commits; the simulator starts the job on
  its virtual clock. The task has left the queue (`queue.pop`) when it is called.
- `preempt(task, nofit)`: free GPUs for critical work (coordinator/core/preempt.py), or None;
  `preempt_gang(gang, nofit)` the same for a critical gang, all of its members' room or none.

A decision takes the ready class whose head comes first (the queue's order, across tenants
by fair share). A class whose head does not fit is parked with its NoFit and costs nothing
more until capacity that could fit it frees up (coordinator/scheduling/wake.py): blocked
classes are not retried pass after pass.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Hashable, Mapping
from typing import Protocol

from coordinator.model import Node, Task
from coordinator.scheduling.fairqueue import FairQueue, QuotaHold, quota_wake_key
from coordinator.scheduling.gang import GangBackoff, GangHold, GangReservation, place_gang
from coordinator.scheduling.placement import NoFit, Placement, PlacementIndex, place
from coordinator.scheduling.policy import STOP, STRICT, Gate
from coordinator.scheduling.policy import _node_outlook as node_outlook
from coordinator.scheduling.tenants import Tenants
from coordinator.scheduling.wake import class_wake_key
from coordinator.settings import Settings

Assign = Callable[[Task, Placement, float], None]
AssignGang = Callable[[Task, list[Placement]], None]  # a gang's N placements, rank 0 first
Preempt = Callable[[Task, NoFit], tuple[Placement | NoFit, float]]
PreemptGang = Callable[[Task, NoFit], list[Placement] | NoFit]


class DispatchHost(Protocol):
    """What a dispatch pass reads, at the time of each call."""

    @property
    def settings(self) -> Settings: ...
    @property
    def queue(self) -> FairQueue: ...
    @property
    def fair(self) -> Tenants: ...
    @property
    def index(self) -> PlacementIndex: ...
    @property
    def tasks(self) -> Mapping[str, Task]: ...
    @property
    def nodes(self) -> Mapping[str, Node]: ...


def decide(host: DispatchHost, t: Task, preempt: Preempt | None) -> tuple[Placement | NoFit, float]:
    """Where `t` goes now (and how long its `assign` waits), or why it cannot go anywhere.

    Gang tasks (issue 28) plug in here: one decision for all of a gang's members."""
    decision = place(
        t.spec.requirements, t.executor, host.index, t.priority, host.settings.balancing,
        ask=t.policy_ask,
    )
    if isinstance(decision, NoFit) and preempt is not None and host.settings.preemption:
        return preempt(t, decision)  # coordinator/core/preempt.py
    return decision, 0.0


def decide_gang(host: DispatchHost, t: Task, supported: bool = True) -> list[Placement] | NoFit:
    """Where each member of gang task `t` goes (coordinator/scheduling/gang.py), all or none.
    A gang is never preempted piecemeal; a critical one may preempt (`dispatch_pass`'s
    `preempt_gang`) only once every member's room is found."""
    if not supported:
        return NoFit(filtered={"do not run gang tasks here": len(host.index)})
    spec = t.spec
    return place_gang(
        spec.requirements, spec.nodes, t.executor, host.index, t.priority,
        host.settings.balancing, ask=t.policy_ask,
    )


GANG_WAKE: Hashable = ("gang-hold",)  # classes held for a gang's reservation wait here


def _around(host: DispatchHost, t: Task, kept: GangReservation, now: float) -> Placement | GangHold:
    """`t` placed on a node the reserving gang does not keep, or why it waits."""
    gang = host.tasks.get(kept.holder)
    res = kept.res
    free = [n for n in host.nodes.values()
            if (n.name not in res.spare if res is not None
                else gang is None or node_outlook(gang, n, host.tasks, now) is None)]
    found = place(t.spec.requirements, t.executor, free, t.priority, host.settings.balancing,
                  ask=t.policy_ask)
    if isinstance(found, Placement):
        return found
    return GangHold(kept.holder, None if res is None else res.at)


def dispatch_pass(
    host: DispatchHost, assign: Assign, preempt: Preempt | None = None,
    deadline: float | None = None, assign_gang: AssignGang | None = None,
    gang_hold: GangReservation | None = None, preempt_gang: PreemptGang | None = None,
) -> bool:
    """Place queued work until nothing more fits. Synchronous: no await inside.

    `deadline` (a `time.perf_counter()` value, None for none): the pass stops after it and
    returns True, so the caller can let its event loop breathe and run another pass; False
    when nothing more fits now. `gang_hold`: nodes kept for the first gang that does not
    fit (coordinator/scheduling/gang.py), under the `priority` policy."""
    queue = host.queue
    kept = gang_hold if gang_hold is not None and host.settings.policy not in STRICT else None
    now = host.fair.clock()
    if kept is not None and kept.holder:
        kept.refresh(host.tasks)
        if not kept.holder:  # its gang left the queue: what waited for it may go
            queue.wake((GANG_WAKE,))
    # fifo and backfill: what a head that does not fit lets by (coordinator/scheduling/policy.py)
    gate = Gate.of(host.settings.policy, queue, host.index, host.nodes, host.tasks,
                   host.fair.clock(), lambda t: decide(host, t, None)[0])
    while (found := queue.next()) is not None:
        if deadline is not None and time.perf_counter() > deadline:
            return True
        key, entry = found
        t = host.tasks[entry[2]]
        if why := host.fair.hold(t):  # its tenant is at a quota: wait until it lets go
            queue.block(key, QuotaHold(why), (quota_wake_key(key[0]),))
            continue
        if gate is not None and (verdict := gate.check(key, entry, t)) is not None:
            if verdict == STOP:
                break
            if isinstance(verdict, Placement):  # backfilled: it cannot delay the head
                queue.pop(key)
                assign(t, verdict, 0.0)
            continue
        if t.gang_size > 1:  # a gang: all of its members in one decision, or none
            if gang_hold is not None and gang_hold.backoff.get(t.id, 0.0) > now:
                queue.block(key, GangBackoff(gang_hold.backoff[t.id]), (GANG_WAKE,))
                continue
            gang = decide_gang(host, t, assign_gang is not None)
            if (isinstance(gang, NoFit) and preempt_gang is not None and assign_gang is not None
                    and host.settings.preemption):
                gang = preempt_gang(t, gang)  # coordinator/core/preempt.py, all or nothing
            if isinstance(gang, NoFit):
                queue.block(key, gang, (class_wake_key(t.spec.requirements, t.executor),))
                if kept is not None:  # the first gang that does not fit keeps nodes
                    kept.hold(t, host.nodes.values(), host.tasks, now)
                continue
            queue.pop(key)
            assert assign_gang is not None
            assign_gang(t, gang)
            if kept is not None and kept.holder == t.id:
                kept.clear()
                queue.wake((GANG_WAKE,))
            continue
        decision, hold = decide(host, t, preempt)
        if (kept is not None and kept.holder and isinstance(decision, Placement)
                and not kept.allows(t, decision, host.nodes, host.tasks, now)):
            around = _around(host, t, kept, now)
            if isinstance(around, GangHold):
                queue.block(key, around, (GANG_WAKE, class_wake_key(
                    t.spec.requirements, t.executor)))
                continue
            decision, hold = around, 0.0
        if isinstance(decision, NoFit):  # its reason is worked out when read
            queue.block(key, decision, (class_wake_key(t.spec.requirements, t.executor),))
            continue
        queue.pop(key)
        assign(t, decision, hold)
    return False

"""Queue policies (`MESH_POLICY`): the order queued work is tried in, and what may pass a
head that does not fit. Pure: no I/O; every clock is an argument. The live coordinator
(coordinator/core/dispatch.py) and the simulator (coordinator/sim/) run this same code.

- `priority` (the default): today's order. Within a tenant by priority with aging (a level
  is worth `MESH_AGING_S` seconds of waiting), across tenants by fair share
  (coordinator/scheduling/fairshare.py). A class whose head does not fit is parked and the
  next class is tried, so small work flows around big work: nothing is held back for it.
- `fifo`: strict submission order across every tenant. Work is tried in the order it was
  submitted (a requeued task keeps its place); the first task that does not fit holds back
  everything submitted after it until it is placed, even work that would fit now.
  Priority is not looked at. Two things still pass it: work of a tenant held by its own
  quota does not hold others back (it waits for its tenant, not for room), and a task that
  can never fit is refused at submit, so it never blocks.
- `backfill`: EASY backfill on `timeout_s`. The order of `fifo`; the first task that does
  not fit (the head) gets a reservation: the earliest time some node it could run on has
  room for it, by the expected ends of the work running there (its start plus its
  `timeout_s`; work without `timeout_s` never ends, by that estimate). A later task may
  start now only if it fits now and cannot delay that reservation: it ends (now plus its
  own `timeout_s`) by then, or it runs on another node, or it uses only GPUs the head will
  not need on the reserved node. A task without `timeout_s` passes only in the last two
  ways. When no node gives a finite reservation, nothing passes the head (as `fifo`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass

from coordinator.model import Node, Task
from coordinator.scheduling.fairqueue import FairQueue, TenantKey
from coordinator.scheduling.placement import (
    NoFit,
    Placement,
    gpu_matches,
)
from coordinator.scheduling.placement import (
    _labels_ok as labels_ok,  # the one label rule
)
from coordinator.scheduling.placement import (
    _policy_refuses as policy_refuses,  # the one node-policy filter
)
from coordinator.scheduling.queue import Entry
from coordinator.scheduling.wake import class_wake_key
from coordinator.settings import POLICIES as POLICIES

STRICT = frozenset({"fifo", "backfill"})  # a head that does not fit holds back what follows
BACKFILL_WAKE: Hashable = ("backfill",)  # classes held for the head wait here, one pass


def rank(policy: str, aging_s: float, submitted_at: float, priority: int) -> float:
    """Queue order within a tenant, lower first (the submission sequence breaks ties).
    `priority`: with aging, priority is worth `aging_s` seconds of waiting per level, so old
    low-priority work is never starved by a stream of new high-priority work; without it,
    strict priority. `fifo`, `backfill`: the time of submission."""
    if policy in STRICT:
        return submitted_at
    return submitted_at - priority * aging_s if aging_s > 0 else -priority


class BackfillHold:
    """Why a task that fits now waits: read as a queued task's `reason`."""

    def __init__(self, head: str, at: float | None) -> None:
        self.head, self.at = head, at

    @property
    def reason(self) -> str:
        if self.at is None:
            return (f"waiting behind task {self.head}, the first in the queue, which does not "
                    "fit yet and has no expected start (work without timeout_s holds its "
                    "GPUs): nothing passes it")
        return (f"waiting behind task {self.head}, the first in the queue: starting now "
                f"would delay the start reserved for it (backfill on timeout_s)")


@dataclass(slots=True)
class Reservation:
    """When and where the head is expected to fit, and what it leaves free there."""

    node: str
    at: float  # the head's expected start on `node`
    spare: int  # units (GPUs, or CPU slots for CPU work) free on `node` at `at` beyond its need
    gpus: bool  # whether the units are GPUs


def expected_end(t: Task, now: float) -> float:
    """When running task `t` is expected to let go: its start plus its `timeout_s`; never
    (inf) without one; `now` for one running past its estimate."""
    limit = t.spec.timeout_s
    if limit is None:
        return math.inf
    return max(now, (t.assigned_at if t.assigned_at is not None else now) + limit)


def reserve(head: Task, nodes: Iterable[Node], tasks: Mapping[str, Task],
            now: float) -> Reservation | None:
    """The earliest start `head` can expect, on the node that gives it first (by name on a
    tie); None when no node it could ever run on frees enough by the estimates."""
    req, executor, ask = head.spec.requirements, head.executor, head.policy_ask
    need = req.gpu_count
    need_mb = req.memory_gb * 1024
    best: Reservation | None = None
    for node in nodes:
        if (not node.online or node.unavailable or executor not in node.executors
                or policy_refuses(node, ask)
                or (req.labels or req.node_selector) and not labels_ok(req, node)):
            continue
        if need:
            usable = {g.index for g in node.gpus if not g.fault
                      and g.memory_total_mb >= need_mb and gpu_matches(req, g)}
            if len(usable) < need:
                continue
            free = sum(1 for i in usable if i not in node.gpu_tasks)
            ends = []
            for task_id in node.tasks:
                t = tasks.get(task_id)
                if t is not None and (held := len(usable.intersection(t.gpu_indices))):
                    ends.append((expected_end(t, now), held))
            want = need
        else:
            free = node.free_slots
            ends = [(expected_end(t, now), 1) for i in node.cpu_tasks
                    if (t := tasks.get(i)) is not None]
            want = 1
            if node.slots < 1:
                continue
        at = now
        ends.sort()
        k = 0
        while free < want and k < len(ends):
            at = ends[k][0]
            while k < len(ends) and ends[k][0] <= at:  # everything ending by then
                free += ends[k][1]
                k += 1
        if free < want or math.isinf(at):
            continue
        while k < len(ends) and ends[k][0] <= at:
            free += ends[k][1]
            k += 1
        found = Reservation(node.name, at, free - want, bool(need))
        if best is None or (found.at, found.node) < (best.at, best.node):
            best = found
    return best


def may_pass(res: Reservation | None, t: Task, where: Placement, now: float) -> bool:
    """Whether `t`, placed at `where` now, leaves the head's reservation whole; takes the
    reserved node's spare units it would hold past the reserved start."""
    if res is None:
        return False
    if where.node != res.node:
        return True
    limit = t.spec.timeout_s
    if limit is not None and now + limit <= res.at:
        return True
    units = len(where.gpu_indices) if res.gpus else (0 if where.gpu_indices else 1)
    if units <= res.spare:
        res.spare -= units
        return True
    return False


STOP = "stop"  # nothing after the head may go in this pass
SKIP = "skip"  # this class was parked; try the next one


class Gate:
    """What a strict policy lets go in one dispatch pass. `check` is asked before each
    decision; the head (the barrier) is the earliest class parked for want of room."""

    def __init__(
        self, policy: str, queue: FairQueue, nodes: Mapping[str, Node],
        tasks: Mapping[str, Task], now: float, place_now: Callable[[Task], Placement | NoFit],
    ) -> None:
        self.policy, self.queue, self.nodes, self.tasks, self.now = (
            policy, queue, nodes, tasks, now)
        self.place_now = place_now
        self._seen = -1  # blocked classes when the barrier was last found
        self._barrier: Entry | None = None
        self._res: tuple[Entry, Reservation | None] | None = None
        if policy == "backfill":
            queue.wake((BACKFILL_WAKE,))  # what waited for the last pass's reservation

    @classmethod
    def of(
        cls, policy: str, queue: FairQueue, nodes: Mapping[str, Node],
        tasks: Mapping[str, Task], now: float, place_now: Callable[[Task], Placement | NoFit],
    ) -> Gate | None:
        return cls(policy, queue, nodes, tasks, now, place_now) if policy in STRICT else None

    def barrier(self) -> Entry | None:
        blocked = self.queue.blocked
        if blocked != self._seen:
            self._seen = blocked
            self._barrier = self.queue.first_parked(NoFit)
        return self._barrier

    def check(self, key: TenantKey, entry: Entry, t: Task) -> str | Placement | None:
        """None: decide `t` as usual (nothing before it waits). STOP: end the pass. SKIP:
        its class was parked. A Placement: backfill `t` there."""
        barrier = self.barrier()
        if barrier is None or entry < barrier:
            return None
        if self.policy == "fifo":
            return STOP
        where = self.place_now(t)
        req = t.spec.requirements
        if isinstance(where, NoFit):
            self.queue.block(key, where, (class_wake_key(req, t.executor),))
            return SKIP
        if self._res is None or self._res[0] != barrier:
            head = self.tasks[barrier[2]]
            self._res = (barrier, reserve(head, self.nodes.values(), self.tasks, self.now))
        res = self._res[1]
        if may_pass(res, t, where, self.now):
            return where
        self.queue.block(key, BackfillHold(barrier[2], None if res is None else res.at),
                         (BACKFILL_WAKE,))
        return SKIP

"""Queue policies (`MESH_POLICY`): the order queued work is tried in, and what may pass a
head that does not fit. Pure: no I/O; every clock is an argument. The live coordinator
(coordinator/core/dispatch.py) and the simulator (coordinator/sim/) run this same code.

- `priority` (the default): today's order. Within a tenant by priority with aging (a level
  is worth `MESH_AGING_S` seconds of waiting), across tenants by fair share
  (coordinator/scheduling/fairshare.py). A class whose head does not fit is parked and the
  next class is tried, so small work flows around big work: nothing is held back for it.
- `sef`: shortest estimate first, with aging. As `priority` (fair share across tenants,
  classes parked, priority levels worth `MESH_AGING_S`), but within a tenant a task ranks as
  if submitted its `timeout_s` later (a task without one: a day later; no estimate counts
  for more than a day). Short work goes first; a long task is passed only by work
  submitted less than its estimate after it, so it cannot starve.
- `fifo`: strict submission order across every tenant. Work is tried in the order it was
  submitted (a requeued task keeps its place); the first task that does not fit holds back
  everything submitted after it until it is placed, even work that would fit now.
  Priority is not looked at. Two things still pass it: work of a tenant held by its own
  quota does not hold others back (it waits for its tenant, not for room), and a task that
  no node here could run even when idle (a GPU type no node has, more GPUs than any node)
  is parked apart (`NeverFits`) until a node that could run it joins.
- `backfill`: EASY backfill on `timeout_s`. The order of `fifo`; the first task that does
  not fit (the head) gets a reservation: the earliest time some node it could run on has
  room for it, by the expected ends of the work running there (its start plus its
  `timeout_s`; work without `timeout_s` never ends, by that estimate). A later task may
  start now only if it fits now and cannot delay that reservation: it ends (now plus its
  own `timeout_s`) by then, or it runs on another node, or it uses only GPUs the head will
  not need on the reserved node. A task without `timeout_s` passes only in the last two
  ways. When no node gives a finite reservation, nothing passes the head (as `fifo`).
  A gang (coordinator/core/gangs.py) never starts ahead of the head; a gang at the head is
  reserved the N nodes that have room for a member first, from the latest of their times.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Hashable, Iterable, Mapping
from dataclasses import dataclass
from weakref import WeakKeyDictionary

from coordinator.model import Node, Task
from coordinator.scheduling.fairqueue import FairQueue, TenantKey
from coordinator.scheduling.fairshare import tenant_of
from coordinator.scheduling.placement import (
    NoFit,
    Placement,
    PlacementIndex,
    gpu_matches,
)
from coordinator.scheduling.placement import (
    _labels_ok as labels_ok,  # the one label rule
)
from coordinator.scheduling.placement import (
    _policy_refuses as policy_refuses,  # the one node-policy filter
)
from coordinator.scheduling.queue import ClassKey, Entry, Reason
from coordinator.scheduling.wake import class_wake_key
from coordinator.settings import POLICIES as POLICIES

STRICT = frozenset({"fifo", "backfill"})  # a head that does not fit holds back what follows
# Classes held for the head wait here and under their own wake key (capacity that frees up
# may move the reservation); a new head wakes them all (`Gate`).
BACKFILL_WAKE: Hashable = ("backfill",)
_held_for: WeakKeyDictionary[FairQueue, Entry] = WeakKeyDictionary()  # the head they wait for
_verified: WeakKeyDictionary[FairQueue, Entry] = WeakKeyDictionary()  # a head that could run


def queue_class(t: Task, policy: str) -> ClassKey:
    """The queue class of `t`: `Task.class_key`, and under `backfill` its `timeout_s` rounded
    up to a power of two, so a long task at the head of a class cannot hide shorter ones
    queued behind it that could pass the head (within a class, up to 2x apart, the earlier
    one goes first)."""
    key = t.class_key
    if policy != "backfill":
        return key
    limit = t.spec.timeout_s
    bucket = b"-" if limit is None else b"%d" % math.ceil(math.log2(max(limit, 1.0)))
    return key[0], key[1] + b"\0t" + bucket


UNKNOWN_ESTIMATE_S = 86_400.0  # `sef`: what a task without timeout_s counts as (a day)


def rank(policy: str, aging_s: float, t: Task) -> float:
    """Queue order within a tenant, lower first (the submission sequence breaks ties).
    `priority`: with aging, priority is worth `aging_s` seconds of waiting per level, so old
    low-priority work is never starved by a stream of new high-priority work; without it,
    strict priority. `sef`: the same, with the task's `timeout_s` added (as if submitted
    that much later). `fifo`, `backfill`: the time of submission."""
    if policy in STRICT:
        return t.submitted_at
    if policy == "sef":
        limit = t.spec.timeout_s
        estimate = UNKNOWN_ESTIMATE_S if limit is None else min(limit, UNKNOWN_ESTIMATE_S)
        return t.submitted_at + estimate - t.priority * aging_s
    return t.submitted_at - t.priority * aging_s if aging_s > 0 else -t.priority


class NeverFits:
    """A head no node here could run even idle: parked apart, it holds nothing back."""

    def __init__(self, nofit: Reason | None) -> None:
        self.nofit = nofit

    @property
    def reason(self) -> str:
        why = self.nofit.reason if self.nofit is not None else "no node fits"
        return f"{why}; no node here could run it even when idle, so it holds no one back"


class FifoHold:
    """Why a task waits under `fifo`: read as a queued task's `reason`."""

    def __init__(self, head: str) -> None:
        self.head = head

    @property
    def reason(self) -> str:
        return (f"waiting behind task {self.head}, the first in the queue, which does not fit "
                "yet (MESH_POLICY=fifo: nothing starts ahead of it)")


class BackfillHold:
    """Why a task that fits now waits: read as a queued task's `reason`."""

    def __init__(self, head: str, at: float | None, gang: bool = False) -> None:
        self.head, self.at, self.gang = head, at, gang

    @property
    def reason(self) -> str:
        if self.gang:
            return (f"waiting behind task {self.head}, the first in the queue, which does not "
                    "fit yet: a gang does not start ahead of it (backfill)")
        if self.at is None:
            return (f"waiting behind task {self.head}, the first in the queue, which does not "
                    "fit yet and has no expected start (work without timeout_s holds its "
                    "GPUs): nothing passes it")
        return (f"waiting behind task {self.head}, the first in the queue: starting now "
                f"would delay the start reserved for it (backfill on timeout_s)")


@dataclass(slots=True)
class Reservation:
    """When and where the head is expected to fit, and what it leaves free there."""

    at: float  # the head's expected start
    # node -> units (GPUs, or CPU slots for CPU work) free there at `at` beyond the head's
    # need: one node, or a gang's members' nodes
    spare: dict[str, int]
    gpus: bool  # whether the units are GPUs


def expected_end(t: Task) -> float:
    """When running task `t` is expected to let go: its start plus its `timeout_s`; never
    (inf) without one. (Work running past its estimate is taken to let go now.)"""
    limit = t.spec.timeout_s
    if limit is None or t.assigned_at is None:
        return math.inf
    return t.assigned_at + limit


# A node as the head sees it: (units free now, sorted (expected end, units) of the work
# holding the others, units the head needs, when enough are free by the estimates: -inf
# for now, inf for never). None: the head could never run there.
Outlook = tuple[int, list[tuple[float, int]], int, float] | None
_outlooks: WeakKeyDictionary[PlacementIndex, dict[tuple[str, tuple[str, bytes]],
                                                   tuple[int, Outlook]]] = WeakKeyDictionary()
OUTLOOKS_KEPT = 4096  # outlooks cached per index (nodes x head classes); then it starts over


def _node_outlook(head: Task, node: Node, tasks: Mapping[str, Task], now: float = 0.0) -> Outlook:
    """`node` as `head` sees it (`Outlook`); None if the head could never run there. The
    expected ends are not clipped to `now` (reserve does that), so the result holds until the
    node changes."""
    req, executor = head.spec.requirements, head.executor
    if (not node.online or node.unavailable or executor not in node.executors
            or policy_refuses(node, head.policy_ask)
            or (req.labels or req.node_selector) and not labels_ok(req, node)):
        return None
    need = req.gpu_count
    if not need:
        if node.slots < 1:
            return None
        ends = [(expected_end(t), 1) for i in node.cpu_tasks if (t := tasks.get(i)) is not None]
        free, want = node.free_slots, 1
    else:
        need_mb = req.memory_gb * 1024
        usable = {g.index for g in node.gpus
                  if not g.fault and g.memory_total_mb >= need_mb and gpu_matches(req, g)}
        if len(usable) < need:
            return None
        ends = []
        for task_id in node.tasks:
            t = tasks.get(task_id)
            if t is not None and (held := len(usable.intersection(t.gpu_indices))):
                ends.append((expected_end(t), held))
        free, want = sum(1 for i in usable if i not in node.gpu_tasks), need
    ends.sort()
    when, have = -math.inf, free
    for end, units in ends:
        if have >= want:
            break
        have += units
        when = end
    return free, ends, want, when if have >= want else math.inf


def reserve(head: Task, nodes: Iterable[Node], tasks: Mapping[str, Task], now: float,
            index: PlacementIndex | None = None) -> Reservation | None:
    """The earliest start `head` can expect: on the node that has room for it first (by
    name on a tie), or for a gang of N, the N nodes that do; None when no such node (or not
    N of them) frees enough by the estimates. With placement's `index`, a node's outlook is
    cached until the index sees the node change (`PlacementIndex.changes`): O(nodes) dict
    reads per call, not a look at every task."""
    cache = _outlooks.setdefault(index, {}) if index is not None else None
    if cache is not None and len(cache) > OUTLOOKS_KEPT:
        cache.clear()
    sig = head.class_key
    starts: list[tuple[float, str, int, list[tuple[float, int]], int]] = []
    for node in nodes:
        name = node.name
        if cache is None or index is None:
            outlook = _node_outlook(head, node, tasks)
        else:
            count = index.changes.get(name, 0)
            cached = cache.get((name, sig))
            if cached is None or cached[0] != count:
                cached = cache[(name, sig)] = (count, _node_outlook(head, node, tasks))
            outlook = cached[1]
        if outlook is not None and outlook[3] != math.inf:
            free, ends, want, when = outlook
            starts.append((max(now, when), name, free, ends, want))
    n = head.gang_size
    if len(starts) < n:
        return None
    chosen = sorted(starts)[:n]
    at = chosen[-1][0]
    return Reservation(at, {name: free + sum(u for end, u in ends if end <= at) - want
                            for _, name, free, ends, want in chosen},
                       bool(head.spec.requirements.gpu_count))


def may_pass(res: Reservation | None, t: Task, where: Placement, now: float) -> bool:
    """Whether `t`, placed at `where` now, leaves the head's reservation whole; takes the
    reserved node's spare units it would hold past the reserved start."""
    if res is None:
        return False
    spare = res.spare.get(where.node)
    if spare is None:
        return True
    limit = t.spec.timeout_s
    if limit is not None and now + limit <= res.at:
        return True
    units = len(where.gpu_indices) if res.gpus else (0 if where.gpu_indices else 1)
    if units <= spare:
        res.spare[where.node] = spare - units
        return True
    return False


STOP = "stop"  # nothing after the head may go in this pass (no policy here asks for it)
SKIP = "skip"  # this class was parked; try the next one


class Gate:
    """What a strict policy lets go in one dispatch pass. `check` is asked before each
    decision; the head (the barrier) is the earliest class parked for want of room."""

    def __init__(
        self, policy: str, queue: FairQueue, index: PlacementIndex, nodes: Mapping[str, Node],
        tasks: Mapping[str, Task], now: float, place_now: Callable[[Task], Placement | NoFit],
    ) -> None:
        self.policy, self.queue, self.index, self.nodes, self.tasks, self.now = (
            policy, queue, index, nodes, tasks, now)
        self.place_now = place_now
        self._seen = -1  # blocked classes when the barrier was last found
        self._barrier: Entry | None = None
        self._res: tuple[Entry, Reservation | None] | None = None
        if (held := _held_for.get(queue)) is not None:
            if held != queue.first_parked(NoFit):  # their head went: try them again
                del _held_for[queue]
                queue.wake((BACKFILL_WAKE,))

    @classmethod
    def of(
        cls, policy: str, queue: FairQueue, index: PlacementIndex, nodes: Mapping[str, Node],
        tasks: Mapping[str, Task], now: float, place_now: Callable[[Task], Placement | NoFit],
    ) -> Gate | None:
        if policy not in STRICT:
            return None
        return cls(policy, queue, index, nodes, tasks, now, place_now)

    def barrier(self) -> Entry | None:
        """Found at the start of a pass; once found it holds for the pass (a pass tries
        entries in order, so whatever it parks later comes after it)."""
        if self._barrier is not None:
            return self._barrier
        queue = self.queue
        blocked = queue.blocked
        if blocked != self._seen:
            self._seen = blocked
            while (head := queue.first_parked(NoFit)) is not None:
                if _verified.get(queue) == head or self._could_ever_run(head):
                    _verified[queue] = head
                    break
            self._barrier = head
            self._seen = queue.blocked
        return self._barrier

    def _could_ever_run(self, head: Entry) -> bool:
        """Whether enough nodes here could run the head's task if they were idle; if not, its
        class is parked apart (NeverFits) and holds nothing back."""
        t = self.tasks.get(head[2])
        if t is None:
            return True
        need = t.gang_size
        for node in self.nodes.values():  # most heads: the first node will do
            if _node_outlook(t, node, self.tasks) is not None:
                need -= 1
                if not need:
                    return True
        key = (tenant_of(t.tenant), queue_class(t, self.policy))
        nofit = self.queue.reason(*key)
        self.queue.block(key, NeverFits(nofit), (class_wake_key(t.spec.requirements, t.executor),))
        return False

    def check(self, key: TenantKey, entry: Entry, t: Task) -> str | Placement | None:
        """None: decide `t` as usual (nothing before it waits). SKIP: its class was parked
        behind the head (fifo: always; backfill: when it does not fit now, or would delay
        the head). A Placement: backfill `t` there."""
        barrier = self.barrier()
        if barrier is None or entry < barrier:
            return None
        if self.policy == "fifo":
            return self._hold(key, t, FifoHold(barrier[2]))
        req = t.spec.requirements
        if t.gang_size > 1:  # a gang never backfills: it waits its turn in the order
            return self._hold(key, t, BackfillHold(barrier[2], None, gang=True))
        where = self.place_now(t)
        if isinstance(where, NoFit):
            self.queue.block(key, where, (class_wake_key(req, t.executor),))
            return SKIP
        if self._res is None or self._res[0] != barrier:
            head = self.tasks[barrier[2]]
            self._res = (barrier, reserve(head, self.nodes.values(), self.tasks, self.now,
                                          self.index))
        res = self._res[1]
        if may_pass(res, t, where, self.now):
            return where
        return self._hold(key, t, BackfillHold(barrier[2], None if res is None else res.at))

    def _hold(self, key: TenantKey, t: Task, why: BackfillHold | FifoHold) -> str:
        assert self._barrier is not None
        _held_for[self.queue] = self._barrier
        wake = class_wake_key(t.spec.requirements, t.executor)
        self.queue.block(key, why, (wake, BACKFILL_WAKE))
        return SKIP

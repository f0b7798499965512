"""Deadlines the coordinator keeps: a task's `timeout_s`, and the start of an assigned task.

A node enforces `timeout_s` itself (gpu_client/executors: the process executor counts from
just before its launch, docker from the container's creation) and reports `failed` with
"timed out after Ns". The coordinator does not take a node's word for it (DESIGN.md, "Zero
trust inside"): a node that keeps heartbeating must not keep a task `running` forever.

- **Running** past `started_at + timeout_s + MESH_TIMEOUT_GRACE_S`: the attempt ends
  `failed` with "timed out after Ns: ..." and a result in the shape of the node's own
  timeout plus `"enforced_by": "coordinator"` (a key no node can send: `TaskOutcome` has no
  such field). Once that is durable the node is sent `cancel`; a later result of that
  attempt is refused as stale (`ended_by_coordinator`, used by the node side's fencing).
  The grace lets an honest node report its own timeout first: after its timer fires it stops
  the work (SIGTERM, SIGKILL after 5 s), waits for NVML to let go of the GPUs (at most
  10 s), uploads artifacts (a 60 s socket timeout each) and sends the result; its timer also
  started earlier than `started_at`, which is when its `task_started` was read here.
- **Assigned** past `assigned_at + MESH_START_DEADLINE_S` without `task_started` (or a
  result): the node's fault, not the task's. It is taken back as an infrastructure fault of
  that node (faults.py `infra_loss`: requeued without spending `max_attempts`, at most
  `MESH_MAX_INFRA_RETRIES` times, counted towards the node's quarantine), and the node is
  sent `cancel` once that is durable. The default leaves room for a Docker image pull,
  which the client itself gives up on after 600 s (and reports as its own fault).

Event-driven and bounded: one deadline per placed attempt (assigned, or running with a
`timeout_s`), armed and dropped by the Mesh's `_transition` (`moved`) in a heap with one loop
timer for its head, never a scan of the tasks; the heap holds at most twice the placed
attempts, and at most `EXPIRE_BATCH` deadlines end in one turn of the loop. After
a restart or a rebuild `Mesh.start` re-arms them from the stored `assigned_at`/`started_at`
(`moved(..., not_before=...)`), none sooner than `MESH_RESTART_GRACE_S` from then: the time
nodes have to come back and report what they ran meanwhile.
"""

from __future__ import annotations

import asyncio
import heapq
import logging
import math
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

from coordinator.core.faults import Transition, note_infra_error
from coordinator.model import Node, Task, TaskState
from coordinator.settings import Settings
from shared.protocol import Cancel

log = logging.getLogger("coordinator.core.mesh")

A, R, FAIL = TaskState.ASSIGNED, TaskState.RUNNING, TaskState.FAILED
ENFORCED_BY = "enforced_by"  # the result key of an attempt the coordinator ended
START, TIMEOUT = "start", "timeout"
COMPACT_SLACK = 64  # stale heap entries allowed beyond the live ones before a compaction
EXPIRE_BATCH = 256  # deadlines ended in one turn of the loop (a restart may find many due)


def ended_by_coordinator(result: Mapping[str, Any] | None) -> bool:
    """Whether a finished attempt's stored result was made by the coordinator (a deadline),
    not reported by its node: a result sent later for that attempt is not a resend."""
    return result is not None and result.get(ENFORCED_BY) == "coordinator"


class DeadlineHost(Protocol):
    """What the deadlines read on the Mesh, at the time of each call (a rebuild replaces
    its tasks and nodes)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def broken(self) -> str: ...
    @property
    def tasks(self) -> Mapping[str, Task]: ...
    @property
    def nodes(self) -> Mapping[str, Node]: ...


class InfraLoss(Protocol):
    """faults.py `NodeFaults.infra_loss`: an attempt ended by its node, not by the task."""

    def __call__(self, node: str, t: Task, cause: str) -> asyncio.Future[None]: ...


class Deadlines:
    """The deadlines of placed attempts. `transition` is the Mesh's transition table;
    `infra_loss` takes an attempt back as its node's fault; `node_changed` re-indexes a node
    (a quarantine); `infra_failed(node)` counts a node fault in the metrics.

    A heap of plain tuples `(due, task id, attempt, kind)` and one loop timer for its head.
    Arming is a dict store and a heap push (C-level tuple compares: asyncio's own timer heap
    compares its handles in Python); moving on is a dict pop, the heap entry goes stale and
    is dropped when it reaches the head, or when stale entries outnumber live ones (`_compact`,
    so the heap stays under twice the placed attempts). Wall time throughout: `started_at` and
    `assigned_at` are wall times, and they are what a restart has."""

    def __init__(
        self, mesh: DeadlineHost, *, transition: Transition, infra_loss: InfraLoss,
        node_changed: Callable[[Node], None], infra_failed: Callable[[str], None],
    ) -> None:
        self._mesh = mesh
        self._transition = transition
        self._infra_loss = infra_loss
        self._node_changed = node_changed
        self._infra_failed = infra_failed
        self._live: dict[str, tuple[float, int, str]] = {}  # task id -> (due, attempt, kind)
        self._heap: list[tuple[float, str, int, str]] = []  # (due, task id, attempt, kind)
        self._timer: asyncio.TimerHandle | None = None  # fires at the head's due time
        self._timer_at = math.inf

    def __len__(self) -> int:
        return len(self._live)

    @property
    def held(self) -> int:
        """Entries in the heap, stale ones included: at most 2 x len(self) + COMPACT_SLACK."""
        return len(self._heap)

    def due(self, task_id: str) -> float | None:
        """When the task's current deadline falls (wall time), None if it has none."""
        live = self._live.get(task_id)
        return None if live is None else live[0]

    def clear(self) -> None:
        """Forget every deadline (the Mesh stops or rebuilds; `start` re-arms)."""
        if self._timer is not None:
            self._timer.cancel()
        self._timer, self._timer_at = None, math.inf
        self._live.clear()
        self._heap.clear()

    def moved(self, t: Task, to: TaskState, *, not_before: float = 0.0) -> None:
        """`t` is now in state `to` (the Mesh's `_transition`, or a reload with `not_before`,
        the earliest wall time a reloaded deadline may fall): the deadline of its previous
        state goes, the one of this state, if any, is armed. O(1) and one heap push."""
        live = self._live
        if live and live.pop(t.id, None) is not None:  # its heap entry is stale now
            if len(self._heap) > 2 * len(live) + COMPACT_SLACK:
                self._compact()  # stale entries outnumber live ones: O(1) amortized
        if to is A:
            due = (t.assigned_at or time.time()) + self._mesh.settings.start_deadline_s
            self._arm(t.id, t.attempt, START, max(due, not_before))
        elif to is R and (limit := t.spec.timeout_s) is not None:
            due = (t.started_at or time.time()) + limit + self._mesh.settings.timeout_grace_s
            self._arm(t.id, t.attempt, TIMEOUT, max(due, not_before))

    def _arm(self, task_id: str, attempt: int, kind: str, due: float) -> None:
        self._live[task_id] = (due, attempt, kind)
        heapq.heappush(self._heap, (due, task_id, attempt, kind))
        if due < self._timer_at:
            self._wake_at(due)

    def _compact(self) -> None:
        live = self._live
        self._heap = [e for e in self._heap if live.get(e[1]) == (e[0], e[2], e[3])]
        heapq.heapify(self._heap)

    def _wake_at(self, due: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        delay = max(0.0, due - time.time())
        self._timer = asyncio.get_running_loop().call_later(delay, self._fire)
        self._timer_at = due

    def _fire(self) -> None:
        """End what is due (at most `EXPIRE_BATCH` in one turn of the loop), drop stale
        heads, and sleep until the next live deadline."""
        self._timer, self._timer_at = None, math.inf
        live = self._live  # self._heap is read anew each time: an end may compact it
        now, ended = time.time(), 0
        while self._heap and self._heap[0][0] <= now and ended < EXPIRE_BATCH:
            due, task_id, attempt, kind = heapq.heappop(self._heap)
            if live.get(task_id) == (due, attempt, kind):
                del live[task_id]
                ended += 1
                self._expire(task_id, attempt, kind)
        heap = self._heap
        while heap and live.get(heap[0][1]) != (heap[0][0], heap[0][2], heap[0][3]):
            heapq.heappop(heap)  # stale: its task moved on
        if heap and heap[0][0] < self._timer_at:
            self._wake_at(heap[0][0])  # at once if the batch was cut short

    def _expire(self, task_id: str, attempt: int, kind: str) -> None:
        mesh = self._mesh
        t = mesh.tasks.get(task_id)
        if mesh.broken or t is None or t.attempt != attempt:
            return  # rebuilding (start re-arms what the store holds), or already moved on
        if kind == TIMEOUT and t.state is R:
            self._timed_out(t)
        elif kind == START and t.state is A:
            self._not_started(t)

    def _timed_out(self, t: Task) -> None:
        settings = self._mesh.settings
        node, attempt, limit = t.node or "", t.attempt, t.spec.timeout_s or 0.0
        now = time.time()
        error = (
            f"timed out after {limit:g}s: node {node} reported no end within "
            f"{settings.timeout_grace_s:g}s more, so the coordinator ended it"
        )
        result = {"duration_s": round(now - (t.started_at or now), 3), ENFORCED_BY: "coordinator"}
        log.warning("task %s attempt %d %s", t.id, attempt, error,
                    extra={"task": t.id, "attempt": attempt, "node": node, "cause": "deadline"})
        write = self._transition(t, FAIL, cause=error, result=result, error=error)
        self._cancel_when_stored(write, node, t.id, attempt, f"timed out after {limit:g}s")

    def _not_started(self, t: Task) -> None:
        mesh = self._mesh
        name, attempt = t.node or "", t.attempt
        limit = mesh.settings.start_deadline_s
        why = f"task not started within {limit:g}s of its assignment (MESH_START_DEADLINE_S)"
        log.warning("task %s attempt %d on %s: %s; taking it back", t.id, attempt, name, why,
                    extra={"task": t.id, "attempt": attempt, "node": name, "cause": "deadline"})
        self._infra_failed(name)
        write = self._infra_loss(name, t, f"node fault on {name}: {why}")
        node = mesh.nodes.get(name)
        if node is not None and note_infra_error(node, why, time.monotonic(), mesh.settings):
            self._node_changed(node)
            log.warning("node %s quarantined: %s", name, node.quarantine_reason,
                        extra={"node": name, "cause": node.quarantine_reason})
        self._cancel_when_stored(write, name, t.id, attempt, why)

    def _cancel_when_stored(
        self, write: asyncio.Future[None], node: str, task_id: str, attempt: int, reason: str
    ) -> None:
        """Tell the node to stop that attempt once its end is durable (a node away now is
        told at its next register, which lists the attempt as one to stop)."""
        def send(f: asyncio.Future[None]) -> None:
            if f.cancelled() or f.exception() is not None:
                return
            holder = self._mesh.nodes.get(node)
            if holder is not None and holder.link is not None:
                holder.link.send(Cancel(task_id=task_id, attempt=attempt, reason=reason))

        write.add_done_callback(send)

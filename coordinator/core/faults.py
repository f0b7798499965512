"""Nodes that fail well: infrastructure errors, quarantine, event-loop stalls, reconciliation.

Bookkeeping only: functions here read and change `Node` records and return what the Mesh
must do (requeue, cancel, re-index); the Mesh applies it through its transition table.

- An attempt that ended because of its node (`TaskResult.infra`) is not the task's fault:
  it goes back to the queue without spending `max_attempts`. A node with
  `quarantine_errors` such errors within `quarantine_window_s` is quarantined: placement
  skips it until a heartbeat, at least `quarantine_probe_s` later, reports it healthy.
- `LoopWatch` measures how late the coordinator's own timers fire. A stall (the loop did
  not run, e.g. SIGSTOP or a long GC) is not node silence: after one, every node's
  `last_seen` moves forward by the stall and nobody is judged for one heartbeat interval,
  so what waits in the sockets is read first.
- A heartbeat's `running` list against the coordinator's view: a reported attempt that is
  not current is to be cancelled; a task placed here long enough ago (before the previous
  heartbeat) and missing from two heartbeats in a row goes back to the queue.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from coordinator.model import ACTIVE, Link, Node, Task, TaskState
from coordinator.settings import Settings
from shared.protocol import Ack, Cancel, Heartbeat, TaskRef, TaskResult

if TYPE_CHECKING:
    from coordinator.core.logs import TaskLogs
    from coordinator.core.metrics import MeshMetrics

log = logging.getLogger("coordinator.core.mesh")

MISSING_CONFIRMATIONS = 2  # heartbeats in a row that must miss a task before it is requeued


# --- infrastructure errors and quarantine --------------------------------------------------

HISTORY_CAUSE_MAX = 300  # characters of a cause kept in a task's history


def note_history(t: Task, node: str | None, cause: str, *, infra: bool) -> None:
    """Record why attempt `t.attempt` ended without being the task's own outcome; the next
    transition's store write carries it."""
    t.history.append({
        "at": round(time.time(), 3), "attempt": t.attempt, "node": node,
        "cause": cause[:HISTORY_CAUSE_MAX], "infra": infra,
    })



def note_infra_error(node: Node, error: str, now: float, settings: Settings) -> bool:
    """Count one infrastructure error; True when it quarantines the node (now)."""
    node.infra_total += 1
    node.infra_errors.append(now)
    node.infra_last = error
    while node.infra_errors and node.infra_errors[0] < now - settings.quarantine_window_s:
        node.infra_errors.popleft()
    if node.quarantine_reason or len(node.infra_errors) < settings.quarantine_errors:
        return False
    node.quarantine_reason = (
        f"{len(node.infra_errors)} infrastructure errors within "
        f"{settings.quarantine_window_s:g}s; last: {error or 'unspecified'}"
    )
    node.quarantined_at = now
    return True


def apply_health(node: Node, msg: Heartbeat, now: float, settings: Settings) -> str:
    """Apply a heartbeat's `executors` and `health`. Returns what changed for placement:
    "" (nothing), "changed", or "lifted" (the node's quarantine ended)."""
    changed = ""
    if msg.executors is not None and frozenset(msg.executors) != node.executors:
        node.executors = frozenset(msg.executors)
        changed = "changed"
    if msg.health != node.health:
        node.health = msg.health
        changed = "changed"
    if node.quarantine_reason and probe_passes(node, msg, now, settings):
        node.quarantine_reason = ""
        node.infra_errors.clear()
        changed = "lifted"
    return changed


def probe_passes(node: Node, msg: Heartbeat, now: float, settings: Settings) -> bool:
    """A quarantined node's health probe: a heartbeat sent at least `quarantine_probe_s`
    after the quarantine began that reports no health problem and usable executors."""
    if now - node.quarantined_at < settings.quarantine_probe_s or msg.health:
        return False
    return bool(node.executors) if msg.executors is None else bool(msg.executors)


# --- event-loop stalls ---------------------------------------------------------------------


@dataclass
class LoopWatch:
    """How late this loop's timers fire: `lag` (the last tick), `max_lag`, stall totals."""

    stall_s: float = 1.0  # a tick later than this is a stall, not ordinary lag
    lag: float = 0.0
    max_lag: float = 0.0
    stalls: int = 0
    stalled_s: float = 0.0
    judge_after: float = 0.0  # monotonic time before which nobody is judged silent
    _due: float = field(default=0.0, repr=False)

    def expect(self, delay: float) -> None:
        """The loop is about to sleep `delay` seconds."""
        self._due = time.monotonic() + delay

    def tick(self) -> float:
        """The sleep ended: record the lag; returns the stall length (0.0 when none)."""
        now = time.monotonic()
        self.lag = max(0.0, now - self._due) if self._due else 0.0
        self.max_lag = max(self.max_lag, self.lag)
        if self.lag <= self.stall_s:
            return 0.0
        self.stalls += 1
        self.stalled_s += self.lag
        return self.lag


def forgive_stall(nodes: Iterable[Node], stall: float, now: float) -> None:
    """The loop did not run for `stall` seconds: that time is nobody's silence."""
    for node in nodes:
        node.last_seen = min(now, node.last_seen + stall)


# --- reconciling a heartbeat's running list ------------------------------------------------


@dataclass
class Reconciled:
    stale: list[TaskRef] = field(default_factory=list)  # reported, not current: cancel them
    missing: list[str] = field(default_factory=list)  # placed here, not reported: requeue


def reconcile(
    node: Node, running: list[TaskRef], tasks: Mapping[str, Task],
    finished: Mapping[str, Task], now: float, assigns: int = -1,
) -> Reconciled:
    """Compare a heartbeat's `running` with what this node holds (`now`: wall time;
    `assigns`: the heartbeat's count of delivered assigns, -1 from an older client)."""
    out = Reconciled()
    if node.hb_epoch != node.epoch:  # a new connection: its first heartbeat sets the baseline
        node.hb_epoch, node.hb_prev_at = node.epoch, 0.0
        node.missing.clear()
    reported: set[str] = set()
    for ref in running:
        reported.add(ref.task_id)
        t = tasks.get(ref.task_id)
        if t is not None and t.state in ACTIVE and t.node == node.name and t.attempt == ref.attempt:
            continue
        done = finished.get(ref.task_id)
        if (ref.state == "finished" and done is not None and done.node == node.name
                and done.attempt == ref.attempt):
            continue  # its result is kept; the ack is on its way (or comes on re-register)
        out.stale.append(ref)
    prev, node.hb_prev_at = node.hb_prev_at, now
    for task_id in node.tasks - reported:
        t = tasks[task_id]
        if not _had_assign(node, t, assigns, prev):
            continue
        seen = node.missing.get(task_id, 0) + 1
        node.missing[task_id] = seen
        if seen >= MISSING_CONFIRMATIONS:
            out.missing.append(task_id)
    for task_id in list(node.missing):
        if task_id in reported or task_id not in node.tasks or task_id in out.missing:
            del node.missing[task_id]
    out.missing.sort(key=lambda i: tasks[i].seq)
    return out


def _had_assign(node: Node, t: Task, assigns: int, prev: float) -> bool:
    """Whether the node had `t`'s assign when it made a heartbeat that leaves it out.

    A node that counts the assigns it got on this connection (`assigns` >= 0) answers
    exactly, however late its heartbeat is read: after a coordinator stall (SIGSTOP, a
    profiler) the heartbeats waiting in the socket were all made before assigns that the
    coordinator sent only on waking, and none of them may count against those tasks. For an
    older client, time decides: placed before the previous heartbeat was read."""
    if assigns >= 0:
        sent = t.sent_as  # None, or an earlier attempt's: this attempt's is not sent yet
        return (sent is not None and sent[0] == t.attempt
                and (sent[1] != node.epoch or sent[2] <= assigns))
    return bool(prev) and t.assigned_at is not None and t.assigned_at < prev


# --- the Mesh's side: what it does with the above ------------------------------------------


class Transition(Protocol):
    """The Mesh's `_transition` (coordinator/core/mesh.py): the one way a task changes state;
    returns the durable write, which callers await (or chain on) before acknowledging."""

    def __call__(
        self, t: Task, to: TaskState, *, cause: str, **change: Any
    ) -> asyncio.Future[None]: ...


class Requeue(Protocol):
    """Node loss for one task: back to the queue or failed (NodeSide.requeue_or_fail)."""

    def __call__(self, t: Task, cause: str, *, infra: bool = False) -> None: ...


class FaultHost(Protocol):
    """What the node-fault paths read on the Mesh, at the time of each call (a rebuild
    replaces the Mesh's tasks and nodes)."""

    @property
    def settings(self) -> Settings: ...
    @property
    def metrics(self) -> MeshMetrics: ...
    @property
    def tasks(self) -> Mapping[str, Task]: ...
    @property
    def finished(self) -> Mapping[str, Task]: ...
    @property
    def nodes(self) -> Mapping[str, Node]: ...
    @property
    def logs(self) -> TaskLogs: ...
    @property
    def loop_watch(self) -> LoopWatch: ...


class NodeFaults:
    """The node-fault paths, a part the node side holds (coordinator/core/node_side.py).
    Every task change still goes through the Mesh's transition table: `transition` and
    `requeue_or_fail` are passed in, with `node_gone`, `node_changed` (re-index a node and
    wake what it may fit) and `wake` (ask for a dispatch pass)."""

    def __init__(
        self, mesh: FaultHost, *, transition: Transition, requeue_or_fail: Requeue,
        node_gone: Callable[[Node, str], None], node_changed: Callable[[Node], None],
        wake: Callable[[], None],
    ) -> None:
        self._mesh = mesh
        self._transition = transition
        self._requeue_or_fail = requeue_or_fail
        self._node_gone = node_gone
        # A gang member's loss ends its gang's attempt (coordinator/core/gangs.py; the Mesh
        # sets it): (task, cause, infra) -> the member's last write.
        self.gang_loss: Callable[[Task, str, bool], asyncio.Future[None]] | None = None
        self._node_changed = node_changed
        self._wake = wake

    def on_infra_result(self, node: Node, link: Link, t: Task, msg: TaskResult) -> None:
        """The attempt ended because of its node: requeue it without spending an attempt."""
        why = msg.error or "unspecified infrastructure error"
        self._mesh.metrics.infra_failed(node.name)
        write = self.infra_loss(node.name, t, f"node fault on {node.name}: {why}")
        ack = Ack(task_id=msg.task_id, attempt=msg.attempt)
        write.add_done_callback(lambda f: None if f.exception() else link.send(ack))
        if note_infra_error(node, why, time.monotonic(), self._mesh.settings):
            self._node_changed(node)
            log.warning(
                "node %s quarantined: %s", node.name, node.quarantine_reason,
                extra={"node": node.name, "cause": node.quarantine_reason},
            )

    def infra_loss(self, node: str, t: Task, cause: str) -> asyncio.Future[None]:
        """An attempt ended by infrastructure (a node fault, a client restart that lost it),
        not by the task: back to the queue (attempt + 1) without spending `max_attempts`,
        at most `max_infra_retries` times, then failed saying so. The task's history (durable,
        in `GET /tasks/{id}`) and `gpumesh_infra_losses_total{node}` record it."""
        mesh = self._mesh
        mesh.metrics.infra_lost(node)
        mesh.logs.open(t.id).append(f"[gpumesh] attempt {t.attempt} ended by a {cause}\n")
        if t.member_of is not None and self.gang_loss is not None:
            return self.gang_loss(t, cause, True)  # its gang's attempt ends (core/gangs.py)
        t.infra_retries += 1
        note_history(t, node, cause, infra=True)
        limit = mesh.settings.max_infra_retries
        if t.state in ACTIVE:
            self._transition(t, TaskState.LOST, cause=cause)
        if t.infra_retries > limit:
            error = f"gave up after {t.infra_retries} node faults; last: {cause}"
            return self._transition(t, TaskState.FAILED, cause=error, error=error)
        t.error = f"requeued after node fault {t.infra_retries} of {limit}: {cause}"
        return self._transition(t, TaskState.QUEUED, cause=cause)

    def heartbeat_faults(self, node: Node, link: Link, msg: Heartbeat) -> bool:
        """Health, executors, quarantine and reconciliation; True if placement must
        re-index the node."""
        was = node.quarantine_reason
        changed = apply_health(node, msg, time.monotonic(), self._mesh.settings)
        if changed == "lifted":
            log.info("node %s back from quarantine (%s): its heartbeat reports it healthy",
                     node.name, was, extra={"node": node.name})
        if not node.seed_form:  # the seed's clients never report what they run
            self._reconcile(node, link, msg)
        return bool(changed)

    def _reconcile(self, node: Node, link: Link, msg: Heartbeat) -> None:
        mesh = self._mesh
        rec = reconcile(node, msg.running, mesh.tasks, mesh.finished, time.time(), msg.assigns)
        for ref in rec.stale:
            mesh.metrics.stale("heartbeat")
            log.warning("node %s runs task %s attempt %d, which is not current: stopping it",
                        node.name, ref.task_id, ref.attempt,
                        extra={"node": node.name, "task": ref.task_id, "attempt": ref.attempt})
            link.send(Cancel(task_id=ref.task_id, attempt=ref.attempt,
                             reason="reconciled: not the current attempt"))
        for task_id in rec.missing:
            t = mesh.tasks[task_id]
            attempt = t.attempt
            self._requeue_or_fail(
                t, f"node {node.name} did not report it in {MISSING_CONFIRMATIONS} heartbeats"
            )
            link.send(Cancel(task_id=task_id, attempt=attempt, reason="not reported: requeued"))
        if rec.missing:
            self._wake()

    async def liveness_loop(self) -> None:
        """Judge nodes' silence every `interval`, on time the loop was actually running:
        a stall of the loop itself moves every node's `last_seen` forward and postpones
        judging by one heartbeat interval, so waiting heartbeats are read first."""
        mesh = self._mesh
        settings, watch = mesh.settings, mesh.loop_watch
        interval = min(settings.heartbeat_interval_s, settings.node_timeout_s / 3)
        tick = min(0.25, interval)
        next_judge = time.monotonic() + interval
        while True:
            watch.expect(tick)
            await asyncio.sleep(tick)
            now = time.monotonic()
            stall = watch.tick()
            if stall:
                mesh.metrics.loop_stalls.inc()
                forgive_stall(mesh.nodes.values(), stall, now)
                watch.judge_after = now + settings.heartbeat_interval_s
                log.warning("coordinator event loop stalled for %.1fs: not counted as "
                            "node silence", stall)
            if now >= next_judge and now >= watch.judge_after:
                next_judge = now + interval
                self._judge_silence(now - settings.node_timeout_s)

    def _judge_silence(self, deadline: float) -> None:
        silent = self._mesh.settings.node_timeout_s
        for node in list(self._mesh.nodes.values()):
            if node.online and node.last_seen < deadline:
                if node.link is not None:
                    node.link.close(4003, f"node lost: no message for {silent:g}s")
                self._node_gone(node, f"silent for more than {silent:g}s")

"""The node side of the Mesh: registration, node loss, and the messages nodes send.

A part the Mesh holds (`mesh.node_side`) and calls, to keep mesh.py to the transition table,
submission and dispatch; it holds the node-fault paths in turn (`faults`,
coordinator/core/faults.py). What it reads on the Mesh is `NodeHost`; what it does to the
Mesh's state goes through the callbacks it is given. Every task change here still goes
through the Mesh's `_transition`; every reply to a node is sent only once what it reflects
is committed (acks wait for the result's write, `_ack_if_stored` reads the stored row).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine, Mapping
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from coordinator.core.deadlines import ended_by_coordinator
from coordinator.core.drain import on_register
from coordinator.core.faults import FaultHost, NodeFaults, Transition, note_history
from coordinator.core.nodes import account_energy, apply_heartbeat, apply_register, gpus_reshaped
from coordinator.model import ACTIVE, FINISHED, DrainMark, Link, Node, Task, TaskState
from coordinator.scheduling.wake import vram_freed
from shared.protocol import (
    Ack,
    Cancel,
    ClientMsg,
    Error,
    Heartbeat,
    Register,
    Registered,
    ReplicaState,
    TaskAccepted,
    TaskLog,
    TaskOutcome,
    TaskResult,
    TaskStarted,
)

if TYPE_CHECKING:
    from coordinator.core.services import ServiceManager
    from coordinator.scheduling.fairqueue import FairQueue
    from coordinator.scheduling.placement import PlacementIndex
    from coordinator.storage.store_core import GroupCommitStore

log = logging.getLogger("coordinator.core.mesh")

Q, A, R = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING
DONE, FAIL, LOST = TaskState.COMPLETED, TaskState.FAILED, TaskState.LOST


class NodeHost(FaultHost, Protocol):
    """What the node side reads on the Mesh, at the time of each call (a rebuild replaces
    the Mesh's tasks, nodes, index, queue and drains): the fault paths' view and more."""

    @property
    def store(self) -> GroupCommitStore: ...
    @property
    def broken(self) -> str: ...
    @property
    def nodes(self) -> dict[str, Node]: ...
    @property
    def index(self) -> PlacementIndex: ...
    @property
    def queue(self) -> FairQueue: ...
    @property
    def drains(self) -> Mapping[str, DrainMark]: ...
    @property
    def services(self) -> ServiceManager: ...


class GangLoss(Protocol):
    """coordinator/core/gangs.py `Gangs.member_lost`: a gang member's attempt ended by its
    node; the whole gang's attempt ends with it."""

    def __call__(self, t: Task, cause: str, infra: bool) -> asyncio.Future[None]: ...


class NodeSide:
    """What nodes do to the Mesh (join, leave, report) and node loss. `transition` is the
    Mesh's transition table; `node_changed` re-indexes a node and wakes the blocked work
    it may fit; `wake_blocked(node, gpus_only)` only wakes; `wake` asks for a dispatch
    pass."""

    def __init__(
        self, mesh: NodeHost, *, transition: Transition,
        node_changed: Callable[[Node], None], wake_blocked: Callable[[Node, bool], None],
        wake: Callable[[], None],
    ) -> None:
        self._mesh = mesh
        self._transition = transition
        self._node_changed = node_changed
        self._wake_blocked = wake_blocked
        self._wake = wake
        self._background: set[asyncio.Task[None]] = set()
        # What a result may record as its artifacts: the web app sets this to the ledger of
        # uploads it stored (coordinator/web/artifacts.py `vet`); until then, none.
        self.artifacts: Callable[[str, int, TaskOutcome], TaskOutcome] = _no_artifacts
        # A gang member's loss ends its gang's attempt (coordinator/core/gangs.py), and rank 0's
        # MASTER_PORT lets the other ranks' assigns go: the Mesh sets both.
        self.gang_loss: GangLoss | None = None
        self.gang_port: Callable[[Task, int], None] | None = None
        self.faults = NodeFaults(
            mesh, transition=transition, requeue_or_fail=self.requeue_or_fail,
            node_gone=self.node_gone, node_changed=node_changed, wake=wake,
        )

    # --- node loss ---------------------------------------------------------------------

    def requeue_or_fail(self, t: Task, cause: str, *, infra: bool = False) -> None:
        """Node loss: back to the queue, spending an attempt; `infra` (a client restart lost
        it): without spending one (faults.py `infra_loss`)."""
        if t.member_of is not None and self.gang_loss is not None:
            self.gang_loss(t, cause, infra)  # the whole gang's attempt ends (core/gangs.py)
            return
        if infra:
            self.faults.infra_loss(t.node or "", t, cause)
            return
        note_history(t, t.node, cause, infra=False)
        if t.state in ACTIVE:
            self._transition(t, LOST, cause=cause)
        if t.attempt - t.infra_retries >= t.max_attempts:  # node faults spend no attempt
            why = f"gave up after {t.attempt} attempts; last: {cause}"
            self._transition(t, FAIL, cause=why, error=why)
        else:
            self._transition(t, Q, cause=cause)

    def node_gone(self, node: Node, cause: str) -> None:
        node.status = "lost"
        node.link = None
        self._node_changed(node)
        if node.grace is not None:
            node.grace.cancel()
            node.grace = None
        tasks = self._mesh.tasks
        for task_id in sorted(node.tasks, key=lambda i: tasks[i].seq):
            self.requeue_or_fail(tasks[task_id], f"node {node.name} lost: {cause}")
        log.warning("node %s lost: %s", node.name, cause, extra={"node": node.name})
        self._wake()

    def start_grace(self, node: Node, delay: float, cause: str) -> None:
        if node.grace is not None:
            node.grace.cancel()
        epoch = node.epoch

        def expire() -> None:
            node.grace = None
            if node.epoch == epoch and not node.online:
                self.node_gone(node, f"{cause}: not back within {delay:g}s")

        node.grace = asyncio.get_running_loop().call_later(delay, expire)

    # The liveness loop (stall-aware) is in coordinator/core/faults.py (NodeFaults).

    # --- the node side (called by the WebSocket handler) -------------------------------

    def register(self, name: str, msg: Register, link: Link) -> Registered:
        mesh = self._mesh
        node = mesh.nodes.get(name) or Node(name=name)
        mesh.nodes[name] = node
        if node.link is not None and node.link is not link:
            node.link.close(4001, "superseded: same node reconnected")
        if node.grace is not None:
            node.grace.cancel()
            node.grace = None
        apply_register(node, msg)
        on_register(mesh, node)  # a drained node stays drained (coordinator/core/drain.py)
        node.status, node.link, node.epoch = "online", link, node.epoch + 1
        node.assigns_sent = 0
        node.last_seen, node.connected_at = time.monotonic(), time.time()
        node.power_at = node.last_seen
        keep, stop = [], []
        for ref in msg.running:
            t = mesh.tasks.get(ref.task_id)
            if t is not None and t.state in ACTIVE and t.node == name and t.attempt == ref.attempt:
                keep.append(ref)
                t.sent_as = (t.attempt, node.epoch, 0)  # it has it: every heartbeat counts
                if t.state is A and ref.state == "running":
                    self._transition(t, R, cause=f"{name} reported it running on register")
            else:
                stop.append(ref)
                mesh.metrics.stale("register")
        kept = {ref.task_id for ref in keep}
        tasks = mesh.tasks
        for task_id in sorted(node.tasks - kept, key=lambda i: tasks[i].seq):
            why = f"lost with node {name}'s restart: it re-registered without it"
            self.requeue_or_fail(tasks[task_id], why, infra=True)
        self._node_changed(node)
        log.info(
            "node %s registered: %d GPUs, executors %s, kept %d, stopped %d",
            name, len(node.gpus), sorted(node.executors), len(keep), len(stop),
            extra={"node": name},
        )
        self._wake()
        return Registered(
            node_id=name, heartbeat_interval_s=mesh.settings.heartbeat_interval_s,
            keep=keep, stop=stop,
        )

    def forget_stale_nodes(self, now: float) -> list[str]:
        """Forget nodes offline (not online, holding no tasks, no grace pending) whose last
        message is older than MESH_FORGET_NODE_S at monotonic time `now`; returns their
        names. A forgotten node that comes back simply registers anew."""
        mesh = self._mesh
        cutoff = now - mesh.settings.forget_node_s
        gone = [
            n.name for n in mesh.nodes.values()
            if not n.online and not n.tasks and n.grace is None and n.link is None
            and n.last_seen < cutoff
        ]
        for name in gone:
            del mesh.nodes[name]
            mesh.index.remove(name)
            log.info("node %s forgotten: offline for more than %gs", name,
                     mesh.settings.forget_node_s, extra={"node": name})
        return gone

    def forget_node(self, name: str, why: str) -> bool:
        """An admin forgets a node that holds no tasks (the caller checks): it leaves the
        registry and, if connected, is closed with 4004. False if it was not registered."""
        mesh = self._mesh
        node = mesh.nodes.pop(name, None)
        if node is None:
            return False
        assert not node.tasks, f"node {name} still holds tasks"
        if node.grace is not None:
            node.grace.cancel()
            node.grace = None
        mesh.index.remove(name)
        if node.link is not None:
            node.link.close(4004, why)
            node.link = None
        log.warning("node %s forgotten: %s", name, why, extra={"node": name})
        return True

    async def forget_loop(self) -> None:
        interval = min(60.0, max(0.05, self._mesh.settings.forget_node_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.forget_stale_nodes(time.monotonic())

    def disconnected(self, name: str, link: Link, why: str) -> None:
        mesh = self._mesh
        node = mesh.nodes.get(name)
        if node is None or node.link is not link:
            return  # superseded by a newer connection: nothing to do
        node.link = None
        if node.status == "online":
            node.status = "disconnected"
            self._node_changed(node)
            log.info("node %s disconnected (%s)", name, why, extra={"node": name})
            self.start_grace(node, mesh.settings.reconnect_grace_s, "disconnected")

    def heard(self, name: str, link: Link) -> None:
        """Liveness only: any frame on the node's current link shows it is there."""
        node = self._mesh.nodes.get(name)
        if node is not None and node.link is link:
            node.last_seen = time.monotonic()

    def handle(self, name: str, link: Link, msg: ClientMsg) -> None:
        """One decoded message from a registered node. Replies go out through `link`."""
        mesh = self._mesh
        node = mesh.nodes.get(name)
        if node is None or node.link is not link or mesh.broken:
            return  # a connection the Mesh has let go of (superseded, or rebuilding)

        node.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            account_energy(node, msg.gpus, mesh.tasks, 3 * mesh.settings.heartbeat_interval_s)
            reshaped = gpus_reshaped(node.gpus, msg.gpus)
            freed = (not reshaped and mesh.queue.blocked > 0 and bool(msg.gpus)
                     and vram_freed(node.gpus, msg.gpus))
            apply_heartbeat(node, msg)
            if reshaped:  # the index buckets by model and allocation, not by readings
                self._node_changed(node)
            elif freed:  # more free VRAM may fit a class blocked on memory
                self._wake_blocked(node, True)  # GPUs only
            if self.faults.heartbeat_faults(node, link, msg):  # health, executors, quarantine
                self._node_changed(node)
        elif isinstance(msg, TaskResult):
            self._on_result(node, link, msg)
        elif isinstance(msg, TaskStarted | TaskAccepted | TaskLog):
            t = self._fenced(node, link, msg.task_id, msg.attempt, _kind(msg))
            if t is None:
                return
            if isinstance(msg, TaskStarted) and t.state is A:
                self._transition(t, R, cause=f"started on {name}")
            elif isinstance(msg, TaskAccepted) and msg.master_port and self.gang_port:
                self.gang_port(t, msg.master_port)  # a gang's rank 0 found MASTER_PORT
            elif isinstance(msg, TaskLog):
                mesh.logs.open(t.id).append(msg.data)
        elif isinstance(msg, ReplicaState):  # a model service's replica: its health
            mesh.services.replica_report(name, msg)
        elif isinstance(msg, Register):
            link.send(Error(reason="already registered on this connection", code="bad_message"))

    def _fenced(
        self, node: Node, link: Link, task_id: str, attempt: int, kind: str
    ) -> Task | None:
        """The task if this message is from its current attempt; else refuse and stop it."""
        t = self._mesh.tasks.get(task_id)
        if t is not None and t.state in ACTIVE and t.node == node.name and t.attempt == attempt:
            return t
        current = f"attempt {t.attempt} on {t.node}" if t is not None else "not running"
        log.warning(
            "refused %s for task %s attempt %d from %s: task is %s",
            kind, task_id, attempt, node.name, current,
            extra={"task": task_id, "attempt": attempt, "node": node.name, "cause": kind},
        )
        self._mesh.metrics.stale(kind)
        link.send(Error(
            reason=f"stale {kind}: task {task_id} attempt {attempt} is not current ({current})",
            code="stale_attempt", task_id=task_id, attempt=attempt,
        ))
        link.send(Cancel(task_id=task_id, attempt=attempt, reason="fenced: not current"))
        return None

    def _on_result(self, node: Node, link: Link, msg: TaskResult) -> None:
        done = self._mesh.finished.get(msg.task_id)
        if (done is not None and done.attempt == msg.attempt and done.node == node.name
                and not ended_by_coordinator(done.result)):  # a deadline's end: refused below
            self._ack_when_stored(done, link, msg)  # a resend: ack once the row shows it
            return
        if msg.task_id not in self._mesh.tasks and done is None:
            self._spawn(self._ack_if_stored(node, link, msg))  # finished before a restart?
            return
        t = self._fenced(node, link, msg.task_id, msg.attempt, "task_result")
        if t is None:
            return
        if msg.infra and msg.status == "failed":  # the node's fault, not the task's
            self.faults.on_infra_result(node, link, t, msg)
            return
        to = DONE if msg.status == "completed" else FAIL
        result = msgspec.to_builtins(self.artifacts(t.id, t.attempt, msg.result))
        write = self._transition(
            t, to, cause=f"{msg.status} on {node.name}", result=result, error=msg.error
        )
        ack = Ack(task_id=msg.task_id, attempt=msg.attempt)
        write.add_done_callback(lambda f: None if f.exception() else link.send(ack))

    def _ack_when_stored(self, t: Task, link: Link, msg: TaskResult) -> None:
        ack = Ack(task_id=msg.task_id, attempt=msg.attempt)
        if t.pending is None or t.pending.done() and not t.pending.exception():
            link.send(ack)
        else:
            t.pending.add_done_callback(lambda f: None if f.exception() else link.send(ack))

    async def _ack_if_stored(self, node: Node, link: Link, msg: TaskResult) -> None:
        """A result for a task no longer in memory: ack it if the store holds this very
        attempt's end, else refuse it as stale."""
        row = await self._mesh.store.get(msg.task_id)
        if (row is not None and row.state in FINISHED and row.attempt == msg.attempt
                and row.node == node.name and row.result is not None
                and not ended_by_coordinator(row.result)):
            link.send(Ack(task_id=msg.task_id, attempt=msg.attempt))
        elif msg.task_id not in self._mesh.tasks:
            self._fenced(node, link, msg.task_id, msg.attempt, "task_result")

    def _spawn(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


def _no_artifacts(task_id: str, attempt: int, outcome: TaskOutcome) -> TaskOutcome:
    return msgspec.structs.replace(outcome, artifacts=[]) if outcome.artifacts else outcome


def _kind(msg: ClientMsg) -> str:
    return str(type(msg).__struct_config__.tag)

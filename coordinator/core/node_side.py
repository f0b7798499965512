"""The node side of the Mesh: registration, node loss, and the messages nodes send.

Mixed into the Mesh (like coordinator/core/faults.py) to keep mesh.py to the transition table,
submission and dispatch. Every task change here still goes through the Mesh's
`_transition`; every reply to a node is sent only once what it reflects is committed
(acks wait for the result's write, `_ack_if_stored` reads the stored row).
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec

from coordinator.core.drain import on_register
from coordinator.core.faults import NodeFaults, note_history
from coordinator.core.nodes import account_energy, apply_heartbeat, apply_register, gpus_reshaped
from coordinator.model import ACTIVE, FINISHED, Link, Node, Task, TaskState
from coordinator.scheduling.wake import vram_freed
from shared.protocol import (
    Ack,
    Cancel,
    ClientMsg,
    Error,
    Heartbeat,
    Register,
    Registered,
    TaskAccepted,
    TaskLog,
    TaskResult,
    TaskStarted,
)

if TYPE_CHECKING:
    from coordinator.storage.store import Store

log = logging.getLogger("coordinator.core.mesh")

Q, A, R = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING
DONE, FAIL, LOST = TaskState.COMPLETED, TaskState.FAILED, TaskState.LOST


class NodeSide(NodeFaults):
    """Mixed into the Mesh: what nodes do to it (join, leave, report) and node loss. The
    Mesh state it reads is declared on NodeFaults; only what that lacks is declared here."""

    if TYPE_CHECKING:
        store: Store
        broken: str
        _background: set[asyncio.Task[None]]

    # --- node loss ---------------------------------------------------------------------

    def _requeue_or_fail(self, t: Task, cause: str, *, infra: bool = False) -> None:
        """Node loss: back to the queue, spending an attempt; `infra` (a client restart lost
        it): without spending one (faults.py `_infra_loss`)."""
        if infra:
            self._infra_loss(t.node or "", t, cause)
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
        for task_id in sorted(node.tasks, key=lambda i: self.tasks[i].seq):
            self._requeue_or_fail(self.tasks[task_id], f"node {node.name} lost: {cause}")
        log.warning("node %s lost: %s", node.name, cause, extra={"node": node.name})
        self._wake.set()

    def _start_grace(self, node: Node, delay: float, cause: str) -> None:
        if node.grace is not None:
            node.grace.cancel()
        epoch = node.epoch

        def expire() -> None:
            node.grace = None
            if node.epoch == epoch and not node.online:
                self.node_gone(node, f"{cause}: not back within {delay:g}s")

        node.grace = asyncio.get_running_loop().call_later(delay, expire)

    # `_liveness_loop` (stall-aware) is in coordinator/core/faults.py (NodeFaults).

    # --- the node side (called by the WebSocket handler) -------------------------------

    def register(self, name: str, msg: Register, link: Link) -> Registered:
        node = self.nodes.get(name) or Node(name=name)
        self.nodes[name] = node
        if node.link is not None and node.link is not link:
            node.link.close(4001, "superseded: same node reconnected")
        if node.grace is not None:
            node.grace.cancel()
            node.grace = None
        apply_register(node, msg)
        on_register(self, node)  # a drained node stays drained (coordinator/core/drain.py)
        node.status, node.link, node.epoch = "online", link, node.epoch + 1
        node.assigns_sent = 0
        node.last_seen, node.connected_at = time.monotonic(), time.time()
        node.power_at = node.last_seen
        keep, stop = [], []
        for ref in msg.running:
            t = self.tasks.get(ref.task_id)
            if t is not None and t.state in ACTIVE and t.node == name and t.attempt == ref.attempt:
                keep.append(ref)
                t.sent_as = (t.attempt, node.epoch, 0)  # it has it: every heartbeat counts
                if t.state is A and ref.state == "running":
                    self._transition(t, R, cause=f"{name} reported it running on register")
            else:
                stop.append(ref)
                self.metrics.stale("register")
        kept = {ref.task_id for ref in keep}
        for task_id in sorted(node.tasks - kept, key=lambda i: self.tasks[i].seq):
            why = f"lost with node {name}'s restart: it re-registered without it"
            self._requeue_or_fail(self.tasks[task_id], why, infra=True)
        self._node_changed(node)
        log.info(
            "node %s registered: %d GPUs, executors %s, kept %d, stopped %d",
            name, len(node.gpus), sorted(node.executors), len(keep), len(stop),
            extra={"node": name},
        )
        self._wake.set()
        return Registered(
            node_id=name, heartbeat_interval_s=self.settings.heartbeat_interval_s,
            keep=keep, stop=stop,
        )

    def forget_stale_nodes(self, now: float) -> list[str]:
        """Forget nodes offline (not online, holding no tasks, no grace pending) whose last
        message is older than MESH_FORGET_NODE_S at monotonic time `now`; returns their
        names. A forgotten node that comes back simply registers anew."""
        cutoff = now - self.settings.forget_node_s
        gone = [
            n.name for n in self.nodes.values()
            if not n.online and not n.tasks and n.grace is None and n.link is None
            and n.last_seen < cutoff
        ]
        for name in gone:
            del self.nodes[name]
            self.index.remove(name)
            log.info("node %s forgotten: offline for more than %gs", name,
                     self.settings.forget_node_s, extra={"node": name})
        return gone

    def forget_node(self, name: str, why: str) -> bool:
        """An admin forgets a node that holds no tasks (the caller checks): it leaves the
        registry and, if connected, is closed with 4004. False if it was not registered."""
        node = self.nodes.pop(name, None)
        if node is None:
            return False
        assert not node.tasks, f"node {name} still holds tasks"
        if node.grace is not None:
            node.grace.cancel()
            node.grace = None
        self.index.remove(name)
        if node.link is not None:
            node.link.close(4004, why)
            node.link = None
        log.warning("node %s forgotten: %s", name, why, extra={"node": name})
        return True

    async def _forget_loop(self) -> None:
        interval = min(60.0, max(0.05, self.settings.forget_node_s / 4))
        while True:
            await asyncio.sleep(interval)
            self.forget_stale_nodes(time.monotonic())

    def disconnected(self, name: str, link: Link, why: str) -> None:
        node = self.nodes.get(name)
        if node is None or node.link is not link:
            return  # superseded by a newer connection: nothing to do
        node.link = None
        if node.status == "online":
            node.status = "disconnected"
            self._node_changed(node)
            log.info("node %s disconnected (%s)", name, why, extra={"node": name})
            self._start_grace(node, self.settings.reconnect_grace_s, "disconnected")

    def handle(self, name: str, link: Link, msg: ClientMsg) -> None:
        """One decoded message from a registered node. Replies go out through `link`."""
        node = self.nodes.get(name)
        if node is None or node.link is not link or self.broken:
            return  # a connection the Mesh has let go of (superseded, or rebuilding)
        
        node.last_seen = time.monotonic()
        if isinstance(msg, Heartbeat):
            account_energy(node, msg.gpus, self.tasks, 3 * self.settings.heartbeat_interval_s)
            reshaped = gpus_reshaped(node.gpus, msg.gpus)
            freed = (not reshaped and self.queue.blocked > 0 and bool(msg.gpus)
                     and vram_freed(node.gpus, msg.gpus))
            apply_heartbeat(node, msg)
            if reshaped:  # the index buckets by model and allocation, not by readings
                self._node_changed(node)
            elif freed:  # more free VRAM may fit a class blocked on memory
                self._wake_blocked(node, gpus_only=True)
            if self._heartbeat_faults(node, link, msg):  # health, executors, quarantine
                self._node_changed(node)
        elif isinstance(msg, TaskResult):
            self._on_result(node, link, msg)
        elif isinstance(msg, TaskStarted | TaskAccepted | TaskLog):
            t = self._fenced(node, link, msg.task_id, msg.attempt, _kind(msg))
            if t is None:
                return
            if isinstance(msg, TaskStarted) and t.state is A:
                self._transition(t, R, cause=f"started on {name}")
            elif isinstance(msg, TaskLog):
                self.logs.open(t.id).append(msg.data)
        elif isinstance(msg, Register):
            link.send(Error(reason="already registered on this connection", code="bad_message"))

    def _fenced(
        self, node: Node, link: Link, task_id: str, attempt: int, kind: str
    ) -> Task | None:
        """The task if this message is from its current attempt; else refuse and stop it."""
        t = self.tasks.get(task_id)
        if t is not None and t.state in ACTIVE and t.node == node.name and t.attempt == attempt:
            return t
        current = f"attempt {t.attempt} on {t.node}" if t is not None else "not running"
        log.warning(
            "refused %s for task %s attempt %d from %s: task is %s",
            kind, task_id, attempt, node.name, current,
            extra={"task": task_id, "attempt": attempt, "node": node.name, "cause": kind},
        )
        self.metrics.stale(kind)
        link.send(Error(
            reason=f"stale {kind}: task {task_id} attempt {attempt} is not current ({current})",
            code="stale_attempt", task_id=task_id, attempt=attempt,
        ))
        link.send(Cancel(task_id=task_id, attempt=attempt, reason="fenced: not current"))
        return None

    def _on_result(self, node: Node, link: Link, msg: TaskResult) -> None:
        done = self.finished.get(msg.task_id)
        if done is not None and done.attempt == msg.attempt and done.node == node.name:
            self._ack_when_stored(done, link, msg)  # a resend: ack once the row shows it
            return
        if msg.task_id not in self.tasks and done is None:
            self._spawn(self._ack_if_stored(node, link, msg))  # finished before a restart?
            return
        t = self._fenced(node, link, msg.task_id, msg.attempt, "task_result")
        if t is None:
            return
        if msg.infra and msg.status == "failed":  # the node's fault, not the task's
            self._on_infra_result(node, link, t, msg)
            return
        to = DONE if msg.status == "completed" else FAIL
        result = msgspec.to_builtins(msg.result)
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
        row = await self.store.get(msg.task_id)
        if (row is not None and row.state in FINISHED and row.attempt == msg.attempt
                and row.node == node.name and row.result is not None):
            link.send(Ack(task_id=msg.task_id, attempt=msg.attempt))
        elif msg.task_id not in self.tasks:
            self._fenced(node, link, msg.task_id, msg.attempt, "task_result")

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

def _kind(msg: ClientMsg) -> str:
    return str(type(msg).__struct_config__.tag)

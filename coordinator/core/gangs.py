"""Gangs: one task on N nodes at once, all or nothing (issue 28).

A gang is one Task (`nodes: N` in its spec; the *gang task*) that never holds a node itself.
When placement (coordinator/scheduling/gang.py `place_gang`) finds N nodes that fit at the
same moment, the gang task goes `queued -> assigned` and N *member* tasks are created, one
per rank, each an ordinary task (its spec carries `gang: {id, rank, nodes}`) that flows
through the usual machinery: assign, fencing by attempt, results, logs, deadlines, node
loss. The members of one attempt are written in the same turn as the gang's transition,
so they commit in one batch: no member is visible, or sent, without the others.

Rendezvous: rank 0's `assign` goes out first with `master_port` 0; its node finds a free
port, starts with it and reports it in `task_accepted`; only then are the other ranks'
`assign`s sent, with that port and rank 0's address (the node's reported address, else the
one it connected from) as MASTER_ADDR.

Start together, fail together: the gang task is `running` once every member is; it is
`completed` once every member completed (its result holds each rank's exit code and rank
0's output). Any member's failure, cancel, timeout or loss ends the attempt: every other
member is cancelled (its node told at once, after the write commits) and the gang goes
back to the queue as one unit, or fails when its attempts are spent. `max_attempts` counts
gang attempts; node faults (a lost node, a client restart, a member not started within
MESH_GANG_READY_S) do not spend them, at most MESH_MAX_INFRA_RETRIES times, as for tasks.

Preemption (coordinator/core/preempt.py) takes a gang as one unit: a member chosen as a
victim stops every member (`preempted`; each node is sent `cancel` with the grace) and the
gang is requeued without spending an attempt; a critical gang is placed on freed GPUs only
when every member's room was found at once (`start`'s `hold_s`: the victims' grace).

A coordinator restart ends a running gang as a unit (its members are cancelled; their nodes
are told to stop when they re-register) and requeues it without spending an attempt: never
half a gang.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

import msgspec

from coordinator.core.dispatch import GANG_WAKE
from coordinator.core.faults import Transition, note_history
from coordinator.model import ACTIVE, FINISHED, Node, Task, TaskState, new_task_id
from coordinator.scheduling.gang import GangReservation
from coordinator.scheduling.placement import Placement
from coordinator.storage.store import insert_of
from shared.protocol import Cancel, GangRun
from shared.tasks import GangRef

if TYPE_CHECKING:
    from coordinator.core.logs import TaskLogs
    from coordinator.scheduling.fairqueue import FairQueue
    from coordinator.scheduling.placement import PlacementIndex
    from coordinator.settings import Settings
    from coordinator.storage.store_core import GroupCommitStore

log = logging.getLogger("coordinator.core.mesh")

Q, A, R = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING
DONE, FAIL, CANC, LOST = (
    TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED, TaskState.LOST,
)
_enc = msgspec.json.Encoder()
OUTPUT_MAX = 64 << 10  # characters of rank 0's output the gang's result keeps
BACKOFF_MAX_S = 300.0  # the longest a gang waits after its members did not all start


class GangHost(Protocol):
    """What the gangs read on the Mesh, at the time of each call."""

    @property
    def settings(self) -> Settings: ...
    @property
    def store(self) -> GroupCommitStore: ...
    @property
    def tasks(self) -> dict[str, Task]: ...
    @property
    def nodes(self) -> Mapping[str, Node]: ...
    @property
    def index(self) -> PlacementIndex: ...
    @property
    def logs(self) -> TaskLogs: ...
    @property
    def queue(self) -> FairQueue: ...

    def next_seq(self) -> int: ...
    def count_new(self, t: Task) -> None: ...


@dataclass(eq=False)
class Attempt:
    """One attempt of one gang: its members in rank order."""

    gang: Task
    members: list[Task]
    port: int = 0  # MASTER_PORT, once rank 0's node found it
    ending: bool = False  # being stopped: member transitions are ours, not news
    ready: asyncio.TimerHandle | None = None
    placed_at: float = field(default_factory=time.time)


class Gangs:
    """The gang rules. `transition` is the Mesh's transition table; `send_assign(t)` sends a
    member's assign (it asks `may_send` first); `wake` asks for a dispatch pass."""

    def __init__(
        self, mesh: GangHost, *, transition: Transition, send_assign: Callable[[Task], None],
        wake: Callable[[], None],
    ) -> None:
        self._mesh = mesh
        self._transition = transition
        self._send_assign = send_assign
        self._wake = wake
        self.attempts: dict[str, Attempt] = {}  # gang task id -> its current attempt
        # Nodes kept for the first gang that does not fit (coordinator/scheduling/gang.py).
        self.reservation = GangReservation()

    def clear(self) -> None:
        self.reservation.clear()
        self.reservation.backoff.clear()
        for a in self.attempts.values():
            if a.ready is not None:
                a.ready.cancel()
        self.attempts.clear()

    # --- placement -------------------------------------------------------------------

    def start(
        self, t: Task, found: list[Placement], hold_s: float = 0.0
    ) -> list[tuple[Task, asyncio.Future[None]]]:
        """Carry out a gang's placement (coordinator/scheduling/gang.py `place_gang`, in the
        dispatch pass): synchronous, so the members' inserts and every transition are
        queued in one turn and commit in one batch. `hold_s`: how long the members' assigns
        wait (preempted work leaving their GPUs)."""
        mesh = self._mesh
        placed: list[tuple[Task, asyncio.Future[None]]] = []
        members = []
        names = ", ".join(p.node for p in found)
        gang_write = self._transition(t, A, cause=f"gang placed on {names}", node=None, gpus=())
        for rank, p in enumerate(found):
            m = self._member(t, rank)
            mesh.store.write(insert_of(m))
            node = mesh.nodes[p.node]
            write = self._transition(
                m, A, cause=f"gang {t.id} rank {rank} placed on {node.name}", node=node,
                gpus=p.gpu_indices, hold_s=hold_s,
            )
            members.append(m)
            placed.append((m, write))
        placed.append((t, gang_write))
        attempt = Attempt(t, members)
        self.attempts[t.id] = attempt
        attempt.ready = asyncio.get_running_loop().call_later(
            mesh.settings.gang_ready_s + hold_s, self._ready_check, t.id, t.attempt
        )
        mesh.logs.open(t.id).append(
            f"[gpumesh] gang attempt {t.attempt} placed: "
            + ", ".join(f"rank {member_rank(m)} on {m.node}" for m in members) + "\n"
        )
        return placed

    def _member(self, t: Task, rank: int) -> Task:
        mesh = self._mesh
        spec = msgspec.structs.replace(
            t.spec, nodes=1, max_attempts=1, gang=GangRef(id=t.id, rank=rank, nodes=t.gang_size)
        )
        m = Task(
            id=new_task_id(), seq=mesh.next_seq(), task_type=t.task_type, priority=t.priority,
            executor=t.executor, req_raw=t.req_raw, spec_raw=_enc.encode(spec),
            params_raw=t.params_raw, max_attempts=1, tenant=t.tenant,
            submitted_at=time.time(), _spec=spec,
        )
        mesh.tasks[m.id] = m
        mesh.count_new(m)  # counted as queued for the one turn before its assignment
        return m

    # --- the rendezvous --------------------------------------------------------------

    def may_send(self, m: Task) -> bool:
        """Whether member `m`'s assign may go out now: rank 0's at once, the others' once
        rank 0's node reported MASTER_PORT."""
        ref = m.member_of
        if ref is None:
            return True
        attempt = self.attempts.get(ref.id)
        if attempt is None or attempt.ending or m not in attempt.members:
            return False
        return ref.rank == 0 or attempt.port > 0

    def run_of(self, m: Task) -> GangRun | None:
        """The rendezvous an assign of member `m` carries."""
        ref = m.member_of
        attempt = self.attempts.get(ref.id) if ref is not None else None
        if ref is None or attempt is None:
            return None
        addrs = [self._address(x) for x in attempt.members]
        return GangRun(
            gang_id=ref.id, rank=ref.rank, nnodes=ref.nodes,
            gpus_per_node=attempt.gang.spec.requirements.gpu_count,
            master_addr=addrs[0], master_port=attempt.port, node_addrs=addrs,
        )

    def _address(self, m: Task) -> str:
        node = self._mesh.nodes.get(m.node or "")
        if node is None:
            return ""
        return node.address or node.hostname or node.name

    def on_port(self, m: Task, port: int) -> None:
        """Rank 0's node found MASTER_PORT: the other ranks' assigns go out with it."""
        ref = m.member_of
        attempt = self.attempts.get(ref.id) if ref is not None else None
        if ref is None or attempt is None or ref.rank != 0 or attempt.port or attempt.ending:
            return
        attempt.port = port
        for other in attempt.members[1:]:
            pending = other.pending
            if pending is None or pending.done():
                self._send_assign(other)
            else:  # its write is not in yet: send it when it is
                pending.add_done_callback(self._send_when_stored(other))

    def _send_when_stored(self, m: Task) -> Callable[[asyncio.Future[None]], None]:
        def send(f: asyncio.Future[None]) -> None:
            if not f.cancelled() and f.exception() is None:
                self._send_assign(m)

        return send

    # --- what members do -------------------------------------------------------------

    def moved(self, t: Task, prev: TaskState, to: TaskState) -> None:
        """After every transition of a gang task or a member (the Mesh's `_transition`)."""
        ref = t.member_of
        if ref is None:
            attempt = self.attempts.get(t.id)
            if attempt is not None and not attempt.ending and to in FINISHED:
                # the gang itself ended (cancelled): every member stops
                self._stop_members(attempt, f"gang {t.id} {to.value}")
            return
        attempt = self.attempts.get(ref.id)
        if attempt is None or attempt.ending or t not in attempt.members:
            return
        gang = attempt.gang
        if to is R:
            if gang.state is A and all(m.state is R or m.state is DONE for m in attempt.members):
                self._transition(gang, R, cause="every member started")
        elif to is DONE:
            if all(m.state is DONE for m in attempt.members):
                self._close(attempt)
                if gang.state is A:
                    self._transition(gang, R, cause="every member started")
                self._transition(gang, DONE, cause="every member completed",
                                 result=self._result(attempt), error="")
        elif to in (FAIL, CANC):
            why = t.error or to.value
            self.end(attempt, f"rank {ref.rank} on {t.node} {to.value}: {why}", infra=False)

    def member_lost(self, t: Task, cause: str, infra: bool) -> asyncio.Future[None]:
        """A member's node is lost (or faulted, or did not start it): the member fails and
        the gang's attempt ends as a node fault's (`infra`) or a loss's."""
        note_history(t, t.node, cause, infra=infra)
        ref = t.member_of
        attempt = self.attempts.get(ref.id) if ref is not None else None
        if attempt is not None and t in attempt.members and not attempt.ending:
            attempt.ending = True
        if t.state in ACTIVE:
            self._transition(t, LOST, cause=cause)
        write = self._transition(t, FAIL, cause=cause, error=f"gang member lost: {cause}")
        if attempt is not None and t in attempt.members:
            rank = ref.rank if ref is not None else -1
            self.end(attempt, f"rank {rank} on {t.node} lost: {cause}", infra=infra, force=True)
        return write

    def _ready_check(self, gang_id: str, gang_attempt: int) -> None:
        attempt = self.attempts.get(gang_id)
        if attempt is None or attempt.ending or attempt.gang.attempt != gang_attempt:
            return
        if attempt.gang.state is A:
            waiting = [f"rank {member_rank(m)} on {m.node}" for m in attempt.members
                       if m.state is A]
            gang = attempt.gang
            self.end(attempt, f"not every member started within "
                     f"{self._mesh.settings.gang_ready_s:g}s (MESH_GANG_READY_S): "
                     + ", ".join(waiting), infra=True)
            if gang.state is Q:  # requeued with backoff: 1, 2, 4 ... s, at most BACKOFF_MAX_S
                tries = sum(1 for h in gang.history if "MESH_GANG_READY_S" in h["cause"])
                delay = min(BACKOFF_MAX_S, 2.0 ** (tries - 1))
                self.reservation.backoff[gang.id] = time.time() + delay
                asyncio.get_running_loop().call_later(delay, self._backoff_over, gang.id)

    def _backoff_over(self, gang_id: str) -> None:
        if self.reservation.backoff.pop(gang_id, None) is not None:
            self._mesh.queue.wake((GANG_WAKE,))
            self._wake()

    # --- ending an attempt -----------------------------------------------------------

    def end(self, attempt: Attempt, cause: str, *, infra: bool, force: bool = False) -> None:
        """Stop every member still placed and requeue the gang as one unit (or fail it)."""
        if attempt.ending and not force:
            return
        self._stop_members(attempt, cause)
        gang = attempt.gang
        if gang.state not in ACTIVE:
            return
        mesh = self._mesh
        mesh.logs.open(gang.id).append(f"[gpumesh] gang attempt {gang.attempt} ended: {cause}\n")
        note_history(gang, None, cause, infra=infra)
        self._transition(gang, LOST, cause=cause)
        result = self._result(attempt)
        if infra:
            gang.infra_retries += 1
            limit = mesh.settings.max_infra_retries
            if gang.infra_retries > limit:
                why = f"gave up after {gang.infra_retries} node faults; last: {cause}"
                self._transition(gang, FAIL, cause=why, error=why, result=result)
                return
        elif gang.attempt - gang.infra_retries >= gang.max_attempts:
            why = f"gave up after {gang.attempt} attempts; last: {cause}"
            self._transition(gang, FAIL, cause=why, error=why, result=result)
            return
        gang.error = f"requeued as one unit: {cause}"
        self._transition(gang, Q, cause=cause)
        self._wake()

    def preempted(self, m: Task, cause: str, grace_s: float) -> bool:
        """Member `m` was chosen as a preemption victim (coordinator/core/preempt.py): every
        member of its gang stops (its node is sent `cancel` with `grace_s`) and the gang goes
        back to the queue as one unit, spending no attempt (as preempted tasks do not).
        False when `m` is no member of a current attempt (already being stopped)."""
        ref = m.member_of
        attempt = self.attempts.get(ref.id) if ref is not None else None
        if attempt is None or attempt.ending or m not in attempt.members:
            return False
        gang = attempt.gang
        self._stop_members(attempt, cause, grace_s)
        if gang.state not in ACTIVE:
            return True
        self._mesh.logs.open(gang.id).append(
            f"[gpumesh] gang attempt {gang.attempt} {cause}: every member stopped\n")
        gang.infra_retries += 1  # not the gang's fault: it spends no attempt
        note_history(gang, m.node, cause, infra=True)
        self._transition(gang, LOST, cause=cause)
        gang.error = f"requeued as one unit: {cause}"
        self._transition(gang, Q, cause=cause)
        self._wake()
        return True

    def _stop_members(self, attempt: Attempt, cause: str, grace_s: float = 0.0) -> None:
        attempt.ending = True
        self._close(attempt)
        for m in attempt.members:
            if m.state not in ACTIVE:
                continue
            node = self._mesh.nodes.get(m.node or "")
            task_id, at = m.id, m.attempt
            write = self._transition(m, CANC, cause=f"gang stopped: {cause}",
                                     error=f"gang stopped: {cause}")
            if node is not None:
                write.add_done_callback(_cancel_when_stored(node, task_id, at, grace_s))

    def _close(self, attempt: Attempt) -> None:
        if attempt.ready is not None:
            attempt.ready.cancel()
            attempt.ready = None
        if self.attempts.get(attempt.gang.id) is attempt:
            del self.attempts[attempt.gang.id]

    def result_now(self, t: Task) -> dict[str, Any] | None:
        """Gang `t`'s result as a cancel ends it now: members still placed count as cancelled."""
        attempt = self.attempts.get(t.id)
        return self._result(attempt, placed_as=CANC) if attempt is not None else None

    def _result(self, attempt: Attempt, placed_as: TaskState | None = None) -> dict[str, Any]:
        """Each rank's node, state and exit code; rank 0's exit code and output."""
        ranks = []
        for m in attempt.members:
            res = m.result or {}
            state = placed_as if placed_as is not None and m.state in ACTIVE else m.state
            ranks.append({"rank": member_rank(m), "task_id": m.id, "node": m.node,
                          "state": state.value, "exit_code": res.get("exit_code")})
        first = attempt.members[0].result or {}
        output = first.get("output", "")
        return {
            "exit_code": first.get("exit_code"),
            "output": output[-OUTPUT_MAX:] if isinstance(output, str) else "",
            "ranks": ranks,
        }

    # --- what callers read ----------------------------------------------------------

    def view(self, t: Task) -> dict[str, Any]:
        """`GET /tasks/{id}`'s `gang`: its size and the members of its current attempt (or,
        once it ended, of its last one, from its result): rank, task id, node, state, exit."""
        attempt = self.attempts.get(t.id)
        if attempt is not None:
            members = self._result(attempt)["ranks"]
        else:
            ranks = (t.result or {}).get("ranks")
            members = ranks if isinstance(ranks, list) else []
        return {"nodes": t.gang_size, "attempt": t.attempt, "members": members}

    def member_id(self, t: Task, rank: int) -> str | None:
        """The task id of gang `t`'s member of `rank` (current or last attempt)."""
        for m in self.view(t)["members"]:
            if isinstance(m, dict) and m.get("rank") == rank:
                task_id = m.get("task_id")
                return task_id if isinstance(task_id, str) else None
        return None

    # --- a coordinator restart -------------------------------------------------------

    def reload(self, tasks: Mapping[str, Task]) -> None:
        """After a restart: a gang that was placed is ended as one unit, never half kept.
        Its members are cancelled (their nodes are told to stop when they re-register) and
        it is requeued without spending an attempt."""
        gangs: dict[str, list[Task]] = {}
        for t in list(tasks.values()):
            ref = t.member_of
            if ref is not None and t.state in ACTIVE:
                gangs.setdefault(ref.id, []).append(t)
        for t in list(tasks.values()):
            if t.gang_size > 1 and t.state in ACTIVE:
                gangs.setdefault(t.id, [])
        for gang_id, members in gangs.items():
            gang = tasks.get(gang_id)
            members.sort(key=lambda m: member_rank(m))
            attempt = Attempt(gang, members) if gang is not None else None
            cause = "the coordinator restarted while the gang was placed: restarted as a unit"
            if attempt is None:
                for m in members:
                    self._transition(m, CANC, cause=cause, error=cause)
                continue
            self.end(attempt, cause, infra=True)


def _cancel_when_stored(
    node: Node, task_id: str, attempt: int, grace_s: float = 0.0
) -> Callable[[asyncio.Future[None]], None]:
    """Tell the member's node to stop it once its end is durable (`grace_s`: SIGTERM to
    SIGKILL, the preemption grace; 0: the node's own)."""
    def send(f: asyncio.Future[None]) -> None:
        if not f.cancelled() and f.exception() is None and node.link is not None:
            node.link.send(Cancel(task_id=task_id, attempt=attempt, reason="gang stopped",
                                  grace_s=grace_s))

    return send


def member_rank(t: Task) -> int:
    ref = t.member_of
    return ref.rank if ref is not None else -1

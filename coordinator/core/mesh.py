"""The Mesh: the one owner of task and node state.

One object on one event loop, no locks. Transport code (HTTP routes, the WebSocket
handler) turns bytes into calls here and sends back what comes out. Every change of a
task's state goes through `_transition`, which looks the edge up in one table, applies
it synchronously (check and set, no await in between) and returns the durable write;
callers await that write (shielded) before they acknowledge or send anything.

The discipline (DESIGN.md, "Durable before visible") is crash-only:

- memory runs ahead of the store only between a transition and its commit, and in that
  window nothing outside sees it: replies, `ack`s, `assign`s and long-poll wake-ups wait
  for the write (`Task.pending`), reads of one task wait for its pending write;
- any failed or short write (an engine error, a guarded UPDATE that matched no row, a
  value that cannot be encoded) is fatal to this memory: the store refuses further writes,
  the Mesh stops serving (`MeshUnavailable`, HTTP 503), closes every node connection
  (1011) and rebuilds itself from what the store committed, as after a restart. Nodes
  reconnect and report what they run; no transition is retried on a guess.
- what cannot be stored is refused at the edge (shared/limits.py) before any change.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable
from typing import Any

import msgspec

from coordinator.core.deadlines import Deadlines
from coordinator.core.dispatch import dispatch_pass
from coordinator.core.drain import load_drains
from coordinator.core.faults import LoopWatch
from coordinator.core.gangs import Gangs
from coordinator.core.invariants import check_invariants
from coordinator.core.logs import TaskLogs
from coordinator.core.metrics import MeshMetrics
from coordinator.core.node_side import NodeSide
from coordinator.core.preempt import Preemption
from coordinator.core.service_metrics import ServiceMetrics
from coordinator.core.services import ServiceManager
from coordinator.model import FINISHED, DrainMark, Link, Node, Task, TaskState, new_task_id
from coordinator.scheduling.fairqueue import FairQueue
from coordinator.scheduling.fairshare import tenant_of
from coordinator.scheduling.placement import Placement, PlacementIndex
from coordinator.scheduling.policy import STRICT, queue_class, rank
from coordinator.scheduling.tenants import Tenants
from coordinator.scheduling.wake import node_wake_keys
from coordinator.settings import Settings
from coordinator.storage.store import StoreError, Write, insert_of, update_of
from coordinator.storage.store_core import GroupCommitStore
from shared.protocol import Assign, Cancel, ClientMsg, Register, Registered
from shared.tasks import TaskSubmit, executor_for, priority_band

log = logging.getLogger(__name__)

Q, A, R = TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING
DONE, FAIL, CANC, LOST = (
    TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED, TaskState.LOST,
)
_enc = msgspec.json.Encoder()
PASS_BUDGET_S = 0.02  # the longest a dispatch pass holds the event loop


class InvalidTransition(RuntimeError):
    def __init__(self, task: Task, to: TaskState, cause: str) -> None:
        super().__init__(f"task {task.id}: no edge {task.state} -> {to} (cause: {cause})")
        self.task_id, self.state, self.to, self.cause = task.id, task.state, to, cause


class UnknownTask(LookupError):
    def __init__(self, task_id: str) -> None:
        super().__init__(f"no task {task_id}")
        self.task_id = task_id


class MeshUnavailable(StoreError):
    """The Mesh is rebuilding from its store after a failed write: try again shortly."""


class AlreadyFinished(RuntimeError):
    def __init__(self, task: Task) -> None:
        super().__init__(f"task {task.id} is already {task.state}")
        self.task = task


class Mesh:
    """Holds its parts and calls them: `node_side` (what nodes do, node loss; it holds the
    node-fault paths, `node_side.faults`) and `preemption`. Each reads the Mesh's state
    through a narrow protocol of its own and changes tasks only through `_transition`."""

    def __init__(
        self, store: GroupCommitStore, settings: Settings, metrics: MeshMetrics | None = None
    ) -> None:
        self.store = store
        self.settings = settings
        self.metrics = metrics or MeshMetrics()
        self.loop_watch = LoopWatch(settings.stall_s)  # event-loop lag, for liveness
        self.broken: str = ""  # why the Mesh is rebuilding from the store; "" when serving
        self.rebuilds = 0
        self._rebuilding: asyncio.Task[None] | None = None
        store.on_failure = self._store_failed
        self._init_state()
        # The parts live as long as the Mesh; they read its state when called, so they
        # see what a rebuild puts in place (coordinator/core/node_side.py, preempt.py).
        self.node_side = NodeSide(
            self, transition=self._transition, node_changed=self._node_changed,
            wake_blocked=self._wake_blocked, wake=self._wake_dispatch,
        )
        self.preemption = Preemption(self, self._transition)
        # Gangs: one task on N nodes, all or nothing (coordinator/core/gangs.py).
        self.gangs = Gangs(self, transition=self._transition, send_assign=self._send_assign,
                           wake=self._wake_dispatch)
        self.node_side.gang_loss = self.node_side.faults.gang_loss = self.gangs.member_lost
        self.node_side.gang_port = self.gangs.on_port
        self.preemption.stop_gang = self.gangs.preempted  # a gang is preempted as one unit
        # Model services: their specs, replicas (tasks marked as theirs) and scaling.
        self.services = ServiceManager(self, ServiceMetrics())
        self.metrics.registry.register(self.services.metrics)
        self.services.metrics.watch(lambda: list(self.services.services.values()))
        # The coordinator's own deadlines: timeout_s, and a start after assignment.
        self.deadlines = Deadlines(
            self, transition=self._transition, infra_loss=self.node_side.faults.infra_loss,
            node_changed=self._node_changed, infra_failed=self.metrics.infra_failed,
        )

    def _init_state(self) -> None:
        """Every piece of memory that the store is the truth of: rebuilt after a failure."""
        settings = self.settings
        self.tasks: dict[str, Task] = {}  # every unfinished task
        self.finished: OrderedDict[str, Task] = OrderedDict()  # the most recent finished
        self.nodes: dict[str, Node] = {}
        self.index = PlacementIndex()  # placement's view of the nodes: update after changes
        self.fair = Tenants(settings)  # weights, quotas, usage (coordinator/scheduling/tenants.py)
        self.queue = FairQueue(self._is_queued, self.fair.choose, by_head=settings.policy in STRICT)
        self.gpu_seconds: dict[str, float] = {}  # by tenant, for the fairness index
        self.state_counts: Counter[TaskState] = Counter()  # unfinished tasks by state
        self.queued_by_band: Counter[str] = Counter()
        self.finished_counts: Counter[str] = Counter()  # all-time, from the store on start
        self.logs = TaskLogs(settings.log_bytes_per_task)
        self.started_at = time.time()
        self._seq = 0
        self._wake = asyncio.Event()
        self._done: dict[str, asyncio.Event] = {}
        self.loaded = asyncio.Event()  # every stored task is back in memory
        self.drains: dict[str, DrainMark] = {}  # drained node names (coordinator/core/drain.py)
        self._loops: list[asyncio.Task[None]] = []
        self.started_at = getattr(self, "started_at", time.time())

    # --- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Reload work from the store and start dispatching.

        Placed tasks (and their nodes) are back before the first request; queued tasks
        stream in behind, best first, so the first dispatch after a restart does not
        wait for a large backlog to load (`loaded` is set when it has)."""
        counts, self._seq = await self.store.counts()
        self.finished_counts.update(counts)
        active = await self.store.load_active()
        self.fair.load(await self.store.tenants())
        now = time.time()
        self.deadlines.clear()
        self.gangs.clear()
        for t in active:
            self.tasks[t.id] = t
            self.state_counts[t.state] += 1
            if t.state is LOST:
                self.node_side.requeue_or_fail(t, "lost before the coordinator restarted")
            elif t.node is not None:
                node = self.nodes.get(t.node) or self._placeholder(t.node, now)
                node.hold(t)
                self.fair.count(t, None, t.state)
                self._node_changed(node)
                # its deadline, from the stored times; none before its node may be back
                self.deadlines.moved(t, t.state, not_before=now + self.settings.restart_grace_s)
        self.gangs.reload(self.tasks)  # a placed gang restarts as one unit, never half
        await load_drains(self)
        await self.services.load()  # before any node may report a replica
        for node in self.nodes.values():
            self.node_side.start_grace(
                node, self.settings.restart_grace_s, "coordinator restart"
            )
        self._loops = [
            asyncio.create_task(self._dispatch_loop(), name="dispatch"),
            asyncio.create_task(self.node_side.faults.liveness_loop(), name="liveness"),
            asyncio.create_task(self._load_queued(len(active)), name="load-queued"),
            asyncio.create_task(self.node_side.forget_loop(), name="forget-nodes"),
            asyncio.create_task(self.services.run(), name="services"),
        ]
        self._wake.set()

    async def _load_queued(self, active: int) -> None:
        queued = 0
        async for t in self.store.iter_queued(self.settings.aging_s):
            if t.id not in self.tasks:
                self.tasks[t.id] = t
                self.state_counts[Q] += 1
                self._enqueue(t)
                queued += 1
        self.loaded.set()
        log.info(
            "mesh started: %d placed and %d queued tasks reloaded, %d nodes awaited",
            active, queued, len(self.nodes),
        )

    def _placeholder(self, name: str, now: float) -> Node:
        node = Node(name=name, status="disconnected", connected_at=now)
        self.nodes[name] = node
        self._node_changed(node)
        return node

    async def stop(self) -> None:
        if self._rebuilding is not None:
            self._rebuilding.cancel()
        await self._stop_loops()
        self._let_nodes_go(1001, "coordinator shutting down")

    def _let_nodes_go(self, code: int, reason: str) -> None:
        """Cancel every grace timer and deadline, close every node link (`code`, `reason`)."""
        self.deadlines.clear()
        for node in self.nodes.values():
            if node.grace is not None:
                node.grace.cancel()
            if node.link is not None:
                node.link.close(code, reason)

    # --- crash-only: a failed write rebuilds memory from the store ---------------------

    def _store_failed(self, err: StoreError) -> None:
        if self.broken:
            return
        self.broken = str(err)
        log.critical("a store write failed (%s): rebuilding the mesh from the store", err)
        self.metrics.store_failures.inc()
        self._rebuilding = asyncio.get_running_loop().create_task(
            self._rebuild(), name="mesh-rebuild"
        )

    async def _rebuild(self) -> None:
        """Forget memory, close every node connection, reload what the store committed."""
        await self._stop_loops()
        self._let_nodes_go(1011, "coordinator rebuilding its state from the store")
        done = self._done
        delay = 0.05
        while True:
            self._init_state()
            self._done = done  # long-polls keep waiting; they wake when their task ends
            try:
                await self.store.reset()
                await self.start()
                break
            except Exception:  # noqa: BLE001 - the store is still failing: try again
                log.exception("rebuild from the store failed; retrying in %.2fs", delay)
                await self._stop_loops()
                await asyncio.sleep(delay)
                delay = min(delay * 2, 5.0)
        self.rebuilds += 1
        self.broken = ""
        log.warning("mesh rebuilt from the store (%d tasks unfinished)", len(self.tasks))

    async def _stop_loops(self) -> None:
        for loop_task in self._loops:
            loop_task.cancel()
        for loop_task in self._loops:
            try:
                await loop_task
            except asyncio.CancelledError:
                pass
        self._loops = []

    async def settled(self) -> None:
        """Returns once every transition made so far is committed: a reader that awaits
        this first shows no state the store does not hold."""
        self._serving()
        try:
            await self.store.barrier()
        except StoreError as exc:
            why = f"coordinator is rebuilding after a store failure: {exc}"
            raise MeshUnavailable(why) from exc

    def _serving(self) -> None:
        if self.broken:
            raise MeshUnavailable(
                f"coordinator is rebuilding after a store failure: {self.broken}"
            )

    # --- the transition table ----------------------------------------------------------

    def _transition(
        self, t: Task, to: TaskState, *, cause: str, **change: Any
    ) -> asyncio.Future[None]:
        step = self._EDGES.get((t.state, to))
        if step is None:
            raise InvalidTransition(t, to, cause)
        prev, prev_attempt = t.state, t.attempt
        step(self, t, to, **change)
        t.state = to
        self._count(t, prev, to)
        gang = t.gang_size > 1 or t.member_of is not None
        if t.gang_size == 1:  # a gang's own clock is its members' (core/gangs.py)
            self.deadlines.moved(t, to)  # cancels one timer, arms one (core/deadlines.py)
        if t.id in self.services.by_task:  # a model service's replica (core/services.py)
            self.services.task_moved(t, to)
        if log.isEnabledFor(logging.INFO):  # its context dict is not built for nothing
            log.info(
                "task %s %s -> %s (%s)", t.id, prev, to, cause, extra=t.log_context(cause=cause)
            )
        try:
            op = update_of(t, prev, prev_attempt)
        except Exception as exc:  # noqa: BLE001 - memory moved, the store cannot follow
            err = StoreError(f"task {t.id} {prev} -> {to} cannot be encoded: {exc!r}")
            self._store_failed(err)
            write: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            write.set_exception(err)
        else:
            write = self.store.write(op)
        t.pending = write
        if to in FINISHED and t.id in self._done:
            # Long-polls hear of the end only once it is durable, like every other reply.
            write.add_done_callback(
                lambda f: None if f.exception() else self._finished_durably(t.id)
            )
        if gang:
            self.gangs.moved(t, prev, to)  # start together, fail together (core/gangs.py)
        return write

    def _finished_durably(self, task_id: str) -> None:
        done = self._done.pop(task_id, None)
        if done is not None:
            done.set()

    def _queued_assigned(self, t: Task, to: TaskState, *, node: Node | None,
                         gpus: tuple[int, ...], hold_s: float = 0.0) -> None:
        t.attempt += 1  # hold_s: its assign waits that long (preempted work leaving)
        t.assigned_at, t.started_at = time.time() + hold_s, None
        if node is None:  # a gang task: its members hold the nodes (core/gangs.py)
            return
        t.node, t.gpu_indices = node.name, gpus
        node.hold(t)
        self.index.update(node)
        self.metrics.task_waited(t.task_type, t.assigned_at - t.submitted_at)

    def _assigned_running(self, t: Task, to: TaskState) -> None:
        t.started_at = time.time()

    def _finish(self, t: Task, to: TaskState, *, result: dict[str, Any] | None = None,
                error: str = "") -> None:
        t.finished_at = time.time()
        t.result, t.error = result, error
        node = self.nodes.get(t.node) if t.node else None
        if t.gpu_indices and t.assigned_at is not None:
            held = t.finished_at - (t.started_at or t.assigned_at)
            tenant, used = t.tenant or "default", self.gpu_seconds
            used[tenant] = used.get(tenant, 0.0) + held * len(t.gpu_indices)
        if t.energy_j and result is not None and result.get("energy_j") is None:
            t.result = {**result, "energy_j": round(t.energy_j, 3)}
        if node is not None and t.id in node.tasks:
            node.release(t)
            self._node_changed(node)
            if to is DONE:
                node.completed += 1
            elif to is FAIL:
                node.failed += 1
        del self.tasks[t.id]
        self.finished[t.id] = t
        while len(self.finished) > self.settings.finished_cache:
            self.finished.popitem(last=False)
        self.finished_counts[to.value] += 1
        self.logs.finish(t.id)
        run_s = t.finished_at - t.started_at if t.started_at else None
        self.metrics.task_finished(t.task_type, to.value, run_s)
        self._wake.set()

    def _lost(self, t: Task, to: TaskState) -> None:
        node = self.nodes.get(t.node) if t.node else None
        if node is not None:
            node.release(t)
            self._node_changed(node)

    def _lost_queued(self, t: Task, to: TaskState) -> None:
        t.node, t.gpu_indices, t.assigned_at, t.started_at = None, (), None, None
        self.metrics.reassigned()

    _EDGES: dict[tuple[TaskState, TaskState], Callable[..., None]] = {
        (Q, A): _queued_assigned,
        (A, R): _assigned_running,
        (A, DONE): _finish, (A, FAIL): _finish, (R, DONE): _finish, (R, FAIL): _finish,
        (Q, CANC): _finish, (A, CANC): _finish, (R, CANC): _finish,
        (A, LOST): _lost, (R, LOST): _lost,
        (LOST, Q): _lost_queued, (LOST, FAIL): _finish,
    }

    def _count(self, t: Task, prev: TaskState, to: TaskState) -> None:
        if prev not in FINISHED:
            self.state_counts[prev] -= 1
        if to not in FINISHED:
            self.state_counts[to] += 1
        band = priority_band(t.priority)
        if prev is Q:
            self.queued_by_band[band] -= 1
        if to is Q:
            self.queued_by_band[band] += 1
            self._enqueue(t, counted=True)
        if self.fair.count(t, prev, to) and self.queue.wake_tenant(tenant_of(t.tenant)):
            self._wake.set()  # its tenant let go of GPUs: work held by a quota may fit

    def _enqueue(self, t: Task, counted: bool = False) -> None:
        if not counted:
            self.queued_by_band[priority_band(t.priority)] += 1
            self.fair.count(t, None, Q)
        self.queue.push(queue_class(t, self.settings.policy), self._rank(t), t.seq, t.id,
                        tenant_of(t.tenant))
        self._wake.set()

    def wake_queued(self) -> None:
        """Try every blocked class again (a tenant's quotas changed)."""
        self.queue.wake_all()
        self._wake.set()

    def _rank(self, t: Task) -> float:
        """Queue order, lower first, by `MESH_POLICY` (coordinator/scheduling/policy.py)."""
        settings = self.settings
        return rank(settings.policy, settings.aging_s, t)

    def _is_queued(self, task_id: str) -> bool:
        t = self.tasks.get(task_id)
        return t is not None and t.state is Q

    # --- submission and cancel (called by the HTTP API) --------------------------------

    def next_seq(self) -> int:
        self._seq += 1
        return self._seq

    def count_new(self, t: Task) -> None:
        """Count a task made queued outside `submit` (a gang's member), not enqueued."""
        self.state_counts[Q] += 1
        self.queued_by_band[priority_band(t.priority)] += 1
        self.fair.count(t, None, Q)

    def _new_task(self, spec: TaskSubmit, params: dict[str, Any]) -> Task:
        self._seq += 1
        t = Task(
            id=new_task_id(), seq=self._seq, task_type=spec.task_type,
            priority=spec.priority, executor=executor_for(spec),
            req_raw=_enc.encode(spec.requirements), spec_raw=_enc.encode(spec),
            params_raw=_enc.encode(params), max_attempts=spec.max_attempts,
            tenant=spec.tenant, submitted_at=time.time(), _spec=spec,
        )
        self.tasks[t.id] = t
        self.state_counts[Q] += 1
        self._enqueue(t)
        self.metrics.task_submitted(t.task_type)
        return t

    async def submit(
        self, specs: list[tuple[TaskSubmit, dict[str, Any]]],
        also: Callable[[list[Task]], Write] | None = None,
    ) -> list[Task]:
        """Accept tasks, all or none; returns once every one of them is durable.

        The inserts are queued in one turn of the loop, so they share one transaction: a
        batch commits whole or not at all. On failure the Mesh rebuilds from the store,
        where none of them is, and the caller answers 503."""
        self._serving()
        tasks = [self._new_task(spec, params) for spec, params in specs]
        try:
            ops = [insert_of(t) for t in tasks]
        except Exception as exc:  # noqa: BLE001 - the edge let through what cannot be stored
            err = StoreError(f"submission cannot be encoded: {exc!r}")
            self._store_failed(err)
            raise err from exc
        writes = [self.store.write(op) for op in ops]
        for t, w in zip(tasks, writes, strict=True):
            t.pending = w
        if also is not None:  # e.g. the audit record: same turn, so the same transaction
            writes.append(self.store.write(also(tasks)))
        await asyncio.shield(asyncio.gather(*writes))
        return tasks

    async def cancel(
        self, task_id: str, reason: str = "cancelled by user", also: Write | None = None
    ) -> Task:
        self._serving()
        if task_id not in self.tasks and not self.loaded.is_set():
            await self.loaded.wait()  # it may be a queued task still loading
        t = self.tasks.get(task_id)
        if t is None:
            known = self.finished.get(task_id) or await self.store.get(task_id)
            if known is None:
                raise UnknownTask(task_id)
            raise AlreadyFinished(known)
        node = self.nodes.get(t.node) if t.node else None
        attempt = t.attempt
        gang = {"result": self.gangs.result_now(t)} if t.gang_size > 1 else {}  # gangs.py
        writes = [self._transition(t, CANC, cause=reason, error=reason, **gang)]
        if also is not None:  # the same turn as the transition: the same transaction
            writes.append(self.store.write(also))
        await asyncio.shield(asyncio.gather(*writes))
        if node is not None and node.link is not None:
            node.link.send(Cancel(task_id=t.id, attempt=attempt, reason=reason))
        return t

    async def lookup(self, task_id: str) -> Task | None:
        """The task as committed: a transition still being written is waited for."""
        for _ in range(100):  # each round waits for one commit; a busy task settles fast
            self._serving()
            t = self.tasks.get(task_id) or self.finished.get(task_id)
            if t is None:
                return await self.store.get(task_id)
            pending = t.pending
            if pending is None or pending.done() and pending is t.pending:
                if pending is not None and pending.exception() is not None:
                    continue  # that state never committed; the rebuild knows the truth
                return t
            await asyncio.wait([pending])
        raise MeshUnavailable(f"task {task_id} did not settle")

    async def wait_finished(self, task_id: str, wait_s: float) -> None:
        if task_id not in self.tasks and not self.loaded.is_set():
            try:
                await asyncio.wait_for(self.loaded.wait(), wait_s)
            except TimeoutError:
                return
        if task_id not in self.tasks:
            return
        event = self._done.setdefault(task_id, asyncio.Event())
        try:  # asyncio.timeout, not wait_for: no task of its own per long-poll (3.11)
            async with asyncio.timeout(wait_s):
                await event.wait()
        except TimeoutError:
            pass

    def queued_reason(self, t: Task) -> str:
        if t.state is not Q:
            return ""
        nofit = self.queue.reason(tenant_of(t.tenant), queue_class(t, self.settings.policy))
        reason = nofit.reason if nofit is not None else "waiting for a free slot"
        return reason + self.fair.share_note(t.tenant, time.time())

    # --- dispatch ----------------------------------------------------------------------

    async def _dispatch_loop(self) -> None:
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self._dispatch_once()
            except Exception:  # the one catch-all of this loop: keep dispatching
                log.exception("dispatch pass failed")

    async def _dispatch_once(self) -> None:
        started = time.perf_counter()
        placed = self._dispatch_pass()
        if self._wake.is_set():
            await asyncio.sleep(0)  # a pass cut at its budget: let the loop breathe first
        if not placed:
            return
        # The pass's writes were queued in one turn, so they commit (or fail) in one batch:
        # once the last is done all are. The assigns go out then, while the next pass runs.
        placed[-1][1].add_done_callback(lambda _: self._send_placed(placed, started))

    def _send_placed(self, placed: list[tuple[Task, asyncio.Future[None]]],
                     started: float) -> None:
        for t, write in placed:
            if not write.done():  # not in that batch after all: send it after its own
                write.add_done_callback(self._send_later(t, started))
            elif write.cancelled() or write.exception() is not None:
                log.error("assignment of task %s not stored", t.id)
            else:
                self._send_assign(t)
        self.metrics.dispatched(time.perf_counter() - started, len(placed))

    def _send_later(
        self, t: Task, started: float
    ) -> Callable[[asyncio.Future[None]], None]:
        def send(write: asyncio.Future[None]) -> None:
            self._send_placed([(t, write)], started)

        return send

    def _dispatch_pass(self) -> list[tuple[Task, asyncio.Future[None]]]:
        """Place queued work until nothing more fits (coordinator/core/dispatch.py, the code
        the simulator runs too). Synchronous: no await inside. A pass stops after
        `PASS_BUDGET_S` of decisions (many new classes, a big batch) and asks for another,
        so the loop never stalls behind it."""
        placed: list[tuple[Task, asyncio.Future[None]]] = []

        def assign(t: Task, decision: Placement, hold: float) -> None:
            node = self.nodes[decision.node]
            write = self._transition(
                t, A, cause=f"placed on {node.name}", node=node, gpus=decision.gpu_indices,
                hold_s=hold,
            )
            placed.append((t, write))

        def assign_gang(t: Task, found: list[Placement]) -> None:
            hold = self.preemption.gang_hold.pop(t.id, 0.0)  # victims leaving (preempt.py)
            placed.extend(self.gangs.start(t, found, hold))  # core/gangs.py

        if dispatch_pass(self, assign, self.preemption.preempt_for,
                         deadline=time.perf_counter() + PASS_BUDGET_S, assign_gang=assign_gang,
                         gang_hold=self.gangs.reservation,
                         preempt_gang=self.preemption.preempt_gang_for):
            self._wake.set()
        return placed

    def _node_changed(self, node: Node) -> None:
        """Call after any change to a node (allocation, status, GPUs, executors, labels,
        policy, quarantine): refreshes placement's index and wakes the blocked classes
        that capacity on this node could fit. A change that only takes capacity away
        (an assignment) may call `self.index.update` alone."""
        self.index.update(node)
        self._wake_blocked(node)

    def _wake_dispatch(self) -> None:
        """Ask for a dispatch pass (the parts' `wake`)."""
        self._wake.set()

    def _wake_blocked(self, node: Node, gpus_only: bool = False) -> None:
        if node.online and self.queue.blocked and self.queue.wake(
            node_wake_keys(node, gpus_only=gpus_only)
        ):
            self._wake.set()

    def _send_assign(self, t: Task) -> None:
        if t.state is not A or t.node is None:
            return  # cancelled or lost while its write was in flight
        if not self.gangs.may_send(t):
            return  # a gang's rank > 0 waits for rank 0's MASTER_PORT (core/gangs.py)
        if t.assigned_at is not None and (wait := t.assigned_at - time.time()) > 0:
            attempt = t.attempt  # preempted work is leaving its GPUs: send it then

            def send_then() -> None:
                if t.attempt == attempt:
                    self._send_assign(t)

            asyncio.get_running_loop().call_later(wait, send_then)
            return
        node = self.nodes.get(t.node)
        if node is None or node.link is None:
            return  # the node is away; register's reconciliation requeues or keeps it
        node.assigns_sent += 1  # faults.reconcile: which heartbeats were made after it
        t.sent_as = (t.attempt, node.epoch, node.assigns_sent)
        node.link.send(self._assign_msg(t, node))

    def _assign_msg(self, t: Task, node: Node) -> Assign:
        spec = t.spec
        vendors = {g.vendor for g in node.gpus if g.index in t.gpu_indices}
        return Assign(
            task_id=t.id, attempt=t.attempt, task_type=t.task_type, priority=t.priority,
            executor=t.executor, gpu_indices=list(t.gpu_indices),
            gpu_vendor=vendors.pop() if len(vendors) == 1 else "",
            script=spec.script, command=spec.command, image=spec.image, env=spec.env,
            timeout_s=spec.timeout_s, volumes=spec.volumes, shm_size=spec.shm_size,
            cpus=spec.cpus, mem_limit=spec.mem_limit, params=msgspec.json.decode(t.params_raw),
            files=spec.files, artifacts=spec.artifacts, tenant=tenant_of(t.tenant),
            service=self.services.run_for(t.id),
            gang=self.gangs.run_of(t) if spec.gang is not None else None,
        )

    # --- invariants --------------------------------------------------------------------

    def check_invariants(self) -> None:
        """Cross-checks of the registry, the queue and the tasks; raises on a broken one."""
        check_invariants(self)
        self.services.check()

    # --- the node side (coordinator/core/node_side.py), as the link and tests call it ---

    def register(self, name: str, msg: Register, link: Link) -> Registered:
        return self.node_side.register(name, msg, link)

    def handle(self, name: str, link: Link, msg: ClientMsg) -> None:
        """One decoded message from a registered node. Replies go out through `link`."""
        self.node_side.handle(name, link, msg)

    def heard(self, name: str, link: Link) -> None:
        """A frame came from `name` that was refused before it reached `handle`: the node is
        still there, so it is not judged silent; nothing else changes."""
        self.node_side.heard(name, link)

    def disconnected(self, name: str, link: Link, why: str) -> None:
        self.node_side.disconnected(name, link, why)

    def node_gone(self, node: Node, cause: str) -> None:
        self.node_side.node_gone(node, cause)

    def forget_node(self, name: str, why: str) -> bool:
        return self.node_side.forget_node(name, why)

    def forget_stale_nodes(self, now: float) -> list[str]:
        return self.node_side.forget_stale_nodes(now)

    @property
    def preempted_total(self) -> int:
        """Running tasks stopped for critical work since this Mesh was made."""
        return self.preemption.preempted_total

"""What every Store engine shares: the writes, their errors, the row codec, group commit
and the reads (coordinator/storage/store.py is SQLite, coordinator/storage/store_pg.py PostgreSQL).

`write()` returns a future that resolves once the write is committed; every write made
while a commit is in flight goes into the next transaction together (group commit), so
throughput holds under load while each caller still waits for its own durability.

A write that fails is never just logged. A guarded update that matches no row
(`ShortWrite`), an engine error, a value that cannot be encoded or a lost lease (`Deposed`)
fails the whole transaction it was in, every write queued behind it (they were made on
memory that assumed it), and every later write until `reset()`: the store is *broken*,
and `on_failure` tells the Mesh, which rebuilds itself from what is committed (crash-only).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import orjson

from coordinator.model import FINISHED, Task, TaskState

log = logging.getLogger(__name__)
T = TypeVar("T")
Row = Sequence[Any]

COLUMNS = (
    "id, seq, task_type, priority, executor, requirements, spec, params, max_attempts, tenant, "
    "state, attempt, node, gpu_indices, submitted_at, assigned_at, started_at, finished_at, "
    "result, error, history"
)
# Statements use `?` placeholders; the PostgreSQL engine turns them into `%s`.
INSERT_SQL = f"INSERT INTO tasks ({COLUMNS}) VALUES ({', '.join('?' * 21)})"
AUDIT_SQL = (
    "INSERT INTO audit (at, actor, token_id, tenant, action, target, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
UPDATE_SQL = (
    "UPDATE tasks SET state=?, attempt=?, node=?, gpu_indices=?, assigned_at=?, started_at=?, "
    "finished_at=?, result=?, error=?, history=? WHERE id=? AND state=? AND attempt=?"
)


class StoreError(RuntimeError):
    pass


class ShortWrite(StoreError):
    """A guarded update matched no row: memory and the store disagree."""

    def __init__(self, task_id: str, prev_state: str, prev_attempt: int, rows: int) -> None:
        super().__init__(
            f"guarded update of task {task_id} from {prev_state}/{prev_attempt} "
            f"matched {rows} rows"
        )
        self.task_id, self.prev_state, self.prev_attempt = task_id, prev_state, prev_attempt


class StoreBroken(StoreError):
    """A write failed earlier; nothing more is written until the Mesh has rebuilt."""


class Deposed(StoreError):
    """The leader lease moved on (another epoch, or it expired): this coordinator may not
    commit anything more. Raised inside the transaction, so none of it commits."""

    def __init__(self, epoch: int) -> None:
        super().__init__(f"not the leader any more: lease epoch {epoch} is gone or expired")
        self.epoch = epoch


@dataclass(frozen=True, slots=True)
class Insert:
    task: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Update:
    """A guarded write: it applies only if the row is still in the state we read it in."""

    values: tuple[Any, ...]
    task_id: str
    prev_state: str
    prev_attempt: int


@dataclass(frozen=True, slots=True)
class AuditInsert:
    """One audit record: (at, actor, token_id, tenant, action, target, detail JSON)."""

    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class TenantPut:
    """A tenant's weight and quotas (coordinator/scheduling/tenants.py): (name, config JSON, at)."""

    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class Barrier:
    """Writes nothing: its future resolves once every write queued before it committed."""


@dataclass(frozen=True, slots=True)
class DrainPut:
    """A node's drain mark (coordinator/core/drain.py): (name, reason, since, actor) to set it,
    or `values` = (name,) alone to lift it."""

    values: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class ServiceWrite:
    """A model service's row, an event of its history or a replica mark
    (coordinator/core/services.py): `kind` is a key of SERVICE_SQL, `values` its arguments."""

    kind: str
    values: tuple[Any, ...]


MAX_SERVICE_EVENTS = 1000  # a service's history keeps its newest events, older ones pruned
SERVICE_SQL = {
    "put": "INSERT INTO services (tenant, name, spec, task, created_at, updated_at) "
           "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (tenant, name) DO UPDATE SET "
           "spec = excluded.spec, task = excluded.task, updated_at = excluded.updated_at",
    "delete": "DELETE FROM services WHERE tenant = ? AND name = ?",
    "forget": "DELETE FROM service_events WHERE tenant = ? AND name = ?",
    "event": "INSERT INTO service_events (tenant, name, at, kind, detail) VALUES (?, ?, ?, ?, ?)",
    "prune": "DELETE FROM service_events WHERE tenant = ? AND name = ? AND seq <= (SELECT seq "
             "FROM service_events WHERE tenant = ? AND name = ? ORDER BY seq DESC LIMIT 1 "
             f"OFFSET {MAX_SERVICE_EVENTS})",
    "replica": "INSERT INTO service_replicas (task_id, tenant, name) VALUES (?, ?, ?)",
    "unreplica": "DELETE FROM service_replicas WHERE task_id = ?",
}


Op = Insert | Update | AuditInsert | TenantPut | DrainPut | ServiceWrite  # an engine applies
Write = Op | Barrier


TENANT_SQL = (
    "INSERT INTO tenants (name, config, updated_at) VALUES (?, ?, ?) ON CONFLICT (name) "
    "DO UPDATE SET config = excluded.config, updated_at = excluded.updated_at"
)


DRAIN_SET_SQL = (
    "INSERT INTO node_drains (name, reason, since, actor) VALUES (?, ?, ?, ?) ON CONFLICT (name) "
    "DO UPDATE SET reason = excluded.reason, since = excluded.since, actor = excluded.actor"
)
DRAIN_LIFT_SQL = "DELETE FROM node_drains WHERE name = ?"


def statement_of(op: Op) -> tuple[str, tuple[Any, ...]]:
    """The SQL (with `?` placeholders) and arguments of one write."""
    if isinstance(op, Insert):
        return INSERT_SQL, op.task
    if isinstance(op, AuditInsert):
        return AUDIT_SQL, op.values
    if isinstance(op, TenantPut):
        return TENANT_SQL, op.values
    if isinstance(op, DrainPut):
        return DRAIN_SET_SQL if len(op.values) > 1 else DRAIN_LIFT_SQL, op.values
    if isinstance(op, ServiceWrite):
        return SERVICE_SQL[op.kind], op.values
    return UPDATE_SQL, (*op.values, op.task_id, op.prev_state, op.prev_attempt)


def insert_of(t: Task) -> Insert:
    return Insert(
        (
            t.id, t.seq, t.task_type, t.priority, t.executor, t.req_raw, t.spec_raw,
            t.params_raw, t.max_attempts, t.tenant, t.state.value, t.attempt, t.node,
            _indices(t.gpu_indices), t.submitted_at, t.assigned_at, t.started_at,
            t.finished_at, _result(t.result), t.error, orjson.dumps(t.history),
        )
    )


def update_of(t: Task, prev_state: TaskState, prev_attempt: int) -> Update:
    values = (
        t.state.value, t.attempt, t.node, _indices(t.gpu_indices), t.assigned_at,
        t.started_at, t.finished_at, _result(t.result), t.error, orjson.dumps(t.history),
    )
    return Update(values, t.id, prev_state.value, prev_attempt)


def _indices(indices: tuple[int, ...]) -> str:
    return ",".join(map(str, indices))


def _result(result: dict[str, Any] | None) -> bytes | None:
    return None if result is None else orjson.dumps(result)


def task_from_row(row: Row) -> Task:
    (tid, seq, task_type, priority, executor, req, spec, params, max_attempts, tenant, state,
     attempt, node, gpus, submitted, assigned, started, finished, result, error, history) = row
    return Task(
        id=tid, seq=seq, task_type=task_type, priority=priority, executor=executor,
        req_raw=bytes(req), spec_raw=bytes(spec), params_raw=bytes(params),
        max_attempts=max_attempts, tenant=tenant, submitted_at=submitted,
        state=TaskState(state), attempt=attempt, node=node,
        gpu_indices=tuple(int(i) for i in gpus.split(",")) if gpus else (),
        assigned_at=assigned, started_at=started, finished_at=finished,
        result=orjson.loads(result) if result is not None else None, error=error,
        history=(events := orjson.loads(history)),
        infra_retries=sum(1 for e in events if e.get("infra")),  # they spend no attempt
    )


def tasks_from_rows(rows: list[Row]) -> list[Task]:
    return [task_from_row(r) for r in rows]


def queued_order(aging_s: float) -> tuple[str, tuple[Any, ...]]:
    """The Mesh's queue order as SQL: best first, with aging if on."""
    order = "submitted_at - priority * ?, seq" if aging_s > 0 else "-priority, seq"
    args: tuple[Any, ...] = (aging_s,) if aging_s > 0 else ()
    sql = f"SELECT {COLUMNS} FROM tasks WHERE state = 'queued' ORDER BY {order}"
    return sql, args


class GroupCommitStore:
    """The Store interface both engines serve (SQLite `store.Store`, PostgreSQL
    `store_pg.PgStore`): group commit and the reads; an engine supplies `open`, `close`,
    `_commit`, `_query` and `iter_queued`."""

    # Per-engine SQL fragments: SQLite names its partial indexes (its planner would not
    # always pick them); PostgreSQL picks them itself and has a plain index on seq.
    FINISHED_FROM = "tasks"
    OPEN_FROM = "tasks"
    TOP_SEQ_SQL = "SELECT seq FROM tasks ORDER BY seq DESC LIMIT 1"

    def __init__(
        self,
        *,
        on_commit: Callable[[float, int], None] | None = None,
        on_failure: Callable[[StoreError], None] | None = None,
    ) -> None:
        self._on_commit = on_commit
        self.on_failure = on_failure  # the Mesh sets this: a failed write stops it
        self.broken: StoreError | None = None
        self._pending: list[tuple[Write, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    # --- what an engine provides -------------------------------------------------------

    async def open(self) -> None:
        """Connect, bring the schema up to date, start taking writes."""
        raise NotImplementedError

    async def close(self) -> None:
        """Commit what is pending, then disconnect."""
        raise NotImplementedError

    async def _commit(self, ops: list[Op]) -> None:
        """Apply `ops` in order in one transaction; raise (and commit nothing) if any fails."""
        raise NotImplementedError

    async def _query(self, sql: str, args: tuple[Any, ...], decode: Callable[[list[Row]], T]) -> T:
        """Run one read (`?` placeholders) and return `decode(rows)`, decoded off the loop."""
        raise NotImplementedError

    def iter_queued(self, aging_s: float, chunk: int = 5000) -> AsyncIterator[Task]:
        """Queued tasks best first (the Mesh's queue order), decoded off the loop in chunks."""
        raise NotImplementedError

    # --- writes ------------------------------------------------------------------------

    def write(self, op: Write) -> asyncio.Future[None]:
        """Queue a write; the future resolves once it is committed. Never blocks.

        Once a write has failed the store is broken: every later write fails at once,
        until `reset()`."""
        if self._closed:
            raise StoreError("store is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self.broken is not None:
            fut.set_exception(StoreBroken(f"store is rebuilding after: {self.broken}"))
            return fut
        self._pending.append((op, fut))
        if self._flusher is None:
            self._flusher = asyncio.create_task(self._flush(), name="store-flush")
        return fut

    def barrier(self) -> asyncio.Future[None]:
        """Resolves once every write made so far is committed (fails if one failed)."""
        if not self._pending and self._flusher is None and self.broken is None:
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            fut.set_result(None)
            return fut
        return self.write(Barrier())

    async def reset(self) -> None:
        """Accept writes again, after the Mesh rebuilt its memory from the store."""
        if self._flusher is not None:
            await asyncio.gather(self._flusher, return_exceptions=True)
        self.broken = None

    async def _drain(self) -> None:
        """Wait for what is pending to commit (before close)."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        self._closed = True

    async def _flush(self) -> None:
        # One turn of the loop before the first batch: what the writer's caller sets off
        # in the same turn (a submission wakes the dispatcher, which assigns the task)
        # joins this commit instead of waiting for the next one.
        await asyncio.sleep(0)
        try:
            while self._pending:
                batch, self._pending = self._pending, []
                ops = [op for op, _ in batch if not isinstance(op, Barrier)]
                started = time.perf_counter()
                try:
                    if ops:  # only barriers: everything before them has committed already
                        await self._commit(ops)
                except Exception as exc:  # noqa: BLE001 - engine, encoding, short write: fatal
                    self._fail(batch, exc)
                    return
                if self._on_commit is not None:
                    self._on_commit(time.perf_counter() - started, len(ops))
                for _, fut in batch:
                    if not fut.done():
                        fut.set_result(None)
        finally:
            self._flusher = None

    def _fail(self, batch: list[tuple[Write, asyncio.Future[None]]], exc: Exception) -> None:
        err = exc if isinstance(exc, StoreError) else StoreError(f"store write failed: {exc!r}")
        log.critical("store commit of %d writes failed: %s", len(batch), err)
        self.broken = err
        doomed, self._pending = [*batch, *self._pending], []
        for _, fut in doomed:
            if not fut.done():
                fut.set_exception(err)
            fut.exception()  # retrieved: a failure is reported once, via on_failure
        if self.on_failure is not None:
            self.on_failure(err)

    # --- reads -------------------------------------------------------------------------

    async def load_unfinished(self) -> list[Task]:
        return [*await self.load_active(), *[t async for t in self.iter_queued(aging_s=0)]]

    async def load_active(self) -> list[Task]:
        """Tasks that were placed on a node (assigned, running, or lost mid-requeue)."""
        return await self._query(
            f"SELECT {COLUMNS} FROM tasks WHERE state IN "
            "('assigned', 'running', 'lost') ORDER BY seq", (), tasks_from_rows,
        )

    async def top_seq(self) -> int:
        """The highest seq handed out: the newest row's (inserts come in seq order)."""
        return await self._query(self.TOP_SEQ_SQL, (), lambda rows: int(rows[0][0]) if rows else 0)

    async def counts(self) -> tuple[dict[str, int], int]:
        """Finished tasks by state, and the highest seq handed out so far."""
        finished = {s.value for s in FINISHED}
        counts = await self._query(
            "SELECT state, COUNT(*) FROM tasks GROUP BY state", (),
            lambda rows: {state: int(n) for state, n in rows if state in finished},
        )
        return counts, await self.top_seq()

    async def get(self, task_id: str) -> Task | None:
        return await self._query(
            f"SELECT {COLUMNS} FROM tasks WHERE id=?", (task_id,),
            lambda rows: task_from_row(rows[0]) if rows else None,
        )

    async def finished(self, limit: int, offset: int, tenant: str | None = None) -> list[Task]:
        """Finished tasks, newest first; only `tenant`'s when given (an API caller's own)."""
        where = "" if tenant is None else "AND tenant = ? "
        args = (limit, offset) if tenant is None else (tenant, limit, offset)
        return await self._query(
            f"SELECT {COLUMNS} FROM tasks WHERE finished_at IS NOT NULL {where}"
            "ORDER BY finished_at DESC LIMIT ? OFFSET ?", args, tasks_from_rows,
        )

    async def finished_page(
        self, limit: int, after: tuple[float, str] | None = None, offset: int = 0,
        tenant: str | None = None,
    ) -> list[Task]:
        """Finished tasks newest first, by key: those after `after` (finished_at, id), the
        last row of the previous page. Index-backed (tasks_finished_key): a page costs the
        same however deep it is. `offset` is for the seed's paging and is capped by the API."""
        where, args = ["finished_at IS NOT NULL"], []
        if after is not None:
            where.append("(finished_at, id) < (?, ?)")
            args += [after[0], after[1]]
        if tenant is not None:
            where.append("tenant = ?")
            args.append(tenant)
        return await self._query(
            f"SELECT {COLUMNS} FROM {self.FINISHED_FROM} WHERE {' AND '.join(where)} "
            "ORDER BY finished_at DESC, id DESC LIMIT ? OFFSET ?",
            (*args, limit, offset), tasks_from_rows,
        )

    async def open_ids(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, id) of unfinished tasks with seq > `after_seq`, in seq order, from the
        tasks_open index: `/tasks/active` walks the backlog in chunks off the event loop."""
        return await self._query(
            f"SELECT seq, id FROM {self.OPEN_FROM} "
            "WHERE state IN ('queued', 'assigned', 'running', 'lost') AND seq > ? "
            "ORDER BY seq LIMIT ?", (after_seq, limit),
            lambda rows: [(int(s), i) for s, i in rows],
        )

    async def tenants(self) -> list[tuple[str, bytes]]:
        """Every tenant's stored weight and quotas: (name, config JSON), by name."""
        return await self._query(
            "SELECT name, config FROM tenants ORDER BY name", (),
            lambda rows: [(str(r[0]), bytes(r[1])) for r in rows],
        )

    async def node_drains(self) -> list[tuple[str, str, float, str]]:
        """Every drained node: (name, reason, since, actor)."""
        return await self._query(
            "SELECT name, reason, since, actor FROM node_drains ORDER BY name", (),
            lambda rows: [(str(n), str(r), float(s), str(a)) for n, r, s, a in rows],
        )

    async def services(self) -> list[tuple[str, str, bytes, bytes, float, float]]:
        """Every model service: (tenant, name, spec JSON, replica task JSON, created_at,
        updated_at)."""
        return await self._query(
            "SELECT tenant, name, spec, task, created_at, updated_at FROM services "
            "ORDER BY tenant, name", (),
            lambda rows: [(str(t), str(n), bytes(s), bytes(k), float(c), float(u))
                          for t, n, s, k, c, u in rows],
        )

    async def service_replicas(self) -> list[tuple[str, str, str]]:
        """Every task marked as a service's replica: (task id, tenant, service name)."""
        return await self._query(
            "SELECT task_id, tenant, name FROM service_replicas ORDER BY task_id", (),
            lambda rows: [(str(i), str(t), str(n)) for i, t, n in rows],
        )

    async def service_events(self, tenant: str, name: str, limit: int) -> list[dict[str, Any]]:
        """A service's newest `limit` events, oldest first: {seq, at, kind, detail}."""
        return await self._query(
            "SELECT seq, at, kind, detail FROM service_events WHERE tenant = ? AND name = ? "
            "ORDER BY seq DESC LIMIT ?", (tenant, name, limit),
            lambda rows: [{"seq": int(q), "at": float(a), "kind": str(k),
                           "detail": orjson.loads(d)} for q, a, k, d in reversed(rows)],
        )

    async def audit_page(
        self, after: int, limit: int, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Audit rows with seq > `after`, oldest first: page on with the last row's seq."""
        sql = ("SELECT seq, at, actor, token_id, tenant, action, target, detail FROM audit "
               "WHERE seq > ?")
        args: list[Any] = [after]
        if tenant is not None:
            sql += " AND tenant = ?"
            args.append(tenant)
        keys = ("seq", "at", "actor", "token_id", "tenant", "action", "target")
        return await self._query(
            sql + " ORDER BY seq LIMIT ?", (*args, limit),
            lambda rows: [dict(zip(keys, r[:7], strict=True)) | {"detail": orjson.loads(r[7])}
                          for r in rows],
        )

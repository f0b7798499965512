"""Durable task state in SQLite (WAL), off the event loop, with group commit.

One writer thread owns one connection and applies writes in the order they were made.
`write()` returns a future that resolves once the write is committed; every write made
while a commit is in flight goes into the next transaction together (group commit), so
throughput holds under load while each caller still waits for its own durability.
Reads use a second connection on a second thread; WAL lets them run beside the writer.

A write that fails is never just logged. A guarded update that matches no row
(`ShortWrite`), an engine error or a value that cannot be encoded fails the whole
transaction it was in, every write queued behind it (they were made on memory that
assumed it), and every later write until `reset()`: the store is *broken*, and
`on_failure` tells the Mesh, which rebuilds itself from what is committed (crash-only).
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from coordinator.model import FINISHED, Task, TaskState

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS tasks (
    id TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    task_type TEXT NOT NULL,
    priority INTEGER NOT NULL,
    executor TEXT NOT NULL,
    requirements BLOB NOT NULL,
    spec BLOB NOT NULL,
    params BLOB NOT NULL,
    max_attempts INTEGER NOT NULL,
    tenant TEXT NOT NULL,
    state TEXT NOT NULL,
    attempt INTEGER NOT NULL,
    node TEXT,
    gpu_indices TEXT NOT NULL,
    submitted_at REAL NOT NULL,
    assigned_at REAL,
    started_at REAL,
    finished_at REAL,
    result BLOB,
    error TEXT NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_open ON tasks(seq)
    WHERE state IN ('queued', 'assigned', 'running', 'lost');
CREATE INDEX IF NOT EXISTS tasks_active ON tasks(seq)
    WHERE state IN ('assigned', 'running', 'lost');
CREATE TABLE IF NOT EXISTS audit (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    actor TEXT NOT NULL,
    token_id TEXT NOT NULL,
    tenant TEXT NOT NULL,
    action TEXT NOT NULL,
    target TEXT NOT NULL,
    detail BLOB NOT NULL
);
CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at DESC)
    WHERE finished_at IS NOT NULL;
CREATE INDEX IF NOT EXISTS tasks_finished_key ON tasks(finished_at DESC, id DESC)
    WHERE finished_at IS NOT NULL;
"""

_COLUMNS = (
    "id, seq, task_type, priority, executor, requirements, spec, params, max_attempts, tenant, "
    "state, attempt, node, gpu_indices, submitted_at, assigned_at, started_at, finished_at, "
    "result, error"
)
_INSERT = f"INSERT INTO tasks ({_COLUMNS}) VALUES ({', '.join('?' * 20)})"
_AUDIT = (
    "INSERT INTO audit (at, actor, token_id, tenant, action, target, detail) "
    "VALUES (?, ?, ?, ?, ?, ?, ?)"
)
_UPDATE = (
    "UPDATE tasks SET state=?, attempt=?, node=?, gpu_indices=?, assigned_at=?, started_at=?, "
    "finished_at=?, result=?, error=? WHERE id=? AND state=? AND attempt=?"
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
class Barrier:
    """Writes nothing: its future resolves once every write queued before it committed."""


Write = Insert | Update | AuditInsert | Barrier


def insert_of(t: Task) -> Insert:
    return Insert(
        (
            t.id, t.seq, t.task_type, t.priority, t.executor, t.req_raw, t.spec_raw,
            t.params_raw, t.max_attempts, t.tenant, t.state.value, t.attempt, t.node,
            _indices(t.gpu_indices), t.submitted_at, t.assigned_at, t.started_at,
            t.finished_at, _result(t.result), t.error,
        )
    )


def update_of(t: Task, prev_state: TaskState, prev_attempt: int) -> Update:
    values = (
        t.state.value, t.attempt, t.node, _indices(t.gpu_indices), t.assigned_at,
        t.started_at, t.finished_at, _result(t.result), t.error,
    )
    return Update(values, t.id, prev_state.value, prev_attempt)


def _indices(indices: tuple[int, ...]) -> str:
    return ",".join(map(str, indices))


def _result(result: dict[str, Any] | None) -> bytes | None:
    return None if result is None else orjson.dumps(result)


def task_from_row(row: sqlite3.Row | tuple[Any, ...]) -> Task:
    (tid, seq, task_type, priority, executor, req, spec, params, max_attempts, tenant, state,
     attempt, node, gpus, submitted, assigned, started, finished, result, error) = row
    return Task(
        id=tid, seq=seq, task_type=task_type, priority=priority, executor=executor,
        req_raw=bytes(req), spec_raw=bytes(spec), params_raw=bytes(params),
        max_attempts=max_attempts, tenant=tenant, submitted_at=submitted,
        state=TaskState(state), attempt=attempt, node=node,
        gpu_indices=tuple(int(i) for i in gpus.split(",")) if gpus else (),
        assigned_at=assigned, started_at=started, finished_at=finished,
        result=orjson.loads(result) if result is not None else None, error=error,
    )


class Store:
    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        on_commit: Callable[[float, int], None] | None = None,
        on_failure: Callable[[StoreError], None] | None = None,
    ) -> None:
        self.path = path
        self.synchronous = synchronous
        self._on_commit = on_commit
        self.on_failure = on_failure  # the Mesh sets this: a failed write stops it
        self.broken: StoreError | None = None
        self._writer = ThreadPoolExecutor(1, thread_name_prefix="store-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None
        self._pending: list[tuple[Write, asyncio.Future[None]]] = []
        self._flusher: asyncio.Task[None] | None = None
        self._closed = False

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, self._open_writer)
        await loop.run_in_executor(self._reader, self._open_reader)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _open_writer(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._wconn = self._connect()
        self._wconn.executescript(SCHEMA)

    def _open_reader(self) -> None:
        self._rconn = self._connect()
        self._rconn.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        """Commit what is pending, then close both connections."""
        if self._flusher is not None:
            await asyncio.shield(self._flusher)
        self._closed = True
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self._writer, _close, self._wconn)
        await loop.run_in_executor(self._reader, _close, self._rconn)
        self._writer.shutdown(wait=True)
        self._reader.shutdown(wait=True)

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

    async def _flush(self) -> None:
        loop = asyncio.get_running_loop()
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
                    await loop.run_in_executor(self._writer, self._commit, ops)
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

    def _commit(self, ops: list[Write]) -> None:
        conn = self._wconn
        assert conn is not None, "store not open"
        if not ops:
            return  # only barriers: everything before them has committed already
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                if isinstance(op, Insert):
                    conn.execute(_INSERT, op.task)
                    continue
                if isinstance(op, AuditInsert):
                    conn.execute(_AUDIT, op.values)
                    continue
                cur = conn.execute(_UPDATE, (*op.values, op.task_id, op.prev_state,
                                             op.prev_attempt))
                if cur.rowcount != 1:
                    # Memory and the store disagree: nothing of this batch may commit.
                    raise ShortWrite(op.task_id, op.prev_state, op.prev_attempt, cur.rowcount)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    # --- reads -------------------------------------------------------------------------

    async def _read(self, fn: Callable[[sqlite3.Connection], Any]) -> Any:
        conn = self._rconn
        assert conn is not None, "store not open"
        return await asyncio.get_running_loop().run_in_executor(self._reader, fn, conn)

    async def load_unfinished(self) -> list[Task]:
        return [*await self.load_active(), *[t async for t in self.iter_queued(aging_s=0)]]

    async def load_active(self) -> list[Task]:
        """Tasks that were placed on a node (assigned, running, or lost mid-requeue)."""

        def q(conn: sqlite3.Connection) -> list[Task]:
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE state IN "
                "('assigned', 'running', 'lost') ORDER BY seq"
            )
            return [task_from_row(r) for r in rows]

        tasks: list[Task] = await self._read(q)
        return tasks

    async def iter_queued(self, aging_s: float, chunk: int = 5000) -> AsyncIterator[Task]:
        """Queued tasks best first (the Mesh's queue order), decoded off the loop in chunks."""
        order = "submitted_at - priority * ?, seq" if aging_s > 0 else "-priority, seq, ?"
        sql = f"SELECT {_COLUMNS} FROM tasks WHERE state = 'queued' ORDER BY {order}"
        cursors: list[sqlite3.Cursor] = []

        def fetch(conn: sqlite3.Connection) -> list[Task]:
            if not cursors:
                cursors.append(conn.execute(sql, (aging_s,)))
            return [task_from_row(r) for r in cursors[0].fetchmany(chunk)]

        while batch := await self._read(fetch):
            for t in batch:
                yield t

    async def top_seq(self) -> int:
        """The highest seq handed out: the newest row's (inserts come in seq order)."""

        def q(conn: sqlite3.Connection) -> int:
            row = conn.execute("SELECT seq FROM tasks ORDER BY rowid DESC LIMIT 1").fetchone()
            return int(row[0]) if row else 0

        top: int = await self._read(q)
        return top

    async def counts(self) -> tuple[dict[str, int], int]:
        """Finished tasks by state, and the highest seq handed out so far."""

        def q(conn: sqlite3.Connection) -> dict[str, int]:
            finished = {s.value for s in FINISHED}
            return {
                state: n
                for state, n in conn.execute("SELECT state, COUNT(*) FROM tasks GROUP BY state")
                if state in finished
            }

        counts: dict[str, int] = await self._read(q)
        return counts, await self.top_seq()

    async def get(self, task_id: str) -> Task | None:
        def q(conn: sqlite3.Connection) -> Task | None:
            row = conn.execute(f"SELECT {_COLUMNS} FROM tasks WHERE id=?", (task_id,)).fetchone()
            return None if row is None else task_from_row(row)

        task: Task | None = await self._read(q)
        return task

    async def finished(self, limit: int, offset: int, tenant: str | None = None) -> list[Task]:
        """Finished tasks, newest first; only `tenant`'s when given (an API caller's own)."""

        def q(conn: sqlite3.Connection) -> list[Task]:
            where = "" if tenant is None else "AND tenant = ? "
            args = (limit, offset) if tenant is None else (tenant, limit, offset)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks WHERE finished_at IS NOT NULL {where}"
                "ORDER BY finished_at DESC LIMIT ? OFFSET ?",
                args,
            )
            return [task_from_row(r) for r in rows]

        tasks: list[Task] = await self._read(q)
        return tasks

    async def finished_page(
        self, limit: int, after: tuple[float, str] | None = None, offset: int = 0,
        tenant: str | None = None,
    ) -> list[Task]:
        """Finished tasks newest first, by key: those after `after` (finished_at, id), the
        last row of the previous page. Index-backed (tasks_finished_key): a page costs the
        same however deep it is. `offset` is for the seed's paging and is capped by the API."""

        def q(conn: sqlite3.Connection) -> list[Task]:
            where, args = ["finished_at IS NOT NULL"], []
            if after is not None:
                where.append("(finished_at, id) < (?, ?)")
                args += [after[0], after[1]]
            if tenant is not None:
                where.append("tenant = ?")
                args.append(tenant)
            rows = conn.execute(
                f"SELECT {_COLUMNS} FROM tasks INDEXED BY tasks_finished_key "
                f"WHERE {' AND '.join(where)} ORDER BY finished_at DESC, id DESC "
                "LIMIT ? OFFSET ?",
                (*args, limit, offset),
            )
            return [task_from_row(r) for r in rows]

        tasks: list[Task] = await self._read(q)
        return tasks

    async def open_ids(self, after_seq: int, limit: int) -> list[tuple[int, str]]:
        """(seq, id) of unfinished tasks with seq > `after_seq`, in seq order, from the
        tasks_open index: `/tasks/active` walks the backlog in chunks off the event loop."""

        def q(conn: sqlite3.Connection) -> list[tuple[int, str]]:
            return conn.execute(
                "SELECT seq, id FROM tasks INDEXED BY tasks_open "
                "WHERE state IN ('queued', 'assigned', 'running', 'lost') AND seq > ? "
                "ORDER BY seq LIMIT ?",
                (after_seq, limit),
            ).fetchall()

        rows: list[tuple[int, str]] = await self._read(q)
        return rows

    async def audit_page(
        self, after: int, limit: int, tenant: str | None = None
    ) -> list[dict[str, Any]]:
        """Audit rows with seq > `after`, oldest first: page on with the last row's seq."""

        def q(conn: sqlite3.Connection) -> list[dict[str, Any]]:
            sql = ("SELECT seq, at, actor, token_id, tenant, action, target, detail FROM audit "
                   "WHERE seq > ?")
            args: list[Any] = [after]
            if tenant is not None:
                sql += " AND tenant = ?"
                args.append(tenant)
            rows = conn.execute(sql + " ORDER BY seq LIMIT ?", (*args, limit))
            keys = ("seq", "at", "actor", "token_id", "tenant", "action", "target")
            return [dict(zip(keys, r[:7], strict=True)) | {"detail": orjson.loads(r[7])}
                    for r in rows]

        page: list[dict[str, Any]] = await self._read(q)
        return page


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        conn.close()

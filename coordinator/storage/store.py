"""Durable task state in SQLite (WAL), off the event loop, with group commit.

One writer thread owns one connection and applies writes in the order they were made;
what every engine shares (the writes, group commit, failure semantics, the reads) is in
coordinator/storage/store_core.py, and PostgreSQL is coordinator/storage/store_pg.py. Reads use a
second
connection on a second thread; WAL lets them run beside the writer. `open_store` picks the
engine from `MESH_STORE` (`sqlite`, the default, or a `postgresql://` URL).
"""

from __future__ import annotations

import asyncio
import queue
import sqlite3
import threading
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from coordinator.model import Task
from coordinator.storage.datadir import private_sqlite
from coordinator.storage.schema import migrate_sqlite
from coordinator.storage.store_core import (
    AuditInsert,
    Barrier,
    Deposed,
    GroupCommitStore,
    Insert,
    Op,
    Row,
    ShortWrite,
    StoreBroken,
    StoreError,
    Update,
    Write,
    insert_of,
    queued_order,
    statement_of,
    task_from_row,
    update_of,
)

if TYPE_CHECKING:
    from coordinator.settings import Settings

__all__ = [
    "AuditInsert", "Barrier", "Deposed", "Insert", "ShortWrite", "Store", "StoreBroken",
    "StoreError", "Update", "Write", "insert_of", "open_store", "task_from_row", "update_of",
]
T = TypeVar("T")


class Store(GroupCommitStore):
    FINISHED_FROM = "tasks INDEXED BY tasks_finished_key"
    OPEN_FROM = "tasks INDEXED BY tasks_open"
    TOP_SEQ_SQL = "SELECT seq FROM tasks ORDER BY rowid DESC LIMIT 1"

    def __init__(
        self,
        path: Path,
        *,
        synchronous: str = "NORMAL",
        on_commit: Callable[[float, int], None] | None = None,
        on_failure: Callable[[StoreError], None] | None = None,
    ) -> None:
        super().__init__(on_commit=on_commit, on_failure=on_failure)
        self.path = path
        self.synchronous = synchronous
        self._writer = WriterThread("store-writer")
        self._reader = ThreadPoolExecutor(1, thread_name_prefix="store-reader")
        self._wconn: sqlite3.Connection | None = None
        self._rconn: sqlite3.Connection | None = None

    # --- lifecycle ---------------------------------------------------------------------

    async def open(self) -> None:
        self._writer.start()
        await self._writer.call(self._open_writer)
        await asyncio.get_running_loop().run_in_executor(self._reader, self._open_reader)

    def _connect(self) -> sqlite3.Connection:
        conn = sqlite3.connect(self.path, isolation_level=None, check_same_thread=True)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(f"PRAGMA synchronous={self.synchronous}")
        conn.execute("PRAGMA busy_timeout=5000")
        return conn

    def _open_writer(self) -> None:
        private_sqlite(self.path)  # 0600, and so its -wal and -shm (data dir 0700)
        self._wconn = self._connect()
        migrate_sqlite(self._wconn, "mesh", str(self.path))

    def _open_reader(self) -> None:
        self._rconn = self._connect()
        self._rconn.execute("PRAGMA query_only=ON")

    async def close(self) -> None:
        """Commit what is pending, then close both connections."""
        await self._drain()
        await self._writer.call(_close, self._wconn)
        await asyncio.get_running_loop().run_in_executor(self._reader, _close, self._rconn)
        await self._writer.stop()
        self._reader.shutdown(wait=True)

    # --- the engine --------------------------------------------------------------------

    async def _commit(self, ops: list[Op]) -> None:
        await self._writer.call(self._commit_sync, ops)

    def _commit_sync(self, ops: list[Op]) -> None:
        conn = self._wconn
        assert conn is not None, "store not open"
        conn.execute("BEGIN IMMEDIATE")
        try:
            for op in ops:
                sql, args = statement_of(op)
                cur = conn.execute(sql, args)
                if isinstance(op, Update) and cur.rowcount != 1:
                    # Memory and the store disagree: nothing of this batch may commit.
                    raise ShortWrite(op.task_id, op.prev_state, op.prev_attempt, cur.rowcount)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def _query(self, sql: str, args: tuple[Any, ...], decode: Callable[[list[Row]], T]) -> T:
        def q(conn: sqlite3.Connection) -> T:
            return decode(conn.execute(sql, args).fetchall())

        conn = self._rconn
        assert conn is not None, "store not open"
        return await asyncio.get_running_loop().run_in_executor(self._reader, q, conn)

    async def iter_queued(self, aging_s: float, chunk: int = 5000) -> AsyncIterator[Task]:
        """Queued tasks best first (the Mesh's queue order), decoded off the loop in chunks."""
        sql, args = queued_order(aging_s)
        cursors: list[sqlite3.Cursor] = []

        def fetch(conn: sqlite3.Connection) -> list[Task]:
            if not cursors:
                cursors.append(conn.execute(sql, args))
            return [task_from_row(r) for r in cursors[0].fetchmany(chunk)]

        conn = self._rconn
        assert conn is not None, "store not open"
        loop = asyncio.get_running_loop()
        while batch := await loop.run_in_executor(self._reader, fetch, conn):
            for t in batch:
                yield t


def open_store(
    settings: Settings, *, on_commit: Callable[[float, int], None] | None = None
) -> GroupCommitStore:
    """The Store `settings.store` names (not yet opened): SQLite in the data dir, or the
    PostgreSQL database of a `postgresql://` URL."""
    if settings.store.startswith(("postgresql://", "postgres://")):
        from coordinator.storage.store_pg import PgStore

        return PgStore(settings.store, on_commit=on_commit)
    return Store(
        settings.data_dir / "mesh.sqlite3", synchronous=settings.sqlite_synchronous,
        on_commit=on_commit,
    )


class WriterThread:
    """One thread that runs calls in order and hands each result back to the loop.

    What `run_in_executor` does, less its per-call machinery (a `concurrent.futures.Future`
    with its condition variable, chained to an asyncio future): a commit is one queue put
    here and one `call_soon_threadsafe` back. The thread owns the write connection, so
    opening, every commit and closing all run on it (sqlite3's check_same_thread)."""

    def __init__(self, name: str) -> None:
        self._calls: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)

    def start(self) -> None:
        if not self._thread.is_alive():
            self._thread.start()

    def call(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[T] = loop.create_future()
        self._calls.put((loop, fut, fn, args))
        return fut

    async def stop(self) -> None:
        if not self._thread.is_alive():  # never started, or stopped already
            return
        self._calls.put(None)
        await asyncio.to_thread(self._thread.join)

    def _run(self) -> None:
        while (item := self._calls.get()) is not None:
            loop, fut, fn, args = item
            try:
                result = fn(*args)
            except BaseException as exc:  # noqa: BLE001 - handed to the awaiting caller
                loop.call_soon_threadsafe(_settle, fut, None, exc)
            else:
                loop.call_soon_threadsafe(_settle, fut, result, None)


def _settle(fut: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if fut.done():  # its caller was cancelled meanwhile
        return
    if exc is not None:
        fut.set_exception(exc)
    else:
        fut.set_result(result)


def _close(conn: sqlite3.Connection | None) -> None:
    if conn is not None:
        conn.close()

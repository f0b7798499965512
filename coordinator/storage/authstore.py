"""API tokens in their own small SQLite file, `<data-dir>/auth.sqlite3` (the audit trail is in
the mesh store, beside the changes it records: coordinator/access/audit.py). With PostgreSQL they
are
in the mesh's database instead (store_pg.PgAuthStore, same interface).

Every statement runs on one dedicated thread with one connection, so nothing here blocks the
event loop and writes apply in the order they were made. A token change returns only after it
committed, so a created token works (and a revoked one stops working) no earlier than it is
durable. Audit records are group-committed: every record made while a commit is in flight
goes into the next transaction together, so each caller still waits for its own durability
but a burst of submissions costs one fsync per batch, not one per request.
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, TypeVar

from coordinator.storage.datadir import private_sqlite
from coordinator.storage.schema import migrate_sqlite

T = TypeVar("T")


@dataclass(frozen=True, slots=True)
class TokenRow:
    id: str
    hash: str
    tenant: str
    role: str
    name: str
    created_at: float
    revoked_at: float | None

    def view(self) -> dict[str, Any]:
        """What `GET /admin/tokens` shows: never the hash, never the secret."""
        return {
            "id": self.id, "tenant": self.tenant, "role": self.role, "name": self.name,
            "created_at": self.created_at, "revoked": self.revoked_at is not None,
            "revoked_at": self.revoked_at,
        }


class TokenStore(Protocol):
    """Tokens at rest, as access.auth.TokenBook uses them: AuthStore (SQLite) and
    store_pg.PgAuthStore (PostgreSQL)."""

    async def tokens(self) -> list[TokenRow]: ...

    async def add_token(self, row: TokenRow) -> None: ...

    async def revoke(self, token_id: str) -> TokenRow | None: ...


class AuthStore:
    def __init__(self, path: Path, synchronous: str = "NORMAL") -> None:
        self.path, self.synchronous = path, synchronous
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="authstore")
        self._conn: sqlite3.Connection | None = None

    async def _run(self, fn: Callable[[sqlite3.Connection], T]) -> T:
        def call() -> T:
            assert self._conn is not None, "AuthStore is not open"
            return fn(self._conn)

        return await asyncio.get_running_loop().run_in_executor(self._pool, call)

    async def open(self) -> None:
        def connect() -> None:
            private_sqlite(self.path)  # 0600, and so its -wal and -shm (data dir 0700)
            conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute(f"PRAGMA synchronous={self.synchronous}")
            migrate_sqlite(conn, "auth", str(self.path))
            self._conn = conn

        await asyncio.get_running_loop().run_in_executor(self._pool, connect)

    async def close(self) -> None:
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await asyncio.get_running_loop().run_in_executor(self._pool, conn.close)
        self._pool.shutdown(wait=True)

    # --- tokens ----------------------------------------------------------------------------

    async def tokens(self) -> list[TokenRow]:
        def q(conn: sqlite3.Connection) -> list[TokenRow]:
            rows = conn.execute(
                "SELECT id, hash, tenant, role, name, created_at, revoked_at FROM tokens "
                "ORDER BY created_at"
            )
            return [TokenRow(*r) for r in rows]

        return await self._run(q)

    async def add_token(self, row: TokenRow) -> None:
        def q(conn: sqlite3.Connection) -> None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "INSERT INTO tokens VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (row.id, row.hash, row.tenant, row.role, row.name, row.created_at,
                     row.revoked_at),
                )

        await self._run(q)

    async def revoke(self, token_id: str) -> TokenRow | None:
        """Marks the token revoked (committed before this returns); None if unknown."""

        def q(conn: sqlite3.Connection) -> TokenRow | None:
            with conn:
                conn.execute("BEGIN IMMEDIATE")
                conn.execute(
                    "UPDATE tokens SET revoked_at=? WHERE id=? AND revoked_at IS NULL",
                    (time.time(), token_id),
                )
                r = conn.execute(
                    "SELECT id, hash, tenant, role, name, created_at, revoked_at FROM tokens "
                    "WHERE id=?", (token_id,),
                ).fetchone()
            return None if r is None else TokenRow(*r)

        return await self._run(q)

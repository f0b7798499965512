"""Leadership among coordinators that share one PostgreSQL database: a lease row with an epoch.

One row, `leader_lease (id = 1, epoch, holder, url, expires_at)`, created by the PostgreSQL
migrations (coordinator/storage/store_pg.py). A coordinator takes it with one statement that
succeeds
only when the row is missing or its `expires_at` has passed; taking it bumps `epoch`. The
holder renews it every third of `MESH_LEASE_S` with `WHERE epoch = mine AND expires_at > now()`;
a renewal that matches no row, or no successful renewal for a whole lease, means it is no
longer the leader and it steps down. Every time is the database's `now()`, never a local
clock, so a leader frozen with SIGSTOP (or a VM paused) is judged by the database, not by
itself.

Why a lease row and not `pg_advisory_lock`: an advisory lock lives and dies with one session,
so it does not survive a transaction-mode connection pooler (pgbouncer) in front of the
database, and it carries no number. The row gives an epoch that every write of the leader is
checked against (PgStore's fence: `epoch = mine AND expires_at > now() FOR SHARE` at the start
of each write transaction, else `Deposed`), so a deposed leader that wakes up commits nothing,
and a successor's takeover waits for the old leader's in-flight commits.

The lease has its own dedicated connection (autocommit), never one from the store's pool, so
a busy pool cannot delay a renewal.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass

import psycopg

from coordinator.storage.schema import migrate_pg

log = logging.getLogger(__name__)

_ACQUIRE = """
INSERT INTO leader_lease AS l (id, epoch, holder, url, expires_at)
VALUES (1, 1, %(holder)s, %(url)s, now() + make_interval(secs => %(lease)s))
ON CONFLICT (id) DO UPDATE
    SET epoch = l.epoch + 1, holder = EXCLUDED.holder, url = EXCLUDED.url,
        expires_at = EXCLUDED.expires_at
    WHERE l.expires_at <= now()
RETURNING epoch
"""
_RENEW = """
UPDATE leader_lease SET expires_at = now() + make_interval(secs => %(lease)s)
WHERE id = 1 AND epoch = %(epoch)s AND holder = %(holder)s AND expires_at > now()
RETURNING epoch
"""
_RELEASE = (
    "UPDATE leader_lease SET expires_at = now() WHERE id = 1 AND epoch = %(epoch)s RETURNING epoch"
)
_CURRENT = """
SELECT epoch, holder, url, EXTRACT(EPOCH FROM (expires_at - now()))::float8
FROM leader_lease WHERE id = 1
"""


@dataclass(frozen=True, slots=True)
class LeaseView:
    """The lease as the database sees it now."""

    epoch: int
    holder: str
    url: str
    remaining_s: float  # until it lapses, by the database's clock; <= 0: lapsed

    @property
    def live(self) -> bool:
        return self.remaining_s > 0


def new_holder_id() -> str:
    """A holder id unique to this process start (a restarted coordinator is a new holder)."""
    return uuid.uuid4().hex


class Lease:
    """The statements on the lease row, over one dedicated autocommit connection."""

    def __init__(self, dsn: str, holder: str, url: str, lease_s: float) -> None:
        self.dsn, self.holder, self.url, self.lease_s = dsn, holder, url, lease_s
        self._conn: psycopg.AsyncConnection[tuple[object, ...]] | None = None
        self._timeout_s = max(lease_s / 3, 0.5)  # a statement that hangs longer has failed

    async def _connection(self) -> psycopg.AsyncConnection[tuple[object, ...]]:
        if self._conn is None or self._conn.closed:
            ms = int(self._timeout_s * 1000)
            self._conn = await psycopg.AsyncConnection.connect(
                self.dsn, autocommit=True, connect_timeout=max(1, int(self._timeout_s)),
                options=f"-c statement_timeout={ms} -c lock_timeout={ms}",
                application_name="gpumesh-lease",
            )
        return self._conn

    async def _one(self, sql: str, **params: object) -> tuple[object, ...] | None:
        """Run one statement; a failure drops the connection (the next call reconnects)."""
        try:
            async with asyncio.timeout(self._timeout_s + 1):
                conn = await self._connection()
                cur = await conn.execute(sql, params)
                return await cur.fetchone()
        except BaseException:
            await self.close()
            raise

    async def prepare(self) -> None:
        """Bring the schema up to date (the lease table is in it) before the first attempt, on
        a connection of its own with no statement timeout; a schema newer than this code
        refuses the start (SchemaTooNew)."""
        async with await psycopg.AsyncConnection.connect(self.dsn, autocommit=True) as conn:
            await migrate_pg(conn, "PostgreSQL store")

    async def acquire(self) -> int | None:
        """Take the lease if it lapsed (or was never taken): the new epoch, else None."""
        row = await self._one(_ACQUIRE, holder=self.holder, url=self.url, lease=self.lease_s)
        return int(row[0]) if row else None  # type: ignore[call-overload]

    async def renew(self, epoch: int) -> bool:
        """Extend the lease held at `epoch`; False when it is no longer ours (or lapsed)."""
        row = await self._one(_RENEW, epoch=epoch, holder=self.holder, lease=self.lease_s)
        return row is not None

    async def release(self, epoch: int) -> None:
        """Let it lapse now (a clean shutdown), so a standby need not wait out the lease."""
        await self._one(_RELEASE, epoch=epoch)

    async def current(self) -> LeaseView | None:
        row = await self._one(_CURRENT)
        if row is None:
            return None
        epoch, holder, url, remaining = row
        return LeaseView(int(epoch), str(holder), str(url), float(remaining))  # type: ignore[arg-type,call-overload]

    async def close(self) -> None:
        conn, self._conn = self._conn, None
        if conn is not None and not conn.closed:
            try:
                await conn.close()
            except psycopg.Error:
                pass


# What Leadership needs from the app: the ways to show its role, and how to lead.
Lead = Callable[[int, Callable[[str], None]], AbstractAsyncContextManager[None]]


class Leadership:
    """Standby until the lease is won; then lead (`lead(epoch, depose)` builds and serves the
    Mesh for as long as the context is open) until the lease is lost; then standby again.

    Step-down is in-process: the leading context closes (node links closed, the Mesh stopped,
    the store closed) and the coordinator serves as a standby, forwarding to the new leader."""

    def __init__(self, lease: Lease, lead: Lead, *,
                 on_role: Callable[[str, str], None]) -> None:
        self.lease = lease
        self._lead = lead
        self._on_role = on_role  # (state, leader_url): "standby" | "promoting" | "leader"
        self.period_s = max(lease.lease_s / 3, 0.05)
        self.epoch: int | None = None  # while leading
        self._deposed = asyncio.Event()
        self._why = ""

    def depose(self, why: str) -> None:
        """A write was refused for the epoch (`Deposed`): step down now, not at the renewal."""
        if not self._deposed.is_set():
            self._why = why
            self._deposed.set()

    async def run(self) -> None:
        await self._prepare()
        while True:
            epoch = await self._attempt()
            if epoch is None:
                continue
            await self._lead_term(epoch)
            await asyncio.sleep(self.period_s)  # a failed term does not spin on the lease

    async def _prepare(self) -> None:
        """Migrate (the lease table is in the schema), waiting for the database if it is not up
        yet; meanwhile this coordinator serves /health as a standby with no leader known."""
        while True:
            try:
                await self.lease.prepare()
                return
            except (psycopg.OperationalError, OSError) as exc:
                log.warning("lease: database unreachable (%s); retrying", exc)
                self._on_role("standby", "")
                await asyncio.sleep(self.period_s)

    async def _attempt(self) -> int | None:
        """Try to take the lease once; as a standby, wait for it to lapse."""
        try:
            epoch = await self.lease.acquire()
            view = None if epoch is not None else await self.lease.current()
        except (psycopg.Error, OSError, TimeoutError) as exc:
            log.warning("lease: database unreachable (%s); retrying", exc)
            self._on_role("standby", "")
            await asyncio.sleep(self.period_s)
            return None
        if epoch is not None:
            return epoch
        url = view.url if view is not None and view.live else ""
        self._on_role("standby", url)
        remaining = view.remaining_s if view is not None else 0.0
        await asyncio.sleep(min(self.period_s, max(remaining, 0.0) + 0.02))
        return None

    async def _lead_term(self, epoch: int) -> None:
        self.epoch = epoch
        self._deposed.clear()
        self._why = ""
        log.warning("lease won (epoch %d): loading the mesh from the store", epoch)
        self._on_role("promoting", self.lease.url)
        try:
            async with self._lead(epoch, self.depose):
                self._on_role("leader", self.lease.url)
                log.warning("leading at %s (epoch %d)", self.lease.url, epoch)
                why = await self._keep(epoch)
        except Exception as exc:  # noqa: BLE001 - a failed term steps down, never kills the loop
            log.exception("leading failed (epoch %d); stepping down", epoch)
            why = f"leading failed: {exc!r}"
        finally:  # also on shutdown (cancelled): the Mesh is stopped; let the lease go now
            self.epoch = None
            self._on_role("standby", "")
            await self._release_quietly(epoch)
        log.error("stepped down from epoch %d: %s", epoch, why)

    async def _keep(self, epoch: int) -> str:
        """Renew every third of the lease until it is lost; returns why it was."""
        last_ok = time.monotonic()
        while True:
            try:
                async with asyncio.timeout(self.period_s):
                    await self._deposed.wait()
                return self._why
            except TimeoutError:
                pass
            try:
                if not await self.lease.renew(epoch):
                    return "the lease was taken by another coordinator (or lapsed)"
                last_ok = time.monotonic()
            except (psycopg.Error, OSError, TimeoutError) as exc:
                if time.monotonic() - last_ok >= self.lease.lease_s:
                    return f"no renewal for a whole lease ({exc})"
                log.warning("lease renewal failed (%s); retrying", exc)

    async def _release_quietly(self, epoch: int) -> None:
        try:
            await self.lease.release(epoch)
        except (psycopg.Error, OSError, TimeoutError):
            pass  # it lapses on its own


@contextlib.asynccontextmanager
async def serve_leadership(leadership: Leadership) -> AsyncIterator[None]:
    """Run the lease loop for as long as the caller's context is open; on exit, close the
    term (the Mesh stops) and release the lease so a standby takes over at once."""
    task = asyncio.create_task(leadership.run(), name="leadership")
    task.add_done_callback(_loop_ended)
    try:
        yield
    finally:
        task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass
        await leadership.lease.close()


def _loop_ended(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.critical("the lease loop stopped: this coordinator will never lead until restarted",
                     exc_info=task.exception())

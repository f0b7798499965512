"""Versioned schema migrations for both engines, run on start.

Each database records, per component, the last migration applied to it in `schema_version`
(component, version, applied_at). A component is a set of tables with one owner: "mesh"
(tasks, audit and, on PostgreSQL, the leader lease), "auth" (API tokens) and "nodes" (node
credentials). With SQLite each component lives in its own file (mesh.sqlite3, auth.sqlite3,
nodes.sqlite3, as before); with PostgreSQL all three live in one database, so standby
coordinators see the same tokens and node credentials as the leader.

To change the schema, append a `Migration` with the next number to the component's list for
BOTH engines (never edit one that has shipped). A database whose version is newer than the
code knows refuses to start (`SchemaTooNew`, one line saying what to do). Migration 1 is the
schema as it was before versioning, written with IF NOT EXISTS, so an existing SQLite data
directory opens unchanged and is simply stamped version 1.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True, slots=True)
class Migration:
    version: int
    name: str
    statements: tuple[str, ...]


class SchemaTooNew(RuntimeError):
    """The database was written by a newer gpumesh: refuse to start rather than guess."""

    def __init__(self, where: str, component: str, found: int, known: int) -> None:
        super().__init__(
            f"{where}: schema {component!r} is at version {found}, newer than this gpumesh "
            f"knows ({known}); run the gpumesh that wrote it, or restore a backup made "
            "before that upgrade"
        )


_OPEN = "('queued', 'assigned', 'running', 'lost')"
_ACTIVE = "('assigned', 'running', 'lost')"

SQLITE: dict[str, tuple[Migration, ...]] = {
    "mesh": (
        Migration(1, "tasks and audit", (
            """CREATE TABLE IF NOT EXISTS tasks (
                id TEXT PRIMARY KEY, seq INTEGER NOT NULL, task_type TEXT NOT NULL,
                priority INTEGER NOT NULL, executor TEXT NOT NULL, requirements BLOB NOT NULL,
                spec BLOB NOT NULL, params BLOB NOT NULL, max_attempts INTEGER NOT NULL,
                tenant TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT,
                gpu_indices TEXT NOT NULL, submitted_at REAL NOT NULL, assigned_at REAL,
                started_at REAL, finished_at REAL, result BLOB, error TEXT NOT NULL)""",
            f"CREATE INDEX IF NOT EXISTS tasks_open ON tasks(seq) WHERE state IN {_OPEN}",
            f"CREATE INDEX IF NOT EXISTS tasks_active ON tasks(seq) WHERE state IN {_ACTIVE}",
            """CREATE TABLE IF NOT EXISTS audit (
                seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL, actor TEXT NOT NULL,
                token_id TEXT NOT NULL, tenant TEXT NOT NULL, action TEXT NOT NULL,
                target TEXT NOT NULL, detail BLOB NOT NULL)""",
            "CREATE INDEX IF NOT EXISTS tasks_finished ON tasks(finished_at DESC) "
            "WHERE finished_at IS NOT NULL",
            "CREATE INDEX IF NOT EXISTS tasks_finished_key ON tasks(finished_at DESC, id DESC) "
            "WHERE finished_at IS NOT NULL",
        )),
        Migration(2, "task history", (
            "ALTER TABLE tasks ADD COLUMN history BLOB NOT NULL DEFAULT X'5B5D'",  # b"[]"
        )),
        Migration(3, "tenant weights and quotas", (
            "CREATE TABLE IF NOT EXISTS tenants (name TEXT PRIMARY KEY, config BLOB NOT NULL,"
            " updated_at REAL NOT NULL)",
        )),
        Migration(4, "node drains", (
            "CREATE TABLE IF NOT EXISTS node_drains (name TEXT PRIMARY KEY, reason TEXT NOT NULL,"
            " since REAL NOT NULL, actor TEXT NOT NULL)",
        )),
        Migration(5, "model services", (  # coordinator/core/services.py (issue 27)
            "CREATE TABLE services (tenant TEXT NOT NULL, name TEXT NOT NULL, spec BLOB NOT NULL,"
            " task BLOB NOT NULL, created_at REAL NOT NULL, updated_at REAL NOT NULL,"
            " PRIMARY KEY (tenant, name))",
            "CREATE TABLE service_events (seq INTEGER PRIMARY KEY AUTOINCREMENT,"
            " tenant TEXT NOT NULL, name TEXT NOT NULL, at REAL NOT NULL, kind TEXT NOT NULL,"
            " detail BLOB NOT NULL)",
            "CREATE INDEX service_events_of ON service_events(tenant, name, seq)",
            "CREATE TABLE service_replicas (task_id TEXT PRIMARY KEY, tenant TEXT NOT NULL,"
            " name TEXT NOT NULL)",
        )),
    ),
    "auth": (
        Migration(1, "tokens", (
            """CREATE TABLE IF NOT EXISTS tokens (
                id TEXT PRIMARY KEY, hash TEXT NOT NULL UNIQUE, tenant TEXT NOT NULL,
                role TEXT NOT NULL, name TEXT NOT NULL, created_at REAL NOT NULL,
                revoked_at REAL)""",
        )),
    ),
    "nodes": (
        Migration(1, "node credentials", (
            "CREATE TABLE IF NOT EXISTS node_credentials ("
            " name TEXT PRIMARY KEY, hash BLOB NOT NULL, joined_at REAL NOT NULL)",
        )),
    ),
}

POSTGRES: dict[str, tuple[Migration, ...]] = {
    "mesh": (
        Migration(1, "tasks, audit and the leader lease", (
            """CREATE TABLE tasks (
                id text PRIMARY KEY, seq bigint NOT NULL, task_type text NOT NULL,
                priority integer NOT NULL, executor text NOT NULL, requirements bytea NOT NULL,
                spec bytea NOT NULL, params bytea NOT NULL, max_attempts integer NOT NULL,
                tenant text NOT NULL, state text NOT NULL, attempt integer NOT NULL, node text,
                gpu_indices text NOT NULL, submitted_at double precision NOT NULL,
                assigned_at double precision, started_at double precision,
                finished_at double precision, result bytea, error text NOT NULL)""",
            "CREATE INDEX tasks_seq ON tasks(seq)",
            f"CREATE INDEX tasks_open ON tasks(seq) WHERE state IN {_OPEN}",
            f"CREATE INDEX tasks_active ON tasks(seq) WHERE state IN {_ACTIVE}",
            "CREATE INDEX tasks_finished_key ON tasks(finished_at DESC, id DESC) "
            "WHERE finished_at IS NOT NULL",
            """CREATE TABLE audit (
                seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
                at double precision NOT NULL, actor text NOT NULL, token_id text NOT NULL,
                tenant text NOT NULL, action text NOT NULL, target text NOT NULL,
                detail bytea NOT NULL)""",
            """CREATE TABLE leader_lease (
                id int PRIMARY KEY CHECK (id = 1), epoch bigint NOT NULL, holder text NOT NULL,
                url text NOT NULL, expires_at timestamptz NOT NULL)""",
        )),
        Migration(2, "task history", (
            "ALTER TABLE tasks ADD COLUMN history bytea NOT NULL DEFAULT '\\x5b5d'",  # b"[]"
        )),
        Migration(3, "tenant weights and quotas", (
            "CREATE TABLE tenants (name text PRIMARY KEY, config bytea NOT NULL,"
            " updated_at double precision NOT NULL)",
        )),
        Migration(4, "node drains", (
            "CREATE TABLE node_drains (name text PRIMARY KEY, reason text NOT NULL,"
            " since double precision NOT NULL, actor text NOT NULL)",
        )),
        # PostgreSQL only: lets a batch check its guards inside the server, so BEGIN, the
        # writes and COMMIT go in one pipelined round trip (coordinator/storage/store_pg.py).
        Migration(5, "gm_assert", (
            """CREATE FUNCTION gm_assert(ok boolean, what text) RETURNS void AS $$
            BEGIN
                IF ok IS NOT TRUE THEN
                    RAISE EXCEPTION USING ERRCODE = 'GM001', MESSAGE = what;
                END IF;
            END $$ LANGUAGE plpgsql""",
        )),
        Migration(6, "model services", (  # coordinator/core/services.py (issue 27)
            "CREATE TABLE services (tenant text NOT NULL, name text NOT NULL, spec bytea NOT NULL,"
            " task bytea NOT NULL, created_at double precision NOT NULL,"
            " updated_at double precision NOT NULL, PRIMARY KEY (tenant, name))",
            "CREATE TABLE service_events (seq bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,"
            " tenant text NOT NULL, name text NOT NULL, at double precision NOT NULL,"
            " kind text NOT NULL, detail bytea NOT NULL)",
            "CREATE INDEX service_events_of ON service_events(tenant, name, seq)",
            "CREATE TABLE service_replicas (task_id text PRIMARY KEY, tenant text NOT NULL,"
            " name text NOT NULL)",
        )),
    ),
    "auth": (
        Migration(1, "tokens", (
            """CREATE TABLE tokens (
                id text PRIMARY KEY, hash text NOT NULL UNIQUE, tenant text NOT NULL,
                role text NOT NULL, name text NOT NULL, created_at double precision NOT NULL,
                revoked_at double precision)""",
        )),
    ),
    "nodes": (
        Migration(1, "node credentials", (
            "CREATE TABLE node_credentials (name text PRIMARY KEY, hash bytea NOT NULL,"
            " joined_at double precision NOT NULL)",
        )),
    ),
}

_VERSION_TABLE = (
    "CREATE TABLE IF NOT EXISTS schema_version (component TEXT PRIMARY KEY, "
    "version INTEGER NOT NULL, applied_at {real} NOT NULL)"
)
# Two coordinators starting at once on one PostgreSQL database: one migrates, one waits.
PG_MIGRATION_LOCK = 0x676D5F736368656D  # "gm_schem"


def latest(migrations: tuple[Migration, ...]) -> int:
    return migrations[-1].version if migrations else 0


def pending(
    where: str, component: str, found: int, migrations: tuple[Migration, ...]
) -> list[Migration]:
    """The migrations to apply over version `found`; SchemaTooNew if it is past them all."""
    if found > latest(migrations):
        raise SchemaTooNew(where, component, found, latest(migrations))
    return [m for m in migrations if m.version > found]


def migrate_sqlite(conn: sqlite3.Connection, component: str, where: str) -> int:
    """Bring one SQLite file's `component` up to date, in one transaction (blocking: run it
    on the connection's own thread). Returns the version it is at."""
    migrations = SQLITE[component]
    conn.execute("BEGIN IMMEDIATE")
    try:
        conn.execute(_VERSION_TABLE.format(real="REAL"))
        row = conn.execute(
            "SELECT version FROM schema_version WHERE component = ?", (component,)
        ).fetchone()
        todo = pending(where, component, row[0] if row else 0, migrations)
        for m in todo:
            for stmt in m.statements:
                conn.execute(stmt)
        if todo:
            conn.execute(
                "INSERT OR REPLACE INTO schema_version VALUES (?, ?, ?)",
                (component, todo[-1].version, time.time()),
            )
        conn.execute("COMMIT")
    except BaseException:
        conn.execute("ROLLBACK")
        raise
    return latest(migrations)


async def migrate_pg(conn: Any, where: str) -> dict[str, int]:
    """Bring every component of one PostgreSQL database up to date, in one transaction
    under an advisory lock (`conn`: a psycopg AsyncConnection). Returns their versions."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock(%s)", (PG_MIGRATION_LOCK,))
        await conn.execute(_VERSION_TABLE.format(real="double precision"))
        cur = await conn.execute("SELECT component, version FROM schema_version")
        found = dict(await cur.fetchall())
        for component, migrations in POSTGRES.items():
            todo = pending(where, component, found.get(component, 0), migrations)
            for m in todo:
                for stmt in m.statements:
                    await conn.execute(stmt)
            if todo:
                await conn.execute(
                    "INSERT INTO schema_version VALUES (%s, %s, %s) ON CONFLICT (component) "
                    "DO UPDATE SET version = EXCLUDED.version, applied_at = EXCLUDED.applied_at",
                    (component, todo[-1].version, time.time()),
                )
    return {c: latest(m) for c, m in POSTGRES.items()}


SQLITE_FILES = {"mesh": "mesh.sqlite3", "auth": "auth.sqlite3", "nodes": "nodes.sqlite3"}


def preflight(store: str, data_dir: Any) -> None:
    """Before the server starts (blocking): raise SchemaTooNew if a database it would use was
    written by a newer gpumesh, so `gpumesh-coordinator` can refuse with one line. A database
    it cannot reach or that does not exist yet is left to the start itself."""
    if store.startswith(("postgresql://", "postgres://")):
        _preflight_pg(store)
        return
    for component, name in SQLITE_FILES.items():
        path = data_dir / name
        if not path.exists():
            continue
        with contextlib.closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
            try:
                row = conn.execute(
                    "SELECT version FROM schema_version WHERE component = ?", (component,)
                ).fetchone()
            except sqlite3.OperationalError:  # no schema_version yet: from before versioning
                continue
        if row:
            pending(str(path), component, int(row[0]), SQLITE[component])


def describe(url: str) -> str:
    """`host:port/db` of a URL, without its password: what logs and errors may show.
    (Here rather than in store_pg, which imports this module, so the preflight can use it.)"""
    import psycopg  # only with a PostgreSQL store
    from psycopg.conninfo import conninfo_to_dict

    try:
        d = conninfo_to_dict(url)
    except psycopg.ProgrammingError:
        return "postgresql://(unparsable URL)"
    return f"postgresql://{d.get('host', '')}:{d.get('port', 5432)}/{d.get('dbname', '')}"


def _preflight_pg(url: str) -> None:
    import psycopg  # only with a PostgreSQL store

    try:
        with psycopg.connect(url, connect_timeout=5) as conn:
            if conn.execute("SELECT to_regclass('schema_version')").fetchone() == (None,):
                return
            rows = conn.execute("SELECT component, version FROM schema_version").fetchall()
    except psycopg.OperationalError:
        return
    for component, version in rows:
        if component in POSTGRES:
            pending(describe(url), component, int(version), POSTGRES[component])

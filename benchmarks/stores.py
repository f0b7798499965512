"""`--store`: run the store-bound benchmarks on PostgreSQL beside SQLite, in the same run.

`--store postgresql://...` uses that database; `--store pg` starts a private PostgreSQL from
the Debian package (tests/pgserver.py) with its durable defaults (fsync and synchronous_commit
on), and gives each benchmark a fresh database.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

STORE_AWARE = ("roundtrip", "throughput")


def is_pg(store: str) -> bool:
    return store.startswith(("postgresql://", "postgres://"))


def store_env(store: str) -> dict[str, str]:
    """The coordinator's environment for `store` (nothing for the SQLite default)."""
    return {"MESH_STORE": store} if is_pg(store) else {}


def store_label(store: str) -> str:
    return " [postgresql]" if is_pg(store) else ""


def store_name(store: str) -> str:
    return "PostgreSQL" if is_pg(store) else "SQLite"


@contextlib.contextmanager
def databases(store: str) -> Iterator[Callable[[], str]]:
    """A function that gives a database URL per benchmark: `store` itself, or with `pg` a
    fresh database on a private server that is stopped afterwards."""
    if store != "pg":
        yield lambda: store
        return
    from tests.pgserver import PgServer

    server = PgServer(fsync=True)
    try:
        server.start()
        yield server.create_database
    finally:
        server.stop()

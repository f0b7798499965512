"""Node identity: the join token, and the credential each node is issued when it first joins.

A node proves it may join with the join token (`MESH_JOIN_TOKEN`, else `<data-dir>/join.token`,
generated on first start). On its first registration under a name it is issued a credential of
its own; only the credential's hash is kept, durably, in `<data-dir>/nodes.sqlite3`, and the
write commits before the `registered` reply that carries the credential goes out. From then on
a register for that name must present the credential: anyone else is refused (4004 NAME_TAKEN),
so a second machine using the same `NODE_NAME` can never take over the node's work. An admin
frees a name with `DELETE /mesh/nodes/{name}` (`gpumesh node forget NAME`).

Secrets are compared as bytes in constant time; SQLite runs on one dedicated thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import sqlite3
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.storage.datadir import private_dir, private_sqlite
from coordinator.storage.schema import migrate_sqlite
from shared import proof

log = logging.getLogger(__name__)

JOIN_TOKEN_FILE = "join.token"
DB_FILE = "nodes.sqlite3"


def _hash(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8", "surrogatepass")).digest()


def _same(given: str, expected: str) -> bool:
    """Constant-time comparison of two secrets as bytes: any text, never an exception."""
    return hmac.compare_digest(
        given.encode("utf-8", "surrogatepass"), expected.encode("utf-8", "surrogatepass")
    )


def ensure_join_token(
    data_dir: Path, configured: str, path: Path | None = None
) -> tuple[str, Path | None]:
    """The join token: `configured` if set; else the one in `path` (default
    `<data-dir>/join.token`), created (mode 0600, O_EXCL) on first start. Blocking: call it
    through asyncio.to_thread."""
    if configured:
        return configured, None
    path = path or data_dir / JOIN_TOKEN_FILE
    private_dir(path.parent)
    token = secrets.token_urlsafe(32)
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        known = path.read_text().strip()
        if known:
            return known, path
        raise RuntimeError(f"{path} is empty: delete it to generate a new join token") from None
    with os.fdopen(fd, "w") as f:
        f.write(token + "\n")
        f.flush()
        os.fsync(f.fileno())
    return token, path


@dataclass(frozen=True, slots=True)
class Admitted:
    issued: str = ""  # a new credential to hand to the node in `registered`; "" if it had one
    rejoined: bool = False  # it presented a credential this coordinator does not know


@dataclass(frozen=True, slots=True)
class Refused:
    reason: str


class NodeIdentities:
    """Which credential each node name belongs to (hashes only), and the join token."""

    def __init__(self, path: Path, join_token: str, remote: Any = None) -> None:
        self._path = path
        self._join = join_token
        # PostgreSQL (store_pg.PgCredentials): the hashes live in the shared database, so
        # standby coordinators know every node; None: <data-dir>/nodes.sqlite3.
        self._remote = remote
        self._hashes: dict[str, bytes] = {}
        self._db: sqlite3.Connection | None = None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="identity-db")

    @classmethod
    async def open(
        cls, data_dir: Path, configured_token: str, token_file: Path | None = None,
        remote: Any = None,
    ) -> NodeIdentities:
        token, path = await asyncio.to_thread(
            ensure_join_token, data_dir, configured_token, token_file
        )
        if path is not None:
            log.warning("nodes join with the token in %s (give it to clients as MESH_TOKEN)", path)
        ids = cls(data_dir / DB_FILE, token, remote)
        if remote is None:
            await ids._run(ids._open_db)
        else:
            ids._hashes = await remote.load()
        return ids

    async def close(self) -> None:
        if self._remote is None:
            await self._run(self._close_db)
        self._pool.shutdown(wait=True)

    async def _save(self, name: str, digest: bytes) -> None:
        if self._remote is None:
            await self._run(self._insert, name, digest)
        else:
            await self._remote.insert(name, digest)

    async def _drop(self, name: str) -> None:
        if self._remote is None:
            await self._run(self._delete, name)
        else:
            await self._remote.delete(name)

    async def _run(self, fn: Callable[..., None], *args: object) -> None:
        await asyncio.get_running_loop().run_in_executor(self._pool, fn, *args)

    # --- on the database thread ------------------------------------------------------------

    def _open_db(self) -> None:
        private_sqlite(self._path)  # 0600, and so its -wal and -shm (data dir 0700)
        db = sqlite3.connect(self._path, check_same_thread=False, isolation_level=None)
        db.execute("PRAGMA journal_mode=WAL")
        db.execute("PRAGMA synchronous=FULL")  # rare writes; a credential must survive power loss
        migrate_sqlite(db, "nodes", str(self._path))
        rows = db.execute("SELECT name, hash FROM node_credentials")
        self._hashes = {name: bytes(digest) for name, digest in rows}
        self._db = db

    def _close_db(self) -> None:
        if self._db is not None:
            self._db.close()
            self._db = None

    def _insert(self, name: str, digest: bytes) -> None:
        assert self._db is not None
        self._db.execute(
            "INSERT OR REPLACE INTO node_credentials (name, hash, joined_at) VALUES (?, ?, ?)",
            (name, digest, time.time()),
        )

    def _delete(self, name: str) -> None:
        assert self._db is not None
        self._db.execute("DELETE FROM node_credentials WHERE name = ?", (name,))

    # --- on the event loop -----------------------------------------------------------------

    def join_ok(self, token: str) -> bool:
        return _same(token, self._join)

    def prove(self, node: str, nonce_n: str, bound: str) -> tuple[str, str]:
        """Answer a node's nonce (shared/proof.py): (our nonce, the proof header's value)."""
        return proof.coordinator_header(self._join, node, nonce_n, bound)

    def node_proof_ok(
        self, node: str, nonce_n: str, nonce_c: str, bound: str, given: str
    ) -> bool:
        return proof.node_proof_ok(self._join, node, nonce_n, nonce_c, bound, given)

    def known(self, name: str) -> bool:
        return name in self._hashes

    def credential_ok(self, name: str, credential: str) -> bool:
        """Is `credential` the one issued to node `name`? (node HTTP routes: artifacts)"""
        known = self._hashes.get(name)
        return known is not None and bool(credential) and hmac.compare_digest(
            _hash(credential), known)

    async def admit(self, name: str, credential: str) -> Admitted | Refused:
        """Check a register's credential for `name`; on a first join, issue one and store its
        hash durably before returning (so the reply that carries it shows committed state)."""
        known = self._hashes.get(name)
        if known is None and self._remote is not None:  # joined through another coordinator?
            found = await self._remote.lookup(name)
            known = self._hashes.get(name) or found
            if known is not None:
                self._hashes[name] = known
        if known is not None:
            if credential and hmac.compare_digest(_hash(credential), known):
                return Admitted()
            return Refused(
                f"node name {name!r} belongs to another node's credential: pick another "
                "NODE_NAME, or have an admin run `gpumesh node forget "
                f"{name}` if that node is gone"
            )
        issued = secrets.token_urlsafe(32)
        digest = _hash(issued)
        self._hashes[name] = digest  # claimed now: a racing register for the name is refused
        try:
            await asyncio.shield(self._save(name, digest))
        except Exception:
            if self._hashes.get(name) == digest:
                del self._hashes[name]
            raise
        return Admitted(issued=issued, rejoined=bool(credential))

    async def forget(self, name: str) -> bool:
        """Drop `name`'s credential (durably); False if it had none."""
        if name not in self._hashes and (
            self._remote is None or await self._remote.lookup(name) is None
        ):
            return False
        await asyncio.shield(self._drop(name))
        self._hashes.pop(name, None)
        return True

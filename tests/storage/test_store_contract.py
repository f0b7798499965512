"""The Store contract, on both engines: SQLite in a temp dir, PostgreSQL from tests/pgserver.py.

Every test here takes `engine` and gets the same behaviour from either: group commit,
guarded updates, failure semantics, reads and pages, migrations. Then what only PostgreSQL
has: fencing on the lease epoch, tokens and node credentials shared between coordinators.
"""

from __future__ import annotations

import asyncio
import sqlite3
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import psycopg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.model import Task, TaskState
from coordinator.storage.authstore import TokenRow
from coordinator.storage.schema import POSTGRES, SQLITE, SchemaTooNew, latest
from coordinator.storage.store import (
    AuditInsert,
    Deposed,
    Insert,
    ShortWrite,
    Store,
    StoreBroken,
    StoreError,
    insert_of,
    update_of,
)
from coordinator.storage.store_core import (
    MAX_SERVICE_EVENTS,
    DrainPut,
    GroupCommitStore,
    ServiceWrite,
    TenantPut,
)
from coordinator.storage.store_pg import PgAuthStore, PgCredentials, PgStore
from tests.conftest import FAST, TEST_ADMIN_TOKEN, run_coordinator, wait_until
from tests.core.test_durability import FAULTS, FaultyWrites, Step, scenario, steps
from tests.pgserver import PgServer, pg_server  # noqa: F401 - the session fixture

MakeStore = Callable[..., GroupCommitStore]


def make_task(i: int, state: TaskState = TaskState.QUEUED, **kw: Any) -> Task:
    return Task(
        id=f"t{i}", seq=i, task_type="test", priority=kw.pop("priority", 5), executor="builtin",
        req_raw=b"{}", spec_raw=msgspec.json.encode({"task_type": "test"}), params_raw=b"{}",
        max_attempts=3, tenant=kw.pop("tenant", ""), submitted_at=kw.pop("at", time.time()),
        state=state, **kw,
    )


@pytest.fixture(params=["sqlite", "postgresql"])
def engine(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Where the store lives: a SQLite path, or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "mesh.sqlite3")
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()


@pytest.fixture
def make_store(engine: str) -> MakeStore:
    def make(**kw: Any) -> GroupCommitStore:
        if engine.startswith("postgresql://"):
            return PgStore(engine, **kw)
        return Store(Path(engine), **kw)

    return make


async def test_writes_made_together_commit_together(make_store: MakeStore) -> None:
    batches: list[int] = []
    store = make_store(on_commit=lambda _s, n: batches.append(n))
    await store.open()
    try:
        await asyncio.gather(*(store.write(insert_of(make_task(i))) for i in range(500)))
        assert sum(batches) == 500
        assert len(batches) < 50  # group commit: far fewer transactions than writes
        loaded = await store.load_unfinished()
        assert [t.id for t in loaded] == [f"t{i}" for i in range(500)]
    finally:
        await store.close()


async def test_a_short_write_fails_its_batch_and_breaks_the_store(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    failures: list[StoreError] = []
    store.on_failure = failures.append
    try:
        t = make_task(1)
        await store.write(insert_of(t))
        t.state, t.attempt, t.node = TaskState.ASSIGNED, 1, "a"
        await store.write(update_of(t, TaskState.QUEUED, 0))
        # A batch with a good insert and a stale update: neither commits.
        t.state, t.attempt = TaskState.CANCELLED, 0
        good = store.write(insert_of(make_task(2)))
        stale = store.write(update_of(t, TaskState.QUEUED, 0))
        with pytest.raises(ShortWrite, match="matched 0 rows"):
            await stale
        with pytest.raises(ShortWrite):
            await good
        assert len(failures) == 1
        with pytest.raises(StoreBroken):
            await store.write(insert_of(make_task(3)))
        with pytest.raises(StoreBroken):
            await store.barrier()
        got = await store.get("t1")
        assert got is not None and got.state is TaskState.ASSIGNED and got.attempt == 1
        assert got.node == "a"
        assert await store.get("t2") is None
        await store.reset()
        await store.write(insert_of(make_task(2)))
        await store.barrier()
        assert await store.get("t2") is not None
    finally:
        await store.close()


async def test_a_value_the_engine_cannot_hold_commits_nothing(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    store.on_failure = lambda _e: None
    try:
        ok = store.write(insert_of(make_task(1)))
        raw = insert_of(make_task(2)).task
        bad = store.write(Insert((*raw[:3], 1 << 70, *raw[4:])))  # priority past 64 bits
        for fut in (ok, bad):
            with pytest.raises(StoreError):
                await fut
        await store.reset()
        assert await store.get("t1") is None and await store.get("t2") is None
    finally:
        await store.close()


async def test_reopen_sees_everything_and_pages_finished(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    for i in range(6):
        t = make_task(i, tenant="a" if i % 3 else "b", history=[{"cause": "x", "n": i}])
        if i == 3:
            t.history.append({"cause": "node lost", "infra": True})
        await store.write(insert_of(t))
        if i % 2 == 0:
            t.state, t.finished_at = TaskState.COMPLETED, 1000.0 + i
            t.result = {"exit_code": 0, "output": f"out {i}"}
            await store.write(update_of(t, TaskState.QUEUED, 0))
    await store.write(AuditInsert((1.0, "me", "tok", "a", "submit", "t1", b'{"k": 1}')))
    await store.write(AuditInsert((2.0, "me", "tok", "b", "cancel", "t0", b"{}")))
    await store.close()

    again = make_store()
    await again.open()
    try:
        counts, top = await again.counts()
        assert counts == {"completed": 3} and top == 5
        assert [t.id for t in await again.load_unfinished()] == ["t1", "t3", "t5"]
        assert await again.open_ids(1, 10) == [(3, "t3"), (5, "t5")]
        page = await again.finished(limit=2, offset=0)
        assert [t.id for t in page] == ["t4", "t2"]
        assert page[0].result == {"exit_code": 0, "output": "out 4"}
        assert page[0].history == [{"cause": "x", "n": 4}]
        assert page[0].infra_retries == 0
        assert [t.infra_retries for t in await again.load_unfinished()] == [0, 1, 0]
        assert [t.id for t in await again.finished(limit=2, offset=2)] == ["t0"]
        assert [t.id for t in await again.finished(10, 0, tenant="b")] == ["t0"]
        first = await again.finished_page(1)
        assert [t.id for t in first] == ["t4"]
        key = (first[0].finished_at or 0.0, first[0].id)
        assert [t.id for t in await again.finished_page(5, key)] == ["t2", "t0"]
        assert [t.id for t in await again.finished_page(5, key, tenant="a")] == ["t2"]
        audit = await again.audit_page(0, 10)
        assert [(r["seq"], r["action"], r["detail"]) for r in audit] == [
            (1, "submit", {"k": 1}), (2, "cancel", {})]
        assert [r["target"] for r in await again.audit_page(0, 10, tenant="b")] == ["t0"]
        assert await again.audit_page(1, 10) == audit[1:]
    finally:
        await again.close()


async def test_tenant_configs_and_drain_marks_are_kept(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    try:
        await store.write(TenantPut(("lab", b'{"weight": 2}', 1.0)))
        await store.write(TenantPut(("lab", b'{"weight": 3}', 2.0)))  # replaces
        await store.write(DrainPut(("n1", "disk swap", 5.0, "admin")))
        await store.write(DrainPut(("n2", "bios", 6.0, "admin")))
        await store.write(DrainPut(("n2",)))  # lifted
        assert await store.tenants() == [("lab", b'{"weight": 3}')]
        assert await store.node_drains() == [("n1", "disk swap", 5.0, "admin")]
    finally:
        await store.close()


async def test_services_their_history_and_replica_marks_are_kept(make_store: MakeStore) -> None:
    """Model services (coordinator/core/services.py): a row per (tenant, name), replaced by a
    put; events per service, newest MAX_SERVICE_EVENTS kept; replica marks; all reopened."""
    store = make_store()
    await store.open()
    try:
        for tenant in ("a", "b"):
            await store.write(ServiceWrite("put", (tenant, "chat", b'{"v": 1}', b"{}", 1.0, 1.0)))
        await store.write(ServiceWrite("put", ("a", "chat", b'{"v": 2}', b"{}", 1.0, 2.0)))
        for i in range(MAX_SERVICE_EVENTS + 5):  # one group commit, in order
            store.write(ServiceWrite("event", ("a", "chat", float(i), "k", b'{"i": %d}' % i)))
            store.write(ServiceWrite("prune", ("a", "chat", "a", "chat")))
        await store.barrier()
        await store.write(ServiceWrite("event", ("b", "chat", 1.0, "created", b"{}")))
        await store.write(ServiceWrite("replica", ("t1", "a", "chat")))
        await store.write(ServiceWrite("replica", ("t2", "a", "chat")))
        await store.write(ServiceWrite("unreplica", ("t1",)))
        await store.write(ServiceWrite("delete", ("b", "chat")))
        await store.write(ServiceWrite("forget", ("b", "chat")))
    finally:
        await store.close()
    store = make_store()
    await store.open()
    try:
        assert await store.services() == [("a", "chat", b'{"v": 2}', b"{}", 1.0, 2.0)]
        assert await store.service_replicas() == [("t2", "a", "chat")]
        events = await store.service_events("a", "chat", 2000)
        assert len(events) == MAX_SERVICE_EVENTS  # the oldest were pruned
        assert [e["detail"]["i"] for e in events[-2:]] == [MAX_SERVICE_EVENTS + 3,
                                                          MAX_SERVICE_EVENTS + 4]
        assert [e["kind"] for e in await store.service_events("a", "chat", 1)] == ["k"]
        assert await store.service_events("b", "chat", 10) == []
    finally:
        await store.close()


async def test_queued_come_back_in_queue_order(make_store: MakeStore) -> None:
    store = make_store()
    await store.open()
    try:
        now = 10_000.0
        spec = [(0, 1, now), (1, 9, now), (2, 5, now), (3, 9, now + 1), (4, 1, now - 5000)]
        for i, prio, at in spec:
            await store.write(insert_of(make_task(i, priority=prio, at=at)))
        plain = [t.id async for t in store.iter_queued(aging_s=0, chunk=2)]
        assert plain == ["t1", "t3", "t2", "t0", "t4"]
        # Aging: t4 waited 5000 s, worth 8+ priority levels at 600 s each.
        aged = [t.id async for t in store.iter_queued(aging_s=600, chunk=2)]
        assert aged == ["t4", "t1", "t3", "t2", "t0"]
        assert await store.load_active() == []
    finally:
        await store.close()


async def test_schema_is_versioned_and_a_newer_one_refuses(
    make_store: MakeStore, engine: str, tmp_path: Path
) -> None:
    store = make_store()
    await store.open()
    if isinstance(store, PgStore):
        rows = await store.fetch("SELECT component, version FROM schema_version")
        assert dict(rows) == {c: latest(m) for c, m in POSTGRES.items()}
        await store.transact(lambda c: c.execute(
            "UPDATE schema_version SET version = version + 1 WHERE component = 'mesh'"))
    else:
        assert isinstance(store, Store)
        with sqlite3.connect(store.path) as db:
            (version,) = db.execute(
                "SELECT version FROM schema_version WHERE component='mesh'").fetchone()
            assert version == latest(SQLITE["mesh"])
            db.execute("UPDATE schema_version SET version = version + 1")
    await store.close()
    newer = make_store()
    with pytest.raises(SchemaTooNew, match="newer than this gpumesh knows"):
        await newer.open()
    await newer.close()
    # The coordinator refuses to start on it, with one line and exit status 2.
    data_dir = Path(engine).parent if isinstance(store, Store) else tmp_path / "d"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "coordinator", "--port", "0", "--data-dir", str(data_dir),
        "--store", engine if isinstance(store, PgStore) else "sqlite",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode == 2, (out, err)
    lines = err.decode().strip().splitlines()
    assert len(lines) == 1 and "newer than this gpumesh knows (" in lines[0], lines


OLD_SQLITE_SCHEMA = """
CREATE TABLE tasks (id TEXT PRIMARY KEY, seq INTEGER NOT NULL, task_type TEXT NOT NULL,
    priority INTEGER NOT NULL, executor TEXT NOT NULL, requirements BLOB NOT NULL,
    spec BLOB NOT NULL, params BLOB NOT NULL, max_attempts INTEGER NOT NULL,
    tenant TEXT NOT NULL, state TEXT NOT NULL, attempt INTEGER NOT NULL, node TEXT,
    gpu_indices TEXT NOT NULL, submitted_at REAL NOT NULL, assigned_at REAL,
    started_at REAL, finished_at REAL, result BLOB, error TEXT NOT NULL);
CREATE TABLE audit (seq INTEGER PRIMARY KEY AUTOINCREMENT, at REAL NOT NULL,
    actor TEXT NOT NULL, token_id TEXT NOT NULL, tenant TEXT NOT NULL, action TEXT NOT NULL,
    target TEXT NOT NULL, detail BLOB NOT NULL);
INSERT INTO tasks VALUES ('old', 7, 'test', 5, 'builtin', X'7B7D', X'7B7D', X'7B7D', 3, '',
    'queued', 0, NULL, '', 1.0, NULL, NULL, NULL, NULL, '');
"""


async def test_a_data_dir_from_before_versioning_opens_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "mesh.sqlite3"
    with sqlite3.connect(path) as db:
        db.executescript(OLD_SQLITE_SCHEMA)
    store = Store(path)
    await store.open()
    try:
        (old,) = await store.load_unfinished()
        assert (old.id, old.seq, old.history) == ("old", 7, [])
        assert await store.top_seq() == 7
        await store.write(insert_of(make_task(8)))
    finally:
        await store.close()


# --- PostgreSQL only: the lease fence, and what standbys share ------------------------------


async def _lease(dsn: str, epoch: int, ttl_s: float = 30.0) -> None:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        await conn.execute(
            "INSERT INTO leader_lease (id, epoch, holder, url, expires_at) "
            "VALUES (1, %s, 'h', 'http://x', now() + make_interval(secs => %s)) "
            "ON CONFLICT (id) DO UPDATE SET epoch = EXCLUDED.epoch, "
            "expires_at = EXCLUDED.expires_at",
            (epoch, ttl_s),
        )


async def test_a_deposed_leader_commits_nothing(pg_server: PgServer) -> None:  # noqa: F811
    dsn = pg_server.create_database()
    store = PgStore(dsn)
    await store.open()
    failures: list[StoreError] = []
    store.on_failure = failures.append
    tokens = PgAuthStore(store)
    try:
        await _lease(dsn, epoch=1)
        store.fence(1)
        await store.write(insert_of(make_task(1)))
        await tokens.add_token(TokenRow("k1", "h1", "a", "admin", "", 1.0, None))
        await _lease(dsn, epoch=2)  # a successor took over, from another connection
        with pytest.raises(Deposed, match="epoch 1"):
            await store.write(insert_of(make_task(2)))
        assert isinstance(failures[0], Deposed)
        with pytest.raises(Deposed):
            await tokens.add_token(TokenRow("k2", "h2", "a", "admin", "", 1.0, None))
        with pytest.raises(Deposed):
            await PgCredentials(store).insert("n1", b"d")
        await store.reset()
        await _lease(dsn, epoch=1, ttl_s=-1)  # our epoch back, but expired
        with pytest.raises(Deposed):
            await store.write(insert_of(make_task(3)))
        await store.reset()
        assert [t.id for t in await store.load_unfinished()] == ["t1"]
        assert [r.id for r in await tokens.tokens()] == ["k1"]
        assert await PgCredentials(store).load() == {}
    finally:
        await store.close()


async def test_a_successor_waits_for_the_leaders_commit_in_flight(pg_server: PgServer) -> None:  # noqa: F811
    """FOR SHARE: the takeover UPDATE blocks while a leader transaction holds the row."""
    dsn = pg_server.create_database()
    store = PgStore(dsn)
    await store.open()
    await _lease(dsn, epoch=1)
    store.fence(1)
    try:
        async with await psycopg.AsyncConnection.connect(dsn) as leader:
            await leader.execute(
                "SELECT 1 FROM leader_lease WHERE id = 1 AND epoch = 1 FOR SHARE")
            takeover = asyncio.create_task(_lease(dsn, epoch=2))
            done, _ = await asyncio.wait([takeover], timeout=0.5)
            assert not done  # the successor waits for the leader's transaction
            await leader.commit()
        await asyncio.wait_for(takeover, 10)
        with pytest.raises(Deposed):
            await store.write(insert_of(make_task(1)))
    finally:
        await store.close()


async def test_postgresql_going_away_and_coming_back() -> None:
    """A server restart: writes and reads fail as StoreError (the Mesh rebuilds, the API
    answers 503) while it is down, and work again once it is back, with nothing lost."""
    server = PgServer()
    await asyncio.to_thread(server.start)
    try:
        store = PgStore(await asyncio.to_thread(server.create_database), pool_wait_s=0.5)
        await store.open()
        failures: list[StoreError] = []
        store.on_failure = failures.append
        await store.write(insert_of(make_task(1)))
        await asyncio.to_thread(server.halt)
        with pytest.raises(StoreError):
            await store.write(insert_of(make_task(2)))
        assert len(failures) == 1
        with pytest.raises(StoreError):
            await store.get("t1")
        with pytest.raises(StoreError):
            await PgAuthStore(store).tokens()
        await asyncio.to_thread(server.resume)
        await store.reset()
        await store.write(insert_of(make_task(3)))  # the write connection reconnects at once

        async def reads() -> list[str] | None:  # the pool reconnects with its own backoff
            try:
                return [t.id for t in await store.load_unfinished()]
            except StoreError:
                return None

        assert await wait_until(reads, 20, "reads again") == ["t1", "t3"]
        await store.close()
    finally:
        await asyncio.to_thread(server.stop)


async def test_standbys_see_the_leaders_tokens_and_credentials(pg_server: PgServer) -> None:  # noqa: F811
    dsn = pg_server.create_database()
    leader, standby = PgStore(dsn), PgStore(dsn)
    # Two coordinators starting at once on an empty database: one migrates, one waits.
    await asyncio.wait_for(asyncio.gather(leader.open(), standby.open()), 30)
    try:
        await PgAuthStore(leader).add_token(TokenRow("k1", "h1", "a", "submit", "n", 1.0, None))
        await PgCredentials(leader).insert("node-a", b"\x01\x02")
        assert [r.hash for r in await PgAuthStore(standby).tokens()] == ["h1"]
        assert await PgCredentials(standby).lookup("node-a") == b"\x01\x02"
        revoked = await PgAuthStore(standby).revoke("k1")
        assert revoked is not None and revoked.revoked_at is not None
        assert await PgAuthStore(standby).revoke("nope") is None
        await PgCredentials(standby).delete("node-a")
        assert await PgCredentials(leader).load() == {}
    finally:
        await leader.close()
        await standby.close()


# --- a real mesh on PostgreSQL --------------------------------------------------------------


async def leads(live: Any) -> bool:
    r = await live.http.get("/health")
    return r.status_code == 200 and r.json().get("role") == "leader"


async def test_a_real_mesh_runs_tasks_on_postgresql(
    pg_server: PgServer, tmp_path: Path, spawn_client: Any,  # noqa: F811
) -> None:
    dsn = pg_server.create_database()
    settings = replace(FAST, data_dir=tmp_path / "mesh-data", store=dsn,
                       admin_token=TEST_ADMIN_TOKEN)
    async with run_coordinator(settings) as live:
        await wait_until(lambda: leads(live), 20, "the coordinator leads")
        spawn_client("a", live.ws_url)
        ids = [await live.submit(task_type="test", priority=i % 10) for i in range(20)]
        for task_id in ids:
            done = await live.wait_finished(task_id)
            assert done["status"] == "completed", done
        r = await live.http.post("/admin/tokens", json={"tenant": "t1", "role": "submit"})
        assert r.status_code in (200, 201), r.text
    async with await psycopg.AsyncConnection.connect(dsn) as conn:
        cur = await conn.execute("SELECT state, count(*) FROM tasks GROUP BY state")
        assert dict(await cur.fetchall()) == {"completed": 20}
        cur = await conn.execute("SELECT count(*) FROM tokens WHERE tenant = 't1'")
        assert await cur.fetchone() == (1,)
        cur = await conn.execute("SELECT name FROM node_credentials")
        assert await cur.fetchall() == [("a",)]
    # A coordinator started again on the same database serves what the first one recorded.
    async with run_coordinator(settings) as again:
        await wait_until(lambda: leads(again), 20, "the coordinator leads again")
        assert (await again.task(ids[-1]))["status"] == "completed"


# --- the crash-only property (tests/core/test_durability.py) on PostgreSQL -----------------------


class FaultyPgStore(FaultyWrites, PgStore):
    def __init__(self, url: str, fail_at: int, kind: str, stall_s: float = 0.3) -> None:
        super().__init__(url)
        self.fail_at, self.kind, self.stall_s = fail_at, kind, stall_s
        self.seen = 0


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(fail_at=st.integers(1, 25), kind=st.sampled_from(FAULTS), plan=steps)
def test_any_failed_write_on_postgresql_leaves_memory_equal_to_the_store(
    pg_server: PgServer, fail_at: int, kind: str, plan: list[Step],  # noqa: F811
) -> None:
    dsn = pg_server.create_database()
    with tempfile.TemporaryDirectory() as d:
        asyncio.run(scenario(Path(d), fail_at, kind, plan, FaultyPgStore(dsn, fail_at, kind)))

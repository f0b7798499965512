"""Issue 13, HA half: the leader lease, standbys that forward, failover without loss.

Everything runs against a real PostgreSQL (tests/pgserver.py); coordinators and clients are
real processes, killed with SIGKILL or frozen with SIGSTOP.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed

from coordinator.leader.lease import Lease
from gpu_client.credential import credential_paths, load_any, save_all
from gpu_client.endpoints import Endpoints
from gpu_client.settings import ClientSettings
from shared.protocol import CloseCode
from tests.conftest import ADMIN_HEADERS, Proc, free_port, wait_until
from tests.pgserver import PgServer, pg_server  # noqa: F401 - the session fixture


@pytest.fixture
def db(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()


async def _lease(dsn: str, name: str, lease_s: float) -> Lease:
    lease = Lease(dsn, name, f"http://{name}:8001", lease_s)
    await lease.prepare()
    return lease


async def test_lease_has_one_holder_and_a_new_epoch_per_holder(db: str) -> None:
    a, b = await _lease(db, "a", 1.0), await _lease(db, "b", 1.0)
    try:
        first = await a.acquire()
        assert first is not None
        assert await b.acquire() is None  # held: nobody else takes it
        view = await b.current()
        assert view is not None and view.live and view.url == "http://a:8001"
        assert await a.renew(first)
        # `a` stops renewing: by the database's clock the lease lapses and `b` takes it.
        second = await wait_until(b.acquire, 5, "the lease to lapse and pass to b")
        assert second == first + 1
        assert not await a.renew(first)  # deposed: renewal matches nothing
        assert await a.acquire() is None
        await b.release(second)
        third = await wait_until(a.acquire, 2, "a released lease to be taken at once")
        assert third == second + 1
    finally:
        await a.close()
        await b.close()


async def test_takeover_waits_for_a_leader_write_in_flight(db: str) -> None:
    """FOR SHARE on the lease row in a leader's write transaction makes a takeover wait for
    that commit: a successor never starts while the old leader is mid-commit."""
    a, b = await _lease(db, "a", 0.3), await _lease(db, "b", 6.0)
    try:
        async with await psycopg.AsyncConnection.connect(db) as writer:
            epoch = await a.acquire()
            assert epoch is not None
            cur = await writer.execute(
                "SELECT 1 FROM leader_lease WHERE id = 1 AND epoch = %s AND expires_at > now() "
                "FOR SHARE", (epoch,))
            assert await cur.fetchone() is not None
            await wait_until(_lapsed(b), 5, "a's lease to lapse by the database's clock")
            takeover = asyncio.create_task(b.acquire())
            await wait_until(_lease_waits_on_lock(writer), 5, "the takeover to wait on the row")
            assert not takeover.done()
            await writer.commit()
            assert await asyncio.wait_for(takeover, 5) == epoch + 1
    finally:
        await a.close()
        await b.close()


def _lapsed(lease: Lease) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        view = await lease.current()
        return view is not None and not view.live
    return check


def _lease_waits_on_lock(conn: psycopg.AsyncConnection[Any]) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        cur = await conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'gpumesh-lease' "
            "AND wait_event_type = 'Lock'")
        row = await cur.fetchone()
        return bool(row and row[0])
    return check


# --- the node's side: a list of coordinators, 4010 followed only inside it ----------------


def test_a_node_tries_its_coordinators_in_turn_and_follows_only_configured_leaders() -> None:
    s = ClientSettings.from_env({"NODE_NAME": "n1", "MESH_COORDINATOR_URL":
                                 "http://a:8001/, ws://b:8001,ws://a:8001"})
    assert s.urls == ("ws://a:8001", "ws://b:8001") and s.coordinator_url == "ws://a:8001"
    ends = Endpoints(s.urls)
    assert ends.current == "ws://a:8001"
    assert ends.failed() is False and ends.current == "ws://b:8001"  # next in the round
    assert ends.failed() is True and ends.current == "ws://a:8001"  # a whole round: back off
    assert ends.redirect("ws://B:8001") and ends.current == "ws://b:8001"  # host: any case
    assert not ends.redirect("ws://evil.example:8001")  # not ours: try the next one instead
    assert ends.current == "ws://a:8001"
    assert not ends.redirect("no url at all")


def test_one_credential_per_mesh_whatever_the_order_of_its_urls(tmp_path: Path) -> None:
    first = credential_paths(tmp_path, ("ws://a:8001",), "n1")
    save_all(first, "secret-1")
    grown = credential_paths(tmp_path, ("ws://b:8001", "ws://a:8001"), "n1")  # b added first
    assert load_any(grown) == "secret-1"
    assert load_any(credential_paths(tmp_path, ("ws://b:8001",), "n1")) == "secret-1"
    assert first == credential_paths(tmp_path, ("ws://a:8001",), "n1")  # one URL: as before


# --- two coordinator processes on one database ---------------------------------------------

LEASE_S = 2.0  # short, so a failover fits in a test; the default is 10 s
LOAD_S = 10.0  # what we allow for a new leader to load the mesh on a busy 2-core machine

_TRIGGER = """
CREATE TABLE test_changes (
    task_id text, old_state text, state text, attempt int, app text,
    at timestamptz DEFAULT clock_timestamp());
CREATE FUNCTION test_log_change() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    INSERT INTO test_changes (task_id, old_state, state, attempt, app) VALUES (
        NEW.id, CASE WHEN TG_OP = 'UPDATE' THEN OLD.state END, NEW.state, NEW.attempt,
        current_setting('application_name'));
    RETURN NEW;
END $$;
CREATE TRIGGER test_log AFTER INSERT OR UPDATE ON tasks
    FOR EACH ROW EXECUTE FUNCTION test_log_change();
"""


def _url(port: int) -> str:
    return f"http://127.0.0.1:{port}"


def _coordinator_env(dsn: str, port: int, app: str, lease_s: float = LEASE_S) -> dict[str, str]:
    """Its store is the shared database; `application_name` tells its writes apart."""
    return {
        "MESH_STORE": f"{dsn}?application_name={app}", "MESH_LEASE_S": str(lease_s),
        "MESH_ADVERTISE_URL": _url(port),
    }


async def _health(http: httpx.AsyncClient, port: int) -> dict[str, Any] | None:
    try:
        r = await http.get(f"{_url(port)}/health", timeout=2)
    except httpx.HTTPError:
        return None
    doc: dict[str, Any] = r.json()
    return doc


def _role_is(
    http: httpx.AsyncClient, port: int, role: str, leader: str | None = None
) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        doc = await _health(http, port)
        return doc is not None and doc.get("role") == role and (
            leader is None or doc.get("leader") == leader)
    return check


async def _sql(dsn: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    async with await psycopg.AsyncConnection.connect(dsn, autocommit=True) as conn:
        cur = await conn.execute(sql, args or None)
        return await cur.fetchall() if cur.description else []


async def _count(dsn: str, where: str) -> int:
    rows = await _sql(dsn, f"SELECT count(*) FROM tasks WHERE {where}")
    return int(rows[0][0])


async def _pair(
    dsn: str, spawn: Callable[..., Proc], tmp: Path, http: httpx.AsyncClient
) -> tuple[Proc, int, Proc, int]:
    """Coordinator A leads, B is its standby; every task write is logged (test_changes)."""
    pa, pb = free_port(), free_port()
    a = spawn(pa, tmp / "a", **_coordinator_env(dsn, pa, "coord-a"))
    await wait_until(_role_is(http, pa, "leader", _url(pa)), 30, "A to lead")
    b = spawn(pb, tmp / "b", **_coordinator_env(dsn, pb, "coord-b"))
    await wait_until(_role_is(http, pb, "standby", _url(pa)), 30, "B to stand by for A")
    await _sql(dsn, _TRIGGER)
    return a, pa, b, pb


async def _nodes_online(http: httpx.AsyncClient, port: int, n: int) -> bool:
    r = await http.get(f"{_url(port)}/mesh/nodes")
    return r.status_code == 200 and sum(
        1 for v in r.json()["nodes"].values() if v.get("status") == "online") >= n


async def _assert_each_completed_once(dsn: str, ids: list[str]) -> None:
    states = dict(await _sql(dsn, "SELECT state, count(*) FROM tasks GROUP BY state"))
    assert states == {"completed": len(ids)}, states
    done = await _sql(
        dsn, "SELECT task_id, count(*) FROM test_changes WHERE state = 'completed' "
        "AND old_state IS DISTINCT FROM 'completed' GROUP BY task_id")
    counts = dict(done)
    assert set(counts) == set(ids), "a task's completion was never recorded"
    twice = {k: v for k, v in counts.items() if v != 1}
    assert not twice, f"results recorded more than once: {twice}"


async def test_kill9_of_the_leader_loses_nothing_and_records_each_result_once(
    db: str, spawn_coordinator: Callable[..., Proc], spawn_client: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
        a, pa, _b, pb = await _pair(db, spawn_coordinator, tmp_path, http)
        urls = f"ws://127.0.0.1:{pa},ws://127.0.0.1:{pb}"
        for name in ("n1", "n2"):
            spawn_client(name, urls, MESH_SLOTS="4", MESH_EXECUTORS="builtin")
        await wait_until(lambda: _nodes_online(http, pb, 2), 30, "both nodes online (via B)")
        body = [{"task_type": "test", "sleep_s": 0.3, "name": f"t{i}"} for i in range(208)]
        r = await http.post(f"{_url(pb)}/tasks/submit", json=body)  # through the standby
        assert r.status_code == 200, r.text
        ids = [t["task_id"] for t in r.json()["tasks"]]
        r = await http.get(f"{_url(pb)}/tasks/{ids[0]}", params={"wait": "20"})  # a long poll
        assert r.status_code == 200 and r.json()["status"] == "completed", r.text
        r = await http.get(f"{_url(pb)}/tasks/{ids[0]}", headers={"Authorization": "Bearer x"})
        assert r.status_code == 401, r.text  # the caller's token travels; the leader decides
        await wait_until(lambda: _running_with_backlog(db), 30, "8 running, 150+ queued")

        killed = time.monotonic()
        a.kill9()
        await wait_until(_role_is(http, pb, "leader", _url(pb)), LEASE_S + LOAD_S, "B to lead")
        failover_s = time.monotonic() - killed
        a2 = spawn_coordinator(pa, tmp_path / "a", **_coordinator_env(db, pa, "coord-a"))
        await wait_until(_role_is(http, pa, "standby", _url(pb)), 30, "old leader as standby")
        await wait_until(lambda: _all_completed(db), 90, "every task to complete")
        await _assert_each_completed_once(db, ids)
        assert a2.popen is not None and a2.popen.poll() is None, a2.output()
        print(f"failover (lease {LEASE_S}s, kill -9 to the standby leading): {failover_s:.2f}s")


async def _all_completed(dsn: str) -> bool:
    return await _count(dsn, "state <> 'completed'") == 0


async def _running_with_backlog(dsn: str) -> bool:
    return (await _count(dsn, "state = 'running'") >= 8
            and await _count(dsn, "state = 'queued'") >= 150)


async def test_a_standby_answers_health_and_503_and_points_nodes_at_the_leader(
    db: str, spawn_coordinator: Callable[..., Proc], tmp_path: Path
) -> None:
    """The lease is held (by a leader that does not answer): the standby says where the leader
    is, answers the API with 503 + Retry-After, and closes a node's socket with 4010 and the
    leader's ws URL."""
    gone = free_port()
    holder = await _lease(db, "gone", 60.0)
    holder.url = _url(gone)
    assert await holder.acquire() is not None
    await holder.close()  # the row stays held for 60 s; nobody renews it
    port = free_port()
    spawn_coordinator(port, tmp_path / "s", **_coordinator_env(db, port, "coord-s"))
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
        await wait_until(_role_is(http, port, "standby", _url(gone)), 30, "a standby")
        r = await http.post(f"{_url(port)}/tasks/submit", json={"task_type": "test"})
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
        assert r.json()["error"] == "no leader" and _url(gone) in r.json()["reason"]
        r = await http.post(f"{_url(port)}/tasks/submit", content=b"x" * (5 << 20))
        assert r.status_code == 413, r.text  # the body cap holds before anything is forwarded
    async with connect(f"ws://127.0.0.1:{port}/ws/n1") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None
    assert (closed.value.rcvd.code, closed.value.rcvd.reason) == (
        CloseCode.NOT_LEADER, f"ws://127.0.0.1:{gone}")


async def test_a_leader_frozen_past_its_lease_commits_nothing_and_steps_down(
    db: str, spawn_coordinator: Callable[..., Proc], spawn_client: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
        a, pa, _b, pb = await _pair(db, spawn_coordinator, tmp_path, http)
        urls = f"ws://127.0.0.1:{pa},ws://127.0.0.1:{pb}"
        spawn_client("n1", urls, MESH_SLOTS="4", MESH_EXECUTORS="builtin")
        await wait_until(lambda: _nodes_online(http, pa, 1), 30, "the node online")
        body = [{"task_type": "test", "sleep_s": 1.0, "name": f"t{i}"} for i in range(12)]
        r = await http.post(f"{_url(pa)}/tasks/submit", json=body)
        assert r.status_code == 200, r.text
        ids = [t["task_id"] for t in r.json()["tasks"]]
        await wait_until(lambda: _count_is(db, "state = 'running'", 4), 30, "4 running on A")

        a.popen.send_signal(signal.SIGSTOP)  # type: ignore[union-attr]
        try:  # its node finishes those 4 while A sleeps: their results wait in A's socket
            await wait_until(_role_is(http, pb, "leader", _url(pb)), LEASE_S + LOAD_S,
                             "B to lead while A is frozen")
            (resumed,), = await _sql(db, "SELECT clock_timestamp()")
        finally:
            a.popen.send_signal(signal.SIGCONT)  # type: ignore[union-attr]
        await wait_until(_role_is(http, pa, "standby", _url(pb)), 30, "A to step down")
        await wait_until(lambda: _all_completed(db), 60, "every task to complete on B")
        late = await _sql(db, "SELECT task_id, state FROM test_changes WHERE app = 'coord-a' "
                          "AND at >= %s", resumed)
        assert late == [], f"the deposed leader committed after it was resumed: {late}"
        await _assert_each_completed_once(db, ids)
        assert a.popen is not None and a.popen.poll() is None, "A must live on as a standby"


async def _count_is(dsn: str, where: str, n: int) -> bool:
    return await _count(dsn, where) >= n


async def test_without_its_database_a_coordinator_stands_by_and_says_why(
    spawn_coordinator: Callable[..., Proc], tmp_path: Path
) -> None:
    """PostgreSQL not up (yet): the coordinator serves /health (503 "no leader"), answers the
    API with 503 + Retry-After and asks nodes to come back later (1013), instead of exiting."""
    port, nothing = free_port(), free_port()
    spawn_coordinator(port, tmp_path / "c", MESH_STORE=f"postgresql://u@127.0.0.1:{nothing}/db",
                      MESH_LEASE_S="1", MESH_ADVERTISE_URL=_url(port))
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
        doc = await wait_until(lambda: _health(http, port), 30, "/health to answer")
        assert (doc["status"], doc["role"], doc["leader"]) == ("no leader", "standby", None)
        r = await http.get(f"{_url(port)}/mesh/status")
        assert r.status_code == 503 and r.headers["Retry-After"] == "1", r.text
    async with connect(f"ws://127.0.0.1:{port}/ws/n1") as ws:
        with pytest.raises(ConnectionClosed) as closed:
            await ws.recv()
    assert closed.value.rcvd is not None and closed.value.rcvd.code == CloseCode.TRY_AGAIN_LATER


async def test_a_leader_stopped_cleanly_hands_over_without_waiting_out_its_lease(
    db: str, spawn_coordinator: Callable[..., Proc], tmp_path: Path
) -> None:
    """SIGTERM: the leader stops its Mesh and releases the lease, so the standby leads within
    a third of the lease (its next attempt) instead of the whole lease."""
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
        pa, pb = free_port(), free_port()
        lease = 6.0
        a = spawn_coordinator(pa, tmp_path / "a", **_coordinator_env(db, pa, "coord-a", lease))
        await wait_until(_role_is(http, pa, "leader", _url(pa)), 30, "A to lead")
        spawn_coordinator(pb, tmp_path / "b", **_coordinator_env(db, pb, "coord-b", lease))
        await wait_until(_role_is(http, pb, "standby", _url(pa)), 30, "B to stand by")
        stopped = time.monotonic()
        await asyncio.to_thread(a.stop)  # SIGTERM, and wait for the exit
        await wait_until(_role_is(http, pb, "leader", _url(pb)), lease, "B to lead")
        handover = time.monotonic() - stopped
        assert handover < lease * 0.6, f"took {handover:.2f}s: the lease was not released"


class Partition:
    """A TCP relay between one coordinator and PostgreSQL that the test can cut and heal."""

    def __init__(self, port: int) -> None:
        self.port, self.cut = port, False
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> int:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        return int(self._server.sockets[0].getsockname()[1])

    async def _relay(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        if self.cut:
            w.transport.abort()
            return
        ur, uw = await asyncio.open_connection("127.0.0.1", self.port)
        self._writers |= {w, uw}
        await asyncio.gather(_pipe(r, uw), _pipe(ur, w), return_exceptions=True)

    def sever(self) -> None:
        self.cut = True
        for w in self._writers:
            w.transport.abort()
        self._writers.clear()

    async def close(self) -> None:
        self.sever()
        self._server.close()
        await self._server.wait_closed()


async def _pipe(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    try:
        while data := await r.read(65536):
            w.write(data)
            await w.drain()
    finally:
        w.transport.abort()


async def test_a_leader_cut_off_from_its_database_steps_down_after_its_lease(
    db: str, pg_server: PgServer, spawn_coordinator: Callable[..., Proc],  # noqa: F811
    tmp_path: Path,
) -> None:
    relay = Partition(pg_server.port)
    via = db.replace(f":{pg_server.port}/", f":{await relay.start()}/")
    try:
        async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
            pa, pb = free_port(), free_port()
            spawn_coordinator(pa, tmp_path / "a", **_coordinator_env(via, pa, "coord-a"))
            await wait_until(_role_is(http, pa, "leader", _url(pa)), 30, "A to lead")
            spawn_coordinator(pb, tmp_path / "b", **_coordinator_env(db, pb, "coord-b"))
            await wait_until(_role_is(http, pb, "standby", _url(pa)), 30, "B to stand by")
            relay.sever()  # A cannot renew: it steps down once a whole lease passed
            await wait_until(_role_is(http, pb, "leader", _url(pb)), LEASE_S + LOAD_S, "B")
            await wait_until(_role_is(http, pa, "standby"), LEASE_S + LOAD_S, "A to step down")
            doc = await _health(http, pa)
            assert doc is not None and doc["status"] == "no leader", doc  # it cannot see B
            relay.cut = False  # healed: A finds the lease and follows B
            await wait_until(_role_is(http, pa, "standby", _url(pb)), 30, "A to follow B")
    finally:
        await relay.close()

"""HA failover of a running gang (issue 28 item 5): two coordinator processes on one real
PostgreSQL (tests/pgserver.py), the leader killed with SIGKILL while a gang of 2 runs on two
real clients. The standby takes over and restarts the gang as one unit: both of the first
attempt's members are stopped on their nodes, and the gang completes once, on attempt 2;
never half a gang kept."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_HEADERS, Proc, wait_until
from tests.gang import task_uids
from tests.leader.test_failover import LEASE_S, LOAD_S, _pair, _role_is, _sql, _url
from tests.pgserver import PgServer, pg_server  # noqa: F401 - the session fixture


@pytest.fixture
def db(request: pytest.FixtureRequest) -> str:
    """A fresh, empty database on the session's PostgreSQL."""
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()


def _parked(stop: Path) -> int:
    """How many processes wait for `stop` (first-attempt ranks, parked)."""
    found = subprocess.run(["pgrep", "-f", str(stop)], capture_output=True, text=True)
    return len(found.stdout.split())


async def test_a_running_gang_is_restarted_as_one_unit_by_the_new_leader(
    db: str, spawn_coordinator: Callable[..., Proc], spawn_client: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    stop = tmp_path / "stop"  # never created: a first-attempt rank parks until it is stopped
    # A rank's first run (no flag of its rank yet) marks it and parks; a later one says done.
    script = (f'f="{tmp_path}/first$NODE_RANK"; if [ ! -e "$f" ]; then touch "$f"; '
              f'while [ ! -e "{stop}" ]; do sleep 0.2; done; exit 3; fi; '
              'echo "rank $NODE_RANK of $NNODES done"')
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as http:
        a, pa, _b, pb = await _pair(db, spawn_coordinator, tmp_path, http)
        urls = f"ws://127.0.0.1:{pa},ws://127.0.0.1:{pb}"
        for i in range(2):
            spawn_client(f"h{i}", urls, MESH_NODE_ADDRESS="127.0.0.1",
                         MESH_TASK_UIDS=task_uids(i))

        async def online(port: int) -> bool:
            r = await http.get(f"{_url(port)}/mesh/nodes")
            return r.status_code == 200 and sum(
                1 for n in r.json()["nodes"].values() if n.get("status") == "online") == 2

        await wait_until(lambda: online(pb), 30, "both nodes online (via B)")
        r = await http.post(f"{_url(pb)}/tasks/submit", json={
            "task_type": "custom", "nodes": 2, "command": ["sh", "-c", script],
            "max_attempts": 1})
        assert r.status_code == 200, r.text
        gang = r.json()["task_id"]

        async def running() -> dict[str, Any] | None:
            doc: dict[str, Any] = (await http.get(f"{_url(pa)}/tasks/{gang}")).json()
            return doc if doc.get("status") == "running" else None

        first = await wait_until(running, 30, "the gang running on A")
        await wait_until(lambda: _parked(stop) >= 2, 30, "both first-attempt ranks parked")
        members = [m["task_id"] for m in first["gang"]["members"]]
        assert len(members) == 2 and first["attempt"] == 1

        killed = time.monotonic()
        a.kill9()
        await wait_until(_role_is(http, pb, "leader", _url(pb)), LEASE_S + LOAD_S, "B to lead")

        async def finished() -> dict[str, Any] | None:
            try:
                doc: dict[str, Any] = (await http.get(
                    f"{_url(pb)}/tasks/{gang}", params={"wait": "5"}, timeout=15)).json()
            except (httpx.HTTPError, ValueError):
                return None
            return doc if doc.get("status") in ("completed", "failed", "cancelled") else None

        done = await wait_until(finished, 90, "the gang finished on B")
        took = time.monotonic() - killed
        assert done["status"] == "completed", done
        assert done["attempt"] == 2 and done["max_attempts"] == 1  # the failover spent none
        assert any("coordinator restarted" in h["cause"] and h["infra"]
                   for h in done["history"]), done["history"]
        ranks = done["result"]["ranks"]
        assert [r["exit_code"] for r in ranks] == [0, 0]
        assert {r["node"] for r in ranks} == {"h0", "h1"}
        assert not {r["task_id"] for r in ranks} & set(members)  # new members, both
        assert "rank 0 of 2 done" in done["result"]["output"]
        # both first-attempt members were ended by the new leader, and their processes
        # stopped on both nodes (`stop` never came): never half a gang kept
        rows = await _sql(db, "SELECT id, state FROM tasks WHERE id = ANY(%s)", members)
        assert sorted(state for _, state in rows) == ["cancelled", "cancelled"], rows
        await wait_until(lambda: _parked(stop) == 0, 30, "the first attempt's ranks gone")
        # the gang's result was recorded once, by B
        rows = await _sql(db, "SELECT app FROM test_changes WHERE task_id = %s AND "
                          "state = 'completed' AND old_state IS DISTINCT FROM 'completed'", gang)
        assert rows == [("coord-b",)], rows
        print(f"kill -9 of the leader to the gang completed on the standby: {took:.2f}s")

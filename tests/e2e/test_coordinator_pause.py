"""A coordinator paused again and again (SIGSTOP/SIGCONT, as a sampling profiler or a slow
VM does) under a stream of work: real coordinator and client processes.

While the coordinator is stopped, its nodes' heartbeats wait in the sockets; on waking it
reads them all at once, and assigns it committed just before the stop go out only then.
Those heartbeats were made before the node had those assigns, so none of them may count
against the tasks (coordinator/core/faults.py `_had_assign`): every task completes on its first
attempt, exactly once, and nothing is left active.
"""

from __future__ import annotations

import asyncio
import os
import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import ADMIN_HEADERS, Proc, free_port, wait_for

Spawn = Callable[..., Proc]

PAUSES = 4
PAUSE_S = 2.5  # five heartbeats (MESH_HEARTBEAT_S=0.5) wait in each node's socket
TASK = {"task_type": "test", "max_attempts": 1}  # a wrong requeue would fail the task


def _ok(http: httpx.Client, path: str) -> Any:
    try:
        r = http.get(path)
    except httpx.HTTPError:
        return None
    return r.json() if r.status_code == 200 else None


def _submitter(port: int, ids: list[str], stop: threading.Event, errors: list[str]) -> None:
    """Batches of 40 `test` tasks, back to back, until `stop`."""
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=ADMIN_HEADERS,
                      timeout=30) as http:
        while not stop.is_set():
            r = http.post("/tasks/submit", json=[TASK] * 40)
            if r.status_code != 200:
                errors.append(r.text)
                return
            ids.extend(t["task_id"] for t in r.json()["tasks"])


@pytest.mark.slow
async def test_paused_coordinator_requeues_nothing_and_loses_nothing(
    spawn_coordinator: Spawn, spawn_client: Spawn, tmp_path: Path
) -> None:
    port = free_port()
    coord = spawn_coordinator(port, tmp_path / "data")
    http = httpx.Client(base_url=f"http://127.0.0.1:{port}", headers=ADMIN_HEADERS, timeout=30)
    wait_for(lambda: _ok(http, "/health"), 20, "coordinator up")
    for name in ("a", "b"):
        spawn_client(name, f"ws://127.0.0.1:{port}", MESH_SLOTS="8", MESH_LOG_LEVEL="INFO")
    wait_for(lambda: (_ok(http, "/health") or {}).get("online_nodes") == 2, 20, "2 nodes")

    ids: list[str] = []
    errors: list[str] = []
    stop = threading.Event()
    feeder = threading.Thread(target=_submitter, args=(port, ids, stop, errors))
    feeder.start()
    try:
        for _ in range(PAUSES):
            count = len(ids)
            await asyncio.to_thread(wait_for, lambda c=count: len(ids) >= c + 200, 20, "work")
            os.kill(coord.pid, signal.SIGSTOP)
            try:
                await asyncio.to_thread(time.sleep, PAUSE_S)  # the pause is the test
            finally:
                os.kill(coord.pid, signal.SIGCONT)
    finally:
        stop.set()
        await asyncio.to_thread(feeder.join, 40)
    assert not errors, errors[:1]
    resumed = time.monotonic()

    def drained() -> bool:
        doc = _ok(http, "/tasks/active")
        return doc is not None and not doc["tasks"]

    # Bounded: reconnect grace (1.5 s) + node timeout (3 s) + a margin.
    await asyncio.to_thread(wait_for, drained, 15, "no active task")
    drain_s = time.monotonic() - resumed
    await asyncio.to_thread(_each_completed_once, http, ids)
    assert drain_s < 15
    await asyncio.to_thread(http.close)


def _each_completed_once(http: httpx.Client, ids: list[str]) -> None:
    """Every task completed on its first attempt, and the mesh counts each once."""
    docs = [http.get(f"/tasks/{task_id}").json() for task_id in ids]
    wrong = [d for d in docs if d["status"] != "completed" or d["attempt"] != 1]
    assert not wrong, (f"{len(wrong)} of {len(ids)}", [
        (d["status"], d["attempt"], d["error"]) for d in wrong[:3]])
    status = http.get("/mesh/status").json()
    assert status["completed_tasks"] == len(ids), (status["completed_tasks"], len(ids))

"""Backlog and recovery: a million queued tasks, then a restart with 100,000 queued.

Part 1: a coordinator with no node, so every task stays queued. The submit rate is
measured at ~1k queued and again at ~1M queued, the same way both times: PROBE batches
of 1,000 `test` tasks, one POST after another, each answered once its tasks are durable;
the rate is 1,000 / the median batch time. In between, the queue is filled with batches
of 10,000, two in flight. RSS is read at the end.

Part 2: a coordinator with 100,000 queued tasks is killed with SIGKILL and started again
while a compute client (`python -m gpu_client`, MESH_RECONNECT_MAX_S=0.2) is already
trying to connect. Timed from starting the new process: until HTTP answers, and until the
first task is dispatched (`/mesh/status` shows it active or completed, polled every 5 ms).
"""

from __future__ import annotations

import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.httpc import HttpConn
from benchmarks.stats import Result, ratio

TASK = {"task_type": "test"}
PROBE = 15  # batches of 1,000 per rate probe
FILL_BATCH = 10_000


def _post(conn: HttpConn, n: int) -> float:
    t0 = time.perf_counter()
    status, doc = conn.request("POST", "/tasks/submit", [TASK] * n)
    took = time.perf_counter() - t0
    if status != 200 or doc["count"] != n:
        raise RuntimeError(f"batch of {n} refused: {status} {doc}")
    return took


def _probe(conn: HttpConn) -> float:
    """Tasks/s from the median of PROBE sequential batches of 1,000."""
    return 1000 / statistics.median(_post(conn, 1000) for _ in range(PROBE))


def _fill(port: int, target_queued: int) -> float:
    """Queue tasks until `target_queued`, two batches in flight; returns tasks/s."""
    import threading

    queued = int(procs.get(port, "/mesh/status")["queued_tasks"])
    todo = max(0, target_queued - queued)
    batches = [FILL_BATCH] * (todo // FILL_BATCH) + (
        [todo % FILL_BATCH] if todo % FILL_BATCH else []
    )
    errors: list[Exception] = []

    def lane() -> None:
        conn = HttpConn("127.0.0.1", port, timeout=300)
        try:
            while batches:
                _post(conn, batches.pop())
        except (OSError, RuntimeError) as exc:  # handed to the caller below
            errors.append(exc)
        finally:
            conn.close()

    t0 = time.perf_counter()
    lanes = [threading.Thread(target=lane) for _ in range(2)]
    for t in lanes:
        t.start()
    for t in lanes:
        t.join()
    if errors:
        raise errors[0]
    return todo / (time.perf_counter() - t0)


def part1(log_dir: Path, total: int) -> dict[str, Any]:
    with procs.mesh(log_dir) as (port, coord, _):
        conn = HttpConn("127.0.0.1", port, timeout=300)
        _post(conn, 1000)  # warm-up, and ~1k queued
        small = _probe(conn)
        small_rss = coord.ps.memory_info().rss
        conn.close()
        fill_rate = _fill(port, total - PROBE * 1000)
        conn = HttpConn("127.0.0.1", port, timeout=300)
        big = _probe(conn)
        queued = int(procs.get(port, "/mesh/status")["queued_tasks"])
        conn.close()
        rss = coord.ps.memory_info().rss
        t0 = time.perf_counter()
        procs.get(port, "/mesh/status")
        status_ms = (time.perf_counter() - t0) * 1000
    return {
        "rate_at_1k": round(small),
        "rate_at_full": round(big),
        "full_vs_1k": ratio(small, big),
        "fill_rate": round(fill_rate),
        "queued": queued,
        "rss_mb": round(rss / 2**20),
        "bytes_per_task": round((rss - small_rss) / (queued - 1000 - PROBE * 1000)),
        "status_ms": round(status_ms, 1),
    }


def _first_dispatch(port: int) -> bool:
    doc = procs.get(port, "/mesh/status")
    return bool(doc and (doc["active_tasks"] or doc["completed_tasks"]))


def part2(log_dir: Path, queued: int) -> dict[str, Any]:
    port = procs.free_port()
    data = log_dir / "restart-data"
    coord = procs.start_coordinator(port, data, log_dir)
    client = None
    try:
        procs.wait_for(lambda: procs.get(port, "/health"), 30, "the coordinator", (coord,))
        _fill(port, queued)
        coord.kill9()
        client = procs.start_client("waiting", port, log_dir, MESH_RECONNECT_MAX_S="0.2")
        time.sleep(1.0)  # it is trying, and failing, to connect
        t0 = time.perf_counter()
        coord = procs.start_coordinator(port, data, log_dir)
        while True:
            try:
                if procs.get(port, "/health"):
                    break
            except OSError:
                pass
            if not coord.alive() or time.perf_counter() - t0 > 120:
                raise RuntimeError(f"coordinator did not come back:\n{coord.output()}")
            time.sleep(0.005)
        http_s = time.perf_counter() - t0
        procs.wait_for(lambda: _first_dispatch(port), 120, "the first dispatch", (coord,))
        first_s = time.perf_counter() - t0
        return {
            "restart_queued": queued,
            "http_up_s": round(http_s, 2),
            "first_dispatch_s": round(first_s, 2),
        }
    finally:
        if client is not None:
            client.stop()
        coord.stop()


def run(quick: bool = False) -> Result:
    total = 200_000 if quick else 1_000_000
    with tempfile.TemporaryDirectory(prefix="bench-backlog-") as tmp:
        row = part1(Path(tmp), total)
        row.update(part2(Path(tmp), 100_000))
    notes = [
        f"submit rate: median of {PROBE} sequential POSTs of 1,000 tasks, each durable before "
        "its answer; full_vs_1k = rate_at_full / rate_at_1k",
        "restart: SIGKILL, then a new coordinator process while a client retries every "
        "<= 0.2 s; times from the new process's start (Python start-up included)",
    ]
    if quick:
        notes.append("--quick: 200,000 queued instead of 1,000,000")
    within = row["full_vs_1k"] >= 0.8
    goals = [
        f"{'met' if within else 'MISSED'}: submit rate at {row['queued']:,} queued is "
        f"{row['full_vs_1k']}x the rate at ~1k (goal: unchanged within noise)",
        f"{'met' if row['first_dispatch_s'] < 2 else 'MISSED'}: first dispatch "
        f"{row['first_dispatch_s']} s after a restart with 100,000 queued (goal < 2 s)",
    ]
    columns = [
        "queued",
        "rate_at_1k",
        "rate_at_full",
        "full_vs_1k",
        "fill_rate",
        "rss_mb",
        "bytes_per_task",
        "restart_queued",
        "http_up_s",
        "first_dispatch_s",
    ]
    return Result("backlog", [row], columns, notes, goals)

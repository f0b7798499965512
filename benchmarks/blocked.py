"""Dispatch beside work that cannot fit: 10,000 distinct requirement classes no node serves.

A `python -m coordinator` process and one `python -m gpu_client` process (no GPU: the
builtin executor runs `test` tasks at once). First the round trip of a `test` task
(`POST /tasks/submit` then `GET /tasks/{id}?wait=10` on one kept-alive connection) with an
empty queue; then 10,000 tasks are queued, each asking for one GPU of a type no node has
(`nofit-00000`, `nofit-00001`, ...: 10,000 requirement classes), in batches of 1,000;
then the round trip again, with all of them still queued. From before the fill to the
end, a thread times `GET /health` on its own connection every 10 ms.

Before the blocked-class queue (issue 10), each decision rescanned the head of every
class: a pass cost O(classes) placements, and every submit, result and register ran one.
"""

from __future__ import annotations

import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.httpc import HttpConn
from benchmarks.stats import Result, summary

TASK = {"task_type": "test"}
CLASSES = 10_000
BATCH = 500
JOIN_TOKEN = "bench-blocked-join-token"


def _round_trip(conn: HttpConn) -> float:
    t0 = time.perf_counter()
    status, doc = conn.request("POST", "/tasks/submit", TASK)
    assert status == 200, doc
    status, doc = conn.request("GET", f"/tasks/{doc['task_id']}?wait=10")
    took = time.perf_counter() - t0
    assert status == 200 and doc["status"] == "completed", doc
    return took * 1000


class HealthProbe:
    """Times GET /health every `every_s` in a thread; samples are kept by phase."""

    def __init__(self, port: int, every_s: float = 0.01) -> None:
        self.port, self.every_s = port, every_s
        self.phase = "idle"
        self.samples: dict[str, list[float]] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="health-probe", daemon=True)

    def __enter__(self) -> HealthProbe:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)

    def _run(self) -> None:
        conn = HttpConn("127.0.0.1", self.port, timeout=30)
        try:
            while not self._stop.is_set():
                t0 = time.perf_counter()
                status, _ = conn.request("GET", "/health")
                took = (time.perf_counter() - t0) * 1000
                if status == 200:
                    self.samples.setdefault(self.phase, []).append(took)
                self._stop.wait(self.every_s)
        finally:
            conn.close()


def _fill(conn: HttpConn, classes: int) -> tuple[float, float]:
    """Queue the unfittable classes; returns (seconds to store them, seconds until the
    last one was tried and parked: its queued reason says why nothing fits)."""
    t0 = time.perf_counter()
    last = ""
    for start in range(0, classes, BATCH):
        batch = [
            {"task_type": "test", "requirements": {"gpu_count": 1, "gpu_type": f"nofit-{i:05d}"}}
            for i in range(start, min(start + BATCH, classes))
        ]
        status, doc = conn.request("POST", "/tasks/submit", batch)
        if status != 200 or doc["count"] != len(batch):
            raise RuntimeError(f"batch refused: {status} {doc}")
        last = doc["tasks"][-1]["task_id"]
    stored = time.perf_counter() - t0

    def tried() -> bool:
        status, doc = conn.request("GET", f"/tasks/{last}")
        return status == 200 and str(doc.get("reason", "")).startswith("no node fits")

    procs.wait_for(tried, 120, "every blocked class tried once")
    return stored, time.perf_counter() - t0


def _rt_row(queue: str, samples: list[float]) -> dict[str, Any]:
    s = summary(samples)
    return {
        "queue": queue, "tasks": len(samples), "p50_ms": round(s["p50"], 3),
        "p90_ms": round(s["p90"], 3), "p99_ms": round(s["p99"], 3), "max_ms": round(s["max"], 3),
    }


def run(quick: bool = False) -> Result:
    n, warm = (100, 20) if quick else (300, 50)
    with tempfile.TemporaryDirectory(prefix="bench-blocked-") as tmp:
        client_env = {"MESH_TOKEN": JOIN_TOKEN, "MESH_STATE_DIR": str(Path(tmp) / "state")}
        with procs.mesh(
            Path(tmp), clients=1, client_env=client_env, MESH_JOIN_TOKEN=JOIN_TOKEN
        ) as (port, _, _):
            conn = HttpConn("127.0.0.1", port, timeout=120)
            with HealthProbe(port) as probe:
                for _ in range(warm):
                    _round_trip(conn)
                probe.phase = "empty"
                empty = [_round_trip(conn) for _ in range(n)]
                probe.phase = "fill"
                fill_s, tried_s = _fill(conn, CLASSES)
                status = procs.get(port, "/mesh/status")
                queued = int(status["queued_tasks"]) if status else -1
                probe.phase = "blocked"
                for _ in range(warm):
                    _round_trip(conn)
                blocked = [_round_trip(conn) for _ in range(n)]
                probe.phase = "after"
            conn.close()
    rows = [_rt_row("empty", empty), _rt_row(f"{CLASSES:,} blocked classes", blocked)]
    slowdown = round(rows[1]["p50_ms"] / rows[0]["p50_ms"], 2)
    rows[1]["vs_empty_p50"] = slowdown
    health = {
        phase: summary(probe.samples.get(phase, [])) for phase in ("empty", "fill", "blocked")
    }
    for row, phase in ((rows[0], "empty"), (rows[1], "blocked")):
        row["health_p99_ms"] = round(health[phase]["p99"], 2)
        row["health_max_ms"] = round(health[phase]["max"], 2)
    worst = max(h["max"] for h in health.values())
    notes = [
        f"{queued:,} tasks queued ({CLASSES:,} classes in batches of {BATCH:,}): stored in "
        f"{fill_s:.2f} s, every class tried and parked {tried_s:.2f} s after the first POST",
        f"/health during the fill: {len(probe.samples.get('fill', []))} probes, "
        f"p50 {health['fill']['p50']:.2f} ms, max {health['fill']['max']:.2f} ms",
        f"round trips: {warm} warm-up then {n}, sequential, one kept-alive connection; "
        "/health timed every 10 ms on its own connection",
    ]
    goals = [
        f"{'met' if slowdown <= 3 else 'MISSED'}: test-task p50 with {CLASSES:,} blocked classes "
        f"is {slowdown}x the empty queue's (goal <= 3x)",
        f"{'met' if worst < 50 else 'MISSED'}: /health max {worst:.2f} ms throughout "
        "(goal < 50 ms)",
    ]
    columns = [
        "queue", "tasks", "p50_ms", "p90_ms", "p99_ms", "max_ms", "vs_empty_p50",
        "health_p99_ms", "health_max_ms",
    ]
    return Result("blocked", rows, columns, notes, goals)

"""Scale: a coordinator holding 1,000 and 10,000 simulated nodes (8 GPUs each).

A `python -m coordinator` process and a `python -m benchmarks.simnodes` process with N
WebSocket nodes heartbeating every 5 s (spread over the interval). Once all are
registered and a full heartbeat interval has passed, the coordinator's CPU (psutil, over
a WINDOW_S window) and RSS are read; CPU seconds divided by the heartbeats received in
that window is the cost of one heartbeat (an upper bound: it carries pings, the liveness
sweep and everything else the idle mesh does). Then tasks are submitted one after
another (half `test` tasks on a CPU slot, half needing 1 GPU with 16 GB free) and each is
timed from POST to the end of `GET ?wait=`: placement over N nodes plus dispatch.
"""

from __future__ import annotations

import json
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.httpc import HttpConn
from benchmarks.stats import Result, summary

CPU_TASK = {"task_type": "test"}
GPU_TASK = {"task_type": "test", "requirements": {"gpu_count": 1, "memory_gb": 16}}


class SimOutput:
    """Reads the simulator's JSON lines on a thread; keeps the latest of each event."""

    def __init__(self, proc: procs.Proc) -> None:
        self.latest: dict[str, dict[str, Any]] = {}
        self._cond = threading.Condition()
        self._thread = threading.Thread(target=self._read, args=(proc,), daemon=True)
        self._thread.start()

    def _read(self, proc: procs.Proc) -> None:
        assert proc.popen.stdout is not None
        for line in proc.popen.stdout:
            try:
                doc = json.loads(line)
            except ValueError:
                continue
            with self._cond:
                self.latest[doc["event"]] = doc
                self._cond.notify_all()

    def wait(self, event: str, timeout: float) -> dict[str, Any] | None:
        with self._cond:
            self._cond.wait_for(lambda: event in self.latest, timeout)
            return self.latest.get(event)

    def next_tick(self, timeout: float = 5) -> dict[str, Any]:
        with self._cond:
            seen = self.latest.get("tick")
            self._cond.wait_for(lambda: self.latest.get("tick") is not seen, timeout)
            return self.latest["tick"]


def _cpu_s(p: procs.Proc) -> float:
    t = p.ps.cpu_times()
    return t.user + t.system


def _latencies(port: int, n: int) -> dict[str, list[float]]:
    conn = HttpConn("127.0.0.1", port)
    out: dict[str, list[float]] = {"cpu": [], "gpu": []}
    for i in range(n):
        kind, body = ("gpu", GPU_TASK) if i % 2 else ("cpu", CPU_TASK)
        t0 = time.perf_counter_ns()
        status, doc = conn.request("POST", "/tasks/submit", body)
        assert status == 200, doc
        status, doc = conn.request("GET", f"/tasks/{doc['task_id']}?wait=30")
        assert status == 200 and doc["status"] == "completed", doc
        out[kind].append((time.perf_counter_ns() - t0) / 1e6)
    conn.close()
    return out


def measure(n_nodes: int, window_s: float, tasks: int, log_dir: Path) -> dict[str, Any]:
    port = procs.free_port()
    coord = procs.start_coordinator(port, log_dir / f"data-{port}", log_dir)
    running = [coord]
    try:
        procs.wait_for(lambda: procs.get(port, "/health"), 30, "the coordinator", (coord,))
        rss_empty = coord.ps.memory_info().rss
        argv = [
            sys.executable,
            "-m",
            "benchmarks.simnodes",
            "--url",
            f"ws://127.0.0.1:{port}",
            "--nodes",
            str(n_nodes),
        ]
        sim = procs.spawn(f"simnodes-{n_nodes}", argv, procs.clean_env(), log_dir, capture=True)
        running.append(sim)
        out = SimOutput(sim)
        ready = out.wait("ready", 60 + n_nodes / 50)
        if ready is None or not sim.alive():
            raise RuntimeError(f"simulator not ready:\n{sim.output()}\n{coord.output()}")
        if ready["failed"]:
            raise RuntimeError(
                f"{ready['failed']} of {n_nodes} nodes failed to register:\n{sim.output()}"
            )
        time.sleep(5.5)  # one full heartbeat interval: every node is beating now
        tick0 = out.next_tick()
        cpu0, sim0, t0 = _cpu_s(coord), _cpu_s(sim), time.monotonic()
        time.sleep(window_s)
        tick1 = out.next_tick()
        cpu1, sim1, t1 = _cpu_s(coord), _cpu_s(sim), time.monotonic()
        beats = tick1["heartbeats"] - tick0["heartbeats"]
        rss = coord.ps.memory_info().rss
        online = procs.online_nodes(port)
        lat = _latencies(port, tasks)
        both = lat["cpu"] + lat["gpu"]
        s, g = summary(both), summary(lat["gpu"])
        return {
            "nodes": n_nodes,
            "online": online,
            "connect_s": ready["connect_s"],
            "coord_cpu_pct": round(100 * (cpu1 - cpu0) / (t1 - t0), 1),
            "sim_cpu_pct": round(100 * (sim1 - sim0) / (t1 - t0), 1),
            "heartbeats_per_s": round(beats / (t1 - t0)),
            "us_per_heartbeat": round(1e6 * (cpu1 - cpu0) / beats, 1) if beats else None,
            "rss_mb": round(rss / 2**20),
            "rss_per_node_kb": round((rss - rss_empty) / 1024 / n_nodes, 1),
            "p50_ms": round(s["p50"], 2),
            "p99_ms": round(s["p99"], 2),
            "gpu_p50_ms": round(g["p50"], 2),
            "gpu_p99_ms": round(g["p99"], 2),
            "closed": out.next_tick()["closed"],
        }
    finally:
        for p in reversed(running):
            p.stop(timeout=30)


def run(quick: bool = False) -> Result:
    sizes, window, tasks = ((1_000, 2_000), 10.0, 60) if quick else ((1_000, 10_000), 20.0, 200)
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        rows = [measure(n, window, tasks, Path(tmp)) for n in sizes]
    biggest = rows[-1]
    verdict = "met" if biggest["coord_cpu_pct"] < 50 else "MISSED"
    notes = [
        f"8 GPUs per node, heartbeats every 5 s; CPU over {window:.0f} s of steady state; "
        f"{tasks} tasks one after another (half CPU, half 1 GPU >= 16 GB), POST to result",
        "us_per_heartbeat: coordinator CPU in the window / heartbeats in the window",
    ]
    if quick:
        notes.append("--quick: 2,000 nodes instead of 10,000")
    goals = [
        f"{verdict}: {biggest['nodes']:,} nodes at {biggest['coord_cpu_pct']} % of one "
        "core (goal: 10,000 nodes < 50 %)"
    ]
    columns = [
        "nodes",
        "online",
        "connect_s",
        "coord_cpu_pct",
        "sim_cpu_pct",
        "heartbeats_per_s",
        "us_per_heartbeat",
        "rss_mb",
        "p50_ms",
        "p99_ms",
        "gpu_p99_ms",
    ]
    return Result("scale", rows, columns, notes, goals)

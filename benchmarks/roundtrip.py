"""Submit -> result of one `test` task over HTTP + WebSocket, one node; Ray and Dask beside.

gpumesh: a `python -m coordinator` process and one `python -m gpu_client` process. One
kept-alive HTTP connection does `POST /tasks/submit` then `GET /tasks/{id}?wait=10`, task
after task; each round trip is timed from before the POST to the end of the GET's answer.
Dask: a `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)` and
`client.submit(noop, pure=False).result()` (benchmarks/dask_baseline.py). Ray:
`ray.init(num_cpus=2)` and `ray.get(noop.remote())` (benchmarks/ray_baseline.py). Each
baseline runs in a process of its own (benchmarks/baseline_proc.py). All run side by side and are
measured in alternating blocks, so a noisy neighbour on a shared machine hits all alike.
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks import procs
from benchmarks.dask_baseline import DaskBaseline
from benchmarks.httpc import HttpConn
from benchmarks.ray_baseline import RayBaseline
from benchmarks.stats import Result, ratio, summary
from benchmarks.stores import store_env, store_label, store_name

TASK = {"task_type": "test"}


def ours_once(conn: HttpConn) -> int:
    t0 = time.perf_counter_ns()
    status, doc = conn.request("POST", "/tasks/submit", TASK)
    assert status == 200, doc
    status, doc = conn.request("GET", f"/tasks/{doc['task_id']}?wait=10")
    took = time.perf_counter_ns() - t0
    assert status == 200 and doc["status"] == "completed", doc
    return took


def _row(system: str, samples_ns: list[int]) -> dict[str, Any]:
    s = summary([x / 1e6 for x in samples_ns])
    return {
        "system": system,
        "tasks": len(samples_ns),
        "p50_ms": round(s["p50"], 3),
        "p90_ms": round(s["p90"], 3),
        "p99_ms": round(s["p99"], 3),
        "max_ms": round(s["max"], 3),
    }


def run(quick: bool = False, store: str = "sqlite") -> Result:
    n, rounds, warm = (100, 2, 30) if quick else (150, 3, 50)
    ours: list[int] = []
    theirs: list[int] = []
    rays: list[int] = []
    dask = DaskBaseline()
    ray = RayBaseline()
    try:
        dask.roundtrip(warm)
        dask_cpu = procs.CpuMeter(dask.pids())
        ray.roundtrip(warm)
        ray_cpu = procs.CpuMeter(ray.pids())
        with tempfile.TemporaryDirectory(prefix="bench-rt-") as tmp:
            with procs.mesh(Path(tmp), clients=1, **store_env(store)) as (port, coord, nodes):
                our_cpu = procs.CpuMeter([coord.pid, *(p.pid for p in nodes)])
                conn = HttpConn("127.0.0.1", port)
                for _ in range(warm):
                    ours_once(conn)
                for _ in range(rounds):
                    with our_cpu:
                        ours += [ours_once(conn) for _ in range(n)]
                    with dask_cpu:
                        theirs += dask.roundtrip(n)
                    with ray_cpu:
                        rays += ray.roundtrip(n)
                conn.close()
    finally:
        ray.close()
        dask.close()
    mine, base = _row(f"gpumesh{store_label(store)}", ours), _row("dask", theirs)
    ray_row = _row("ray", rays)
    for row, meter, count in ((mine, our_cpu, ours), (base, dask_cpu, theirs),
                              (ray_row, ray_cpu, rays)):
        row["cpu_ms_per_task"] = round(1000 * meter.total / len(count), 2)
    mine["vs_dask_p50"] = ratio(mine["p50_ms"], base["p50_ms"])
    mine["vs_dask_p99"] = ratio(mine["p99_ms"], base["p99_ms"])
    mine["vs_ray_p50"] = ratio(mine["p50_ms"], ray_row["p50_ms"])
    mine["vs_ray_p99"] = ratio(mine["p99_ms"], ray_row["p99_ms"])
    goals = [
        f"{'met' if mine['p50_ms'] <= 3 else 'MISSED'}: gpumesh p50 {mine['p50_ms']} ms "
        "(goal <= 3 ms)",
        f"{'met' if mine['vs_dask_p50'] >= 4 else 'MISSED'}: {mine['vs_dask_p50']}x faster "
        "than Dask at p50 (goal >= 4x)",
        f"{'met' if mine['vs_ray_p50'] >= 2 else 'MISSED'}: p50 {mine['p50_ms']} ms is "
        f"{round(mine['p50_ms'] / ray_row['p50_ms'], 2)}x Ray's {ray_row['p50_ms']} ms "
        "(goal <= 0.5x)",
    ]
    notes = [
        f"sequential tasks after {warm} warm-up each; {rounds} alternating blocks of {n}; "
        f"dask {dask.version} LocalCluster(2 worker processes, 1 thread each); "
        f"ray {ray.version} local (num_cpus=2), ray.get(f.remote())",
        "gpumesh: POST /tasks/submit + GET /tasks/{id}?wait=10 on one kept-alive connection; "
        f"the task is durable ({store_name(store)}) before the POST is answered",
        "cpu_ms_per_task: CPU of the system's processes per task (gpumesh: coordinator + "
        "client; dask: workers + the process holding client, scheduler and nannies; ray: "
        "driver, raylet, GCS, workers and agents)",
        "vs_*: the baseline's time over gpumesh's (above 1: gpumesh is faster)",
    ]
    columns = [
        "system",
        "tasks",
        "p50_ms",
        "p90_ms",
        "p99_ms",
        "max_ms",
        "vs_dask_p50",
        "vs_dask_p99",
        "vs_ray_p50",
        "vs_ray_p99",
        "cpu_ms_per_task",
    ]
    return Result("roundtrip", [mine, ray_row, base], columns, notes, goals)

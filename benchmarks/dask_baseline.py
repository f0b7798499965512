"""The Dask baselines, run in their own process: `python -m benchmarks.dask_baseline MODE N`.

A `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`, what the issue names.
MODE `roundtrip`: N sequential `client.submit(noop, pure=False).result()` after a warm-up;
prints the latencies (ns) as JSON. MODE `throughput`: N no-op tasks with `client.map`,
then `client.gather`, best of a few rounds after a warm-up round; prints tasks/s as JSON.
Dask is the `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time
from typing import Any


def noop(*_: Any) -> None:
    return None


def _cluster() -> Any:
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2,
        threads_per_worker=1,
        processes=True,
        dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    return cluster, Client(cluster)


def pids(client: Any) -> list[int]:
    """Dask's processes: this one (client, scheduler, nannies) and the two workers."""
    return [os.getpid(), *client.run(os.getpid).values()]


def roundtrip(n: int, warm: int) -> list[int]:
    cluster, client = _cluster()
    try:
        for _ in range(warm):
            client.submit(noop, pure=False).result()
        samples = []
        for _ in range(n):
            t0 = time.perf_counter_ns()
            client.submit(noop, pure=False).result()
            samples.append(time.perf_counter_ns() - t0)
        return samples
    finally:
        client.close()
        cluster.close()


def throughput(n: int, rounds: int = 3) -> dict[str, Any]:
    cluster, client = _cluster()
    try:
        client.gather(client.map(noop, range(200), pure=False))  # warm-up
        rates = []
        for r in range(rounds):
            t0 = time.perf_counter()
            futures = client.map(noop, range(r * n, (r + 1) * n), pure=False)
            client.gather(futures)
            rates.append(n / (time.perf_counter() - t0))
            del futures
        return {"tasks_per_s": max(rates), "rounds": [round(x) for x in rates]}
    finally:
        client.close()
        cluster.close()


def version() -> str:
    import distributed

    return str(distributed.__version__)


def main(argv: list[str]) -> None:
    mode, n = argv[0], int(argv[1])
    if mode == "roundtrip":
        doc: Any = {"samples_ns": roundtrip(n, int(argv[2]) if len(argv) > 2 else 50)}
    elif mode == "throughput":
        doc = throughput(n)
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    doc["version"] = version()
    print(json.dumps(doc))


if __name__ == "__main__":
    main(sys.argv[1:])

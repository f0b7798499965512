"""The Dask baseline, in its own process: `python -m benchmarks.dask_baseline`.

A `LocalCluster(n_workers=2, threads_per_worker=1, processes=True)`, what issue 7 names, and
its client, as a Dask user would run them; nothing is durable. The process answers the
commands of benchmarks/baseline_proc.py (`roundtrip N`: N sequential
`client.submit(noop, pure=False).result()`; `throughput N`: N no-op tasks with
`client.map`, then `client.gather`; `pids`: this process (client, scheduler, nannies) and
the workers). In its own process, Dask's client and scheduler threads no longer compete for
the load generator's GIL. Dask is the `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

import itertools
import logging
from typing import Any

from benchmarks.baseline_proc import BaselineProcess, serve


def noop(*_: Any) -> None:
    return None


def _serve() -> None:
    import distributed
    from dask.distributed import Client, LocalCluster

    cluster = LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
        silence_logs=logging.ERROR,
    )
    client = Client(cluster)
    keys = itertools.count()  # fresh arguments every round: nothing is served from a cache

    def throughput(n: int) -> None:
        start = next(keys) * n
        client.gather(client.map(noop, range(start, start + n), pure=False))

    try:
        for _ in range(50):
            client.submit(noop, pure=False).result()
        throughput(200)  # workers up and warm
        serve(distributed.__version__, lambda: client.submit(noop, pure=False).result(),
              throughput)
    finally:
        client.close()
        cluster.close()


class DaskBaseline(BaselineProcess):
    MODULE = "benchmarks.dask_baseline"


if __name__ == "__main__":
    _serve()

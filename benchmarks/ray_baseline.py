"""The Ray baseline, in its own process: `python -m benchmarks.ray_baseline`.

Ray local, as its users start it: `ray.init(num_cpus=2)` (no dashboard), a no-op
`@ray.remote` function, its native path `f.remote()` + `ray.get`. Nothing is durable. The
process answers the commands of benchmarks/baseline_proc.py (`roundtrip N`: N sequential
`ray.get(noop.remote())`; `throughput N`: N `noop.remote()` then one `ray.get` of them all;
`pids`), so the benchmarks measure Ray in blocks between their own, and its threads and
start-up (a few seconds) stay out of the load generator.

Ray is the `bench` extra: `pip install -e '.[bench]'`.
"""

from __future__ import annotations

from typing import Any

from benchmarks.baseline_proc import BaselineProcess, serve


def _serve() -> None:
    import ray

    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False,
             configure_logging=False)

    @ray.remote
    def noop(*_: Any) -> None:
        return None

    ray.get([noop.remote() for _ in range(200)])  # workers up and warm
    serve(ray.__version__, lambda: ray.get(noop.remote()),
          lambda n: ray.get([noop.remote() for _ in range(n)]))
    ray.shutdown()


class RayBaseline(BaselineProcess):
    MODULE = "benchmarks.ray_baseline"
    ENV = {"RAY_USAGE_STATS_ENABLED": "0"}


if __name__ == "__main__":
    _serve()

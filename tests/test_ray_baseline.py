"""The Ray baseline of `roundtrip` and `throughput` starts, answers and goes away.

Only when Ray is installed (the `bench` extra); about 5 s, most of it Ray's own start-up.
"""

from __future__ import annotations

import psutil
import pytest

pytest.importorskip("ray")

from benchmarks.ray_baseline import RayBaseline  # noqa: E402


@pytest.mark.slow
def test_ray_baseline_measures_and_stops_its_processes() -> None:
    ray = RayBaseline()
    try:
        pids = ray.pids()
        assert len(pids) > 2  # the driver and what Ray started (raylet, GCS, workers)
        samples = ray.roundtrip(5)
        assert len(samples) == 5 and all(s > 0 for s in samples)
        assert ray.throughput(50) > 0
    finally:
        ray.close()
    assert not [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

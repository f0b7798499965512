"""The Ray and Dask baselines of `roundtrip` and `throughput` start, answer and go away.

Only when Ray (and Dask) are installed (the `bench` extra); about 5 s each, mostly start-up.
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


@pytest.mark.slow
def test_dask_baseline_runs_in_its_own_process() -> None:
    """Dask's client and scheduler live in a child of their own, like Ray's driver: none of
    their threads share the load generator's interpreter (benchmarks/baseline_proc.py)."""
    pytest.importorskip("distributed")
    import os

    from benchmarks.dask_baseline import DaskBaseline

    dask = DaskBaseline()
    try:
        pids = dask.pids()
        assert os.getpid() not in pids and len(pids) >= 3  # the child and its two workers
        assert len(dask.roundtrip(5)) == 5
        assert dask.throughput(50) > 0
    finally:
        dask.close()
    assert not [p for p in pids if psutil.pid_exists(p) and
                psutil.Process(p).status() != psutil.STATUS_ZOMBIE]

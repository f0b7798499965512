"""The loop-only counters and histograms expose what prometheus_client's would."""

from __future__ import annotations

import random

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from coordinator.core.metrics import LoopCounter, LoopHistogram, MeshMetrics, _LoopSeries

BUCKETS = (0.001, 0.01, 0.1, 1, 10)


def _samples(registry: CollectorRegistry, suffixes: tuple[str, ...]) -> list[str]:
    text = generate_latest(registry).decode()
    return sorted(line for line in text.splitlines()
                  if not line.startswith("#") and line.split("{")[0].endswith(suffixes))


def test_same_samples_as_the_client_library() -> None:
    theirs, ours = CollectorRegistry(), CollectorRegistry()
    h = Histogram("x_seconds", "doc", ["kind"], buckets=BUCKETS, registry=theirs)
    c = Counter("x_events", "doc", ["kind"], registry=theirs)
    lh = LoopHistogram("x_seconds", "doc", ["kind"], BUCKETS)
    lc = LoopCounter("x_events", "doc", ["kind"])
    ours.register(_LoopSeries([lh, lc]))
    rng = random.Random(7)
    values = [0.0, 0.001, 0.01, 1, 10, 10.5, -1.0, *(rng.uniform(0, 20) for _ in range(500))]
    for i, v in enumerate(values):
        kind = "ab"[i % 2]
        h.labels(kind).observe(max(0.0, v))  # the Mesh never observes below 0
        lh.observe((kind,), v)
        c.labels(kind).inc()
        lc.inc((kind,))
    mine = _samples(ours, ("_bucket", "_count", "_total"))
    assert mine == _samples(theirs, ("_bucket", "_count", "_total"))
    sums = {line.rsplit(" ", 1)[0]: float(line.rsplit(" ", 1)[1])
            for line in _samples(theirs, ("_sum",))}
    for line in _samples(ours, ("_sum",)):
        key, value = line.rsplit(" ", 1)
        assert abs(sums[key] - float(value)) < 1e-9
    assert lh.count("a") == len(values[::2]) and lc.value("b") == len(values[1::2])


def test_mesh_series_start_at_zero() -> None:
    """Every task type's submitted and finished series exist before the first task, so
    rate() and the failure alert see the first one."""
    text = generate_latest(MeshMetrics().registry).decode()
    assert 'gpumesh_tasks_submitted_total{task_type="training"} 0.0' in text
    assert 'gpumesh_tasks_finished_total{status="failed",task_type="custom"} 0.0' in text

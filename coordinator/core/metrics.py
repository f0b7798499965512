"""Prometheus metrics: counters and histograms the Mesh feeds, gauges read at scrape time.

Each app gets its own `CollectorRegistry` (no module-level globals), so two coordinators
in one test process never share counters. Gauges are computed from the Mesh's state when
Prometheus scrapes, so they cannot drift from the truth.
"""

from __future__ import annotations

import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping
from typing import TYPE_CHECKING, Protocol

from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector
from prometheus_client.utils import floatToGoString

from coordinator.scheduling.tenants import TENANT_LABEL, TENANT_SERIES, tenant_gauges
from shared.tasks import TASK_TYPES

if TYPE_CHECKING:
    from coordinator.model import Node, TaskState
    from coordinator.scheduling.tenants import Tenants

# Typed here: prometheus_client leaves it unannotated. "+Inf", "1.0", "2.5e-05"...
_go_float: Callable[[float], str] = floatToGoString

_LATENCY = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10)
_TASK_TIME = (0.01, 0.05, 0.1, 0.5, 1, 5, 10, 30, 60, 300, 900, 3600, 4 * 3600, 24 * 3600)
BANDS = ("low", "normal", "high", "critical")


class MeshMetrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        # The per-task and per-commit series are fed on the event loop only: plain numbers
        # there (LoopCounter, LoopHistogram), read at scrape time, cost no lock per update.
        self.submitted = LoopCounter("gpumesh_tasks_submitted", "Tasks accepted", ["task_type"])
        self.finished = LoopCounter(
            "gpumesh_tasks_finished", "Tasks finished", ["task_type", "status"]
        )
        self.reassignments = Counter(
            "gpumesh_reassignments", "Tasks requeued after their node was lost", registry=r
        )
        self.stale_messages = Counter(
            "gpumesh_stale_messages", "Messages refused by attempt fencing", ["kind"], registry=r
        )
        self.bad_messages = Counter(
            "gpumesh_bad_messages", "WebSocket frames that did not decode", registry=r
        )
        self.infra_failures = Counter(
            "gpumesh_infra_failures", "Attempts ended by their node's fault (requeued)",
            ["node"], registry=r,
        )
        self.infra_losses = Counter(
            "gpumesh_infra_losses",
            "Attempts lost to infrastructure (node fault, client restart): requeued without "
            "spending max_attempts", ["node"], registry=r,
        )
        self.loop_stalls = Counter(
            "gpumesh_loop_stalls", "Coordinator event-loop stalls (lag over MESH_STALL_S)",
            registry=r,
        )
        self.store_failures = Counter(
            "gpumesh_store_failures",
            "Store writes that failed; each made the mesh rebuild from the store", registry=r,
        )
        self.wait = LoopHistogram(
            "gpumesh_task_wait_seconds", "Submit to assignment", ["task_type"], _TASK_TIME
        )
        self.run = LoopHistogram(
            "gpumesh_task_run_seconds", "Start to finish", ["task_type"], _TASK_TIME
        )
        self.dispatch = LoopHistogram(
            "gpumesh_dispatch_latency_seconds", "One dispatch pass, placement to durable", [],
            _LATENCY,
        )
        self.store_write = LoopHistogram(
            "gpumesh_store_write_seconds", "One store commit (a batch of writes)", [], _LATENCY
        )
        self.store_batch = LoopHistogram(
            "gpumesh_store_batch_size", "Writes per store commit", [],
            (1, 2, 5, 10, 20, 50, 100, 200, 500, 1000),
        )
        r.register(_LoopSeries([self.submitted, self.finished, self.wait, self.run,
                                self.dispatch, self.store_write, self.store_batch]))
        # Start labelled counters at 0: rate() and increase() ignore a series' first sample,
        # so a counter born at 1 would hide the first failure from the failure-rate alert.
        for task_type in TASK_TYPES:
            self.submitted.inc((task_type,), 0)
            for status in ("completed", "failed", "cancelled"):
                self.finished.inc((task_type, status), 0)
        for kind in ("register", "task_accepted", "task_started", "task_log", "task_result"):
            self.stale_messages.labels(kind)

    # Called by the Mesh (and the store), on the event loop ------------------------------

    def task_submitted(self, task_type: str) -> None:
        self.submitted.inc((task_type,))

    def task_waited(self, task_type: str, seconds: float) -> None:
        self.wait.observe((task_type,), seconds)

    def task_finished(self, task_type: str, status: str, run_s: float | None) -> None:
        self.finished.inc((task_type, status))
        if run_s is not None:
            self.run.observe((task_type,), run_s)

    def reassigned(self) -> None:
        self.reassignments.inc()

    def infra_failed(self, node: str) -> None:
        self.infra_failures.labels(node).inc()

    def infra_lost(self, node: str) -> None:
        self.infra_losses.labels(node).inc()

    def stale(self, kind: str) -> None:
        self.stale_messages.labels(kind).inc()

    def dispatched(self, seconds: float, count: int) -> None:
        self.dispatch.observe((), seconds)

    def store_committed(self, seconds: float, writes: int) -> None:
        self.store_write.observe((), seconds)
        self.store_batch.observe((), writes)

    def watch(self, mesh: Watched, ws_connections: Callable[[], int]) -> None:
        self.registry.register(_MeshGauges(mesh, ws_connections))

    def exposition(self, per_tenant: bool) -> bytes:
        """`GET /metrics`: every series (`per_tenant`: an admin or a `metrics` token), else
        all but those that name a tenant; global counts stay in both."""
        return generate_latest(self.registry if per_tenant else _NoTenants(self.registry))


class LoopCounter:
    """A labelled counter updated only on the event loop: a dict of floats, no lock.

    `prometheus_client.Counter` takes a lock per `inc`; with four series touched per task
    that was a few per cent of the coordinator's CPU at full load (issue 16). Exposed as
    `<name>_total` and `<name>_created`, as the client library does."""

    def __init__(self, name: str, doc: str, labels: list[str]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.values: dict[tuple[str, ...], float] = {}
        self.created: dict[tuple[str, ...], float] = {}

    def inc(self, key: tuple[str, ...], amount: float = 1) -> None:
        value = self.values.get(key)
        if value is None:
            self.created[key] = time.time()
            value = 0.0
        self.values[key] = value + amount

    def value(self, *key: str) -> float:
        return self.values.get(key, 0.0)

    def family(self) -> Metric:
        family = CounterMetricFamily(self.name, self.doc, labels=self.labels)
        for key, value in list(self.values.items()):
            family.add_metric(list(key), value, created=self.created[key])
        return family


class LoopHistogram:
    """A histogram updated only on the event loop: per series, a list of bucket counts and
    a sum, no lock; cumulative only when scraped."""

    def __init__(self, name: str, doc: str, labels: list[str],
                 buckets: tuple[float, ...]) -> None:
        self.name, self.doc, self.labels = name, doc, labels
        self.bounds = [float(b) for b in buckets]
        self.les = [_go_float(b) for b in self.bounds] + ["+Inf"]
        self.series: dict[tuple[str, ...], list[float]] = {}  # counts..., then the sum

    def observe(self, key: tuple[str, ...], amount: float) -> None:
        counts = self.series.get(key)
        if counts is None:
            counts = self.series[key] = [0.0] * (len(self.bounds) + 2)
        amount = max(0.0, amount)
        counts[bisect_left(self.bounds, amount)] += 1
        counts[-1] += amount

    def count(self, *key: str) -> float:
        counts = self.series.get(key)
        return sum(counts[:-1]) if counts else 0.0

    def family(self) -> Metric:
        family = HistogramMetricFamily(self.name, self.doc, labels=self.labels)
        for key, counts in list(self.series.items()):
            running, buckets = 0.0, []
            for le, n in zip(self.les, counts[:-1], strict=True):
                running += n
                buckets.append((le, running))
            family.add_metric(list(key), buckets, counts[-1])
        return family


class _LoopSeries(Collector):
    def __init__(self, series: list[LoopCounter | LoopHistogram]) -> None:
        self.series = series

    def collect(self) -> Iterator[Metric]:
        for one in self.series:
            yield one.family()


class _NoTenants(Collector):
    """A registry's families less the per-tenant ones (by name, or by a `tenant` label on
    any sample, so a tenant series added later is left out without being listed here)."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if family.name in TENANT_SERIES or any(
                TENANT_LABEL in s.labels for s in family.samples
            ):
                continue
            yield family


class LoopLag(Protocol):
    """The Mesh's event-loop lag (coordinator/core/faults.py `LoopWatch`)."""

    @property
    def lag(self) -> float: ...
    @property
    def max_lag(self) -> float: ...


class Watched(Protocol):
    """What the gauges read on the Mesh (coordinator/core/mesh.py) when Prometheus scrapes."""

    @property
    def nodes(self) -> Mapping[str, Node]: ...
    @property
    def queued_by_band(self) -> Mapping[str, int]: ...
    @property
    def state_counts(self) -> Mapping[TaskState, int]: ...
    @property
    def loop_watch(self) -> LoopLag: ...
    @property
    def fair(self) -> Tenants: ...
    @property
    def gpu_seconds(self) -> Mapping[str, float]: ...
    @property
    def preempted_total(self) -> int: ...


class _MeshGauges(Collector):
    def __init__(self, mesh: Watched, ws_connections: Callable[[], int]) -> None:
        self.mesh = mesh
        self.ws_connections = ws_connections

    def collect(self) -> Iterator[Metric]:
        mesh = self.mesh
        nodes = GaugeMetricFamily("gpumesh_nodes", "Nodes by status", labels=["status"])
        by_status = {"online": 0, "disconnected": 0, "lost": 0}
        up = GaugeMetricFamily("gpumesh_node_up", "1 if the node is online", labels=["node"])
        gpu_labels = ["node", "gpu", "name"]
        mem_total = GaugeMetricFamily(
            "gpumesh_gpu_memory_total_bytes", "GPU memory", labels=gpu_labels
        )
        mem_used = GaugeMetricFamily(
            "gpumesh_gpu_memory_used_bytes", "GPU memory in use", labels=gpu_labels
        )
        util = GaugeMetricFamily(
            "gpumesh_gpu_utilization_percent", "GPU utilisation", labels=gpu_labels
        )
        temp = GaugeMetricFamily(
            "gpumesh_gpu_temperature_celsius", "GPU temperature", labels=gpu_labels
        )
        power = GaugeMetricFamily("gpumesh_gpu_power_watts", "GPU power draw", labels=gpu_labels)
        gpus_total = vram_total = vram_used = 0
        for node in mesh.nodes.values():
            by_status[node.status] = by_status.get(node.status, 0) + 1
            up.add_metric([node.name], 1.0 if node.online else 0.0)
            if not node.online:
                continue
            for g in node.gpus:
                labels = [node.name, str(g.index), g.name]
                gpus_total += 1
                vram_total += g.memory_total_mb
                vram_used += g.memory_used_mb
                mem_total.add_metric(labels, g.memory_total_mb * 2**20)
                mem_used.add_metric(labels, g.memory_used_mb * 2**20)
                util.add_metric(labels, g.utilization_pct)
                if g.temperature_c is not None:
                    temp.add_metric(labels, g.temperature_c)
                if g.power_w is not None:
                    power.add_metric(labels, g.power_w)
        for status, n in by_status.items():
            nodes.add_metric([status], n)
        yield nodes
        yield up
        yield GaugeMetricFamily("gpumesh_gpus_total", "GPUs on online nodes", value=gpus_total)
        yield GaugeMetricFamily(
            "gpumesh_vram_total_bytes", "VRAM on online nodes", value=vram_total * 2**20
        )
        yield GaugeMetricFamily(
            "gpumesh_vram_used_bytes", "VRAM in use on online nodes", value=vram_used * 2**20
        )
        yield from (mem_total, mem_used, util, temp, power)
        depth = GaugeMetricFamily(
            "gpumesh_queue_depth", "Queued tasks by priority band", labels=["band"]
        )
        for band in BANDS:
            depth.add_metric([band], mesh.queued_by_band[band])
        yield depth
        tasks = GaugeMetricFamily("gpumesh_tasks", "Unfinished tasks by state", labels=["state"])
        for state in ("queued", "assigned", "running"):
            tasks.add_metric([state], sum(n for s, n in mesh.state_counts.items() if s == state))
        yield tasks
        yield GaugeMetricFamily(
            "gpumesh_ws_connections", "Open node WebSockets", value=self.ws_connections()
        )
        yield from _fault_gauges(mesh)
        # coordinator/scheduling/tenants.py
        yield from tenant_gauges(mesh.fair, mesh.gpu_seconds, mesh.preempted_total)


def _fault_gauges(mesh: Watched) -> Iterator[Metric]:
    quarantined = GaugeMetricFamily(
        "gpumesh_node_quarantined", "1 if the node is quarantined or reports itself unhealthy",
        labels=["node"],
    )
    faulted = GaugeMetricFamily(
        "gpumesh_gpu_faulted", "1 for a GPU taken out by a driver-reported fault",
        labels=["node", "gpu"],
    )
    for node in mesh.nodes.values():
        why = node.quarantine_reason or node.health
        quarantined.add_metric([node.name], 1.0 if why else 0.0)
        for g in node.gpus:
            if g.fault:
                faulted.add_metric([node.name, str(g.index)], 1.0)
    yield quarantined
    yield faulted
    watch = mesh.loop_watch
    yield GaugeMetricFamily(
        "gpumesh_loop_lag_seconds", "How late the coordinator's liveness timer last fired",
        value=watch.lag,
    )
    yield GaugeMetricFamily(
        "gpumesh_loop_lag_max_seconds", "The largest event-loop lag seen", value=watch.max_lag
    )

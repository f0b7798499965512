"""Prometheus series of model services (issue 27), per tenant and service.

Every series carries a `tenant` label, so `/metrics` shows them only to an admin or a
`metrics` token (coordinator/core/metrics.py `_NoTenants`, docs/security.md "Tenant
privacy"). Counters and histograms are fed on the event loop (the router's `finished`, the
control plane's scaling); replicas by state are read from the services when scraped.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from typing import Protocol

from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from coordinator.core.metrics import LoopCounter, LoopHistogram

_TTFT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
_TOKENS_PER_S = (1, 5, 10, 25, 50, 100, 250, 500, 1000, 2500)
STATES = ("starting", "ready", "unhealthy", "stopping")
LABELS = ["tenant", "service"]


class ReplicaView(Protocol):
    @property
    def state(self) -> str: ...


class ServiceView(Protocol):
    @property
    def tenant(self) -> str: ...
    @property
    def name(self) -> str: ...
    @property
    def desired(self) -> int: ...

    def states(self) -> Iterable[str]: ...


class ServiceMetrics(Collector):
    def __init__(self) -> None:
        self.requests = LoopCounter(
            "gpumesh_service_requests", "Requests routed to a service, by HTTP status class",
            [*LABELS, "status"])
        self.errors = LoopCounter(
            "gpumesh_service_errors", "Requests to a service that ended with status >= 500",
            LABELS)
        self.ttft = LoopHistogram(
            "gpumesh_service_ttft_seconds", "Time to a response's first byte from a replica",
            LABELS, _TTFT)
        self.duration = LoopHistogram(
            "gpumesh_service_request_seconds", "Whole request time through the mesh", LABELS,
            _TTFT)
        self.tokens = LoopCounter(
            "gpumesh_service_completion_tokens", "Completion tokens the engines reported",
            LABELS)
        self.tokens_per_s = LoopHistogram(
            "gpumesh_service_tokens_per_second", "Completion tokens per second of a request",
            LABELS, _TOKENS_PER_S)
        self.scale_events = LoopCounter(
            "gpumesh_service_scale_events", "Replica count changes and restarts, by kind",
            [*LABELS, "kind"])
        self.stale_reports = 0  # `replica` reports of attempts that are not current
        self._services: Callable[[], Iterable[ServiceView]] = list

    def watch(self, services: Callable[[], Iterable[ServiceView]]) -> None:
        self._services = services

    def added(self, tenant: str, service: str) -> None:
        """A service's series start at 0 (rate() and increase() miss a series' first
        sample, so a counter born at 1 would hide the first request or error)."""
        key = (tenant, service)
        self.requests.inc((*key, "2xx"), 0)
        self.errors.inc(key, 0)
        self.tokens.inc(key, 0)
        for kind in ("up", "down", "restart"):
            self.scale_events.inc((*key, kind), 0)
        for hist in (self.ttft, self.duration, self.tokens_per_s):
            hist.series.setdefault(key, [0.0] * (len(hist.bounds) + 2))

    def request(self, tenant: str, service: str, status: int, ttft_s: float | None,
                duration_s: float, completion_tokens: int | None) -> None:
        key = (tenant, service)
        self.requests.inc((*key, f"{status // 100}xx"))
        if status >= 500:
            self.errors.inc(key)
        if ttft_s is not None:
            self.ttft.observe(key, ttft_s)
        self.duration.observe(key, duration_s)
        if completion_tokens:
            self.tokens.inc(key, completion_tokens)
            generating = duration_s - (ttft_s or 0.0)
            if generating > 0:
                self.tokens_per_s.observe(key, completion_tokens / generating)

    def summary(self, tenant: str, service: str) -> dict[str, float | None]:
        """Totals for views and the console: requests, errors, mean latency and TTFT (s)."""
        key = (tenant, service)
        total = self.duration.count(*key)
        ttft_n = self.ttft.count(*key)
        return {
            "total": total, "errors": self.errors.value(*key),
            "mean_s": _sum(self.duration, key) / total if total else None,
            "ttft_mean_s": _sum(self.ttft, key) / ttft_n if ttft_n else None,
            "completion_tokens": self.tokens.value(*key),
        }

    def scaled(self, tenant: str, service: str, kind: str) -> None:
        self.scale_events.inc((tenant, service, kind))

    def collect(self) -> Iterator[Metric]:
        for series in (self.requests, self.errors, self.ttft, self.duration, self.tokens,
                       self.tokens_per_s, self.scale_events):
            yield series.family()
        replicas = GaugeMetricFamily(
            "gpumesh_service_replicas", "Replicas of a service by state", labels=[*LABELS, "state"])
        desired = GaugeMetricFamily(
            "gpumesh_service_replicas_desired", "Replicas a service is scaled to", labels=LABELS)
        for svc in self._services():
            counts = dict.fromkeys(STATES, 0)
            for state in svc.states():
                counts[state] = counts.get(state, 0) + 1
            for state, n in counts.items():
                replicas.add_metric([svc.tenant, svc.name, state], n)
            desired.add_metric([svc.tenant, svc.name], svc.desired)
        yield replicas
        yield desired


def _sum(hist: LoopHistogram, key: tuple[str, ...]) -> float:
    counts = hist.series.get(key)
    return counts[-1] if counts else 0.0

"""Tenants: weights and quotas (durable in the store), rate limits, and the admin routes.

`Tenants` lives in the Mesh (`mesh.fair`) and is rebuilt with it: the configs are reloaded
from the store on every start; usage (decayed GPU-seconds) and the token buckets are
memory only and begin again at zero after a restart.

- A tenant without a stored config gets the defaults (`MESH_TENANT_DEFAULT_*`).
- `admit` (called by `POST /tasks/submit` before anything is stored): the tenant's
  `max_queued` (429, with the reason) and its rate (a token bucket: `rate` tasks per
  second, `burst` at once; 429 with `Retry-After`).
- `hold` (called by dispatch): the GPU, running and non-preemptible quotas.
- The admin routes are in coordinator/web/tenant_api.py.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import msgspec
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.metrics_core import Metric

from coordinator.model import ACTIVE, Task, TaskState
from coordinator.scheduling.fairshare import (
    Ledger,
    TenantConfig,
    choose,
    quota_hold,
    target_shares,
    tenant_of,
    weighted_jain,
)

if TYPE_CHECKING:
    from coordinator.settings import Settings

_dec = msgspec.json.Decoder(TenantConfig)


@dataclass(slots=True)
class TokenBucket:
    """`rate` tokens per second up to `burst`; `take(n, now)` returns 0.0 when it took
    them, else the seconds until `n` would be there. `now` is a monotonic clock."""

    rate: float
    burst: float
    tokens: float
    at: float

    def take(self, n: int, now: float) -> float:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate)
        self.at = now
        if self.tokens >= n:
            self.tokens -= n
            return 0.0
        return (n - self.tokens) / self.rate


def defaults_of(settings: Settings) -> TenantConfig:
    def limit(v: int) -> int | None:
        return v if v > 0 else None

    return TenantConfig(
        weight=settings.tenant_default_weight,
        max_gpus=limit(settings.tenant_default_max_gpus),
        max_running=limit(settings.tenant_default_max_running),
        max_queued=limit(settings.tenant_default_max_queued),
        rate=settings.tenant_default_rate or None,
        burst=limit(settings.tenant_default_burst),
        max_nonpreemptible=limit(settings.tenant_default_max_nonpreemptible),
    )


class Tenants:
    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        self.clock = clock  # wall time; the simulator's virtual clock (coordinator/sim/)
        self.defaults = defaults_of(settings)
        self.configs: dict[str, TenantConfig] = {}
        self.ledger = Ledger(settings.fairshare_halflife_s)
        self.buckets: dict[str, TokenBucket] = {}
        self.weights = _Weights(self)
        self._notes: dict[str, tuple[float, str]] = {}  # tenant -> (when, share note)

    def config(self, tenant: str) -> TenantConfig:
        return self.configs.get(tenant) or self.defaults

    def load(self, rows: Iterable[tuple[str, bytes]]) -> None:
        for name, raw in rows:
            self.configs[name] = _dec.decode(raw)

    def set(self, name: str, config: TenantConfig) -> None:
        self.configs[name] = config
        self.buckets.pop(name, None)  # the next submission starts a bucket at the new rate

    # --- dispatch --------------------------------------------------------------------

    def choose(self, candidates: Iterable[str]) -> str:
        return choose(candidates, self.ledger, self.weights, self.clock())

    def hold(self, t: Task) -> str:
        """Why `t` may not be placed now under its tenant's quotas ("" when it may)."""
        tenant = tenant_of(t.tenant)
        config = self.config(tenant)
        if config is self.defaults and not _limits(config):
            return ""
        gpus = t.spec.requirements.gpu_count * t.gang_size  # a gang's GPUs count in full
        if t.gang_size > 1 and config.max_running is not None:
            running = (use.running if (use := self.ledger.use.get(tenant)) is not None else 0)
            if running + t.gang_size > config.max_running:  # each member runs
                return (f"tenant {tenant} is at its quota of {config.max_running} running "
                        f"tasks (this gang runs {t.gang_size})")
        return quota_hold(config, self.ledger.use.get(tenant), gpus, t.spec.preemptible, tenant)

    def count(self, t: Task, prev: TaskState | None, to: TaskState) -> bool:
        """Follow one transition; True when the tenant let go of something (its classes
        held by a quota may now fit)."""
        tenant = tenant_of(t.tenant)
        if prev is TaskState.QUEUED:
            self.ledger.queue(tenant, -1)
        if to is TaskState.QUEUED:
            self.ledger.queue(tenant, 1)
        if t.gang_size > 1:  # a gang's members hold its GPUs and run; it holds nothing itself
            return False
        if to in ACTIVE and prev not in ACTIVE:
            self.ledger.start(t.id, tenant, len(t.gpu_indices), self.clock(), t.spec.preemptible)
        elif prev in ACTIVE and to not in ACTIVE:
            return self.ledger.stop(t.id, self.clock()) is not None
        return False

    # --- submission ------------------------------------------------------------------

    def admit(self, tenant: str, n: int, now: float) -> tuple[str, float | None]:
        """Whether `n` more tasks of `tenant` may be queued: ("", None) when they may, else
        (why, seconds to wait or None when waiting alone will not help)."""
        tenant = tenant_of(tenant)
        config = self.config(tenant)
        if config.max_queued is not None:
            use = self.ledger.use.get(tenant)
            queued = use.queued if use is not None else 0
            if queued + n > config.max_queued:
                return (f"tenant {tenant} has {queued} tasks queued; its quota is "
                        f"{config.max_queued} (max_queued)", 5.0)
        if config.rate is None:
            return "", None
        burst = float(config.burst or max(1, math.ceil(config.rate)))
        if n > burst:
            return (f"a batch of {n} is over tenant {tenant}'s burst of {burst:g} "
                    "submissions; send smaller batches", None)
        bucket = self.buckets.get(tenant)
        if bucket is None:
            bucket = self.buckets[tenant] = TokenBucket(config.rate, burst, burst, now)
        wait = bucket.take(n, now)
        if wait:
            return (f"tenant {tenant} is over its rate of {config.rate:g} submissions/s "
                    f"(burst {burst:g})", wait)
        return "", None

    def admit_many(self, tenants: list[str], now: float) -> tuple[str, float | None]:
        """`admit` for a batch, tenant by tenant (an admin's batch may name several)."""
        for tenant, n in Counter(tenant_of(t) for t in tenants).items():
            why, wait = self.admit(tenant, n, now)
            if why:
                return why, wait
        return "", None

    def share_note(self, tenant: str, now: float) -> str:
        """For a queued task's reason: "" unless other tenants with queued work are behind
        `tenant` in fair share (then their work goes first). Cached for a second: the
        reasons of a long backlog cost O(1) each."""
        tenant = tenant_of(tenant)
        cached = self._notes.get(tenant)
        if cached is not None and now - cached[0] < 1.0:
            return cached[1]
        waiting = [k for k, u in self.ledger.use.items() if u.queued]
        note = ""
        if len(waiting) > 1 and tenant in waiting:
            usage = {k: self.ledger.usage(k, now) for k in waiting}
            total = sum(usage.values())
            target = target_shares(waiting, self.weights)[tenant]
            if total > 0 and usage[tenant] / total > target:
                note = (f"; fair share: tenant {tenant} has had {usage[tenant] / total:.0%} of "
                        f"recent GPU time among tenants with queued work, for a {target:.0%} "
                        f"share (weight {self.config(tenant).weight:g}): theirs goes first")
        self._notes[tenant] = (now, note)
        return note

    def check(self, tasks: Iterable[Task]) -> None:
        """The ledger agrees with the tasks: what each tenant holds and has queued."""
        held: dict[str, list[int]] = {}
        queued: Counter[str] = Counter()
        for t in tasks:
            if t.state in ACTIVE and t.gang_size == 1:  # a gang holds through its members
                held[t.id] = [len(t.gpu_indices)]
            elif t.state is TaskState.QUEUED:
                queued[tenant_of(t.tenant)] += 1
        assert set(self.ledger.holds) == set(held), ("ledger holds", set(self.ledger.holds)
                                                     ^ set(held))
        gpus: Counter[str] = Counter()
        for task_id, hold in self.ledger.holds.items():
            assert hold.gpus == held[task_id][0], ("ledger GPUs of", task_id)
            gpus[hold.tenant] += hold.gpus
        for tenant, use in self.ledger.use.items():
            assert use.queued == queued[tenant], ("queued of tenant", tenant, use.queued)
            assert use.gpus == gpus[tenant], ("GPUs of tenant", tenant, use.gpus)

    # --- views -----------------------------------------------------------------------

    def names(self) -> list[str]:
        return sorted(set(self.configs) | set(self.ledger.use))

    def view(self, name: str, gpu_seconds: float = 0.0) -> dict[str, Any]:
        now = time.time()
        use = self.ledger.use.get(name)
        active = [k for k, u in self.ledger.use.items() if u.queued or u.running]
        usage = {k: self.ledger.usage(k, now) for k in self.ledger.use}
        total = sum(usage.values())
        config = self.config(name)
        return {
            "name": name,
            "configured": name in self.configs,
            "weight": config.weight,
            "quota": msgspec.to_builtins(config) | {"weight": config.weight},
            "usage_gpu_s": round(usage.get(name, 0.0), 3),
            "gpu_seconds": round(gpu_seconds, 3),
            "share": round(usage.get(name, 0.0) / total, 4) if total else 0.0,
            "target_share": round(target_shares(active, self.weights).get(name, 0.0), 4),
            "gpus": use.gpus if use else 0,
            "running": use.running if use else 0,
            "queued": use.queued if use else 0,
            "nonpreemptible_gpus": use.nonpreemptible_gpus if use else 0,
        }


class _Weights(Mapping[str, float]):
    """A tenant's weight, looked up lazily: every tenant has one (its config's, or the
    default's), so `get` and `[]` never miss; iterating names the configured tenants."""

    def __init__(self, tenants: Tenants) -> None:
        self._t = tenants

    def get(self, tenant: str, default: object = None) -> float:
        return self._t.config(tenant).weight

    def __getitem__(self, tenant: str) -> float:
        return self.get(tenant)

    def __iter__(self) -> Iterator[str]:
        return iter(self._t.configs)

    def __len__(self) -> int:
        return len(self._t.configs)


def _limits(config: TenantConfig) -> bool:
    return any(v is not None for v in (config.max_gpus, config.max_running,
                                       config.max_nonpreemptible))


def weighted_fairness(fair: Tenants, gpu_seconds: Mapping[str, float]) -> dict[str, Any]:
    """Added to `/mesh/status` `fairness`: Jain's index over GPU-seconds per weight."""
    jain = weighted_jain(dict(gpu_seconds), fair.weights)
    return {
        "weighted_jain_index": round(jain, 4) if jain is not None else None,
        "weights": {k: fair.config(k).weight for k in sorted(gpu_seconds)},
    }


# The series that name a tenant: in /metrics only for an admin or a `metrics` token (a read
# or submit token gets the rest, global counts included; coordinator/core/metrics.py).
TENANT_LABEL = "tenant"
TENANT_SERIES = frozenset({"gpumesh_tenant_gpus", "gpumesh_tenant_queued",
                           "gpumesh_tenant_usage_gpu_seconds"})


def tenant_gauges(
    fair: Tenants, gpu_seconds: Mapping[str, float], preempted_total: int
) -> Iterator[Metric]:
    """The tenants' Prometheus series, read at scrape time (coordinator/core/metrics.py):
    global ones, and per tenant (TENANT_SERIES, labelled TENANT_LABEL)."""
    jain = weighted_jain(dict(gpu_seconds), fair.weights)
    yield GaugeMetricFamily(
        "gpumesh_fairness_weighted_jain", "Jain's index over GPU-seconds per tenant weight",
        value=jain if jain is not None else math.nan,
    )
    labels = [TENANT_LABEL]
    gauges = {
        "gpus": GaugeMetricFamily("gpumesh_tenant_gpus", "GPUs held by a tenant's tasks",
                                  labels=labels),
        "queued": GaugeMetricFamily("gpumesh_tenant_queued", "A tenant's queued tasks",
                                    labels=labels),
        "usage_gpu_s": GaugeMetricFamily(
            "gpumesh_tenant_usage_gpu_seconds", "A tenant's decayed GPU-seconds",
            labels=labels),
    }
    for name in fair.names():
        view = fair.view(name)
        for key, family in gauges.items():
            family.add_metric([name], view[key])
    yield from gauges.values()
    yield CounterMetricFamily(
        "gpumesh_preemptions", "Running tasks stopped and requeued for critical work",
        value=preempted_total,
    )

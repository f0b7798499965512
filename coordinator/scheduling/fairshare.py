"""Weighted fair share and tenant quotas: the pure part (no I/O; every clock is an argument).

- `TenantConfig`: a tenant's weight and quotas (None: unlimited), as stored and as sent to
  `PUT /admin/tenants/{name}`.
- `Ledger`: what each tenant holds now (GPUs, running tasks, queued tasks, non-preemptible
  work) and its usage: GPU-seconds decayed with a half-life, like Slurm's fair-share factor.
  Work still running counts what it has used so far. Every update is O(1).
- `choose`: which tenant's work goes next: the lowest usage per unit of weight (Slurm's
  U/S), then the fewest held GPUs per weight, then the name. With equal task lengths and a
  full backlog, each tenant's GPU-seconds converge to its weight's share.
- `quota_hold`: why a task may not be placed now because of its tenant's quotas ("" when
  it may).
- `weighted_jain`: Jain's index over usage per unit of weight: 1.0 when every tenant got
  exactly its weight's share, 1/n when one tenant took everything.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Annotated

import msgspec

DEFAULT_TENANT = "default"  # the tenant of work submitted without one (MESH_AUTH=off, admin)

Limit = Annotated[int, msgspec.Meta(ge=0, le=10**9)] | None


class TenantConfig(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """A tenant's share and quotas; None is unlimited."""

    weight: Annotated[float, msgspec.Meta(gt=0, le=1e6)] = 1.0
    max_gpus: Limit = None  # GPUs its tasks hold at once
    max_running: Limit = None  # its tasks placed on nodes at once
    max_queued: Limit = None  # its tasks waiting; a submission past it gets 429
    rate: Annotated[float, msgspec.Meta(gt=0, le=1e6)] | None = None  # submissions per second
    burst: Annotated[int, msgspec.Meta(ge=1, le=10**6)] | None = None  # bucket size; default rate
    max_nonpreemptible: Limit = None  # GPUs held by its `preemptible: false` tasks


def tenant_of(tenant: str) -> str:
    return tenant or DEFAULT_TENANT


def decayed(value: float, since: float, now: float, half_life_s: float) -> float:
    """`value` recorded at `since`, seen at `now`: halved every `half_life_s` (0: never)."""
    if half_life_s <= 0 or now <= since or value == 0:
        return value
    return value * math.exp2(-(now - since) / half_life_s)


@dataclass(slots=True)
class TenantUse:
    past: float = 0.0  # decayed GPU-seconds of finished holds, as of `past_at`
    past_at: float = 0.0
    gpus: int = 0  # GPUs held now
    since_sum: float = 0.0  # sum of gpus * hold start over current holds
    running: int = 0  # tasks placed now
    queued: int = 0
    nonpreemptible_gpus: int = 0

    def usage(self, now: float, half_life_s: float) -> float:
        """Decayed GPU-seconds, the current holds' time so far included."""
        return decayed(self.past, self.past_at, now, half_life_s) + (
            self.gpus * now - self.since_sum
        )


@dataclass(frozen=True, slots=True)
class Hold:
    tenant: str
    gpus: int
    since: float
    preemptible: bool


@dataclass
class Ledger:
    half_life_s: float = 0.0
    use: dict[str, TenantUse] = field(default_factory=dict)
    holds: dict[str, Hold] = field(default_factory=dict)  # task id -> what it holds

    def of(self, tenant: str) -> TenantUse:
        u = self.use.get(tenant)
        if u is None:
            u = self.use[tenant] = TenantUse()
        return u

    def queue(self, tenant: str, n: int) -> None:
        self.of(tenant).queued += n

    def start(self, task_id: str, tenant: str, gpus: int, now: float, preemptible: bool) -> None:
        """A task of `tenant` was placed, holding `gpus` GPUs from `now`."""
        if task_id in self.holds:
            return
        self.holds[task_id] = Hold(tenant, gpus, now, preemptible)
        u = self.of(tenant)
        u.running += 1
        u.gpus += gpus
        u.since_sum += gpus * now
        if not preemptible:
            u.nonpreemptible_gpus += gpus

    def stop(self, task_id: str, now: float) -> Hold | None:
        """A placed task let go of its node: its hold becomes past usage."""
        hold = self.holds.pop(task_id, None)
        if hold is None:
            return None
        u = self.of(hold.tenant)
        u.running -= 1
        u.gpus -= hold.gpus
        u.since_sum -= hold.gpus * hold.since
        if not u.gpus:
            u.since_sum = 0.0  # no float drift left behind
        if not hold.preemptible:
            u.nonpreemptible_gpus -= hold.gpus
        u.past = decayed(u.past, u.past_at, now, self.half_life_s) + hold.gpus * max(
            0.0, now - hold.since
        )
        u.past_at = now
        return hold

    def usage(self, tenant: str, now: float) -> float:
        u = self.use.get(tenant)
        return 0.0 if u is None else u.usage(now, self.half_life_s)


def choose(
    candidates: Iterable[str], ledger: Ledger, weights: Mapping[str, float], now: float
) -> str:
    """The tenant whose work goes next: lowest usage per weight, then fewest held GPUs per
    weight, then name. `weights` lacks a tenant: weight 1."""

    def key(tenant: str) -> tuple[float, float, str]:
        w = weights.get(tenant, 1.0)
        u = ledger.use.get(tenant)
        held = u.gpus if u is not None else 0
        return (ledger.usage(tenant, now) / w, held / w, tenant)

    return min(candidates, key=key)


def quota_hold(
    config: TenantConfig, use: TenantUse | None, gpus: int, preemptible: bool, tenant: str
) -> str:
    """Why a task needing `gpus` GPUs may not be placed now under its tenant's quotas;
    "" when it may. Never lets a tenant pass a quota, however its work arrives."""
    held = use.gpus if use is not None else 0
    running = use.running if use is not None else 0
    if config.max_running is not None and running + 1 > config.max_running:
        return f"tenant {tenant} is at its quota of {config.max_running} running tasks"
    if gpus and config.max_gpus is not None and held + gpus > config.max_gpus:
        return (f"tenant {tenant} is at its GPU quota ({held} of {config.max_gpus} GPUs "
                f"held, this task needs {gpus})")
    if gpus and not preemptible and config.max_nonpreemptible is not None:
        pinned = use.nonpreemptible_gpus if use is not None else 0
        if pinned + gpus > config.max_nonpreemptible:
            return (f"tenant {tenant} is at its quota of {config.max_nonpreemptible} GPUs "
                    f"for non-preemptible work ({pinned} held)")
    return ""


def weighted_jain(usage: Mapping[str, float], weights: Mapping[str, float]) -> float | None:
    """Jain's index over usage / weight of the tenants that used something; None if none."""
    xs = [v / weights.get(k, 1.0) for k, v in usage.items() if v > 0]
    if not xs:
        return None
    return sum(xs) ** 2 / (len(xs) * sum(x * x for x in xs))


def target_shares(tenants: Iterable[str], weights: Mapping[str, float]) -> dict[str, float]:
    """Each tenant's share by weight among `tenants` (those with work or usage)."""
    names = list(tenants)
    total = sum(weights.get(k, 1.0) for k in names)
    return {k: weights.get(k, 1.0) / total for k in names} if total else {}

"""What a simulation's result says: the per-job CSV and the summary every policy is judged by.

A job's **completion time** (JCT) is `end - submit`; its **queueing delay** is `start - submit`.
Percentiles interpolate linearly between the two nearest ranks (numpy's default): `p` of sorted
values `v[0..n-1]` is `v[k] + (v[k+1] - v[k]) * f` where `k + f = p / 100 * (n - 1)`.
**Makespan** is the last end minus the first submit. **Utilisation** is the GPU-seconds the jobs
ran (`gpus * (end - start)`) over `total GPUs * makespan`, 0 to 1.

**Shares and the weighted Jain index.** At each moment `t` a tenant `i` *wants* `d_i(t)` GPUs
(the GPUs of its jobs submitted and not yet ended, queued or running) and *holds* `b_i(t)` (the
GPUs of its running jobs). Its demand share then is `d_i(t) / sum_j d_j(t)` and its GPU share
`b_i(t) / sum_j b_j(t)`. Integrated over time (where the sums are above 0):

    D_i = integral of d_i(t) / sum_j d_j(t) dt        S_i = integral of b_i(t) / sum_j b_j(t) dt

`demand_share_i = D_i / sum D`, `gpu_share_i = S_i / sum S`, and a tenant's ratio
`x_i = S_i / D_i` is how much of its demand share it got (1: exactly its share; below 1: less).
The weighted Jain index over tenants with weights `w_i = D_i / sum D` is

    jain = (sum_i w_i x_i)^2 / sum_i w_i x_i^2

It is 1 when every tenant gets GPU time in proportion to what it asks for, and falls toward the
smallest weight as one tenant takes what others wait for. (With equal weights it is Jain's
`(sum x)^2 / (n sum x^2)`.) One tenant, or no demand at all, gives 1.
"""

from __future__ import annotations

import csv
import heapq
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from coordinator.settings import Settings
from coordinator.sim.engine import JobRecord, SimResult

# The live coordinator's default MESH_POLICY: what `gpumesh simulate` runs without --policy.
DEFAULT_POLICY = Settings().policy

CSV_COLUMNS = ("policy", "id", "tenant", "gpus", "nodes", "submit_s", "start_s", "end_s",
               "queue_s", "jct_s", "node")

# The keys every summary has, in this order (more follow them).
SUMMARY_KEYS = ("policy", "jobs", "mean_jct_s", "p50_jct_s", "p99_jct_s", "mean_queue_s",
                "p99_queue_s", "makespan_s", "utilization", "jain")


def percentile(ordered: Sequence[float], p: float) -> float:
    """The `p`th percentile (0-100) of already sorted values, linear between ranks."""
    if not ordered:
        return 0.0
    rank = p / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def weighted_jain(weights: Sequence[float], values: Sequence[float]) -> float:
    """(sum w x)^2 / (sum w * sum w x^2); 1.0 when there is nothing to compare."""
    total = sum(weights)
    square = sum(w * x * x for w, x in zip(weights, values, strict=True))
    if total <= 0 or square <= 0:
        return 1.0
    mean = sum(w * x for w, x in zip(weights, values, strict=True))
    return mean * mean / (total * square)


@dataclass(slots=True)
class TenantShare:
    jobs: int = 0
    gpu_s: float = 0.0  # GPU-seconds its jobs ran
    demand: float = 0.0  # D_i (seconds)
    held: float = 0.0  # S_i (seconds)
    jct_sum: float = 0.0


def tenant_shares(records: Iterable[JobRecord]) -> dict[str, TenantShare]:
    """D_i and S_i of every tenant (see the module's docstring), by one sweep over the jobs'
    submit, start and end events. Each tenant's integrals are brought up to date only when its
    own d_i or b_i changes, against running integrals of 1/sum d and 1/sum b: O(events log)."""
    events: list[tuple[float, int, str, int, int]] = []  # (t, order, tenant, d delta, b delta)
    shares: dict[str, TenantShare] = {}
    for r in records:
        j = r.job
        s = shares.setdefault(j.tenant, TenantShare())
        s.jobs += 1
        s.gpu_s += j.gpus * (r.end_s - r.start_s)
        s.jct_sum += r.end_s - j.submit_s
        # At one instant: ends first, then submits, then starts (zero-length spans either way).
        events.append((j.submit_s, 1, j.tenant, j.gpus, 0))
        events.append((r.start_s, 2, j.tenant, 0, j.gpus))
        events.append((r.end_s, 0, j.tenant, -j.gpus, -j.gpus))
    heapq.heapify(events)
    want_total = hold_total = 0
    inv_want = inv_hold = 0.0  # integrals of 1/sum d and 1/sum b so far
    now = 0.0
    want: dict[str, int] = dict.fromkeys(shares, 0)
    hold: dict[str, int] = dict.fromkeys(shares, 0)
    seen_want: dict[str, float] = dict.fromkeys(shares, 0.0)
    seen_hold: dict[str, float] = dict.fromkeys(shares, 0.0)
    while events:
        t, _, tenant, dd, db = heapq.heappop(events)
        if t > now:
            if want_total > 0:
                inv_want += (t - now) / want_total
            if hold_total > 0:
                inv_hold += (t - now) / hold_total
            now = t
        s = shares[tenant]
        s.demand += want[tenant] * (inv_want - seen_want[tenant])
        s.held += hold[tenant] * (inv_hold - seen_hold[tenant])
        seen_want[tenant], seen_hold[tenant] = inv_want, inv_hold
        want[tenant] += dd
        hold[tenant] += db
        want_total += dd
        hold_total += db
    return shares


def summarize(result: SimResult) -> dict[str, Any]:
    """The summary of one policy's run: SUMMARY_KEYS first, then `total_gpus`, `p50_queue_s`,
    `skipped` (jobs the engine could not run; `skipped_why`: how many for each reason),
    `wall_s`, `peak_rss_mb` and `tenants` (each tenant's jobs, GPU-seconds, demand and GPU
    shares, their ratio and mean JCT)."""
    records = result.records
    jct = sorted(r.end_s - r.job.submit_s for r in records)
    queue = sorted(r.start_s - r.job.submit_s for r in records)
    n = len(records)
    makespan = (max(r.end_s for r in records) - min(r.job.submit_s for r in records)) if n else 0.0
    busy = sum(r.job.gpus * (r.end_s - r.start_s) for r in records)
    capacity = result.total_gpus * makespan
    shares = tenant_shares(records)
    demand_total = sum(s.demand for s in shares.values()) or 1.0
    held_total = sum(s.held for s in shares.values()) or 1.0
    names = sorted(shares)
    ratios = [shares[t].held / shares[t].demand if shares[t].demand > 0 else 1.0 for t in names]
    weights = [shares[t].demand / demand_total for t in names]
    tenants = {
        t: {
            "jobs": shares[t].jobs,
            "gpu_s": round(shares[t].gpu_s, 3),
            "demand_share": round(shares[t].demand / demand_total, 6),
            "gpu_share": round(shares[t].held / held_total, 6),
            "ratio": round(x, 6),
            "mean_jct_s": round(shares[t].jct_sum / shares[t].jobs, 3),
        }
        for t, x in zip(names, ratios, strict=True)
    }
    return {
        "policy": result.policy,
        "jobs": n,
        "mean_jct_s": round(sum(jct) / n, 3) if n else 0.0,
        "p50_jct_s": round(percentile(jct, 50), 3),
        "p99_jct_s": round(percentile(jct, 99), 3),
        "mean_queue_s": round(sum(queue) / n, 3) if n else 0.0,
        "p99_queue_s": round(percentile(queue, 99), 3),
        "makespan_s": round(makespan, 3),
        "utilization": round(busy / capacity, 6) if capacity > 0 else 0.0,
        "jain": round(weighted_jain(weights, ratios), 6),
        "p50_queue_s": round(percentile(queue, 50), 3),
        "total_gpus": result.total_gpus,
        "skipped": sum(result.skipped.values()),
        "skipped_why": dict(sorted(result.skipped.items())),
        "wall_s": round(result.wall_s, 3),
        "peak_rss_mb": round(result.peak_rss_mb, 1),
        "tenants": tenants,
    }


def write_jobs_csv(results: Sequence[SimResult], out: Path) -> int:
    """One row per job per policy (CSV_COLUMNS), in each policy's start order; returns rows."""
    rows = 0
    with out.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(CSV_COLUMNS)
        for result in results:
            for r in sorted(result.records, key=lambda r: (r.start_s, r.job.submit_s, r.job.id)):
                j = r.job
                w.writerow((result.policy, j.id, j.tenant, j.gpus, j.nodes, _num(j.submit_s),
                            _num(r.start_s), _num(r.end_s), _num(r.start_s - j.submit_s),
                            _num(r.end_s - j.submit_s), r.node))
                rows += 1
    return rows


def _num(x: float) -> str:
    """Seconds as written in the CSV: whole numbers without '.0', others to the millisecond."""
    return str(int(x)) if x == int(x) else f"{x:.3f}"

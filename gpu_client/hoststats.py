"""The host's CPU, memory and load, for `register` and `heartbeat`. Blocking: use to_thread."""

from __future__ import annotations

from dataclasses import dataclass

import psutil

MIB = 1 << 20


@dataclass(frozen=True, slots=True)
class HostStats:
    cpu_count: int
    cpu_pct: float  # all CPUs, since the previous call (the first: since psutil's import)
    memory_total_mb: int
    memory_used_mb: int  # total minus available: page cache a task could reclaim is free
    load1: float


def host_stats() -> HostStats:
    """A snapshot of the host. Does not sleep: CPU % is measured since the previous call."""
    vm = psutil.virtual_memory()
    return HostStats(
        cpu_count=psutil.cpu_count(logical=True) or 1,
        cpu_pct=float(psutil.cpu_percent(interval=None)),
        memory_total_mb=vm.total // MIB,
        memory_used_mb=(vm.total - vm.available) // MIB,
        load1=float(psutil.getloadavg()[0]),
    )

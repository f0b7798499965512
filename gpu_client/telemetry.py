"""Telemetry reads with a deadline, so a hung NVML call never delays a heartbeat.

`Telemetry.reading(deadline)` starts one read of the GPU source and the host stats in a
worker thread (never more than one at a time: a hung driver call holds one thread, not one
per heartbeat) and waits for it at most `deadline` seconds. A read that is late keeps going
in its thread and becomes the last good reading when it returns; meanwhile each caller gets
the last good one. Heartbeats therefore go out on their own timer whatever telemetry does.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field

from gpu_client.detect import GpuSource
from gpu_client.hoststats import HostStats, host_stats
from shared.protocol import GpuInfo

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Reading:
    gpus: list[GpuInfo] = field(default_factory=list)
    host: HostStats | None = None
    at: float = 0.0  # time.monotonic() of the read; 0: never read


class Telemetry:
    def __init__(self, source: GpuSource) -> None:
        self._source = source
        self._last = Reading()
        self._inflight: asyncio.Future[Reading] | None = None
        self.late_reads = 0  # reads that missed their deadline (tests, logs)

    @property
    def last(self) -> Reading:
        return self._last

    async def reading(self, deadline: float) -> Reading:
        """A fresh reading if one arrives within `deadline` seconds, else the last good one."""
        if self._inflight is None:
            self._inflight = asyncio.ensure_future(asyncio.to_thread(self._read))
            self._inflight.add_done_callback(self._settle)
        try:
            async with asyncio.timeout(deadline):
                return await asyncio.shield(self._inflight)
        except TimeoutError:
            self.late_reads += 1
            if self.late_reads in (1, 10) or self.late_reads % 100 == 0:
                log.warning("telemetry read still running after %.1fs (%d late so far): "
                            "heartbeats carry the reading of %.0fs ago", deadline,
                            self.late_reads, time.monotonic() - self._last.at if self._last.at
                            else float("nan"))
            return self._last
        except Exception:  # noqa: BLE001 - a vendor library can raise anything; keep beating
            log.exception("telemetry read failed; using the last good reading")
            return self._last

    def _read(self) -> Reading:
        """Blocking: runs in a worker thread."""
        return Reading(self._source.read(), host_stats(), time.monotonic())

    def _settle(self, fut: asyncio.Future[Reading]) -> None:
        self._inflight = None
        if not fut.cancelled() and fut.exception() is None:
            self._last = fut.result()

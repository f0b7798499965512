"""The node's own health: which executors work now, and whether it can run work at all.

`NodeHealth.probe()` re-asks every executor `available()` (the Docker engine may have died or
come back, the work dir may have been fixed) and checks the work dir: a directory we can
create and delete a file in, with at least `min_free_mb` free. The agent calls it every
`probe_interval_s` and right after an attempt ended with an infrastructure error; heartbeats
carry `executors` (the usable ones) and `health` ("" or why the node cannot run work).
Probes run with a deadline: a hung probe counts as a failed one.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
from collections.abc import Mapping
from pathlib import Path

from gpu_client.executors.base import Executor

log = logging.getLogger(__name__)

PROBE_DEADLINE_S = 10.0
MIB = 1 << 20


class NodeHealth:
    def __init__(
        self, executors: Mapping[str, Executor], work_dir: Path, min_free_mb: int
    ) -> None:
        self._executors = executors
        self._work_dir = work_dir
        self._min_free_mb = min_free_mb
        self.usable: list[str] = list(executors)
        self.health = ""
        self._lock = asyncio.Lock()

    async def probe(self) -> bool:
        """Re-probe executors and the work dir; True if what the node offers changed."""
        async with self._lock:
            before = (list(self.usable), self.health)
            usable = []
            for name, executor in self._executors.items():
                if await self._available(name, executor):
                    usable.append(name)
            self.usable = usable
            try:
                async with asyncio.timeout(PROBE_DEADLINE_S):
                    self.health = await asyncio.to_thread(
                        work_dir_problem, self._work_dir, self._min_free_mb
                    )
            except TimeoutError:
                self.health = f"work dir {self._work_dir} did not answer within "\
                    f"{PROBE_DEADLINE_S:g}s"
            changed = before != (self.usable, self.health)
            if changed:
                log.warning("node health: %s; executors usable: %s",
                            self.health or "healthy", ", ".join(self.usable) or "none")
            return changed

    async def _available(self, name: str, executor: Executor) -> bool:
        try:
            async with asyncio.timeout(PROBE_DEADLINE_S):
                return await executor.available()
        except Exception as exc:  # noqa: BLE001 - a probe that fails says "not available"
            log.warning("executor %s probe failed: %r", name, exc)
            return False


def work_dir_problem(work_dir: Path, min_free_mb: int) -> str:
    """Blocking. "" when `work_dir` is a writable directory with enough free space."""
    try:
        work_dir.mkdir(parents=True, exist_ok=True)
        probe = work_dir / f".probe-{os.getpid()}"
        probe.write_bytes(b"ok")
        probe.unlink()
    except OSError as exc:
        return f"work dir {work_dir} is not a writable directory: {exc.strerror or exc}"
    free_mb = shutil.disk_usage(work_dir).free // MIB
    if free_mb < min_free_mb:
        return f"work dir {work_dir} has {free_mb} MB free, less than {min_free_mb} MB"
    return ""

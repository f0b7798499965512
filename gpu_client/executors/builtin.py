"""The `builtin` executor: tasks the client runs itself, in its event loop. Today: `test`.

`test` reports the node and its GPUs. Params: `sleep_s` (a number) keeps it running that
long first, cancellably; `fail: true` makes it fail.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time

import msgspec

from gpu_client.detect import GpuSource, reads_instantly
from gpu_client.executors.base import Adopted, OnOutput, OnStarted, RunOutcome
from gpu_client.settings import ClientSettings
from shared.protocol import Assign

log = logging.getLogger(__name__)


class BuiltinExecutor:
    name = "builtin"

    def __init__(self, node_name: str, source: GpuSource) -> None:
        self._node_name = node_name
        self._source = source
        self._running: dict[tuple[str, int], asyncio.Task[None]] = {}

    async def available(self) -> bool:
        return True

    async def run(self, assign: Assign, on_started: OnStarted, on_output: OnOutput) -> RunOutcome:
        began = time.monotonic()
        if assign.task_type != "test":
            why = f"builtin has no task type {assign.task_type!r}"
            return RunOutcome(exit_code=None, error=why)
        sleep_s = assign.params.get("sleep_s")
        if isinstance(sleep_s, int | float) and not isinstance(sleep_s, bool) and sleep_s > 0:
            key = (assign.task_id, assign.attempt)
            nap = asyncio.create_task(asyncio.sleep(float(sleep_s)))
            self._running[key] = nap  # cancel() can reach it from now on
            on_started()
            try:
                await asyncio.wait([nap])  # a cancel() cancels `nap`, not this coroutine
            finally:
                self._running.pop(key, None)
                nap.cancel()
            if nap.cancelled():
                return RunOutcome(exit_code=None, error="cancelled", duration_s=_since(began))
        # An instant test task reports no start: its result follows at once, and the
        # coordinator takes assigned -> completed directly (one frame and one commit fewer).
        gpus = (
            self._source.read() if reads_instantly(self._source)
            else await asyncio.to_thread(self._source.read)
        )
        message = f"test task ok on node {self._node_name}"
        data = {
            "node": self._node_name,
            "hostname": socket.gethostname(),
            "gpus": msgspec.to_builtins(gpus),
            "gpu_indices": list(assign.gpu_indices),
            "params": assign.params,
        }
        if assign.params.get("fail") is True:
            return RunOutcome(
                exit_code=1, output=message, duration_s=_since(began), data=data,
                error="test task asked to fail",
            )
        return RunOutcome(exit_code=0, output=message, duration_s=_since(began), data=data)

    async def cancel(self, task_id: str, attempt: int, grace_s: float | None = None) -> None:
        nap = self._running.get((task_id, attempt))
        if nap is not None:
            nap.cancel()

    async def adopt(self) -> list[Adopted]:
        return []  # builtin work lives in this process: nothing survives a restart

    async def release(self, task_id: str, attempt: int) -> None:
        return None


def _since(began: float) -> float:
    return round(time.monotonic() - began, 3)


def create(settings: ClientSettings, source: GpuSource) -> BuiltinExecutor:
    return BuiltinExecutor(settings.node_name, source)

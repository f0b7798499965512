"""Executors run assigned tasks: `builtin` (in the client), `process`, `docker`. See base.py."""

from __future__ import annotations

import importlib
import logging

from gpu_client.detect import GpuSource
from gpu_client.executors.base import Adopted, Executor, RunOutcome, gpu_env
from gpu_client.settings import ClientSettings

log = logging.getLogger(__name__)

__all__ = ["Adopted", "Executor", "RunOutcome", "gpu_env", "load_executors"]


async def load_executors(settings: ClientSettings, source: GpuSource) -> dict[str, Executor]:
    """The executors this node offers: each in `settings.executors` that loads and is available.

    Executor `x` lives in module `gpu_client.executors.x`, which has `create(settings, source)`.
    """
    offered: dict[str, Executor] = {}
    for name in settings.executors:
        try:
            module = importlib.import_module(f"gpu_client.executors.{name}")
        except ImportError as exc:
            log.warning("executor %s not offered: %s", name, exc)
            continue
        executor: Executor = module.create(settings, source)
        if await executor.available():
            offered[name] = executor
        else:
            log.warning("executor %s not offered: not available on this node", name)
    return offered

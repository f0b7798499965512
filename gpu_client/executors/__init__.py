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
    """The executors this node may offer: each in `settings.executors` that loads.

    One that is not available now (Docker not running, the work dir unusable) is kept: the
    agent's health probe offers it as soon as `available()` says yes, so a node that starts
    before its Docker daemon, or with a broken work dir later mended, is not short of it for
    good. Executor `x` lives in module `gpu_client.executors.x` (`create(settings, source)`).
    """
    offered: dict[str, Executor] = {}
    for name in settings.executors:
        try:
            module = importlib.import_module(f"gpu_client.executors.{name}")
        except ImportError as exc:
            log.warning("executor %s not offered: %s", name, exc)
            continue
        executor: Executor = module.create(settings, source)
        offered[name] = executor
        if not await executor.available():
            log.warning("executor %s not available now; offered once a probe finds it "
                        "working (every MESH_PROBE_INTERVAL_S)", name)
    return offered

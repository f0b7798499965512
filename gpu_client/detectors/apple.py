"""Apple silicon GPUs through `system_profiler SPDisplaysDataType -json` (macOS only).

The GPU shares the machine's unified memory, so `memory_total_mb` is the total RAM and
`memory_used_mb` what the whole machine uses (Metal lets one process wire roughly 75% of it).
macOS reports no GPU utilisation, temperature or power without root (`powermetrics`).
There is one Apple GPU, index 0, and no device-visibility variable for it.
"""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Callable

import psutil

from gpu_client.detectors.base import MIB, CliError, LogOnce, RunCli, json_start, run_cli
from shared.protocol import GpuInfo

log = logging.getLogger(__name__)

SYSTEM_PROFILER_ARGV = ("system_profiler", "SPDisplaysDataType", "-json")


def ram_mib() -> tuple[int, int]:
    """(total, used) RAM in MiB; used is total minus what is available."""
    vm = psutil.virtual_memory()
    return vm.total // MIB, (vm.total - vm.available) // MIB


def parse_system_profiler(text: str, memory: tuple[int, int]) -> list[GpuInfo]:
    """Apple GPUs from system_profiler's JSON; discrete AMD/Intel GPUs of Intel Macs skipped."""
    doc = json.loads(json_start(text))
    total, used = memory
    gpus: list[GpuInfo] = []
    for item in doc.get("SPDisplaysDataType", []):
        vendor = str(item.get("spdisplays_vendor", ""))
        model = str(item.get("sppci_model") or item.get("_name") or "")
        if "apple" not in vendor.lower() and not model.startswith("Apple"):
            continue
        cores = str(item.get("sppci_cores", "")).strip()
        gpus.append(
            GpuInfo(
                index=len(gpus),
                name=f"{model} ({cores}-core GPU)" if cores.isdigit() else model,
                vendor="apple",
                memory_total_mb=total,
                memory_used_mb=used,
            )
        )
    return gpus


class AppleDetector:
    """`run` is the CLI seam, `memory` the unified-memory reading, `platform` sys.platform."""

    vendor = "apple"

    def __init__(
        self,
        run: RunCli = run_cli,
        memory: Callable[[], tuple[int, int]] = ram_mib,
        platform: str = sys.platform,
    ) -> None:
        self._run, self._memory, self._platform = run, memory, platform
        self._once = LogOnce(log)
        self._missing = False  # the CLI is not installed: stop asking

    def is_available(self) -> bool:
        return self._platform == "darwin" and bool(self.read())

    def read(self) -> list[GpuInfo]:
        if self._platform != "darwin" or self._missing:
            return []
        try:
            return parse_system_profiler(self._run(SYSTEM_PROFILER_ARGV), self._memory())
        except CliError as exc:
            self._missing = exc.missing
            self._once(logging.INFO, f"cli:{exc.reason}", "Apple: %s; no GPUs", exc)
        except (ValueError, AttributeError, TypeError) as exc:  # JSON of an unexpected shape
            self._once(logging.WARNING, "json", "Apple: system_profiler unparsable: %s", exc)
        return []

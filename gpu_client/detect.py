"""GPU detection behind one seam: a `GpuSource` whose `read()` returns the GPUs it sees.

`read()` blocks (NVML, subprocesses): call it through `asyncio.to_thread`.

Indices: on a node with one GPU vendor, `GpuInfo.index` is that vendor runtime's device
index (NVML/CUDA in PCI order, ROCr, Level Zero); NVIDIA MIG instances are numbered after
the physical cards. On a mixed node each vendor gets its own block of 100 (nvidia 0, amd
100, intel 200, apple 300). `visible_devices_env(gpus)` turns assigned GPUs into
CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES / ZE_AFFINITY_MASK. See detectors/layout.py.

`python -m gpu_client.detect` prints what this machine's detectors see, as JSON.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import msgspec

from gpu_client.detectors import (
    AmdDetector,
    AppleDetector,
    GpuDetector,
    IntelDetector,
    NvmlDetector,
    lay_out,
    visible_devices_env,
)
from gpu_client.hoststats import host_stats
from shared.config import env_bool, env_str
from shared.protocol import GpuInfo, within_ranges

log = logging.getLogger(__name__)

__all__ = [
    "DetectedGpus",
    "FakeGpus",
    "GpuSource",
    "NoGpus",
    "make_source",
    "visible_devices_env",
]


class GpuSource(Protocol):
    def read(self) -> list[GpuInfo]: ...


@dataclass
class NoGpus:
    def read(self) -> list[GpuInfo]:
        return []


FAKE_VENDORS = ("fake", "nvidia", "amd", "intel", "apple")
_FAKE_ITEM = re.compile(
    r"^(?:(\d+)x)?([A-Za-z0-9_.-]+?)(?:-(\d+)GB)?(?:@([A-Za-z]+))?$", re.IGNORECASE
)

# Compute capability of NVIDIA-like fake names, so min-CC placement can be demonstrated.
_FAKE_CC = {
    "B200": "10.0",
    "H200": "9.0",
    "H100": "9.0",
    "GH200": "9.0",
    "L40S": "8.9",
    "L40": "8.9",
    "L4": "8.9",
    "RTX4090": "8.9",
    "RTX4080": "8.9",
    "A100": "8.0",
    "A40": "8.6",
    "A10": "8.6",
    "RTX3090": "8.6",
    "A6000": "8.6",
    "T4": "7.5",
    "V100": "7.0",
}


@dataclass
class FakeGpus:
    """Simulated GPUs (`MESH_FAKE_GPUS=2xA100-80GB,1xRTX4090-24GB`); tests edit `.gpus`.

    Each item is `[COUNTx]NAME[-MEMGB][@VENDOR]`: memory defaults to 16 GB, vendor to
    "fake", so an executor never mistakes a simulated card for a real one. `@amd`,
    `@nvidia`, `@intel` or `@apple` claim a vendor, for demos of vendor-aware placement.
    Known NVIDIA names (A100, H100, RTX4090...) carry their compute capability.
    """

    gpus: list[GpuInfo] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> FakeGpus:
        per_vendor: dict[str, list[GpuInfo]] = {}
        made = 0
        for item in (p.strip() for p in text.split(",") if p.strip()):
            m = _FAKE_ITEM.match(item)
            if m is None:
                raise ValueError(f"MESH_FAKE_GPUS item {item!r}: expected like 2xA100-80GB")
            count, name, gb = int(m.group(1) or 1), m.group(2), int(m.group(3) or 16)
            vendor = (m.group(4) or "fake").lower()
            if vendor not in FAKE_VENDORS:
                raise ValueError(
                    f"MESH_FAKE_GPUS item {item!r}: vendor must be one of {', '.join(FAKE_VENDORS)}"
                )
            nvidia_like = vendor in ("fake", "nvidia")
            cc = _FAKE_CC.get(name.upper(), "") if nvidia_like else ""
            # "fake" GPUs are numbered as NVIDIA's would be: one block, shared with @nvidia.
            mine = per_vendor.setdefault("nvidia" if nvidia_like else vendor, [])
            for _ in range(count):
                mine.append(
                    GpuInfo(
                        index=len(mine),
                        name=name,
                        vendor=vendor,
                        memory_total_mb=gb * 1024,
                        uuid=f"FAKE-{name}-{made}",
                        compute_capability=cc,
                        # Idle readings, so dashboards and energy accounting have data.
                        temperature_c=35.0,
                        power_w=25.0,
                        power_limit_w=300.0,
                    )
                )
                made += 1
        return cls(lay_out(per_vendor.items()))

    def read(self) -> list[GpuInfo]:
        return [msgspec.structs.replace(g) for g in self.gpus]


class DetectedGpus:
    """Every vendor detector's GPUs, in one index space; devices with no memory dropped.

    A detector that raises (it should not) is logged with its traceback once and counts as
    no GPUs, so one broken vendor stack never costs the node its heartbeat.
    """

    def __init__(self, detectors: Sequence[GpuDetector]) -> None:
        self.detectors = list(detectors)
        self._reported: set[str] = set()

    def read(self) -> list[GpuInfo]:
        per_vendor: list[tuple[str, list[GpuInfo]]] = []
        for detector in self.detectors:
            try:
                gpus = detector.read()
            except Exception:  # noqa: BLE001 - vendor libraries can raise anything
                self._report_once(
                    f"raised:{detector.vendor}",
                    logging.ERROR,
                    "%s detector failed; counting no %s GPUs",
                    detector.vendor,
                    detector.vendor,
                    exc_info=True,
                )
                gpus = []
            kept = [within_ranges(g) for g in gpus if self._usable(g)]
            per_vendor.append((detector.vendor, kept))
        return lay_out(per_vendor)

    def _usable(self, gpu: GpuInfo) -> bool:
        if gpu.memory_total_mb > 0:
            return True
        self._report_once(
            f"nomem:{gpu.vendor}:{gpu.index}:{gpu.uuid}",
            logging.INFO,
            "%s GPU %d (%s) reports no memory; not schedulable, ignored",
            gpu.vendor,
            gpu.index,
            gpu.name,
        )
        return False

    def _report_once(
        self, key: str, level: int, msg: str, *args: object, exc_info: bool = False
    ) -> None:
        if key not in self._reported:
            self._reported.add(key)
            log.log(level, msg, *args, exc_info=exc_info)

    def compute_pids(self) -> set[int]:
        """Blocking. Pids the NVIDIA driver lists as compute processes on this node's GPUs."""
        pids: set[int] = set()
        for detector in self.detectors:
            if isinstance(detector, NvmlDetector):
                pids |= detector.compute_pids()
        return pids

    def close(self) -> None:
        for detector in self.detectors:
            if isinstance(detector, NvmlDetector):
                detector.close()


def default_detectors() -> list[GpuDetector]:
    return [NvmlDetector(), AmdDetector(), IntelDetector(), AppleDetector()]


def reads_instantly(source: GpuSource) -> bool:
    """True for sources that read from memory, so `read()` may run on the event loop."""
    return isinstance(source, NoGpus | FakeGpus)


def make_source(env: Mapping[str, str]) -> GpuSource:
    """The GPU source this node should use, from GPU_ENABLED and MESH_FAKE_GPUS.

    GPU_ENABLED=false: no GPUs. MESH_FAKE_GPUS: simulated ones (a malformed value raises
    ValueError, as any bad setting does). Otherwise every vendor's detector, combined.
    """
    if not env_bool(env, "GPU_ENABLED", True):
        return NoGpus()
    fake = env_str(env, "MESH_FAKE_GPUS", "")
    if fake:
        return FakeGpus.parse(fake)
    return DetectedGpus(default_detectors())


def main() -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    source = make_source(os.environ)
    gpus = source.read()
    report = {
        "source": type(source).__name__,
        "gpus": msgspec.to_builtins(gpus),
        "visible_devices_env": visible_devices_env(gpus),
        "host": dataclasses.asdict(host_stats()),
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()

"""GPU detection behind one seam: a `GpuSource` whose `read()` returns the GPUs it sees.

`read()` blocks (NVML, subprocesses): call it through `asyncio.to_thread`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field

import msgspec
from typing import Protocol

from shared.config import env_bool, env_str
from shared.protocol import GpuInfo


class GpuSource(Protocol):
    def read(self) -> list[GpuInfo]: ...


@dataclass
class NoGpus:
    def read(self) -> list[GpuInfo]:
        return []


_FAKE_ITEM = re.compile(r"^(?:(\d+)x)?([A-Za-z0-9_.-]+?)(?:-(\d+)GB)?$", re.IGNORECASE)


@dataclass
class FakeGpus:
    """Simulated GPUs (`MESH_FAKE_GPUS=2xA100-80GB,1xRTX4090-24GB`); tests edit `.gpus`."""

    gpus: list[GpuInfo] = field(default_factory=list)

    @classmethod
    def parse(cls, text: str) -> FakeGpus:
        gpus: list[GpuInfo] = []
        for item in (p.strip() for p in text.split(",") if p.strip()):
            m = _FAKE_ITEM.match(item)
            if m is None:
                raise ValueError(f"MESH_FAKE_GPUS item {item!r}: expected like 2xA100-80GB")
            count, name, gb = int(m.group(1) or 1), m.group(2), int(m.group(3) or 16)
            for _ in range(count):
                gpus.append(
                    GpuInfo(
                        index=len(gpus), name=name, vendor="fake", memory_total_mb=gb * 1024,
                        uuid=f"FAKE-{name}-{len(gpus)}",
                    )
                )
        return cls(gpus)

    def read(self) -> list[GpuInfo]:
        return [msgspec.structs.replace(g) for g in self.gpus]


def make_source(env: Mapping[str, str]) -> GpuSource:
    """The GPU source this node should use, from GPU_ENABLED and MESH_FAKE_GPUS."""
    if not env_bool(env, "GPU_ENABLED", True):
        return NoGpus()
    fake = env_str(env, "MESH_FAKE_GPUS", "")
    if fake:
        return FakeGpus.parse(fake)
    return NoGpus()  # vendor detectors (NVML, amdsmi, xpu-smi, Apple) plug in here

"""Intel GPUs through `xpu-smi` (JSON), or sysfs (`/sys/class/drm/cardN`) when it is absent.

Indices are xpu-smi's device ids, which follow Level Zero's order, so ZE_AFFINITY_MASK
takes them; the sysfs fallback counts Intel cards in DRM order, which matches on the usual
one- or two-card box. Whole devices only: the tiles of a Max 1550 are not split out.
"""

from __future__ import annotations

import json
import logging
import os
import re
from pathlib import Path
from typing import Any

from gpu_client.detectors.base import (
    CliError,
    LogOnce,
    RunCli,
    bytes_to_mib,
    json_start,
    run_cli,
    to_float,
)
from shared.protocol import GpuInfo

log = logging.getLogger(__name__)

INTEL_PCI_VENDOR = "0x8086"
_CARD = re.compile(r"^card(\d+)$")


def parse_xpu_discovery(text: str) -> list[dict[str, Any]]:
    """Devices from `xpu-smi discovery -j`; virtual functions dropped where a PF is present."""
    doc = json.loads(json_start(text))
    devices = [d for d in doc.get("device_list", []) if isinstance(d, dict)]
    devices = [d for d in devices if str(d.get("device_type", "GPU")).upper() == "GPU"]
    kinds = {str(d.get("device_function_type", "physical")).lower() for d in devices}
    if "physical" in kinds:
        devices = [
            d
            for d in devices
            if str(d.get("device_function_type", "physical")).lower() == "physical"
        ]
    return devices


def parse_xpu_stats(text: str) -> dict[str, float]:
    """`xpu-smi stats -d N -j` as {metric: value}. Device-level values win; a metric only
    reported per tile is summed over tiles (memory, power) or maxed (temperature, busy %)."""
    doc = json.loads(json_start(text))
    device: dict[str, float] = {}
    for item in doc.get("device_level", []):
        value = to_float(item.get("value"))
        if value is not None:
            device[str(item.get("metrics_type"))] = value
    tiles: dict[str, float] = {}
    for tile in doc.get("tile_level", []):
        for item in tile.get("data_list", []):
            name, value = str(item.get("metrics_type")), to_float(item.get("value"))
            if value is None:
                continue
            if "TEMPERATURE" in name or "UTILIZATION" in name:
                tiles[name] = max(tiles.get(name, value), value)
            else:
                tiles[name] = tiles.get(name, 0.0) + value
    return tiles | device


def _metric(stats: dict[str, float], name: str) -> float | None:
    return stats.get(f"XPUM_STATS_{name}")


def _used_mib(stats: dict[str, float], total_mb: int) -> int:
    """xpu-smi's CLI prints memory used in MiB; its REST API in bytes. Take both."""
    used = _metric(stats, "MEMORY_USED")
    if used is None:
        return 0
    return int(used) >> 20 if total_mb and used > total_mb * 4 else int(used)


class XpuSmiDetector:
    """Intel GPUs from xpu-smi. Names and sizes are read once; stats on every read."""

    vendor = "intel"

    def __init__(self, run: RunCli = run_cli) -> None:
        self._run = run
        self._devices: list[tuple[int, str, str, int]] | None = None  # id, name, uuid, MiB
        self._once = LogOnce(log)
        self._missing = False  # the CLI is not installed: stop asking

    def is_available(self) -> bool:
        return bool(self._discover())

    def _discover(self) -> list[tuple[int, str, str, int]]:
        if self._devices is None:
            found: list[tuple[int, str, str, int]] = []
            for d in parse_xpu_discovery(self._run(("xpu-smi", "discovery", "-j"))):
                dev_id = int(d.get("device_id", len(found)))
                detail = json.loads(
                    json_start(self._run(("xpu-smi", "discovery", "-d", str(dev_id), "-j")))
                )
                total = bytes_to_mib(detail.get("memory_physical_size_byte"))
                name = str(d.get("device_name") or detail.get("device_name") or "Intel GPU")
                found.append((dev_id, name, str(d.get("uuid", "")), total))
            self._devices = found
        return self._devices

    def read(self) -> list[GpuInfo]:
        if self._missing:
            return []
        try:
            devices = self._discover()
        except CliError as exc:
            self._missing = exc.missing
            self._once(logging.INFO, f"cli:{exc.reason}", "Intel: %s; no GPUs from xpu-smi", exc)
            return []
        except (ValueError, AttributeError, TypeError) as exc:  # JSON of an unexpected shape
            self._once(logging.WARNING, "json", "Intel: xpu-smi discovery unparsable: %s", exc)
            return []
        return [self._read_one(*device) for device in devices]

    def _read_one(self, dev_id: int, name: str, uuid: str, total: int) -> GpuInfo:
        try:
            stats = parse_xpu_stats(self._run(("xpu-smi", "stats", "-d", str(dev_id), "-j")))
        except (CliError, ValueError, AttributeError, TypeError) as exc:
            self._once(
                logging.WARNING, f"stats:{dev_id}", "Intel: no stats for %d: %s", dev_id, exc
            )
            stats = {}
        return GpuInfo(
            index=dev_id,
            name=name,
            vendor=self.vendor,
            uuid=uuid,
            memory_total_mb=total,
            memory_used_mb=_used_mib(stats, total),
            utilization_pct=_metric(stats, "GPU_UTILIZATION") or 0.0,
            temperature_c=_metric(stats, "GPU_CORE_TEMPERATURE"),
            power_w=_metric(stats, "POWER"),
        )


class IntelSysfsDetector:
    """Intel GPUs from sysfs: presence, PCI id and, on the xe driver, VRAM size.

    i915 publishes no VRAM size in sysfs, so those cards (and integrated GPUs) read 0 MiB
    and the composite source drops them: install xpu-smi to schedule on them.
    """

    vendor = "intel"

    def __init__(self, root: Path = Path("/sys/class/drm")) -> None:
        self._root = root

    def is_available(self) -> bool:
        return bool(self.read())

    def read(self) -> list[GpuInfo]:
        cards: list[tuple[int, Path]] = []
        try:
            entries = list(self._root.iterdir())
        except OSError:
            return []
        for entry in entries:
            m = _CARD.match(entry.name)
            if m and _read(entry / "device" / "vendor") == INTEL_PCI_VENDOR:
                cards.append((int(m.group(1)), entry / "device"))
        gpus = []
        for local, (_, device) in enumerate(sorted(cards)):
            pci_id = _read(device / "device") or "?"
            vram = sum(
                bytes_to_mib(_read(tile / "physical_vram_size_bytes"))
                for tile in sorted(device.glob("tile*"))
            )
            gpus.append(
                GpuInfo(
                    index=local,
                    name=f"Intel GPU [{pci_id}]",
                    vendor=self.vendor,
                    uuid=os.path.basename(os.path.realpath(device)),  # the PCI address
                    memory_total_mb=vram,
                )
            )
        return gpus


def _read(path: Path) -> str:
    try:
        return path.read_text().strip()
    except OSError:
        return ""


class IntelDetector:
    """xpu-smi where it answers, else sysfs."""

    vendor = "intel"

    def __init__(self, run: RunCli = run_cli, sysfs: Path = Path("/sys/class/drm")) -> None:
        self._xpu = XpuSmiDetector(run)
        self._sysfs = IntelSysfsDetector(sysfs)

    def is_available(self) -> bool:
        return bool(self.read())

    def read(self) -> list[GpuInfo]:
        return self._xpu.read() or self._sysfs.read()

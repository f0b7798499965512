"""NVIDIA GPUs through NVML (`pynvml`, from the nvidia-ml-py distribution).

Indices: a whole card keeps its NVML index, which is the PCI bus order; CUDA counts the same
way under CUDA_DEVICE_ORDER=PCI_BUS_ID (its default, FASTEST_FIRST, may differ, so the
executor should address NVIDIA devices by UUID: see `layout.visible_devices_env`). A card in
MIG mode is not schedulable itself: each of its MIG instances is, with an index numbered
after all physical cards (NVML count + k) and `parent_index` = the card's NVML index. MIG
instances have no CUDA index at all; CUDA_VISIBLE_DEVICES takes their `MIG-...` UUID.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import msgspec

from gpu_client.detectors.base import MIB, LogOnce
from gpu_client.detectors.nvidia_faults import LOST, NvmlFaults, compute_pids
from shared.protocol import GpuInfo

log = logging.getLogger(__name__)

T = TypeVar("T")


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


class NvmlDetector:
    """Reads NVIDIA GPUs through NVML; `nvml` is the `pynvml` module (tests pass a fake one).

    nvmlInit runs once, on the first `read()`, and the card handles are kept. MIG instances
    are listed again on every read: an operator can repartition a card without a restart.
    If NVML cannot start (no driver, no libnvidia-ml.so), this says so once and reads [].
    """

    vendor = "nvidia"

    def __init__(self, nvml: Any = None) -> None:
        self._nvml = nvml  # None: import pynvml on first use
        self._state: Literal["new", "ready", "unavailable"] = "new"
        self._cards: list[Any] = []
        self._once = LogOnce(log)
        self._faults = NvmlFaults(nvml)
        self._last: dict[int, list[GpuInfo]] = {}  # card index -> its last good reading

    def is_available(self) -> bool:
        return self._start()

    def read(self) -> list[GpuInfo]:
        if not self._start():
            return []
        nvml = self._nvml
        gpus: list[GpuInfo] = []
        next_mig_index = len(self._cards)
        self._faults.poll()
        for index, card in enumerate(self._cards):
            try:
                whole = self._whole_card(index, card)
                whole.fault = self._faults.fault(index, card)
                migs = self._mig_handles(card)
                parts = [self._mig_instance(whole, mig) for mig in migs or ()]
            except nvml.NVMLError as exc:  # GPU lost, reset required, ...
                if isinstance(exc, nvml.NVMLError_GpuIsLost) and index in self._last:
                    # Listed with its last reading and a fault: out of service, not vanished.
                    self._once(logging.ERROR, f"lost:{index}", "NVIDIA GPU %d: %s", index, LOST)
                    gpus += [msgspec.structs.replace(g, fault=LOST) for g in self._last[index]]
                    next_mig_index += sum(g.parent_index is not None for g in self._last[index])
                    continue
                self._once(
                    logging.WARNING,
                    f"card:{index}:{exc}",
                    "NVIDIA GPU %d unreadable: %s",
                    index,
                    exc,
                )
                continue
            for part in parts:
                part.fault = whole.fault
            if migs is None:
                self._last[index] = [whole]
                gpus.append(whole)
                continue
            if not parts:
                self._once(
                    logging.INFO,
                    f"mig-empty:{index}",
                    "NVIDIA GPU %d is in MIG mode with no instances: nothing to schedule",
                    index,
                )
            numbered = [msgspec.structs.replace(p, index=next_mig_index + k)
                        for k, p in enumerate(parts)]
            next_mig_index += len(numbered)
            self._last[index] = numbered
            gpus += numbered
        return sorted(gpus, key=lambda g: g.index)

    def compute_pids(self) -> set[int]:
        """Blocking. Pids NVML lists as compute processes on any card (empty without NVML)."""
        if self._state != "ready":
            return set()
        return compute_pids(self._nvml, self._cards)

    def close(self) -> None:
        if self._state == "ready":
            try:
                self._nvml.nvmlShutdown()
            except self._nvml.NVMLError as exc:
                log.debug("nvmlShutdown: %s", exc)
        self._state, self._cards = "new", []
        self._faults = NvmlFaults(self._nvml)

    # --- internals -----------------------------------------------------------------------

    def _start(self) -> bool:
        if self._state != "new":
            return self._state == "ready"
        self._state = "unavailable"
        if self._nvml is None:
            try:
                import pynvml
            except ImportError as exc:
                log.info("NVIDIA: pynvml is not installed (%s); no NVIDIA GPUs", exc)
                return False
            self._nvml = pynvml
            self._faults = NvmlFaults(pynvml)
        nvml = self._nvml
        try:
            nvml.nvmlInit()
        except nvml.NVMLError as exc:
            log.info("NVIDIA: NVML did not start (%s); no NVIDIA GPUs", exc)
            return False
        try:
            count = nvml.nvmlDeviceGetCount()
            self._cards = [nvml.nvmlDeviceGetHandleByIndex(i) for i in range(count)]
        except nvml.NVMLError as exc:
            log.warning("NVIDIA: NVML started but listing devices failed: %s", exc)
            nvml.nvmlShutdown()
            return False
        self._state = "ready"
        self._faults.start(self._cards)
        log.info("NVIDIA: NVML sees %d GPU(s)", len(self._cards))
        return True

    def _get(self, fn: Callable[..., T], *args: object) -> T | None:
        """One reading; None where this device does not support it (NVMLError_NotSupported)."""
        nvml = self._nvml
        try:
            return fn(*args)
        except (nvml.NVMLError_NotSupported, nvml.NVMLError_FunctionNotFound):
            return None

    def _whole_card(self, index: int, h: Any) -> GpuInfo:
        nvml = self._nvml
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        util = self._get(nvml.nvmlDeviceGetUtilizationRates, h)
        temp = self._get(nvml.nvmlDeviceGetTemperature, h, nvml.NVML_TEMPERATURE_GPU)
        power_mw = self._get(nvml.nvmlDeviceGetPowerUsage, h)
        limit_mw = self._get(nvml.nvmlDeviceGetEnforcedPowerLimit, h)
        cc = self._get(nvml.nvmlDeviceGetCudaComputeCapability, h)
        return GpuInfo(
            index=index,
            name=_text(nvml.nvmlDeviceGetName(h)),
            vendor=self.vendor,
            uuid=_text(nvml.nvmlDeviceGetUUID(h)),
            memory_total_mb=int(mem.total) // MIB,
            memory_used_mb=int(mem.used) // MIB,
            utilization_pct=float(util.gpu) if util is not None else 0.0,
            temperature_c=float(temp) if temp is not None else None,
            power_w=power_mw / 1000.0 if power_mw is not None else None,
            power_limit_w=limit_mw / 1000.0 if limit_mw is not None else None,
            compute_capability=f"{cc[0]}.{cc[1]}" if cc is not None else "",
        )

    def _mig_handles(self, card: Any) -> list[Any] | None:
        """The card's MIG instances, or None when the card is not in MIG mode."""
        nvml = self._nvml
        mode = self._get(nvml.nvmlDeviceGetMigMode, card)
        if mode is None or mode[0] != nvml.NVML_DEVICE_MIG_ENABLE:
            return None
        handles: list[Any] = []
        for slot in range(nvml.nvmlDeviceGetMaxMigDeviceCount(card)):
            try:
                handles.append(nvml.nvmlDeviceGetMigDeviceHandleByIndex(card, slot))
            except nvml.NVMLError_NotFound:  # an empty slot
                continue
        return handles

    def _mig_instance(self, card: GpuInfo, h: Any) -> GpuInfo:
        """A MIG instance: its own name, UUID and memory; the card's temperature and CC.

        NVML reports no utilisation or power per instance; power stays None rather than
        charging the whole card's draw to every instance (energy accounting sums it).
        """
        nvml = self._nvml
        mem = nvml.nvmlDeviceGetMemoryInfo(h)
        return GpuInfo(
            index=card.index,  # renumbered by the caller
            name=_text(nvml.nvmlDeviceGetName(h)),
            vendor=self.vendor,
            uuid=_text(nvml.nvmlDeviceGetUUID(h)),
            memory_total_mb=int(mem.total) // MIB,
            memory_used_mb=int(mem.used) // MIB,
            temperature_c=card.temperature_c,
            power_limit_w=None,
            compute_capability=card.compute_capability,
            parent_index=card.index,
        )

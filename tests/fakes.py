"""The one fake in the suite: vendor libraries at the GPU seam (a `pynvml`, an `amdsmi`).

They raise the real pynvml exception classes, so the detector's `except` clauses are tested
against what NVML really throws. Our own detector code is never faked.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pynvml

MIB = 1 << 20


@dataclass
class FakeNvDevice:
    """One NVML device handle: a card, or a MIG instance (in a card's `mig`)."""

    name: str
    uuid: str
    total_mib: int
    used_mib: int = 0
    util_pct: int = 0
    temp_c: int = 40
    power_mw: int = 100_000
    limit_mw: int = 400_000
    cc: tuple[int, int] = (8, 0)
    mig: list[FakeNvDevice | None] | None = None  # None: MIG off; a None slot is empty
    unsupported: set[str] = field(default_factory=set)  # nvml function names -> NotSupported
    lost: bool = False  # every call raises NVMLError_GpuIsLost
    ecc_uncorrected: int = 0  # volatile uncorrectable ECC count
    retired_pending: bool = False
    remapped_rows: tuple[int, int, int, int] = (0, 0, 0, 0)  # corr, unc, pending, failed
    xids: list[int] = field(default_factory=list)  # XID events not yet read
    compute_pids: list[int] = field(default_factory=list)


class FakeNvml:
    """Stands in for the `pynvml` module: `NvmlDetector(nvml=FakeNvml([...]))`."""

    NVMLError = pynvml.NVMLError
    NVMLError_NotSupported = pynvml.NVMLError_NotSupported
    NVMLError_NotFound = pynvml.NVMLError_NotFound
    NVMLError_FunctionNotFound = pynvml.NVMLError_FunctionNotFound
    NVML_TEMPERATURE_GPU = pynvml.NVML_TEMPERATURE_GPU
    NVML_DEVICE_MIG_ENABLE = pynvml.NVML_DEVICE_MIG_ENABLE
    NVML_DEVICE_MIG_DISABLE = pynvml.NVML_DEVICE_MIG_DISABLE
    NVMLError_GpuIsLost = pynvml.NVMLError_GpuIsLost
    NVMLError_Timeout = pynvml.NVMLError_Timeout
    NVML_MEMORY_ERROR_TYPE_UNCORRECTED = pynvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED
    NVML_VOLATILE_ECC = pynvml.NVML_VOLATILE_ECC
    NVML_FEATURE_ENABLED = pynvml.NVML_FEATURE_ENABLED
    NVML_FEATURE_DISABLED = pynvml.NVML_FEATURE_DISABLED
    nvmlEventTypeXidCriticalError = pynvml.nvmlEventTypeXidCriticalError

    def __init__(self, devices: list[FakeNvDevice], init_error: int | None = None) -> None:
        self.devices = devices
        self.init_error = init_error  # e.g. pynvml.NVML_ERROR_DRIVER_NOT_LOADED
        self.init_calls = 0
        self.handle_calls = 0
        self.initialized = False

    # --- lifecycle --------------------------------------------------------------------

    def nvmlInit(self) -> None:
        self.init_calls += 1
        if self.init_error is not None:
            raise pynvml.NVMLError(self.init_error)
        self.initialized = True

    def nvmlShutdown(self) -> None:
        self.initialized = False

    def nvmlDeviceGetCount(self) -> int:
        self._need_init()
        return len(self.devices)

    def nvmlDeviceGetHandleByIndex(self, index: int) -> FakeNvDevice:
        self._need_init()
        self.handle_calls += 1
        return self.devices[index]

    # --- readings ---------------------------------------------------------------------

    def nvmlDeviceGetName(self, h: FakeNvDevice) -> str:
        return self._check(h, "nvmlDeviceGetName").name

    def nvmlDeviceGetUUID(self, h: FakeNvDevice) -> str:
        return self._check(h, "nvmlDeviceGetUUID").uuid

    def nvmlDeviceGetMemoryInfo(self, h: FakeNvDevice) -> Any:
        d = self._check(h, "nvmlDeviceGetMemoryInfo")
        total, used = d.total_mib * MIB, d.used_mib * MIB
        return SimpleNamespace(total=total, used=used, free=total - used)

    def nvmlDeviceGetUtilizationRates(self, h: FakeNvDevice) -> Any:
        return SimpleNamespace(
            gpu=self._check(h, "nvmlDeviceGetUtilizationRates").util_pct, memory=0
        )

    def nvmlDeviceGetTemperature(self, h: FakeNvDevice, sensor: int) -> int:
        assert sensor == pynvml.NVML_TEMPERATURE_GPU
        return self._check(h, "nvmlDeviceGetTemperature").temp_c

    def nvmlDeviceGetPowerUsage(self, h: FakeNvDevice) -> int:
        return self._check(h, "nvmlDeviceGetPowerUsage").power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, h: FakeNvDevice) -> int:
        return self._check(h, "nvmlDeviceGetEnforcedPowerLimit").limit_mw

    def nvmlDeviceGetCudaComputeCapability(self, h: FakeNvDevice) -> tuple[int, int]:
        return self._check(h, "nvmlDeviceGetCudaComputeCapability").cc

    # --- MIG --------------------------------------------------------------------------

    def nvmlDeviceGetMigMode(self, h: FakeNvDevice) -> list[int]:
        d = self._check(h, "nvmlDeviceGetMigMode")
        if d.mig is None:
            return [self.NVML_DEVICE_MIG_DISABLE, self.NVML_DEVICE_MIG_DISABLE]
        return [self.NVML_DEVICE_MIG_ENABLE, self.NVML_DEVICE_MIG_ENABLE]

    def nvmlDeviceGetMaxMigDeviceCount(self, h: FakeNvDevice) -> int:
        d = self._check(h, "nvmlDeviceGetMaxMigDeviceCount")
        return 7 if d.mig is not None else 0

    def nvmlDeviceGetMigDeviceHandleByIndex(self, h: FakeNvDevice, slot: int) -> FakeNvDevice:
        d = self._check(h, "nvmlDeviceGetMigDeviceHandleByIndex")
        slots = d.mig or []
        if slot >= len(slots) or slots[slot] is None:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_FOUND)
        found = slots[slot]
        assert found is not None
        return found

    # --- faults and processes ---------------------------------------------------------

    def nvmlDeviceGetTotalEccErrors(self, h: FakeNvDevice, kind: int, counter: int) -> int:
        assert (kind, counter) == (self.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, self.NVML_VOLATILE_ECC)
        return self._check(h, "nvmlDeviceGetTotalEccErrors").ecc_uncorrected

    def nvmlDeviceGetRetiredPagesPendingStatus(self, h: FakeNvDevice) -> int:
        d = self._check(h, "nvmlDeviceGetRetiredPagesPendingStatus")
        return self.NVML_FEATURE_ENABLED if d.retired_pending else self.NVML_FEATURE_DISABLED

    def nvmlDeviceGetRemappedRows(self, h: FakeNvDevice) -> tuple[int, int, int, int]:
        return self._check(h, "nvmlDeviceGetRemappedRows").remapped_rows

    def nvmlEventSetCreate(self) -> list[FakeNvDevice]:
        self._need_init()
        return []

    def nvmlDeviceRegisterEvents(self, h: FakeNvDevice, kinds: int, events: list[Any]) -> None:
        assert kinds == self.nvmlEventTypeXidCriticalError
        events.append(self._check(h, "nvmlDeviceRegisterEvents"))

    def nvmlEventSetWait(self, events: list[FakeNvDevice], timeout_ms: int) -> Any:
        for d in events:
            if d.xids:
                return SimpleNamespace(device=d, eventType=self.nvmlEventTypeXidCriticalError,
                                       eventData=d.xids.pop(0))
        raise pynvml.NVMLError(pynvml.NVML_ERROR_TIMEOUT)

    def nvmlDeviceGetComputeRunningProcesses(self, h: FakeNvDevice) -> list[Any]:
        d = self._check(h, "nvmlDeviceGetComputeRunningProcesses")
        return [SimpleNamespace(pid=p, usedGpuMemory=0) for p in d.compute_pids]

    # --- helpers ----------------------------------------------------------------------

    def _need_init(self) -> None:
        if not self.initialized:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_UNINITIALIZED)

    def _check(self, h: FakeNvDevice, fn: str) -> FakeNvDevice:
        self._need_init()
        if h.lost:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_GPU_IS_LOST)
        if fn in h.unsupported:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NOT_SUPPORTED)
        return h


def h100(index: int, **kw: Any) -> FakeNvDevice:
    values: dict[str, Any] = dict(
        name="NVIDIA H100 80GB HBM3",
        uuid=f"GPU-{index:08d}-h100",
        total_mib=81559,
        used_mib=512,
        util_pct=37,
        temp_c=41,
        power_mw=118_512,
        limit_mw=700_000,
        cc=(9, 0),
    )
    values.update(kw)
    return FakeNvDevice(**values)


def mig(profile: str, total_mib: int, n: int, used_mib: int = 13) -> FakeNvDevice:
    return FakeNvDevice(
        name=f"NVIDIA H100 80GB HBM3 MIG {profile}",
        uuid=f"MIG-0000000{n}-{profile}",
        total_mib=total_mib,
        used_mib=used_mib,
        unsupported={
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetEnforcedPowerLimit",
        },
    )


class AmdSmiException(Exception):
    pass


class FakeAmdSmi:
    """Stands in for the `amdsmi` module: devices are dicts of what each getter returns."""

    AmdSmiException = AmdSmiException
    AmdSmiTemperatureType = SimpleNamespace(EDGE="edge", HOTSPOT="hotspot")
    AmdSmiTemperatureMetric = SimpleNamespace(CURRENT="current")

    def __init__(self, devices: list[dict[str, Any]], init_fails: bool = False) -> None:
        self.devices, self.init_fails = devices, init_fails

    def amdsmi_init(self) -> None:
        if self.init_fails:
            raise AmdSmiException("AMDSMI_STATUS_DRIVER_NOT_LOADED")

    def amdsmi_get_processor_handles(self) -> list[dict[str, Any]]:
        return self.devices

    def _field(self, h: dict[str, Any], key: str) -> Any:
        if key not in h:
            raise AmdSmiException(f"AMDSMI_STATUS_NOT_SUPPORTED: {key}")
        return h[key]

    def amdsmi_get_gpu_asic_info(self, h: dict[str, Any]) -> Any:
        return self._field(h, "asic")

    def amdsmi_get_gpu_vram_usage(self, h: dict[str, Any]) -> Any:
        return self._field(h, "vram")

    def amdsmi_get_gpu_activity(self, h: dict[str, Any]) -> Any:
        return self._field(h, "activity")

    def amdsmi_get_power_info(self, h: dict[str, Any]) -> Any:
        return self._field(h, "power")

    def amdsmi_get_temp_metric(self, h: dict[str, Any], sensor: str, metric: str) -> Any:
        return self._field(h, f"temp_{sensor}")

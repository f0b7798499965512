"""NVIDIA GPU faults that NVML reports, as the text of `GpuInfo.fault` ("" when none).

Read on every `NvmlDetector.read()`, cheaply: uncorrectable volatile ECC errors
(nvmlDeviceGetTotalEccErrors), retired pages pending a reset, row remapping failed or pending,
and critical XID events (one event set, drained without waiting). A card whose reads raise
NVML_ERROR_GPU_IS_LOST is "fallen off the bus" (see nvidia.py). The coordinator places no work
on a GPU with a fault; the other GPUs of the node stay in service.

XIDs are sticky: once seen, the card stays faulted until the client restarts (after the
operator has reset the GPU). XIDs that are usually a program's own error (13, 31, 43, 45...)
are logged, not counted as faults.
"""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger(__name__)

# Hardware XIDs: double-bit ECC, NVLink, off the bus, high SBE rate, (un)contained ECC, GSP.
FAULT_XIDS = frozenset({48, 74, 79, 92, 94, 95, 119, 120})
LOST = "fallen off the bus (NVML: GPU is lost)"


class NvmlFaults:
    """Fault readings for the cards of one NVML session; `nvml` is pynvml or a fake."""

    def __init__(self, nvml: Any) -> None:
        self._nvml = nvml
        self._events: Any = None
        self._by_uuid: dict[str, int] = {}
        self.xids: dict[int, int] = {}  # card index -> its first fault XID

    def start(self, cards: list[Any]) -> None:
        """Register every card for critical XID events; cards that cannot are skipped."""
        nvml = self._nvml
        try:
            self._events = nvml.nvmlEventSetCreate()
        except (nvml.NVMLError, AttributeError) as exc:
            log.info("NVIDIA: no XID events (%s)", exc)
            return
        for index, card in enumerate(cards):
            try:
                self._by_uuid[_text(nvml.nvmlDeviceGetUUID(card))] = index
                nvml.nvmlDeviceRegisterEvents(card, nvml.nvmlEventTypeXidCriticalError,
                                              self._events)
            except nvml.NVMLError as exc:
                log.info("NVIDIA GPU %d: no XID events (%s)", index, exc)

    def poll(self) -> None:
        """Drain pending XID events without waiting."""
        nvml = self._nvml
        if self._events is None:
            return
        for _ in range(1000):
            try:
                data = nvml.nvmlEventSetWait(self._events, 0)
            except nvml.NVMLError_Timeout:
                return
            except nvml.NVMLError as exc:
                log.debug("XID event wait: %s", exc)
                return
            xid = int(data.eventData)
            try:
                index = self._by_uuid.get(_text(nvml.nvmlDeviceGetUUID(data.device)), -1)
            except nvml.NVMLError:
                index = -1
            if xid in FAULT_XIDS and index >= 0:
                if index not in self.xids:
                    log.error("NVIDIA GPU %d: XID %d: taken out of service", index, xid)
                self.xids.setdefault(index, xid)
            else:
                log.warning("NVIDIA GPU %d: XID %d (not counted as a GPU fault)", index, xid)

    def fault(self, index: int, card: Any) -> str:
        """The card's fault now, or "". Raises NVMLError_GpuIsLost for a lost card."""
        if index in self.xids:
            return f"xid {self.xids[index]}"
        nvml = self._nvml
        ecc = self._read(nvml.nvmlDeviceGetTotalEccErrors, card,
                         nvml.NVML_MEMORY_ERROR_TYPE_UNCORRECTED, nvml.NVML_VOLATILE_ECC)
        if ecc:
            return f"uncorrectable ECC errors ({int(ecc)})"
        if self._read(nvml.nvmlDeviceGetRetiredPagesPendingStatus, card) == \
                nvml.NVML_FEATURE_ENABLED:
            return "retired pages pending (GPU reset needed)"
        rows = self._read(nvml.nvmlDeviceGetRemappedRows, card)
        if rows is not None and rows[3]:
            return "row remapping failed"
        if rows is not None and rows[2]:
            return "row remapping pending (GPU reset needed)"
        return ""

    def _read(self, fn: Any, *args: Any) -> Any:
        nvml = self._nvml
        try:
            return fn(*args)
        except nvml.NVMLError as exc:
            if isinstance(exc, nvml.NVMLError_GpuIsLost):
                raise
            return None  # not supported on this card (no ECC on consumer cards, ...)


def compute_pids(nvml: Any, cards: list[Any]) -> set[int]:
    """Pids of the compute processes NVML lists on any of `cards` (lost cards skipped)."""
    pids: set[int] = set()
    for card in cards:
        try:
            pids |= {int(p.pid) for p in nvml.nvmlDeviceGetComputeRunningProcesses(card)}
        except nvml.NVMLError:
            continue
    return pids


def _text(value: object) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)

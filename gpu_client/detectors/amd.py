"""AMD GPUs through the `amdsmi` Python module, or the `rocm-smi --json` CLI where only it exists.

Indices are the device order both tools use (rocm-smi's `cardN` keys, amdsmi's handle
order), which is ROCr's order for ROCR_VISIBLE_DEVICES. Where the card reports a unique id,
`uuid` is ROCr's form of it (`GPU-<hex>`), which ROCR_VISIBLE_DEVICES also accepts.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Mapping
from typing import Any

from gpu_client.detectors.base import CliError, LogOnce, RunCli, json_start, run_cli, to_float
from shared.protocol import GpuInfo

log = logging.getLogger(__name__)

ROCM_SMI_ARGV = (
    "rocm-smi",
    "--showproductname",
    "--showmeminfo",
    "vram",
    "--showuse",
    "--showtemp",
    "--showpower",
    "--showmaxpower",
    "--showuniqueid",
    "--json",
)

_CARD_KEY = re.compile(r"^card(\d+)$")


def rocr_uuid(unique_id: object) -> str:
    """`0x18F68E602B8A790F` -> `GPU-18f68e602b8a790f` (ROCr's UUID); "" when absent or zero."""
    text = str(unique_id or "").strip().lower().removeprefix("0x")
    if not text or not re.fullmatch(r"[0-9a-f]+", text) or int(text, 16) == 0:
        return ""
    return f"GPU-{text}"


def _first_text(card: Mapping[str, Any], *names: str) -> str:
    lowered = {k.strip().lower(): v for k, v in card.items()}
    for name in names:
        value = lowered.get(name.lower())
        if isinstance(value, str) and value.strip() and value.strip().upper() != "N/A":
            return value.strip()
    return ""


def _number(card: Mapping[str, Any], *patterns: str) -> float | None:
    """The first reading, in pattern order, that parses as a number ("N/A" is skipped)."""
    for pattern in patterns:
        rx = re.compile(pattern, re.IGNORECASE)
        for key, value in card.items():
            number = to_float(value) if rx.fullmatch(key.strip()) else None
            if number is not None:
                return number
    return None


def _vram_mib(card: Mapping[str, Any], which: str) -> int:
    """`VRAM Total Memory (B)` (most versions) or `... (MiB)` (some builds), in MiB."""
    in_bytes = _number(card, rf"vram total {which}memory \(b\)")
    if in_bytes is not None:
        return int(in_bytes) >> 20
    in_mib = _number(card, rf"vram total {which}memory \(mib\)")
    return int(in_mib) if in_mib is not None else 0


def parse_rocm_smi(text: str) -> list[GpuInfo]:
    """GPUs from `rocm-smi ... --json`; raises ValueError (json.JSONDecodeError) on junk."""
    doc = json.loads(json_start(text))
    if not isinstance(doc, dict):
        raise ValueError("rocm-smi --json: expected an object keyed by card")
    gpus: list[GpuInfo] = []
    for key, card in doc.items():
        m = _CARD_KEY.match(key)
        if m is None or not isinstance(card, dict):
            continue  # "system" and friends
        power = _number(
            card,
            r"current socket graphics package power \(w\)",
            r"average graphics package power \(w\)",
        )
        gpus.append(
            GpuInfo(
                index=int(m.group(1)),
                name=_first_text(card, "Card Series", "Device Name", "Card Model", "Card SKU")
                or f"AMD GPU {m.group(1)}",
                vendor="amd",
                uuid=rocr_uuid(card.get("Unique ID")),
                memory_total_mb=_vram_mib(card, ""),
                memory_used_mb=_vram_mib(card, "used "),
                utilization_pct=_number(card, r"gpu use \(%\)") or 0.0,
                temperature_c=_number(
                    card,
                    r"temperature \(sensor edge\) \(c\)",
                    r"temperature \(sensor junction\) \(c\)",
                ),
                power_w=power,
                power_limit_w=_number(card, r"max graphics package power \(w\)"),
            )
        )
    return sorted(gpus, key=lambda g: g.index)


class RocmSmiDetector:
    """AMD GPUs from the rocm-smi CLI; `run` is the CLI seam (tests feed recorded output)."""

    vendor = "amd"

    def __init__(self, run: RunCli = run_cli) -> None:
        self._run = run
        self._once = LogOnce(log)
        self._missing = False  # the CLI is not installed: stop asking

    def is_available(self) -> bool:
        return bool(self.read())

    def read(self) -> list[GpuInfo]:
        if self._missing:
            return []
        try:
            return parse_rocm_smi(self._run(ROCM_SMI_ARGV))
        except CliError as exc:
            self._missing = exc.missing
            self._once(logging.INFO, f"cli:{exc.reason}", "AMD: %s; no AMD GPUs from rocm-smi", exc)
        except ValueError as exc:  # json.JSONDecodeError is a ValueError
            self._once(logging.WARNING, "json", "AMD: rocm-smi printed no usable JSON: %s", exc)
        return []


class AmdSmiDetector:
    """AMD GPUs through the `amdsmi` module; `amdsmi` is that module (tests pass a fake).

    Units as the amdsmi Python API documents them: VRAM in MB, power in W, temperature in °C.
    """

    vendor = "amd"

    def __init__(self, amdsmi: Any) -> None:
        self._smi = amdsmi
        self._handles: list[Any] | None = None
        self._once = LogOnce(log)

    def is_available(self) -> bool:
        return self._start()

    def _start(self) -> bool:
        if self._handles is not None:
            return True
        smi = self._smi
        try:
            smi.amdsmi_init()
            self._handles = list(smi.amdsmi_get_processor_handles())
        except smi.AmdSmiException as exc:
            self._once(logging.INFO, "init", "AMD: amdsmi did not start (%s)", exc)
            return False
        log.info("AMD: amdsmi sees %d GPU(s)", len(self._handles))
        return True

    def _get(self, name: str, *args: object) -> Any:
        try:
            return getattr(self._smi, name)(*args)
        except self._smi.AmdSmiException as exc:
            log.debug("amdsmi %s: %s", name, exc)
            return None

    def read(self) -> list[GpuInfo]:
        if not self._start() or self._handles is None:
            return []
        smi, gpus = self._smi, []
        for index, h in enumerate(self._handles):
            asic = self._get("amdsmi_get_gpu_asic_info", h) or {}
            vram = self._get("amdsmi_get_gpu_vram_usage", h) or {}
            activity = self._get("amdsmi_get_gpu_activity", h) or {}
            power = self._get("amdsmi_get_power_info", h) or {}
            temp = self._get(
                "amdsmi_get_temp_metric",
                h,
                smi.AmdSmiTemperatureType.EDGE,
                smi.AmdSmiTemperatureMetric.CURRENT,
            )
            if to_float(temp) is None:  # MI300 reports no edge sensor: use the hotspot
                temp = self._get(
                    "amdsmi_get_temp_metric",
                    h,
                    smi.AmdSmiTemperatureType.HOTSPOT,
                    smi.AmdSmiTemperatureMetric.CURRENT,
                )
            draw = to_float(power.get("current_socket_power"))
            gpus.append(
                GpuInfo(
                    index=index,
                    name=str(asic.get("market_name") or f"AMD GPU {index}"),
                    vendor=self.vendor,
                    uuid=rocr_uuid(asic.get("asic_serial")),
                    memory_total_mb=int(to_float(vram.get("vram_total")) or 0),
                    memory_used_mb=int(to_float(vram.get("vram_used")) or 0),
                    utilization_pct=to_float(activity.get("gfx_activity")) or 0.0,
                    temperature_c=to_float(temp),
                    power_w=draw
                    if draw is not None
                    else to_float(power.get("average_socket_power")),
                    power_limit_w=to_float(power.get("power_limit")),
                )
            )
        return gpus


def load_amdsmi() -> Any:
    """The amdsmi module, or None. Importing it loads libamd_smi.so, which can fail any way."""
    try:
        import amdsmi  # type: ignore[import-not-found]
    except Exception as exc:  # noqa: BLE001 - a broken ROCm install raises OSError, KeyError...
        log.debug("AMD: amdsmi not importable: %r", exc)
        return None
    return amdsmi


class AmdDetector:
    """amdsmi when it imports and starts, else rocm-smi; decided on first use."""

    vendor = "amd"

    def __init__(self, amdsmi: Any = None, run: RunCli = run_cli) -> None:
        self._amdsmi, self._run = amdsmi, run
        self._chosen: AmdSmiDetector | RocmSmiDetector | None = None

    def _choose(self) -> AmdSmiDetector | RocmSmiDetector:
        if self._chosen is None:
            module = self._amdsmi if self._amdsmi is not None else load_amdsmi()
            lib = AmdSmiDetector(module) if module is not None else None
            self._chosen = (
                lib if lib is not None and lib.is_available() else RocmSmiDetector(self._run)
            )
        return self._chosen

    def is_available(self) -> bool:
        return self._choose().is_available()

    def read(self) -> list[GpuInfo]:
        return self._choose().read()

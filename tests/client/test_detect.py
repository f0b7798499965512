"""make_source's rules, simulated GPUs, the combined source's index space, host stats, and
`python -m gpu_client.detect` as a real process."""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import pytest

from gpu_client.detect import DetectedGpus, FakeGpus, NoGpus, make_source
from gpu_client.detectors import (
    AmdDetector,
    AppleDetector,
    IntelDetector,
    NvmlDetector,
    RocmSmiDetector,
    visible_devices_env,
)
from gpu_client.detectors.amd import ROCM_SMI_ARGV
from gpu_client.detectors.base import CliError
from gpu_client.hoststats import HostStats, host_stats
from shared.config import ConfigError
from shared.protocol import GpuInfo, Heartbeat, decode_client, encode
from tests.fakes import FakeAmdSmi, FakeNvml, h100, mig

ROOT = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parents[1] / "fixtures"


def absent(argv: Sequence[str]) -> str:
    raise CliError(argv, "not installed")


def rocm_mi300x(argv: Sequence[str]) -> str:
    if tuple(argv) != ROCM_SMI_ARGV:
        raise CliError(argv, "not installed")
    return (FIXTURES / "rocm_smi_mi300x_x2.json").read_text()


# --- make_source -------------------------------------------------------------------------


def test_gpu_disabled_wins_over_everything() -> None:
    source = make_source({"GPU_ENABLED": "false", "MESH_FAKE_GPUS": "2xA100-80GB"})
    assert isinstance(source, NoGpus) and source.read() == []


def test_fake_gpus_from_env() -> None:
    source = make_source({"MESH_FAKE_GPUS": "2xA100-80GB,1xRTX4090-24GB"})
    gpus = source.read()
    assert [(g.index, g.name, g.memory_total_mb, g.vendor) for g in gpus] == [
        (0, "A100", 81920, "fake"),
        (1, "A100", 81920, "fake"),
        (2, "RTX4090", 24576, "fake"),
    ]
    assert [g.uuid for g in gpus] == ["FAKE-A100-0", "FAKE-A100-1", "FAKE-RTX4090-2"]
    assert [g.compute_capability for g in gpus] == ["8.0", "8.0", "8.9"]


def test_otherwise_every_vendor_detector() -> None:
    source = make_source({})
    assert isinstance(source, DetectedGpus)
    kinds = {type(d) for d in source.detectors}
    assert kinds == {NvmlDetector, AmdDetector, IntelDetector, AppleDetector}
    assert isinstance(source.read(), list)  # this machine: whatever it has, no exception


def test_bad_settings_are_errors() -> None:
    with pytest.raises(ConfigError):
        make_source({"GPU_ENABLED": "maybe"})
    with pytest.raises(ValueError, match="expected like 2xA100-80GB"):
        make_source({"MESH_FAKE_GPUS": "2x A100"})
    with pytest.raises(ValueError, match="vendor must be one of"):
        make_source({"MESH_FAKE_GPUS": "1xTPUv5@google"})


# --- FakeGpus ----------------------------------------------------------------------------


def test_fake_defaults_and_vendor_suffix() -> None:
    gpus = FakeGpus.parse("RTX4090, 2xMI300X-192GB@amd, 1xArcA770-16GB@intel, M3Max-128GB@apple")
    assert [(g.index, g.vendor, g.memory_total_mb) for g in gpus.gpus] == [
        (0, "fake", 16384),
        (100, "amd", 196608),
        (101, "amd", 196608),
        (200, "intel", 16384),
        (300, "apple", 131072),
    ]
    assert gpus.gpus[1].compute_capability == ""
    env = visible_devices_env(gpus.gpus[:3])
    assert env["ROCR_VISIBLE_DEVICES"] == "0,1" and env["CUDA_VISIBLE_DEVICES"] == "0"


def test_fake_and_nvidia_share_one_block() -> None:
    gpus = FakeGpus.parse("1xA100-40GB,1xH100-80GB@nvidia").read()
    assert [(g.index, g.vendor) for g in gpus] == [(0, "fake"), (1, "nvidia")]
    assert len({g.uuid for g in gpus}) == 2


def test_fake_reads_are_copies() -> None:
    source = FakeGpus.parse("1xA100-80GB")
    source.read()[0].memory_used_mb = 999
    assert source.read()[0].memory_used_mb == 0
    source.gpus[0].memory_used_mb = 5  # tests simulate load by editing .gpus
    assert source.read()[0].memory_used_mb == 5


# --- DetectedGpus ------------------------------------------------------------------------


def test_single_vendor_keeps_the_vendor_indices() -> None:
    nvml = FakeNvml([h100(0), h100(1, mig=[mig("3g.40gb", 40_192, 1)]), h100(2)])
    gpus = DetectedGpus([NvmlDetector(nvml), RocmSmiDetector(lambda a: "{}")]).read()
    assert [(g.index, g.parent_index) for g in gpus] == [(0, None), (2, None), (3, 1)]


def test_a_drivers_wrong_readings_are_dropped_so_the_heartbeat_is_taken() -> None:
    """NVML and friends report sentinels (65535 C, 0xFFFFFFFF mW); the coordinator refuses a
    heartbeat out of range (shared/protocol.py), so the client sends no reading instead."""
    wrong = GpuInfo(index=0, vendor="nvidia", memory_total_mb=81_920, memory_used_mb=-5,
                    utilization_pct=101.0, temperature_c=65_535.0, power_w=float("nan"),
                    power_limit_w=4_294_967.295)

    class Odd:
        vendor = "nvidia"

        def read(self) -> list[GpuInfo]:
            return [wrong]

    (gpu,) = DetectedGpus([Odd()]).read()  # type: ignore[list-item]
    assert (gpu.memory_used_mb, gpu.utilization_pct) == (0, 100.0)
    assert (gpu.temperature_c, gpu.power_w, gpu.power_limit_w) == (None, None, None)
    beat = encode(Heartbeat(gpus=[gpu]))
    assert isinstance(decode_client(beat), Heartbeat)  # what the coordinator takes
    assert not isinstance(decode_client(encode(Heartbeat(gpus=[wrong]))), Heartbeat)


def test_mixed_vendors_get_a_block_each() -> None:
    nvml = FakeNvml([h100(0), h100(1, mig=[mig("3g.40gb", 40_192, 1)])])
    source = DetectedGpus(
        [
            NvmlDetector(nvml),
            AmdDetector(FakeAmdSmi([], init_fails=True), rocm_mi300x),
            IntelDetector(absent, Path("/nonexistent")),
        ]
    )
    gpus = source.read()
    assert [(g.vendor, g.index, g.parent_index) for g in gpus] == [
        ("nvidia", 0, None),
        ("nvidia", 2, 1),
        ("amd", 100, None),
        ("amd", 101, None),
    ]
    env = visible_devices_env([gpus[1], gpus[3]])
    assert env == {
        "CUDA_VISIBLE_DEVICES": "MIG-00000001-3g.40gb",
        "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
        "ROCR_VISIBLE_DEVICES": "GPU-2a07f2c1b1d6a011",
    }


class Raises:
    vendor = "amd"

    def is_available(self) -> bool:
        return True

    def read(self) -> list[GpuInfo]:
        raise RuntimeError("vendor library blew up")


class NoMemory:
    vendor = "intel"

    def is_available(self) -> bool:
        return True

    def read(self) -> list[GpuInfo]:
        return [
            GpuInfo(index=0, name="Intel UHD 770", vendor="intel"),
            GpuInfo(index=1, name="Arc A770", vendor="intel", memory_total_mb=16256),
        ]


def test_a_raising_detector_costs_only_its_vendor(caplog: pytest.LogCaptureFixture) -> None:
    source = DetectedGpus([Raises(), NvmlDetector(FakeNvml([h100(0)]))])
    assert [g.index for g in source.read()] == [0]
    assert [g.index for g in source.read()] == [0]
    assert caplog.text.count("amd detector failed") == 1
    assert "vendor library blew up" in caplog.text  # with its traceback


def test_devices_without_memory_are_dropped(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level("INFO")
    source = DetectedGpus([NoMemory()])
    assert [(g.index, g.name) for g in source.read()] == [(1, "Arc A770")]
    source.read()
    assert caplog.text.count("reports no memory") == 1


def test_no_driver_anywhere_reads_no_gpus() -> None:
    source = DetectedGpus(
        [
            NvmlDetector(FakeNvml([], init_error=9)),
            AmdDetector(FakeAmdSmi([], init_fails=True), absent),
            IntelDetector(absent, Path("/nonexistent")),
            AppleDetector(absent, platform="darwin"),
        ]
    )
    assert source.read() == []


# --- host stats and the script -----------------------------------------------------------


def test_host_stats() -> None:
    stats = host_stats()
    assert isinstance(stats, HostStats)
    assert stats.cpu_count >= 1 and 0.0 <= stats.cpu_pct <= 100.0
    assert 0 < stats.memory_used_mb <= stats.memory_total_mb
    assert stats.load1 >= 0.0


def test_detect_script_prints_json() -> None:
    env = {"PATH": "/usr/bin:/bin", "MESH_FAKE_GPUS": "1xL4-24GB"}
    done = subprocess.run(
        [sys.executable, "-m", "gpu_client.detect"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    report = json.loads(done.stdout)
    assert report["source"] == "FakeGpus"
    assert report["gpus"] == [
        {
            "index": 0,
            "name": "L4",
            "vendor": "fake",
            "uuid": "FAKE-L4-0",
            "memory_total_mb": 24576,
            "temperature_c": 35.0,
            "power_w": 25.0,
            "power_limit_w": 300.0,
            "compute_capability": "8.9",
        }
    ]
    assert report["visible_devices_env"]["CUDA_VISIBLE_DEVICES"] == "0"
    assert report["host"]["cpu_count"] >= 1

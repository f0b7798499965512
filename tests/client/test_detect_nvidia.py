"""NvmlDetector against a fake `pynvml` module (tests/fakes.py), and against the real one."""

from __future__ import annotations

import logging

import pynvml
import pytest

from gpu_client.detectors.layout import visible_devices_env
from gpu_client.detectors.nvidia import NvmlDetector
from tests.fakes import FakeNvml, h100, mig


def test_reads_every_field_of_a_whole_card() -> None:
    nvml = FakeNvml([h100(0), h100(1, util_pct=99, used_mib=70_000)])
    gpus = NvmlDetector(nvml).read()
    assert [g.index for g in gpus] == [0, 1]
    g = gpus[0]
    assert g.name == "NVIDIA H100 80GB HBM3" and g.vendor == "nvidia"
    assert g.uuid == "GPU-00000000-h100"
    assert (g.memory_total_mb, g.memory_used_mb) == (81559, 512)
    assert g.utilization_pct == 37.0 and g.temperature_c == 41.0
    assert g.power_w == pytest.approx(118.512) and g.power_limit_w == 700.0
    assert g.compute_capability == "9.0" and g.parent_index is None
    assert gpus[1].utilization_pct == 99.0 and gpus[1].memory_used_mb == 70_000


def test_inits_once_and_keeps_handles() -> None:
    nvml = FakeNvml([h100(0), h100(1)])
    detector = NvmlDetector(nvml)
    for _ in range(3):
        assert len(detector.read()) == 2
    assert nvml.init_calls == 1 and nvml.handle_calls == 2


def test_readings_follow_the_device() -> None:
    card = h100(0)
    detector = NvmlDetector(FakeNvml([card]))
    detector.read()
    card.used_mib, card.util_pct = 40_000, 88
    (g,) = detector.read()
    assert (g.memory_used_mb, g.utilization_pct) == (40_000, 88.0)


def test_unsupported_fields_are_none_not_errors() -> None:
    card = h100(
        0,
        unsupported={
            "nvmlDeviceGetPowerUsage",
            "nvmlDeviceGetEnforcedPowerLimit",
            "nvmlDeviceGetTemperature",
            "nvmlDeviceGetUtilizationRates",
            "nvmlDeviceGetCudaComputeCapability",
            "nvmlDeviceGetMigMode",
        },
    )
    (g,) = NvmlDetector(FakeNvml([card])).read()
    assert g.power_w is None and g.power_limit_w is None and g.temperature_c is None
    assert g.utilization_pct == 0.0 and g.compute_capability == ""
    assert g.memory_total_mb == 81559  # the rest is still read


def test_mig_instances_are_their_own_gpus_numbered_after_the_cards() -> None:
    parted = h100(0, mig=[mig("3g.40gb", 40_192, 1), None, mig("1g.10gb", 9_856, 2, 300)])
    nvml = FakeNvml([parted, h100(1)])
    gpus = NvmlDetector(nvml).read()
    assert [(g.index, g.parent_index) for g in gpus] == [(1, None), (2, 0), (3, 0)]
    a, b = gpus[1], gpus[2]
    assert a.name.endswith("MIG 3g.40gb") and a.uuid == "MIG-00000001-3g.40gb"
    assert (a.memory_total_mb, b.memory_total_mb, b.memory_used_mb) == (40_192, 9_856, 300)
    assert a.temperature_c == 41.0 and a.compute_capability == "9.0"  # the card's
    assert a.power_w is None and a.utilization_pct == 0.0  # NVML has none per instance
    env = visible_devices_env([b, gpus[0]])
    assert env["CUDA_VISIBLE_DEVICES"] == "MIG-00000002-1g.10gb,GPU-00000001-h100"


def test_mig_mode_without_instances_offers_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    detector = NvmlDetector(FakeNvml([h100(0, mig=[])]))
    assert detector.read() == [] and detector.read() == []
    assert caplog.text.count("MIG mode with no instances") == 1


def test_a_lost_card_is_skipped_and_logged_once(caplog: pytest.LogCaptureFixture) -> None:
    lost = h100(0)
    detector = NvmlDetector(FakeNvml([lost, h100(1)]))
    lost.lost = True
    assert [g.index for g in detector.read()] == [1]
    assert [g.index for g in detector.read()] == [1]
    assert caplog.text.count("NVIDIA GPU 0 unreadable") == 1
    lost.lost = False
    assert [g.index for g in detector.read()] == [0, 1]


@pytest.mark.parametrize(
    "error", [pynvml.NVML_ERROR_DRIVER_NOT_LOADED, pynvml.NVML_ERROR_LIBRARY_NOT_FOUND]
)
def test_no_driver_means_no_gpus(error: int, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    nvml = FakeNvml([h100(0)], init_error=error)
    detector = NvmlDetector(nvml)
    assert not detector.is_available()
    assert detector.read() == [] and detector.read() == []
    assert nvml.init_calls == 1
    assert caplog.text.count("NVML did not start") == 1


def test_name_and_uuid_as_bytes_from_old_bindings() -> None:
    card = h100(0)
    nvml = FakeNvml([card])
    nvml.nvmlDeviceGetName = lambda h: b"Tesla T4"  # type: ignore[method-assign]
    nvml.nvmlDeviceGetUUID = lambda h: b"GPU-abc"  # type: ignore[method-assign]
    (g,) = NvmlDetector(nvml).read()
    assert (g.name, g.uuid) == ("Tesla T4", "GPU-abc")


def test_close_shuts_nvml_down_and_a_later_read_starts_it_again() -> None:
    nvml = FakeNvml([h100(0)])
    detector = NvmlDetector(nvml)
    detector.read()
    detector.close()
    assert not nvml.initialized
    assert len(detector.read()) == 1 and nvml.init_calls == 2


def test_real_nvml_on_this_machine_does_not_raise() -> None:
    """The real pynvml: [] on a machine without an NVIDIA driver, the GPUs on one with it."""
    detector = NvmlDetector()
    gpus = detector.read()
    assert isinstance(gpus, list)
    assert all(g.vendor == "nvidia" and g.memory_total_mb > 0 for g in gpus)
    detector.close()

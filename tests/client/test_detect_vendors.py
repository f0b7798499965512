"""AMD, Intel and Apple detectors against recorded tool output (tests/fixtures/) and a fake
`amdsmi` module; the CLI seam is a `run_cli` that answers from those files."""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest

from gpu_client.detectors.amd import (
    ROCM_SMI_ARGV,
    AmdDetector,
    AmdSmiDetector,
    RocmSmiDetector,
    parse_rocm_smi,
)
from gpu_client.detectors.apple import SYSTEM_PROFILER_ARGV, AppleDetector
from gpu_client.detectors.base import CliError, run_cli
from gpu_client.detectors.intel import IntelDetector, IntelSysfsDetector, XpuSmiDetector
from gpu_client.detectors.layout import visible_devices_env
from tests.fakes import FakeAmdSmi

FIXTURES = Path(__file__).parents[1] / "fixtures"


def fixture(name: str) -> str:
    return (FIXTURES / name).read_text()


class Recorded:
    """A `run_cli` that answers known command lines with recorded output, and counts calls."""

    def __init__(self, answers: Mapping[tuple[str, ...], str]) -> None:
        self.answers = dict(answers)
        self.calls: list[tuple[str, ...]] = []

    def __call__(self, argv: Sequence[str]) -> str:
        self.calls.append(tuple(argv))
        if tuple(argv) not in self.answers:
            raise CliError(argv, "not installed")
        return self.answers[tuple(argv)]


def absent(argv: Sequence[str]) -> str:
    raise CliError(argv, "not installed")


# --- AMD ---------------------------------------------------------------------------------


def test_rocm_smi_rocm6_mi300x() -> None:
    gpus = RocmSmiDetector(Recorded({ROCM_SMI_ARGV: fixture("rocm_smi_mi300x_x2.json")})).read()
    assert [g.index for g in gpus] == [0, 1]
    a, b = gpus
    assert a.name == "AMD Instinct MI300X" and a.vendor == "amd"
    assert a.memory_total_mb == 196288 and a.memory_used_mb == 284
    assert b.memory_used_mb == 147456 and b.utilization_pct == 97.0
    assert a.temperature_c == 46.0  # no edge sensor on MI300X: the junction one
    assert (a.power_w, a.power_limit_w) == (141.0, 750.0)
    assert a.uuid == "GPU-18f68e602b8a790f"  # ROCr's form of the unique id
    assert visible_devices_env([b]) == {"ROCR_VISIBLE_DEVICES": "GPU-2a07f2c1b1d6a011"}


def test_rocm_smi_rocm5_with_a_warning_before_the_json() -> None:
    (g,) = parse_rocm_smi(fixture("rocm_smi_rx7900xtx_warning.txt"))
    assert g.name == "Radeon RX 7900 XTX" and g.index == 0
    assert (g.memory_total_mb, g.memory_used_mb) == (24560, 1179)
    assert (g.temperature_c, g.power_w, g.power_limit_w) == (38.0, 21.0, 327.0)
    assert g.utilization_pct == 3.0 and g.uuid == ""  # "N/A" unique id
    assert visible_devices_env([g]) == {"ROCR_VISIBLE_DEVICES": "0"}


def test_rocm_smi_vram_in_mib_and_missing_readings() -> None:
    text = '{"card3": {"vram Total Memory (MiB)": "65520", "vram Total Used Memory (MiB)": "9703",'
    text += ' "Card Series": "N/A", "GPU use (%)": "N/A"}}'
    (g,) = parse_rocm_smi(text)
    assert (g.index, g.memory_total_mb, g.memory_used_mb) == (3, 65520, 9703)
    assert g.name == "AMD GPU 3" and g.utilization_pct == 0.0 and g.temperature_c is None


@pytest.mark.parametrize("output", ["", "ERROR: no GPUs", "[1, 2]"])
def test_rocm_smi_junk_reads_no_gpus(output: str, caplog: pytest.LogCaptureFixture) -> None:
    detector = RocmSmiDetector(Recorded({ROCM_SMI_ARGV: output}))
    assert detector.read() == [] and detector.read() == []
    assert caplog.text.count("no usable JSON") == 1


def test_missing_tools_are_asked_once(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    run = Recorded({})
    detectors = [RocmSmiDetector(run), XpuSmiDetector(run), AppleDetector(run, platform="darwin")]
    for _ in range(3):
        assert [d.read() for d in detectors] == [[], [], []]
    assert [c[0] for c in run.calls] == ["rocm-smi", "xpu-smi", "system_profiler"]
    assert caplog.text.count("not installed") == 3


def test_a_failing_tool_is_asked_again() -> None:
    def broken(argv: Sequence[str]) -> str:
        calls.append(argv)
        raise CliError(argv, "exit status 1: rsmi_init failed")

    calls: list[Sequence[str]] = []
    detector = RocmSmiDetector(broken)
    assert detector.read() == [] and detector.read() == []
    assert len(calls) == 2


MI210 = {
    "asic": {"market_name": "AMD Instinct MI210", "asic_serial": "0x5D2E1A7F0C6B3E99"},
    "vram": {"vram_total": 65520, "vram_used": 10},
    "activity": {"gfx_activity": 42, "umc_activity": 3, "mm_activity": "N/A"},
    "power": {"current_socket_power": "N/A", "average_socket_power": 88, "power_limit": 300},
    "temp_edge": 39,
}


def test_amdsmi_library() -> None:
    no_edge = {k: v for k, v in MI210.items() if k not in ("temp_edge", "power")}
    gpus = AmdSmiDetector(FakeAmdSmi([MI210, no_edge | {"temp_hotspot": 61}])).read()
    a, b = gpus
    assert (a.index, a.name, a.memory_total_mb, a.memory_used_mb) == (
        0,
        "AMD Instinct MI210",
        65520,
        10,
    )
    assert (a.utilization_pct, a.temperature_c, a.power_w, a.power_limit_w) == (42, 39, 88, 300)
    assert a.uuid == "GPU-5d2e1a7f0c6b3e99"
    assert b.index == 1 and b.temperature_c == 61.0 and b.power_w is None


def test_amd_prefers_amdsmi_and_falls_back_to_rocm_smi() -> None:
    run = Recorded({ROCM_SMI_ARGV: fixture("rocm_smi_rx7900xtx_warning.txt")})
    assert AmdDetector(FakeAmdSmi([MI210]), run).read()[0].name == "AMD Instinct MI210"
    assert run.calls == []
    fallback = AmdDetector(FakeAmdSmi([], init_fails=True), run)
    assert fallback.read()[0].name == "Radeon RX 7900 XTX"


# --- Intel -------------------------------------------------------------------------------


def xpu_answers() -> dict[tuple[str, ...], str]:
    return {
        ("xpu-smi", "discovery", "-j"): fixture("xpu_smi_discovery_max1100_x2.json"),
        ("xpu-smi", "discovery", "-d", "0", "-j"): fixture("xpu_smi_discovery_d0.json"),
        ("xpu-smi", "discovery", "-d", "1", "-j"): fixture("xpu_smi_discovery_d1.json"),
        ("xpu-smi", "stats", "-d", "0", "-j"): fixture("xpu_smi_stats_d0.json"),
        ("xpu-smi", "stats", "-d", "1", "-j"): fixture("xpu_smi_stats_d1_tiles_bytes.json"),
    }


def test_xpu_smi_max1100() -> None:
    run = Recorded(xpu_answers())
    detector = XpuSmiDetector(run)
    a, b = detector.read()
    assert (a.index, a.name, a.vendor) == (0, "Intel(R) Data Center GPU Max 1100", "intel")
    assert a.uuid == "00000000-0000-0029-0000-002f0bda8086"
    assert (a.memory_total_mb, a.memory_used_mb) == (49152, 20480)
    assert (a.utilization_pct, a.temperature_c, a.power_w) == (64.0, 52.0, 212.45)
    # per-tile values only, memory in bytes
    assert (b.memory_used_mb, b.utilization_pct, b.temperature_c, b.power_w) == (
        8107,
        100.0,
        37.0,
        24.12,
    )
    assert visible_devices_env([b]) == {"ZE_AFFINITY_MASK": "1"}
    detector.read()
    assert sum(c[1] == "discovery" for c in run.calls) == 3  # static facts read once
    assert sum(c[1] == "stats" for c in run.calls) == 4


def test_xpu_smi_stats_failing_keeps_the_device() -> None:
    answers = xpu_answers()
    del answers[("xpu-smi", "stats", "-d", "1", "-j")]
    a, b = XpuSmiDetector(Recorded(answers)).read()
    assert b.memory_total_mb == 49152 and b.memory_used_mb == 0 and b.temperature_c is None


def test_xpu_smi_drops_virtual_functions_beside_their_physical_one() -> None:
    listing = """{"device_list": [
      {"device_id": 0, "device_name": "Intel(R) Data Center GPU Flex 170",
       "device_type": "GPU", "device_function_type": "physical"},
      {"device_id": 1, "device_name": "Intel(R) Data Center GPU Flex 170 VF",
       "device_type": "GPU", "device_function_type": "virtual"}]}"""
    run = Recorded(
        {
            ("xpu-smi", "discovery", "-j"): listing,
            ("xpu-smi", "discovery", "-d", "0", "-j"): '{"memory_physical_size_byte": 17179869184}',
            ("xpu-smi", "stats", "-d", "0", "-j"): "{}",
        }
    )
    (g,) = XpuSmiDetector(run).read()
    assert (g.index, g.memory_total_mb) == (0, 16384)


def make_card(root: Path, n: int, vendor: str, pci_id: str, tiles: Sequence[int] = ()) -> None:
    device = root / f"pci0000:00/0000:0{n}:00.0"
    device.mkdir(parents=True)
    (device / "vendor").write_text(vendor + "\n")
    (device / "device").write_text(pci_id + "\n")
    for t, size in enumerate(tiles):
        (device / f"tile{t}").mkdir()
        (device / f"tile{t}" / "physical_vram_size_bytes").write_text(f"{size}\n")
    card = root / "drm" / f"card{n}"
    card.mkdir(parents=True)
    (card / "device").symlink_to(device)
    (root / "drm" / f"card{n}-DP-1").mkdir()  # a connector, not a card


def test_intel_sysfs_fallback(tmp_path: Path) -> None:
    make_card(tmp_path, 0, "0x8086", "0xa780")  # integrated: no VRAM
    make_card(tmp_path, 1, "0x10de", "0x2684")  # an NVIDIA card: not ours
    make_card(tmp_path, 2, "0x8086", "0xe20b", tiles=[12 << 30])  # Arc B580 on xe
    gpus = IntelDetector(absent, tmp_path / "drm").read()
    assert [(g.index, g.name, g.memory_total_mb) for g in gpus] == [
        (0, "Intel GPU [0xa780]", 0),
        (1, "Intel GPU [0xe20b]", 12288),
    ]
    assert gpus[1].uuid == "0000:02:00.0"


def test_intel_prefers_xpu_smi_and_tolerates_no_sysfs(tmp_path: Path) -> None:
    assert len(IntelDetector(Recorded(xpu_answers()), tmp_path / "nothing").read()) == 2
    assert IntelSysfsDetector(tmp_path / "nothing").read() == []


# --- Apple -------------------------------------------------------------------------------


def test_apple_m3_max_unified_memory() -> None:
    run = Recorded({SYSTEM_PROFILER_ARGV: fixture("system_profiler_m3max.json")})
    detector = AppleDetector(run, memory=lambda: (131072, 20000), platform="darwin")
    assert detector.is_available()
    (g,) = detector.read()
    assert (g.index, g.name, g.vendor) == (0, "Apple M3 Max (40-core GPU)", "apple")
    assert (g.memory_total_mb, g.memory_used_mb) == (131072, 20000)
    assert visible_devices_env([g]) == {}


def test_apple_skips_intel_macs_and_other_systems() -> None:
    run = Recorded({SYSTEM_PROFILER_ARGV: fixture("system_profiler_intel_mac_radeon.json")})
    assert AppleDetector(run, memory=lambda: (1, 0), platform="darwin").read() == []
    linux = Recorded({})
    assert AppleDetector(linux, platform="linux").read() == [] and linux.calls == []


def test_apple_junk_output(caplog: pytest.LogCaptureFixture) -> None:
    run = Recorded({SYSTEM_PROFILER_ARGV: "{not json"})
    assert AppleDetector(run, memory=lambda: (1, 0), platform="darwin").read() == []
    assert "unparsable" in caplog.text


# --- the real CLI seam -------------------------------------------------------------------


def test_run_cli_reports_missing_failing_and_working_tools() -> None:
    with pytest.raises(CliError, match="not installed"):
        run_cli(["gpumesh-no-such-tool-xyz"])
    with pytest.raises(CliError, match="exit status 3"):
        run_cli(["sh", "-c", "echo boom >&2; exit 3"])
    assert run_cli(["sh", "-c", "echo '{}'"]).strip() == "{}"

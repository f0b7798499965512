"""One detector per GPU vendor, each behind `GpuDetector` (`is_available()`, `read()`).

Each tolerates a missing library, driver or CLI: it logs that once and reads no GPUs.
`gpu_client.detect` combines them into the node's `GpuSource`.
"""

from gpu_client.detectors.amd import AmdDetector, AmdSmiDetector, RocmSmiDetector
from gpu_client.detectors.apple import AppleDetector
from gpu_client.detectors.base import CliError, GpuDetector, RunCli, run_cli
from gpu_client.detectors.intel import IntelDetector, IntelSysfsDetector, XpuSmiDetector
from gpu_client.detectors.layout import (
    VENDOR_BLOCK,
    VENDOR_ORDER,
    lay_out,
    runtime_id,
    visible_devices_env,
)
from gpu_client.detectors.nvidia import NvmlDetector

__all__ = [
    "VENDOR_BLOCK",
    "VENDOR_ORDER",
    "AmdDetector",
    "AmdSmiDetector",
    "AppleDetector",
    "CliError",
    "GpuDetector",
    "IntelDetector",
    "IntelSysfsDetector",
    "NvmlDetector",
    "RocmSmiDetector",
    "RunCli",
    "XpuSmiDetector",
    "lay_out",
    "run_cli",
    "runtime_id",
    "visible_devices_env",
]

"""What every vendor detector shares: the interface, the CLI seam, log-once, number parsing."""

from __future__ import annotations

import logging
import subprocess
from collections.abc import Callable, Sequence
from typing import Protocol

from shared.protocol import GpuInfo

log = logging.getLogger(__name__)

CLI_TIMEOUT_S = 10.0
MIB = 1 << 20


class GpuDetector(Protocol):
    """One vendor's GPUs. Neither method raises: a missing driver or tool means no GPUs.

    `index` in what `read()` returns is the vendor runtime's own device index (what
    CUDA_VISIBLE_DEVICES / ROCR_VISIBLE_DEVICES / ZE_AFFINITY_MASK count), or a synthetic one
    above the physical cards for units addressed by UUID (NVIDIA MIG instances).
    """

    vendor: str

    def is_available(self) -> bool: ...

    def read(self) -> list[GpuInfo]: ...


NOT_INSTALLED = "not installed"


class CliError(Exception):
    """A vendor CLI that is missing, timed out, or failed; `reason` says which."""

    def __init__(self, argv: Sequence[str], reason: str) -> None:
        super().__init__(f"{' '.join(argv)}: {reason}")
        self.argv, self.reason = tuple(argv), reason

    @property
    def missing(self) -> bool:
        """The tool is not installed: detectors stop asking (a heartbeat is every few s)."""
        return self.reason == NOT_INSTALLED


RunCli = Callable[[Sequence[str]], str]  # argv -> stdout, or raises CliError


def run_cli(argv: Sequence[str]) -> str:
    """Run a vendor CLI and return its stdout. Blocks up to CLI_TIMEOUT_S."""
    try:
        done = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=CLI_TIMEOUT_S, check=False
        )
    except FileNotFoundError:
        raise CliError(argv, NOT_INSTALLED) from None
    except subprocess.TimeoutExpired:
        raise CliError(argv, f"timed out after {CLI_TIMEOUT_S:g}s") from None
    except OSError as exc:  # permission denied, exec format error
        raise CliError(argv, str(exc)) from exc
    if done.returncode != 0:
        tail = (done.stderr or done.stdout).strip()[-300:]
        raise CliError(argv, f"exit status {done.returncode}: {tail}")
    return done.stdout


class LogOnce:
    """Logs each distinct message key once, so a 5 s heartbeat does not repeat a missing driver."""

    def __init__(self, logger: logging.Logger) -> None:
        self._log = logger
        self._seen: set[str] = set()

    def __call__(self, level: int, key: str, msg: str, *args: object) -> None:
        if key in self._seen:
            return
        self._seen.add(key)
        self._log.log(level, msg, *args)


def to_float(value: object) -> float | None:
    """A reading as a float; None for the "N/A", "", None and junk vendors print."""
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip().rstrip("%").strip())
        except ValueError:
            return None
    return None


def bytes_to_mib(value: object) -> int:
    number = to_float(value)
    return int(number) // MIB if number is not None and number > 0 else 0


def json_start(text: str) -> str:
    """The JSON document in `text`; some CLIs print warnings before it."""
    starts = [i for i in (text.find("{"), text.find("[")) if i >= 0]
    return text[min(starts) :] if starts else text

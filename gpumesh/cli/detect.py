"""`gpumesh detect`: what this machine's GPU detection sees, and why anything was skipped.

Runs the compute client's own detectors (gpu_client/detect.py) here, one vendor at a time,
the way a client on this machine would (GPU_ENABLED and MESH_FAKE_GPUS are honoured), and
reports every device found, in the node's index space, and for every vendor or device left
out the reason the detector gave (no driver, tool missing, no memory, a driver fault); and
how a client here would isolate process tasks (gpu_client/isolation.py: user+cgroup, user,
none).
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import msgspec
from rich.markup import escape
from rich.table import Table

from gpu_client.detect import DetectedGpus, FakeGpus, NoGpus, default_detectors, make_source
from gpu_client.detectors import lay_out
from gpu_client.hoststats import host_stats
from gpu_client.isolation import describe_env as describe_isolation
from gpumesh.cli.common import OK, console, print_json
from shared.protocol import GpuInfo


def register(sub: Any) -> None:
    p = sub.add_parser("detect", help="run GPU detection here: devices found, and why any "
                                      "was skipped")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_detect)


class _Notes(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


@contextmanager
def _notes() -> Iterator[_Notes]:
    """What the detectors log while they run (their reasons), kept instead of printed."""
    logger = logging.getLogger("gpu_client")
    handler, level, propagate = _Notes(), logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    logger.propagate = False
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        logger.propagate = propagate


def detect() -> dict[str, Any]:
    source = make_source(os.environ)
    report: dict[str, Any] = {"source": type(source).__name__, "detectors": [], "skipped": []}
    if isinstance(source, NoGpus):
        report["skipped"].append({"vendor": "all", "device": "-",
                                  "why": "GPU_ENABLED=false: this node offers no GPUs"})
        gpus: list[GpuInfo] = []
    elif isinstance(source, FakeGpus):
        report["source"] += " (MESH_FAKE_GPUS)"
        gpus = source.read()
    else:
        gpus = _detect_vendors(report)
        if isinstance(source, DetectedGpus):
            source.close()
    for g in gpus:
        if g.fault:
            report["skipped"].append({"vendor": g.vendor, "device": f"{g.index} {g.name}",
                                      "why": f"driver reports a fault: {g.fault}"})
    report["gpus"] = msgspec.to_builtins(gpus)
    report["host"] = dataclasses.asdict(host_stats())
    report["isolation"] = _isolation()
    return report


def _isolation() -> dict[str, str]:
    """How a client started here with this environment would isolate process tasks."""
    with _notes():  # the cgroup probe's log lines: the `why` says it
        level, why = describe_isolation(os.environ)
    return {"level": level, "why": why}


def _detect_vendors(report: dict[str, Any]) -> list[GpuInfo]:
    per_vendor: list[tuple[str, list[GpuInfo]]] = []
    for detector in default_detectors():
        with _notes() as notes:
            try:
                found = detector.read()
                available = detector.is_available()
            except Exception as exc:  # noqa: BLE001 - vendor libraries raise anything
                found, available = [], False
                notes.lines.append(f"detector failed: {exc!r}")
        usable = [g for g in found if g.memory_total_mb > 0]
        for g in found:
            if g.memory_total_mb <= 0:
                report["skipped"].append({
                    "vendor": detector.vendor, "device": f"{g.index} {g.name}",
                    "why": "reports no memory: not schedulable"})
        if not found:
            why = "; ".join(dict.fromkeys(notes.lines)) or "no devices found"
            report["skipped"].append({"vendor": detector.vendor, "device": "-", "why": why})
        report["detectors"].append({
            "vendor": detector.vendor, "available": available, "devices": len(found),
            "usable": len(usable), "notes": list(dict.fromkeys(notes.lines)),
        })
        close = getattr(detector, "close", None)
        if close is not None:
            close()
        per_vendor.append((detector.vendor, usable))
    return lay_out(per_vendor)


def cmd_detect(args: argparse.Namespace) -> int:
    report = detect()
    if args.json:
        print_json(report)
        return OK
    out = console()
    out.print(f"[bold]source[/]: {escape(report['source'])}")
    table = Table(box=None, header_style="bold", pad_edge=False, title="GPUs found",
                  title_justify="left")
    for col in ("INDEX", "VENDOR", "NAME", "VRAM GiB", "UTIL", "TEMP", "CC", "UUID"):
        table.add_column(col, no_wrap=True)
    for g in report["gpus"]:
        temp = g.get("temperature_c")
        table.add_row(str(g["index"]), escape(g.get("vendor", "")), escape(g.get("name", "")),
                      f"{g.get('memory_total_mb', 0) / 1024:.1f}",
                      f"{g.get('utilization_pct', 0):.0f}%",
                      f"{temp:.0f}C" if temp is not None else "-",
                      escape(g.get("compute_capability", "") or "-"),
                      escape(g.get("uuid", "") or "-"))
    out.print(table if report["gpus"] else "[dim](no GPUs found)[/]")
    if report["skipped"]:
        skipped = Table(box=None, header_style="bold", pad_edge=False, title="skipped",
                        title_justify="left")
        for col in ("VENDOR", "DEVICE", "WHY"):
            skipped.add_column(col, overflow="fold")
        for s in report["skipped"]:
            skipped.add_row(escape(s["vendor"]), escape(s["device"]), escape(s["why"]))
        out.print(skipped)
    host = report["host"]
    out.print(f"[bold]host[/]: {host.get('cpu_count', '?')} CPUs, "
              f"{host.get('memory_total_mb', 0) / 1024:.1f} GiB memory")
    iso = report["isolation"]
    out.print(f"[bold]isolation[/]: {escape(iso['level'])} ({escape(iso['why'])})")
    return OK

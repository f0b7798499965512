"""Trace files in, `SimJob`s out; a cluster written `8x8:V100,4x4:T4` in, `NodeGroup`s out.

Three formats, told apart by their header row (the columns may come in any order):

- **Philly** (the Pollux artifact's processed copy of the Microsoft Philly trace, 2017):
  `timestamp, duration, num_gpus, gpu_time, cluster`. `timestamp` is the submit time
  (`YYYY-MM-DD HH:MM:SS`), `duration` seconds, `cluster` the virtual cluster, used as the tenant.
  A job's id is its line number in the file.
- **Helios** (`cluster_log.csv` of SenseTime's Helios traces, S-Lab-System-Group/HeliosData):
  `job_id, user, vc, gpu_num, cpu_num, node_num, state, submit_time, start_time, end_time,
  duration, queue`. The tenant is `vc`; `state` is ignored (a failed job held its GPUs as long
  as it ran). Rows with `gpu_num` 0 are CPU jobs: always left out, and counted (`Trace.cpu_only`).
- **Plain**: `submit_time, duration_s, gpus, tenant[, priority, nodes, gpu_type, id]`.
  `submit_time` is seconds or an ISO date; `priority` 0-10 (default 5), `nodes` >= 1 (default 1).

`gpus` is the job's GPUs in all (a job over several nodes: over all of them). Submit times are
rebased so that the first job is submitted at 0, and jobs come out in submit order (ties in
file order). A file ending in `.gz`, or starting with gzip's magic bytes, is read through gzip.

Bad rows are refused: `read_trace` raises `TraceError` naming up to `ERROR_SAMPLES` of them by
line number and reason. With `skip_bad=True` they are left out instead and counted
(`Trace.skipped`, the first few in `Trace.samples`). Blank lines are not rows.

Limits (README "Limits"): at most `MAX_TRACE_JOBS` jobs, `MAX_JOB_GPUS` GPUs and `MAX_JOB_NODES`
nodes per job, durations up to `MAX_DURATION_S`, tenant names up to `MAX_NAME` characters; a
cluster of at most `MAX_CLUSTER_NODES` nodes with `MAX_GPUS_PER_NODE` GPUs each.
"""

from __future__ import annotations

import csv
import gzip
import io
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from coordinator.sim.engine import NodeGroup, SimJob

MAX_TRACE_JOBS = 5_000_000
MAX_JOB_GPUS = 4096
MAX_JOB_NODES = 1024
MAX_DURATION_S = 10 * 365 * 86400.0
MAX_NAME = 128
MAX_CLUSTER_NODES = 100_000
MAX_GPUS_PER_NODE = 64
ERROR_SAMPLES = 10

FORMATS = {
    "philly": ("timestamp", "duration", "num_gpus", "cluster"),
    "helios": ("job_id", "vc", "gpu_num", "node_num", "submit_time", "duration"),
    "plain": ("submit_time", "duration_s", "gpus", "tenant"),
}


class TraceError(ValueError):
    """A trace that cannot be read: which file, which lines, why."""

    def __init__(self, path: str, reason: str, bad: tuple[BadRow, ...] = ()) -> None:
        self.path, self.reason, self.bad = path, reason, bad
        lines = "".join(f"\n  line {b.line}: {b.reason}" for b in bad)
        super().__init__(f"{path}: {reason}{lines}")


class ClusterError(ValueError):
    """A cluster spec that does not parse; the message says which group and why."""


@dataclass(frozen=True, slots=True)
class BadRow:
    line: int
    reason: str


@dataclass(frozen=True, slots=True)
class Trace:
    path: str
    format: str  # philly | helios | plain
    jobs: list[SimJob]
    skipped: int = 0  # bad rows left out (skip_bad=True)
    samples: tuple[BadRow, ...] = ()  # the first of them
    cpu_only: int = 0  # Helios rows with no GPU, always left out
    origin: float = 0.0  # the first submit time before rebasing (epoch seconds, or as written)


class _Bad(Exception):
    """One row's fault; the reader turns it into a BadRow with the line number."""


# --- fields ----------------------------------------------------------------------------------


def _number(row: dict[str, str], col: str, default: float | None = None) -> float:
    text = (row.get(col) or "").strip()
    if not text:
        if default is None:
            raise _Bad(f"{col} is empty")
        return default
    try:
        value = float(text)
    except ValueError:
        raise _Bad(f"{col} {text[:40]!r} is not a number") from None
    if not math.isfinite(value):
        raise _Bad(f"{col} {text[:40]!r} is not a finite number")
    return value


def _whole(row: dict[str, str], col: str, low: int, high: int, default: int | None = None) -> int:
    value = _number(row, col, None if default is None else float(default))
    if value != int(value) or not low <= value <= high:
        raise _Bad(f"{col} {row.get(col, '').strip()[:40]!r} is not a whole number "
                   f"in {low}..{high}")
    return int(value)


def _duration(row: dict[str, str], col: str) -> float:
    value = _number(row, col)
    if not 0 <= value <= MAX_DURATION_S:
        raise _Bad(f"{col} {value:g} is not in 0..{MAX_DURATION_S:.0f} seconds")
    return value


def _time(row: dict[str, str], col: str) -> float:
    """Seconds, or an ISO date (naive dates are UTC) as epoch seconds."""
    text = (row.get(col) or "").strip()
    if not text:
        raise _Bad(f"{col} is empty")
    try:
        value = float(text)
    except ValueError:
        try:
            when = datetime.fromisoformat(text)
        except ValueError:
            raise _Bad(f"{col} {text[:40]!r} is neither seconds nor a date "
                       "(YYYY-MM-DD HH:MM:SS)") from None
        if when.tzinfo is None:
            when = when.replace(tzinfo=UTC)
        return when.timestamp()
    if not math.isfinite(value) or value < 0:
        raise _Bad(f"{col} {text[:40]!r} is not a time in seconds >= 0")
    return value


_NAME = re.compile(r"[^\x00-\x1f\x7f]+")


def _name(row: dict[str, str], col: str, default: str | None = None) -> str:
    text = (row.get(col) or "").strip()
    if not text:
        if default is None:
            raise _Bad(f"{col} is empty")
        return default
    if len(text) > MAX_NAME or not _NAME.fullmatch(text):
        raise _Bad(f"{col} {text[:40]!r} is longer than {MAX_NAME} or holds control characters")
    return text


# --- one row of each format -----------------------------------------------------------------

_Row = Callable[[dict[str, str], int], "tuple[float, SimJob] | None"]


def _philly(row: dict[str, str], line: int) -> tuple[float, SimJob] | None:
    submit = _time(row, "timestamp")
    job = SimJob(id=str(line), submit_s=0.0, duration_s=_duration(row, "duration"),
                 gpus=_whole(row, "num_gpus", 1, MAX_JOB_GPUS), tenant=_name(row, "cluster"))
    return submit, job


def _helios(row: dict[str, str], line: int) -> tuple[float, SimJob] | None:
    gpus = _whole(row, "gpu_num", 0, MAX_JOB_GPUS)
    if gpus == 0:
        return None
    submit = _time(row, "submit_time")
    job = SimJob(id=_name(row, "job_id"), submit_s=0.0, duration_s=_duration(row, "duration"),
                 gpus=gpus, tenant=_name(row, "vc"),
                 nodes=_whole(row, "node_num", 1, MAX_JOB_NODES, default=1))
    return submit, job


def _plain(row: dict[str, str], line: int) -> tuple[float, SimJob] | None:
    submit = _time(row, "submit_time")
    gpus = _whole(row, "gpus", 1, MAX_JOB_GPUS)
    nodes = _whole(row, "nodes", 1, MAX_JOB_NODES, default=1)
    if nodes > gpus:
        raise _Bad(f"nodes {nodes} is more than gpus {gpus} (gpus counts all nodes' GPUs)")
    job = SimJob(id=_name(row, "id", str(line)), submit_s=0.0,
                 duration_s=_duration(row, "duration_s"), gpus=gpus, tenant=_name(row, "tenant"),
                 priority=_whole(row, "priority", 0, 10, default=5), nodes=nodes,
                 gpu_type=_name(row, "gpu_type", ""))
    return submit, job


_READERS: dict[str, _Row] = {"philly": _philly, "helios": _helios, "plain": _plain}


def detect_format(header: list[str]) -> str:
    """The format whose columns the header holds (Helios before Philly before plain)."""
    cols = {h.strip().lower() for h in header}
    for name in ("helios", "philly", "plain"):
        if set(FORMATS[name]) <= cols:
            return name
    wanted = "; ".join(f"{k}: {', '.join(v)}" for k, v in FORMATS.items())
    raise ValueError(f"header {', '.join(header)[:200]!r} is none of the known formats "
                     f"({wanted})")


# --- files ----------------------------------------------------------------------------------


def _open(path: Path) -> io.TextIOBase:
    with path.open("rb") as raw:
        magic = raw.read(2)
    if path.suffix == ".gz" or magic == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.open(path, "rb"), encoding="utf-8", newline="")
    return path.open("r", encoding="utf-8", newline="")


def _rows(reader: Iterator[list[str]], header: list[str]) -> Iterator[tuple[int, dict[str, str]]]:
    cols = [h.strip().lower() for h in header]
    for cells in reader:
        line = reader.line_num  # type: ignore[attr-defined]
        if not cells or all(not c.strip() for c in cells):
            continue
        if len(cells) != len(cols):
            yield line, {"\0": f"{len(cells)} fields, the header has {len(cols)}"}
            continue
        yield line, dict(zip(cols, cells, strict=True))


def read_trace(path: str | Path, *, skip_bad: bool = False, limit: int | None = None) -> Trace:
    """Read a trace file (any of the three formats, gzipped or not). `limit`: keep only the
    first `limit` jobs in submit order. Raises TraceError (a ValueError) with reasons."""
    path = Path(path)
    name = str(path)
    try:
        stream = _open(path)
    except OSError as exc:
        raise TraceError(name, f"cannot open: {exc.strerror or exc}") from None
    parsed: list[tuple[float, int, SimJob]] = []
    bad: list[BadRow] = []
    skipped = cpu_only = 0
    try:
        with stream:
            reader = csv.reader(stream)
            header = next(reader, None)
            if header is None:
                raise TraceError(name, "the file is empty (a header row is needed)")
            try:
                fmt = detect_format(header)
            except ValueError as exc:
                raise TraceError(name, str(exc)) from None
            read_row = _READERS[fmt]
            for line, row in _rows(reader, header):
                try:
                    if "\0" in row:
                        raise _Bad(row["\0"])
                    got = read_row(row, line)
                except _Bad as exc:
                    skipped += 1
                    if len(bad) < ERROR_SAMPLES:
                        bad.append(BadRow(line, str(exc)))
                    continue
                if got is None:
                    cpu_only += 1
                    continue
                if len(parsed) >= MAX_TRACE_JOBS:
                    raise TraceError(name, f"more than {MAX_TRACE_JOBS:,} jobs")
                parsed.append((got[0], line, got[1]))
    except (OSError, EOFError, UnicodeDecodeError, csv.Error) as exc:
        raise TraceError(name, f"unreadable: {exc}") from None
    if skipped and not skip_bad:
        raise TraceError(name, f"{skipped} bad row(s) (skip them with --skip-bad)", tuple(bad))
    parsed.sort(key=lambda p: (p[0], p[1]))
    if limit is not None:
        parsed = parsed[: max(0, limit)]
    origin = parsed[0][0] if parsed else 0.0
    jobs = [_rebased(job, submit - origin) for submit, _, job in parsed]
    return Trace(path=name, format=fmt, jobs=jobs, skipped=skipped, samples=tuple(bad),
                 cpu_only=cpu_only, origin=origin)


def _rebased(job: SimJob, submit_s: float) -> SimJob:
    return SimJob(id=job.id, submit_s=submit_s, duration_s=job.duration_s, gpus=job.gpus,
                  tenant=job.tenant, priority=job.priority, nodes=job.nodes,
                  gpu_type=job.gpu_type)


# --- clusters -------------------------------------------------------------------------------

_GROUP = re.compile(r"(\d+)\s*[xX]\s*(\d+)(?:\s*:\s*([A-Za-z0-9_.-]{1,64}))?")


def parse_cluster(spec: str) -> list[NodeGroup]:
    """`8x8:V100,4x4:T4` -> 8 nodes of 8 V100s and 4 nodes of 4 T4s. The type may be left out
    (`16x8`). Raises ClusterError naming the group at fault."""
    groups: list[NodeGroup] = []
    parts = spec.split(",")
    if not spec.strip():
        raise ClusterError("the cluster is empty: write NODESxGPUS[:TYPE],... (e.g. 8x8:V100)")
    for i, part in enumerate(parts, 1):
        m = _GROUP.fullmatch(part.strip())
        if m is None:
            raise ClusterError(f"cluster group {i} {part.strip()[:40]!r} is not "
                               "NODESxGPUS[:TYPE] (e.g. 8x8:V100; a type is letters, digits, "
                               "'_', '.', '-')")
        count, per_node = int(m.group(1)), int(m.group(2))
        if not 1 <= count <= MAX_CLUSTER_NODES:
            raise ClusterError(f"cluster group {i} {part.strip()!r}: nodes must be "
                               f"1..{MAX_CLUSTER_NODES}")
        if not 1 <= per_node <= MAX_GPUS_PER_NODE:
            raise ClusterError(f"cluster group {i} {part.strip()!r}: GPUs per node must be "
                               f"1..{MAX_GPUS_PER_NODE}")
        groups.append(NodeGroup(count=count, gpus_per_node=per_node, gpu_type=m.group(3) or ""))
    if sum(g.count for g in groups) > MAX_CLUSTER_NODES:
        raise ClusterError(f"the cluster has more than {MAX_CLUSTER_NODES:,} nodes")
    return groups


def format_cluster(groups: list[NodeGroup]) -> str:
    """The inverse of parse_cluster."""
    return ",".join(f"{g.count}x{g.gpus_per_node}" + (f":{g.gpu_type}" if g.gpu_type else "")
                    for g in groups)

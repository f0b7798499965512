"""Percentiles and the result value every benchmark returns."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any


def percentile(sorted_values: Sequence[float], pct: float) -> float:
    """Nearest-rank percentile of already sorted values (pct in 0..100)."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(pct / 100 * len(sorted_values)))
    return float(sorted_values[min(rank, len(sorted_values)) - 1])


def summary(values: Sequence[float]) -> dict[str, float]:
    """p50, p90, p99 and max of `values` (any unit; the caller names it)."""
    s = sorted(values)
    return {
        "p50": percentile(s, 50),
        "p90": percentile(s, 90),
        "p99": percentile(s, 99),
        "max": s[-1] if s else math.nan,
    }


def ratio(ours: float, theirs: float) -> float:
    return round(theirs / ours, 2) if ours > 0 else math.inf


@dataclass
class Result:
    """What one benchmark reports: rows for the table and JSON, notes for the reader."""

    name: str
    rows: list[dict[str, Any]]
    columns: list[str]  # the table's columns, in order (rows may carry more keys)
    notes: list[str] = field(default_factory=list)
    goals: list[str] = field(default_factory=list)  # "met: ..." / "MISSED: ..." lines

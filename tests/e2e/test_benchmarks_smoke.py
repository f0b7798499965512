"""The benchmarks still run: `python -m benchmarks placement --json --quick` and its JSON shape.

Only the shape is checked; speed is what the benchmarks report, not what tests assert.
"""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT


def test_placement_benchmark_prints_json_rows() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "placement", "--json", "--quick"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    rows = json.loads(done.stdout)
    assert isinstance(rows, list)
    assert [r["nodes"] for r in rows] == [10, 100, 1_000, 10_000]
    for row in rows:
        assert row["gpus_per_node"] == 8
        assert isinstance(row["p50_us"], float) and isinstance(row["p99_us"], float)
        assert 0 < row["p50_us"] <= row["p99_us"]
    assert "== placement ==" in done.stderr  # the table goes to stderr when stdout is JSON

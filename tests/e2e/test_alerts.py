"""The Prometheus alert rules and config: valid for promtool, and unit-tested by it.

`profiles/prometheus/alerts_test.yml` holds the cases: each alert pending, firing, and quiet
when it should be (a flapping node, exactly 90 % memory, exactly 100 queued, an idle mesh).
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

PROFILES = Path(__file__).resolve().parents[2] / "profiles" / "prometheus"

pytestmark = pytest.mark.skipif(
    shutil.which("promtool") is None,
    reason="no `promtool` (Debian package `prometheus`): alert rules not checked",
)


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["promtool", *args], cwd=PROFILES, capture_output=True, text=True, timeout=60
    )


def test_alert_rules_are_valid() -> None:
    done = promtool("check", "rules", "alerts.yml")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "SUCCESS: 5 rules found" in done.stdout


def test_prometheus_config_is_valid() -> None:
    # --syntax-only: the scrape token file exists only inside the monitoring profile's volume
    # (test_dashboard scrapes a real coordinator with a real token file).
    done = promtool("check", "config", "--syntax-only", "prometheus.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_alert_rules_unit_tests_pass() -> None:
    done = promtool("test", "rules", "alerts_test.yml")
    assert done.returncode == 0, done.stdout + done.stderr


def test_every_alert_is_unit_tested() -> None:
    rules = (PROFILES / "alerts.yml").read_text()
    cases = (PROFILES / "alerts_test.yml").read_text()
    names = {
        line.split(":", 1)[1].strip()
        for line in rules.splitlines()
        if line.strip().startswith("- alert:")
    }
    assert len(names) == 5
    for name in names:
        assert f"alertname: {name}" in cases, f"{name} has no promtool test case"

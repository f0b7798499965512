"""The `security` group: each test plays a hostile node, tenant, task or stranger against real
servers and real clients (`python -m pytest -m security` runs just these). docs/security.md
names the test behind each "cannot"."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).parent


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    for item in items:
        if HERE in Path(str(item.fspath)).parents:
            item.add_marker(pytest.mark.security)

"""docs/security.md is true to the suite: every "cannot" row names tests, and each exists."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "security.md"
REF = re.compile(r"`(tests/[\w/]+\.py)::(test_\w+)`")


def _tests_in(path: Path) -> set[str]:
    tree = ast.parse(path.read_text())
    return {
        n.name for n in tree.body
        if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.name.startswith("test_")
    }


def test_every_test_the_threat_model_names_exists() -> None:
    refs = REF.findall(DOC.read_text())
    assert len(refs) > 40
    missing = [f"{f}::{t}" for f, t in refs
               if not (ROOT / f).exists() or t not in _tests_in(ROOT / f)]
    assert not missing, f"docs/security.md names tests that do not exist: {missing}"


def test_every_cannot_row_names_a_test() -> None:
    """A row of a "cannot | test" table without a test would be a claim nothing shows."""
    rows, in_table = [], False
    for line in DOC.read_text().splitlines():
        if line.startswith("| cannot | test |"):
            in_table = True
            continue
        if in_table and not line.startswith("|"):
            in_table = False
        if in_table and not line.startswith("| ---"):
            rows.append(line)
    assert len(rows) > 25
    bare = [r for r in rows if not REF.search(r.rsplit("|", 2)[-2])]
    assert not bare, f"rows without a test: {bare}"


def test_the_readme_points_at_the_threat_model() -> None:
    assert "docs/security.md" in (ROOT / "README.md").read_text()

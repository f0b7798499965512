"""The plan of the house: no import circles anywhere, imports run one way, the tour is true.

Every `import` statement counts, wherever it stands: at the top, inside a function, or
under `if TYPE_CHECKING:`. A circle through type hints is still a circle for a reader.
Run alone with `python -m pytest tests/test_layers.py`; it reads source, imports nothing.
"""

from __future__ import annotations

import ast
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("coordinator", "gpu_client", "shared", "gpumesh", "benchmarks", "tests")

# What each part of the coordinator (and each package) may import, besides itself and the
# standard library and third-party packages. Top to bottom, as coordinator/__init__.py draws it.
BASE = ("coordinator.model", "coordinator.settings", "shared")
ALLOWED: dict[str, tuple[str, ...]] = {
    "coordinator.__main__": ("coordinator", "shared"),
    "coordinator.web": ("coordinator", "shared"),
    "coordinator.leader": ("coordinator.storage", *BASE),
    "coordinator.link": (
        "coordinator.core", "coordinator.access", "coordinator.scheduling",
        "coordinator.storage", *BASE,
    ),
    "coordinator.access": ("coordinator.storage", *BASE),
    "coordinator.core": ("coordinator.scheduling", "coordinator.storage", *BASE),
    # The simulator replays traces through core's dispatch pass and scheduling, no I/O.
    "coordinator.sim": (
        "coordinator.core", "coordinator.scheduling", "coordinator.storage", *BASE,
    ),
    "coordinator.scheduling": BASE,
    "coordinator.storage": BASE,
    "coordinator.model": ("shared",),
    "coordinator.settings": ("shared",),
    "coordinator": ("shared",),  # the package docstring
    "gpu_client": ("gpu_client", "shared"),
    # The one exception in shared/: the alias `shared.sdk` is `gpumesh.sdk` for one release.
    "shared.sdk": ("gpumesh.sdk",),
    "shared": ("shared",),
    # Users' package: the SDK and the CLI reach the coordinator over HTTP only. `gpumesh
    # detect` and `discover` use the client's detection (and its isolation level) and mDNS
    # browser; `up` reads the data-dir lock so it never reports another coordinator's health
    # as its own.
    "gpumesh": (
        "gpumesh", "shared", "gpu_client.detect", "gpu_client.detectors", "gpu_client.hoststats",
        "gpu_client.discover", "gpu_client.isolation", "coordinator.storage.datadir",
        # `gpumesh simulate` runs the simulator here, on this machine (no mesh involved).
        "coordinator.sim",
    ),
}


def modules() -> dict[str, Path]:
    found: dict[str, Path] = {}
    for pkg in PACKAGES:
        for path in (ROOT / pkg).rglob("*.py"):
            parts = list(path.relative_to(ROOT).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def imported(name: str, path: Path, known: dict[str, Path]) -> Iterator[str]:
    """Every module of ours that `name` imports, by any statement anywhere in it."""
    tree = ast.parse(path.read_text(), str(path))
    package = name.split(".") if path.name == "__init__.py" else name.split(".")[:-1]
    for node in ast.walk(tree):
        targets: list[str] = []
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                up = package[: len(package) - (node.level - 1)]
                base = ".".join([*up, base] if base else up)
            targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
        for target in targets:
            # `import a.b.c` also imports a.b and a; count the deepest module we own.
            while target and target not in known:
                target = target.rpartition(".")[0]
            if target and target != name:
                yield target


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: set(imported(name, path, known)) for name, path in known.items()}


def circles(edges: dict[str, set[str]]) -> list[list[str]]:
    """Strongly connected components of more than one module (Tarjan, iterative)."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []
    for root in sorted(edges):
        if root in index:
            continue
        work: list[tuple[str, Iterator[str]]] = [(root, iter(sorted(edges[root])))]
        index[root] = low[root] = len(index)
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = len(index)
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(edges[child]))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    member = stack.pop()
                    on_stack.discard(member)
                    component.append(member)
                    if member == node:
                        break
                if len(component) > 1:
                    found.append(sorted(component))
    return found


def rule_for(name: str) -> tuple[str, ...] | None:
    """What `name` may import: its own part and the most specific entry of ALLOWED that
    covers it; None for what has no rule (tests, benchmarks)."""
    best = None
    for prefix in ALLOWED:
        if (name == prefix or name.startswith(prefix + ".")) and (
            best is None or len(prefix) > len(best)
        ):
            best = prefix
    return None if best is None else (best, *ALLOWED[best])


def within(target: str, allowed: tuple[str, ...]) -> bool:
    return any(target == a or target.startswith(a + ".") for a in allowed)


def test_the_graph_sees_imports_of_every_kind() -> None:
    """The reader itself: a function-level import and a TYPE_CHECKING one both count."""
    edges = graph()
    assert "coordinator.core.mesh" in edges["coordinator.web.app"]
    assert "coordinator.scheduling.placement" in edges["coordinator.core.mesh"]
    assert circles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert circles({"a": {"b"}, "b": set()}) == []


def test_no_import_circles_anywhere_in_the_repo() -> None:
    found = circles(graph())
    assert not found, "import circles:\n" + "\n".join(" <-> ".join(c) for c in found)


def test_imports_run_one_way() -> None:
    """Nothing below imports what stands above it (coordinator/__init__.py draws the plan)."""
    wrong = []
    for name, targets in sorted(graph().items()):
        allowed = rule_for(name)
        if allowed is None:
            continue
        wrong += [f"{name} -> {t}" for t in sorted(targets) if not within(t, allowed)]
    assert not wrong, "imports that run against the plan:\n" + "\n".join(wrong)


def test_every_wing_says_what_it_owns_and_may_import() -> None:
    for wing in sorted((ROOT / "coordinator").iterdir()):
        if not (wing / "__init__.py").exists():
            continue
        doc = ast.get_docstring(ast.parse((wing / "__init__.py").read_text())) or ""
        assert "Owns:" in doc and "May import" in doc, f"{wing.name}/__init__.py: {doc[:80]!r}"


def test_the_clients_reach_the_coordinator_only_through_the_sdk() -> None:
    """No HTTP library in the CLI: every request goes through gpumesh.sdk."""
    for path in sorted((ROOT / "gpumesh" / "cli").rglob("*.py")):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                names = [node.module]
            for n in names:
                assert not re.match(r"(httpx|urllib\.request|http\.client|requests)\b", n), (
                    f"{path.relative_to(ROOT)} imports {n}"
                )


ARCH = ROOT / "docs" / "architecture.md"


def test_every_path_the_architecture_page_names_exists() -> None:
    text = ARCH.read_text()
    named = set(re.findall(
        r"(?<![\w/.-])((?:coordinator|gpu_client|shared|gpumesh|tests|docs|profiles|benchmarks)"
        r"/[\w./-]*[\w/])",
        text,
    ))
    assert len(named) > 30, "the page names the files that own each concept"
    missing = sorted(p for p in named if not (ROOT / p).exists())
    assert not missing, f"docs/architecture.md names paths that do not exist: {missing}"


WINGS = ["core", "scheduling", "storage", "access", "link", "leader", "web", "sim"]


@pytest.mark.parametrize("wing", WINGS)
def test_each_wing_has_its_tests_and_its_line_on_the_page(wing: str) -> None:
    assert any((ROOT / "tests" / wing).glob("test_*.py")), f"tests/{wing}/ holds no tests"
    assert f"coordinator/{wing}/" in ARCH.read_text()

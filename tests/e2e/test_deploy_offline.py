"""docs/deploy.md's offline path, its commands run as written, in a copy of the checkout.

The `sh` block under "Offline build" is cut out of the document (never retyped) and run by bash,
`set -e`, in a copy of the tracked files (so its `.env` and `./wheels` land there, not in this
checkout). Only the environment differs from a user's shell: a compose project name and a host
port of the test's own, so it cannot collide with anything else on the machine. Then: the image
was built offline, `up` pulled nothing, and the coordinator answers on the published port.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import free_port, wait_for
from tests.e2e.test_deploy_compose import (
    BASE_IMAGE,
    ROOT,
    compose_env,
    needs_compose,
    needs_engine,
)

DOC = ROOT / "docs" / "deploy.md"


def offline_commands() -> str:
    text = DOC.read_text(encoding="utf-8")
    section = text[text.index("### Offline build"):]
    m = re.search(r"```sh\n(.*?)```", section, re.S)
    assert m is not None, "no sh block under 'Offline build' in docs/deploy.md"
    return m.group(1)


def test_the_offline_block_builds_with_a_profile_and_runs_without_building() -> None:
    """What a user copies must name a profile (a bare `docker-compose build` builds nothing)."""
    lines = [ln.split("#")[0].strip() for ln in offline_commands().splitlines()]
    compose_lines = [ln for ln in lines if "docker-compose" in ln]
    assert compose_lines and all("COMPOSE_PROFILES=" in ln for ln in compose_lines), lines
    assert any(ln.endswith("docker-compose build") for ln in compose_lines), lines
    assert any("up -d --no-build" in ln for ln in compose_lines), lines


@pytest.fixture
def checkout(tmp_path: Path) -> Iterator[Path]:
    """A copy of the tracked files (+ this checkout's .venv and wheelhouse, reused)."""
    copy = tmp_path / "gpumesh"
    files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True,
                           check=True, timeout=60).stdout.decode().split("\0")
    for name in filter(None, files):
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / name, copy / name)
    (copy / ".venv").symlink_to(Path(sys.prefix))  # the doc runs after `make up` made it
    if (ROOT / "wheels").is_dir():
        shutil.copytree(ROOT / "wheels", copy / "wheels")
    yield copy


@pytest.mark.docker
@pytest.mark.slow
@needs_compose
@needs_engine
def test_the_offline_commands_as_written(checkout: Path) -> None:
    have_base = subprocess.run(["docker", "image", "inspect", BASE_IMAGE],
                               capture_output=True, timeout=30).returncode == 0
    if not have_base and (shutil.which("debootstrap") is None or os.geteuid() != 0):
        pytest.skip(f"no {BASE_IMAGE} image, and building it needs root and debootstrap")
    project, port = f"gpumesh-offline-{uuid.uuid4().hex[:8]}", free_port()
    env = compose_env(COMPOSE_PROJECT_NAME=project, GPUMESH_PORT=str(port))
    script = checkout / "offline.sh"
    script.write_text(offline_commands())
    try:
        done = subprocess.run(["bash", "-e", str(script)], cwd=checkout, env=env,
                              capture_output=True, text=True, timeout=900)
        out = done.stdout + done.stderr
        assert done.returncode == 0, out[-6000:]
        assert (checkout / ".env").read_text().strip() == f"GPUMESH_BASE_IMAGE={BASE_IMAGE}"
        assert "Looking in indexes" not in out, "the offline build reached for a package index"
        assert "Pulling" not in out and "pull access denied" not in out, out[-4000:]
        assert re.search(r"Successfully (built|tagged)|Building gpu-coordinator", out), out[-4000:]

        def healthy() -> bool:
            try:
                return httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(healthy, 90, "the coordinator on the published port")
        ps = subprocess.run(["docker-compose", "ps", "--services", "--filter", "status=running"],
                            cwd=checkout, env=env | {"COMPOSE_PROFILES": "coordinator,cpu"},
                            capture_output=True, text=True, timeout=60)
        assert set(ps.stdout.split()) == {"gpu-coordinator", "cpu-client"}, ps
    finally:
        logs = subprocess.run(  # captured by pytest: shown only when the test fails
            ["docker-compose", "logs", "--no-color", "--tail", "60"], cwd=checkout,
            env=env | {"COMPOSE_PROFILES": "coordinator,cpu"}, capture_output=True, text=True,
            timeout=60,
        )
        print(f"--- {project} logs ---\n{logs.stdout}")
        subprocess.run(
            ["docker-compose", "down", "-v", "--remove-orphans", "--timeout", "5"],
            cwd=checkout, env=env | {"COMPOSE_PROFILES": "coordinator,cpu"},
            capture_output=True, timeout=180,
        )

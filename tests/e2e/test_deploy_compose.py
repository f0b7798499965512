"""docker-compose.yml and the image, on the local Docker engine.

The image is built the offline way (a debootstrap base from scripts/build-base-image.sh and a
host-built wheelhouse from scripts/build-wheelhouse.sh), through compose's own `build:` with
GPUMESH_BASE_IMAGE, then the `coordinator` and `cpu` profiles run under a project name of
their own: a task goes in through the published port and completes, the coordinator container
restarts, and the client (not restarted) rejoins by itself.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import free_port, wait_for

ROOT = Path(__file__).resolve().parents[2]
BASE_IMAGE = os.environ.get("GPUMESH_LOCAL_BASE", "gpumesh-base:bookworm")
TEST_IMAGE = "gpumesh:compose-test"  # one tag, so reruns reuse its layers
PROFILES = ("coordinator", "gpu", "cpu", "monitoring", "ha")


def _engine_answers() -> bool:
    if shutil.which("docker") is None:
        return False
    try:
        done = subprocess.run(["docker", "info"], capture_output=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return done.returncode == 0


needs_compose = pytest.mark.skipif(
    shutil.which("docker-compose") is None, reason="no `docker-compose` (v1.28+) on PATH"
)
needs_engine = pytest.mark.skipif(
    not _engine_answers(), reason="no Docker engine answers `docker info`"
)


def compose_env(**extra: str) -> dict[str, str]:
    """This process's environment without compose or gpumesh settings, plus `extra`."""
    drop = ("COMPOSE_", "GPUMESH_", "MESH_", "NODE_", "GPU_", "CPU_NODE_")
    env = {k: v for k, v in os.environ.items() if not k.startswith(drop)}
    env.update(extra)
    return env


def compose(
    project: str, *args: str, env: dict[str, str], timeout: float = 300, check: bool = True
) -> subprocess.CompletedProcess[str]:
    done = subprocess.run(
        ["docker-compose", "-p", project, *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check and done.returncode != 0:
        raise AssertionError(
            f"docker-compose {' '.join(args)} exited {done.returncode}:\n"
            f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
        )
    return done


def inspect(container: str) -> dict[str, Any]:
    out = subprocess.run(
        ["docker", "inspect", container], capture_output=True, text=True, check=True, timeout=30
    ).stdout
    doc: dict[str, Any] = json.loads(out)[0]
    return doc


# --- the compose file alone (no engine needed) -------------------------------------------------


@needs_compose
@pytest.mark.parametrize("profile", PROFILES)
def test_compose_config_is_valid_for_each_profile(profile: str) -> None:
    done = compose(
        "gpumesh-config", "config", env=compose_env(COMPOSE_PROFILES=profile), timeout=60
    )
    assert "services:" in done.stdout


@needs_compose
def test_compose_config_carries_the_deployment_contract() -> None:
    env = compose_env(
        COMPOSE_PROFILES=",".join(PROFILES),
        GPUMESH_BASE_IMAGE=BASE_IMAGE,
        GPUMESH_PORT="18123",
        NODE_NAME="rack1-h100-3",
        MESH_COORDINATOR_URL="ws://lead.lan:8001",
    )
    out = compose("gpumesh-config", "config", env=env, timeout=60).stdout
    profiles = compose("gpumesh-config", "config", "--profiles", env=env, timeout=60).stdout
    assert set(profiles.split()) == set(PROFILES)
    for needle in (
        f"BASE_IMAGE: {BASE_IMAGE}",  # the build arg comes from GPUMESH_BASE_IMAGE
        "published: 18123",  # GPUMESH_PORT picks the host port
        "driver: nvidia",  # the gpu profile reserves NVIDIA GPUs
        "NODE_NAME: rack1-h100-3",  # the seed's env reaches the client
        "MESH_COORDINATOR_URL: ws://lead.lan:8001",
        "coordinator-data:/data",  # the coordinator's data dir is a named volume
        "restart: unless-stopped",
        "MESH_TEMPLATES: /etc/gpumesh/templates.toml",  # the editable task-type templates
    ):
        assert needle in out, f"{needle!r} not in docker-compose config"
    # the seed's second command, on a GPU machine without the coordinator's profile
    only_gpu = compose_env(COMPOSE_PROFILES="gpu")
    compose("gpumesh-config", "config", "-q", env=only_gpu, timeout=60)


# --- the image and the running stack ------------------------------------------------------------


@pytest.fixture(scope="module")
def image() -> str:
    """Build the offline way: local base (once per machine), wheelhouse, compose build."""
    have_base = subprocess.run(
        ["docker", "image", "inspect", BASE_IMAGE], capture_output=True, timeout=30
    )
    if have_base.returncode != 0 and (shutil.which("debootstrap") is None or os.geteuid() != 0):
        pytest.skip(f"no {BASE_IMAGE} image, and building it needs root and debootstrap")
    for script in ("scripts/build-base-image.sh", "scripts/build-wheelhouse.sh"):
        done = subprocess.run(
            [str(ROOT / script)], cwd=ROOT, capture_output=True, text=True, timeout=600
        )
        assert done.returncode == 0, f"{script}:\n{done.stdout[-3000:]}\n{done.stderr[-3000:]}"
    env = compose_env(
        COMPOSE_PROFILES="coordinator", GPUMESH_BASE_IMAGE=BASE_IMAGE, GPUMESH_IMAGE=TEST_IMAGE
    )
    built = compose("gpumesh-build", "build", "gpu-coordinator", env=env, timeout=600)
    assert "Looking in indexes" not in built.stdout, "the offline build reached for an index"
    return TEST_IMAGE


@pytest.mark.docker
@pytest.mark.slow
@needs_compose
@needs_engine
def test_image_runs_both_roles_as_non_root(image: str) -> None:
    config = inspect(image)["Config"]
    assert config["User"] == "gpumesh"
    assert config["Cmd"] == ["python", "-m", "coordinator"]
    assert "/health" in " ".join(config["Healthcheck"]["Test"])
    assert "8001/tcp" in config["ExposedPorts"]
    done = subprocess.run(
        [
            "docker",
            "run",
            "--rm",
            image,
            "sh",
            "-c",
            "id -u && python -m coordinator --help && python -c 'import gpu_client.__main__'",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.splitlines()[0] == "10001"


@pytest.fixture
def stack(image: str) -> Iterator[tuple[str, dict[str, str], httpx.Client]]:
    """`coordinator` + `cpu` up under a project name of their own; always `down -v` after."""
    project = f"gpumesh-test-{uuid.uuid4().hex[:8]}"
    port = free_port()
    env = compose_env(
        COMPOSE_PROFILES="coordinator,cpu",
        GPUMESH_IMAGE=image,
        GPUMESH_BASE_IMAGE=BASE_IMAGE,
        GPUMESH_PORT=str(port),
    )
    api = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=40)
    try:
        compose(project, "up", "-d", "--no-build", env=env, timeout=180)
        yield project, env, api
    finally:
        api.close()
        # captured by pytest: shown only when the test fails
        logs = compose(project, "logs", "--no-color", "--tail", "80", env=env, check=False)
        print(f"--- {project} logs ---\n{logs.stdout}")
        compose(
            project,
            "down",
            "-v",
            "--remove-orphans",
            "--timeout",
            "5",
            env=env,
            timeout=180,
            check=False,
        )


@pytest.mark.docker
@pytest.mark.slow
@needs_compose
@needs_engine
def test_stack_runs_a_task_and_the_client_rejoins_after_a_coordinator_restart(
    stack: tuple[str, dict[str, str], httpx.Client],
) -> None:
    project, env, api = stack

    def container(service: str) -> str:
        cid = compose(project, "ps", "-q", service, env=env, timeout=60).stdout.strip()
        assert cid, f"no container for {service}"
        return cid

    def status() -> dict[str, Any] | None:
        if "authorization" not in api.headers:  # the admin token, read as the docs say
            token = compose(project, "exec", "-T", "gpu-coordinator", "cat", "/data/admin.token",
                            env=env, timeout=60, check=False).stdout.strip()
            if not token:
                return None
            api.headers["Authorization"] = f"Bearer {token}"
        try:
            resp = api.get("/mesh/status")
        except httpx.TransportError:
            return None
        return resp.json() if resp.status_code == 200 else None

    def client_online() -> dict[str, Any] | None:
        doc = status()
        node = (doc or {}).get("nodes", {}).get("cpu-client", {})
        return doc if node.get("status") == "online" else None

    def run_task(body: dict[str, Any]) -> dict[str, Any]:
        task_id = api.post("/tasks/submit", json=body).json()["task_id"]
        doc: dict[str, Any] = api.get(f"/tasks/{task_id}", params={"wait": 30}).json()
        return doc

    wait_for(client_online, 90, "cpu-client online through the published port")
    first = run_task({"task_type": "test"})
    assert first["status"] == "completed", first
    assert first["node"] == "cpu-client"
    script = run_task({"task_type": "custom", "script": "echo ran as $(id -un)"})
    assert script["status"] == "completed", script
    assert "ran as gpumesh" in json.dumps(script["result"])

    coordinator = container("gpu-coordinator")
    # The coordinator (non-root) reads the task-type templates mounted from profiles/.
    read = subprocess.run(
        [
            "docker",
            "exec",
            coordinator,
            "python",
            "-c",
            "import os; from coordinator.web.templates import load_templates, templates_path; "
            "p = templates_path(os.environ); print(p, *sorted(load_templates(p)))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert read.returncode == 0, read.stdout + read.stderr
    assert read.stdout.split()[:2] == ["/etc/gpumesh/templates.toml", "embeddings"], read.stdout
    wait_for(
        lambda: inspect(coordinator)["State"]["Health"]["Status"] == "healthy",
        60,
        "the image's HEALTHCHECK to report healthy",
    )
    client_before = inspect(container("cpu-client"))["State"]

    restarted_at = time.monotonic()
    compose(project, "restart", "gpu-coordinator", env=env, timeout=120)
    doc = wait_for(client_online, 60, "cpu-client online again after the coordinator restart")
    assert doc["uptime_s"] <= time.monotonic() - restarted_at + 1, "the coordinator did not restart"

    client_after = inspect(container("cpu-client"))["State"]
    assert client_after["StartedAt"] == client_before["StartedAt"], "the client was restarted"
    assert client_after["Running"]

    # The named volume kept the first task; the rejoined client takes new work.
    kept = api.get(f"/tasks/{first['task_id']}").json()
    assert kept["status"] == "completed", kept
    again = run_task({"task_type": "test"})
    assert again["status"] == "completed", again


@pytest.mark.docker
@pytest.mark.slow
@needs_compose
@needs_engine
def test_a_process_task_survives_a_client_container_restart_by_running_again(
    stack: tuple[str, dict[str, str], httpx.Client],
) -> None:
    """Issue 19: the client's container restarts under a running process task; the task dies
    with it, the restarted client reports it lost (its journal is in the state volume), and
    it runs again as attempt 2 without spending max_attempts."""
    project, env, api = stack

    def admin() -> bool:
        token = compose(project, "exec", "-T", "gpu-coordinator", "cat", "/data/admin.token",
                        env=env, timeout=60, check=False).stdout.strip()
        if token:
            api.headers["Authorization"] = f"Bearer {token}"
        return bool(token)

    def online() -> bool:
        try:
            doc = api.get("/mesh/status").json()
        except (httpx.TransportError, ValueError):
            return False
        return bool(doc.get("nodes", {}).get("cpu-client", {}).get("status") == "online")

    wait_for(admin, 90, "the coordinator's admin token")
    wait_for(online, 90, "cpu-client online")
    script = "echo started-$MESH_ATTEMPT; sleep 8; echo done-$MESH_ATTEMPT"
    body = {"task_type": "custom", "script": script, "max_attempts": 1}
    task_id = api.post("/tasks/submit", json=body).json()["task_id"]
    wait_for(lambda: api.get(f"/tasks/{task_id}").json()["status"] == "running", 60,
             "the task running")
    compose(project, "restart", "cpu-client", env=env, timeout=120)
    doc: dict[str, Any] = {}
    deadline = time.monotonic() + 90
    while doc.get("status") not in ("completed", "failed") and time.monotonic() < deadline:
        doc = api.get(f"/tasks/{task_id}", params={"wait": 20}).json()
    assert doc["status"] == "completed", doc
    assert doc["attempt"] == 2 and doc["infra_losses"] == 1, doc
    assert doc["result"]["output"].strip().endswith("done-2"), doc["result"]
    assert "lost with the client" in doc["history"][0]["cause"], doc["history"]

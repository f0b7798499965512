"""Real parts for tests: a uvicorn server on a port-0 socket, client and coordinator processes.

Nothing here replaces our own code. The coordinator runs in the test's event loop (so
tests can read its Mesh and check invariants after each test) or as a subprocess (so it
can be killed with SIGKILL); compute clients always run as real `python -m gpu_client`
processes.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import uvicorn

from coordinator.core.mesh import Mesh
from coordinator.settings import Settings
from coordinator.web.app import create_app
from shared.protocol import MAX_FRAME_BYTES

ROOT = Path(__file__).resolve().parent.parent

# The admin token every spawned coordinator process starts with (`MESH_ADMIN_TOKEN`), and the
# header to send it in; in-process coordinators write theirs to <data-dir>/admin.token.
TEST_ADMIN_TOKEN = "gm_test-admin-token-for-spawned-coordinators"
ADMIN_HEADERS = {"Authorization": f"Bearer {TEST_ADMIN_TOKEN}"}


def admin_token(settings: Settings) -> str:
    """The admin token a coordinator with these settings accepts ("" with MESH_AUTH=off)."""
    if settings.auth == "off":
        return ""
    return settings.admin_token or (settings.data_dir / "admin.token").read_text().strip()


# The join token of every test coordinator (in-process and spawned); spawned clients send it.
TEST_JOIN_TOKEN = "test-join-token"

FAST = Settings(
    host="127.0.0.1",
    port=0,
    token=TEST_JOIN_TOKEN,
    heartbeat_interval_s=0.5,
    node_timeout_s=3.0,
    reconnect_grace_s=1.5,
    restart_grace_s=3.0,
    register_timeout_s=2.0,
)


async def wait_until(
    check: Callable[[], Awaitable[Any] | Any], timeout: float = 20.0, what: str = "condition"
) -> Any:
    """Poll `check` until it returns something truthy; fail with `what` at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.02)


def wait_for(
    check: Callable[[], Any], timeout: float, what: str, interval: float = 0.1
) -> Any:
    """The blocking twin of `wait_until`, for tests that drive things from outside a loop."""
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


@dataclass
class LiveCoordinator:
    settings: Settings
    server: uvicorn.Server
    port: int
    http: httpx.AsyncClient

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    @property
    def mesh(self) -> Mesh:
        mesh: Mesh = self.server.config.loaded_app.app.state.mesh  # type: ignore[attr-defined]
        return mesh

    async def submit(self, **body: Any) -> str:
        r = await self.http.post("/tasks/submit", json=body)
        assert r.status_code == 200, r.text
        task_id: str = r.json()["task_id"]
        return task_id

    async def task(self, task_id: str, wait: float = 0) -> dict[str, Any]:
        params = {"wait": str(wait)} if wait else {}
        r = await self.http.get(f"/tasks/{task_id}", params=params, timeout=wait + 10)
        assert r.status_code == 200, r.text
        doc: dict[str, Any] = r.json()
        return doc

    async def wait_finished(self, task_id: str, timeout: float = 30) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            doc = await self.task(task_id, wait=min(5.0, timeout))
            if doc["status"] in ("completed", "failed", "cancelled"):
                return doc
            if time.monotonic() > deadline:
                raise AssertionError(f"task {task_id} still {doc['status']} after {timeout}s")


def bound_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.set_inheritable(True)
    return sock


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return replace(FAST, data_dir=tmp_path / "mesh-data")


@pytest.fixture
async def coordinator(settings: Settings) -> AsyncIterator[LiveCoordinator]:
    async with run_coordinator(settings) as live:
        yield live


class run_coordinator:
    """`async with run_coordinator(settings) as live:` a real uvicorn in this loop."""

    def __init__(self, settings: Settings, check: bool = True) -> None:
        self.settings, self.check = settings, check

    async def __aenter__(self) -> LiveCoordinator:
        sock = bound_socket()
        config = uvicorn.Config(
            create_app(self.settings), ws="websockets-sansio", ws_max_size=MAX_FRAME_BYTES,
            log_level="warning", lifespan="on", timeout_graceful_shutdown=2,
        )
        self.server = uvicorn.Server(config)
        self.task = asyncio.create_task(self.server.serve(sockets=[sock]))
        await wait_until(lambda: self.server.started or self.task.done(), 10, "server start")
        if self.task.done():
            self.task.result()
        port = sock.getsockname()[1]
        token = admin_token(self.settings)
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        http = httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30, headers=headers)
        self.live = LiveCoordinator(self.settings, self.server, port, http)
        return self.live

    async def __aexit__(self, *exc: object) -> None:
        try:
            if self.check and exc[0] is None:
                self.live.mesh.check_invariants()
        finally:
            await self.live.http.aclose()
            self.server.should_exit = True
            await self.task


@dataclass
class Proc:
    """A real subprocess with its output in a file (read it when a test fails)."""

    argv: list[str]
    env: dict[str, str]
    log_path: Path
    popen: subprocess.Popen[bytes] | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    def start(self) -> Proc:
        out = self.log_path.open("ab")
        self.popen = subprocess.Popen(
            self.argv, env=self.env, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
            start_new_session=True,
        )
        out.close()
        return self

    @property
    def pid(self) -> int:
        assert self.popen is not None
        return self.popen.pid

    def kill9(self) -> None:
        assert self.popen is not None
        self.popen.send_signal(signal.SIGKILL)
        self.popen.wait(10)

    def stop(self) -> None:
        if self.popen is None or self.popen.poll() is not None:
            return
        self.popen.send_signal(signal.SIGTERM)
        try:
            self.popen.wait(10)
        except subprocess.TimeoutExpired:
            self.popen.kill()
            self.popen.wait(10)

    def output(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def _base_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "NODE_", "GPU_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    if os.geteuid() == 0 and (shims := _task_python_shims()):
        env["PATH"] = f"{shims}:{env.get('PATH', '')}"
    return env


def _task_python_shims() -> str:
    """A root client runs process tasks as uids of their own, which cannot search /root: where
    `python` is only root's (pyenv here), a world-readable dir with `python` -> python3."""
    if not Path("/usr/bin/python3").exists() or Path("/usr/bin/python").exists():
        return ""
    shims = Path("/tmp/gpumesh-test-shims")
    shims.mkdir(mode=0o755, exist_ok=True)
    if not (shims / "python").is_symlink():
        try:
            (shims / "python").symlink_to("/usr/bin/python3")
        except FileExistsError:
            pass
    return str(shims)


@pytest.fixture
async def spawn_client(tmp_path: Path) -> AsyncIterator[Callable[..., Proc]]:
    """Start `python -m gpu_client` processes; all are stopped (and their groups killed)."""
    procs: list[Proc] = []
    if os.geteuid() == 0:  # tasks run as uids of their own: let them reach their work dirs,
        tmp_path.chmod(0o1777)  # and leave flags and pid files in the test's tmp dir
        for p in (tmp_path, *tmp_path.parents):
            if p == Path(tempfile.gettempdir()) or p == p.parent:
                break
            p.chmod(p.stat().st_mode | 0o001)

    def spawn(name: str, coordinator_url: str, **env: str) -> Proc:
        proc_env = _base_env(
            NODE_NAME=name,
            MESH_COORDINATOR_URL=coordinator_url,
            GPU_ENABLED=env.pop("GPU_ENABLED", "false"),
            MESH_WORK_DIR=str(tmp_path / f"work-{name}"),
            MESH_RECONNECT_MAX_S="1",
            **({  # the join token, a state dir of its own (its credential), the process executor
                "MESH_TOKEN": TEST_JOIN_TOKEN, "MESH_STATE_DIR": str(tmp_path / f"state-{name}"),
                "MESH_EXECUTORS": "process",
            } | env),
        )
        proc = Proc(
            [sys.executable, "-m", "gpu_client"], proc_env, tmp_path / f"client-{name}.log"
        )
        procs.append(proc.start())
        return proc

    yield spawn
    # Off the loop: a client closing its socket needs the in-process coordinator to answer.
    await asyncio.gather(*(asyncio.to_thread(proc.stop) for proc in procs))
    for proc in procs:
        _kill_group(proc)


def _kill_group(proc: Proc) -> None:
    if proc.popen is None:
        return
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


@pytest.fixture
async def spawn_coordinator(tmp_path: Path) -> AsyncIterator[Callable[..., Proc]]:
    """Start `python -m coordinator` processes (to kill -9 them); `.extra['port']`."""
    procs: list[Proc] = []

    def spawn(port: int, data_dir: Path, **env: str) -> Proc:
        proc_env = _base_env(
            MESH_HEARTBEAT_S="0.5", MESH_NODE_TIMEOUT_S="3", MESH_RECONNECT_GRACE_S="1.5",
            MESH_RESTART_GRACE_S="5",
            **({"MESH_ADMIN_TOKEN": TEST_ADMIN_TOKEN, "MESH_JOIN_TOKEN": TEST_JOIN_TOKEN} | env),
        )
        argv = [
            sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data_dir), "--log-level", "warning",
        ]
        proc = Proc(argv, proc_env, tmp_path / f"coordinator-{port}.log", extra={"port": port})
        procs.append(proc.start())
        return proc

    yield spawn
    await asyncio.gather(*(asyncio.to_thread(proc.stop) for proc in procs))

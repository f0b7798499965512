"""Real processes, started as a user would: `python -m coordinator`, `python -m gpu_client`.

Every child gets the hard file-descriptor limit as its soft limit (10,000 sockets need
it) and its own process group, and is stopped (then killed) when its context ends. Output
goes to a log file in the run's temporary directory; it is printed if a start fails.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.httpc import BENCH_TOKEN, HttpConn

BENCH_JOIN_TOKEN = "benchmark-join-token"  # what benchmark nodes join with (MESH_JOIN_TOKEN)

ROOT = Path(__file__).resolve().parent.parent


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return hard


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "NODE_", "GPU_"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen[bytes]
    log_path: Path

    @property
    def pid(self) -> int:
        return self.popen.pid

    @property
    def ps(self) -> psutil.Process:
        return psutil.Process(self.popen.pid)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-4000:]
        except OSError:
            return ""

    def stop(self, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGTERM)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill9()
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.popen.pid, signal.SIGKILL)

    def kill9(self) -> None:
        if self.popen.poll() is None:
            self.popen.send_signal(signal.SIGKILL)
            self.popen.wait(10)


def spawn(
    name: str, argv: list[str], env: dict[str, str], log_dir: Path, capture: bool = False
) -> Proc:
    """Start `argv`; its output goes to a log file (stdout to a pipe when `capture`)."""
    log_path = log_dir / f"{name}.log"
    out = log_path.open("ab")
    popen = subprocess.Popen(
        argv,
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE if capture else out,
        stderr=out if capture else subprocess.STDOUT,
        start_new_session=True,
        preexec_fn=raise_fd_limit,
    )
    out.close()
    return Proc(name, popen, log_path)


def start_coordinator(
    port: int, data_dir: Path, log_dir: Path, log_level: str = "warning", **env: str
) -> Proc:
    argv = [
        sys.executable,
        "-m",
        "coordinator",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--data-dir",
        str(data_dir),
        "--log-level",
        log_level,
    ]
    env = {"MESH_ADMIN_TOKEN": BENCH_TOKEN, "MESH_JOIN_TOKEN": BENCH_JOIN_TOKEN} | env
    return spawn(f"coordinator-{port}", argv, clean_env(**env), log_dir)


def start_client(name: str, port: int, log_dir: Path, **env: str) -> Proc:
    proc_env = clean_env(
        NODE_NAME=name,
        MESH_COORDINATOR_URL=f"ws://127.0.0.1:{port}",
        GPU_ENABLED="false",
        MESH_WORK_DIR=str(log_dir / f"work-{name}"),
        MESH_LOG_LEVEL="WARNING",
        MESH_TOKEN=BENCH_JOIN_TOKEN,
        MESH_STATE_DIR=str(log_dir / f"state-{name}"),
        **env,
    )
    return spawn(f"client-{name}", [sys.executable, "-m", "gpu_client"], proc_env, log_dir)


class CpuMeter:
    """CPU seconds (user + system) used by a set of processes between two readings."""

    def __init__(self, pids: list[int]) -> None:
        self.procs = [psutil.Process(pid) for pid in pids]
        self.total = 0.0
        self._mark = 0.0

    def _now(self) -> float:
        return sum(sum(p.cpu_times()[:2]) for p in self.procs)

    def __enter__(self) -> CpuMeter:
        self._mark = self._now()
        return self

    def __exit__(self, *exc: object) -> None:
        self.total += self._now() - self._mark


def wait_for(check: Any, timeout: float, what: str, procs: tuple[Proc, ...] = ()) -> Any:
    """Call `check` every 10 ms until it returns something truthy; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            value = check()
        except OSError:
            value = None
        if value:
            return value
        for p in procs:
            if not p.alive():
                raise RuntimeError(f"{p.name} exited while waiting for {what}:\n{p.output()}")
        if time.monotonic() > deadline:
            detail = "\n".join(f"--- {p.name}\n{p.output()}" for p in procs)
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}\n{detail}")
        time.sleep(0.01)


def get(port: int, path: str) -> Any:
    conn = HttpConn("127.0.0.1", port, timeout=30)
    try:
        status, doc = conn.request("GET", path)
        return doc if status == 200 else None
    finally:
        conn.close()


def online_nodes(port: int) -> int:
    doc = get(port, "/health")
    return int(doc["online_nodes"]) if doc else 0


@contextlib.contextmanager
def mesh(
    log_dir: Path, clients: int = 0, client_env: dict[str, str] | None = None, **coord_env: str
) -> Iterator[tuple[int, Proc, list[Proc]]]:
    """A coordinator and `clients` compute clients (a, b, ...), all online; stopped after."""
    port = free_port()
    coord = start_coordinator(port, log_dir / f"data-{port}", log_dir, **coord_env)
    procs = [coord]
    try:
        wait_for(lambda: get(port, "/health"), 30, "the coordinator", (coord,))
        for i in range(clients):
            procs.append(start_client(chr(ord("a") + i), port, log_dir, **(client_env or {})))
        wait_for(lambda: online_nodes(port) >= clients, 30, f"{clients} nodes", tuple(procs))
        yield port, coord, procs[1:]
    finally:
        for p in reversed(procs):
            p.stop()

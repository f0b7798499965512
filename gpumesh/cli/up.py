"""`gpumesh up`: a coordinator and a local compute client on this machine, in the foreground.

What it promises, each shown by tests/cli/test_up.py:
- It refuses, with one line and exit code 2 and before it starts or writes anything, a port
  that is taken or a data dir a running coordinator holds (coordinator/storage/datadir.py), so a
  second
  `gpumesh up` never reports the first one's health as its own.
- Ctrl-C (or SIGTERM) stops the client, then the coordinator, says what happens to the work,
  and exits 0. Under `make up` the terminal's Ctrl-C would also reach make, which then reports
  "Interrupt" or the child's signal as an error: when it runs on a terminal, `up` takes the
  terminal's foreground for its own process group while it runs (as a shell does for a job)
  and hands it back when it ends, so Ctrl-C reaches only `up`, which stops its children in
  order.
- The children die with it: they get SIGTERM if `up` itself is killed (PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

from coordinator.storage.datadir import data_dir_in_use
from gpumesh.sdk import Client, MeshError

STOPPED = (
    "gpumesh stopped. Queued tasks stay in {data}; running process tasks and containers were "
    "not stopped: they keep running, and the next `gpumesh up` re-adopts them and records their "
    "results (a task that ended meanwhile reports its exit code; one that was lost runs again)."
)


def cmd_up(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir)
    if why := _refusal(args.host, args.port, data_dir):
        print(f"gpumesh up: {why}", file=sys.stderr)
        return 2
    with _terminal_foreground():
        return _run(args, data_dir)


def _refusal(host: str, port: int, data_dir: Path) -> str | None:
    """Why this `up` must not start, checked before anything is started or written."""
    if why := data_dir_in_use(data_dir):
        return why
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn binds
        try:
            s.bind((host, port))
        except OSError as exc:
            return (f"port {port} on {host} is taken ({exc.strerror}): is another gpumesh "
                    "running? Stop it, or give another --port")
    return None


def _run(args: argparse.Namespace, data_dir: Path) -> int:
    env = dict(os.environ)
    coordinator = _spawn(
        [sys.executable, "-m", "coordinator", "--host", args.host, "--port", str(args.port),
         "--data-dir", str(data_dir)], env,
    )
    url = f"http://127.0.0.1:{args.port}"
    procs = [coordinator]
    stopping: list[int] = []

    def stop(signum: int = signal.SIGTERM, *_: object) -> None:
        stopping.append(signum)
        for p in reversed(procs):  # the client first: it closes its link, then the mesh stops
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    if not _wait_healthy(url, coordinator, 30, stopping):
        interrupted = bool(stopping)
        stop()
        _reap(procs)
        if interrupted:
            print(STOPPED.format(data=data_dir), flush=True)
            return 0
        print("gpumesh up: the coordinator did not start (its log above says why)",
              file=sys.stderr)
        return 1
    client_env = _client_env(env, args.port, data_dir)
    procs.append(_spawn([sys.executable, "-m", "gpu_client"], client_env))
    print(_banner(url, data_dir, client_env["NODE_NAME"], env), flush=True)
    while not stopping and all(p.poll() is None for p in procs):
        time.sleep(0.2)
    crashed = not stopping
    stop()
    _reap(procs)
    if crashed:
        which = "coordinator" if coordinator.returncode not in (0, None) else "client"
        print(f"gpumesh up: the {which} stopped on its own (its log above says why)",
              file=sys.stderr)
        return 1
    print(STOPPED.format(data=data_dir), flush=True)
    return 0


def _client_env(env: dict[str, str], port: int, data_dir: Path) -> dict[str, str]:
    client_env = env | {
        "NODE_NAME": env.get("NODE_NAME") or socket.gethostname(),
        "NODE_ROLE": "compute",
        "MESH_COORDINATOR_URL": f"ws://127.0.0.1:{port}",
        "MESH_EXECUTORS": env.get("MESH_EXECUTORS", "process,docker"),  # opted in: own desk
        # The templates' model cache (coordinator/web/templates.toml), as in profiles/gpu.env.
        "MESH_ALLOWED_VOLUMES": env.get("MESH_ALLOWED_VOLUMES", "/var/cache/gpumesh:rw"),
        # the coordinator wrote its join token there; the client's credential lives beside it
        "MESH_TOKEN_FILE": env.get("MESH_TOKEN_FILE", str(data_dir / "join.token")),
        "MESH_STATE_DIR": env.get("MESH_STATE_DIR", str(data_dir / "client-state")),
    }
    if env.get("MESH_JOIN_TOKEN"):
        client_env["MESH_TOKEN"] = env["MESH_JOIN_TOKEN"]
    return client_env


def _banner(url: str, data_dir: Path, node: str, env: dict[str, str]) -> str:
    tokens = data_dir / "admin.token"
    token = (
        "  API token: the MESH_ADMIN_TOKEN you set\n  TOKEN=$MESH_ADMIN_TOKEN\n"
        if env.get("MESH_ADMIN_TOKEN") else
        f"  API token (admin) in {tokens}\n  TOKEN=$(cat {tokens})\n"
    )
    return (
        f"gpumesh is up: coordinator {url} (data in {data_dir}), local client {node!r}.\n"
        + token
        + f"  curl -H \"Authorization: Bearer $TOKEN\" {url}/mesh/status\n"
        f"  curl -X POST {url}/tasks/submit -H \"Authorization: Bearer $TOKEN\" "
        f"-H 'Content-Type: application/json' -d '{{\"task_type\": \"test\"}}'\n"
        "Ctrl-C stops the coordinator and the client; running tasks keep running."
    )


def _spawn(argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
    # Its own process group: the terminal's Ctrl-C reaches `up` alone, which stops the
    # children in order; PR_SET_PDEATHSIG stops them if `up` is killed outright.
    return subprocess.Popen(argv, env=env, process_group=0, preexec_fn=_die_with_parent)


def _die_with_parent() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


def _reap(procs: list[subprocess.Popen[bytes]]) -> None:
    for p in procs:
        try:
            p.wait(20)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def _wait_healthy(
    url: str, proc: subprocess.Popen[bytes], deadline_s: float, stopping: list[int]
) -> bool:
    """Our coordinator answers /health: it is still alive (the port was free, so the answer
    cannot come from another one)."""
    deadline = time.monotonic() + deadline_s
    with Client(url, token="") as mesh:  # /health is public: no token sent
        while time.monotonic() < deadline and not stopping:
            if proc.poll() is not None:
                return False
            try:
                if mesh.health(timeout=1).status == "healthy":
                    return proc.poll() is None
            except (MeshError, OSError, ValueError):  # not up yet, not ready (503), garbled
                pass
            time.sleep(0.1)
    return False


@contextlib.contextmanager
def _terminal_foreground() -> Iterator[None]:
    """While `up` runs, its own process group is the terminal's foreground (see above)."""
    fd = sys.stdin.fileno() if sys.stdin is not None else -1
    try:
        ours = os.isatty(fd) and os.tcgetpgrp(fd) == os.getpgrp()
    except OSError:
        ours = False
    if not ours:
        yield
        return
    before = os.tcgetpgrp(fd)
    old_ttou = signal.signal(signal.SIGTTOU, signal.SIG_IGN)  # set the foreground from behind
    try:
        os.setpgid(0, 0)
        os.tcsetpgrp(fd, os.getpgrp())
    except OSError:
        signal.signal(signal.SIGTTOU, old_ttou)
        yield
        return
    try:
        yield
    finally:
        with contextlib.suppress(OSError):
            os.tcsetpgrp(fd, before)
        signal.signal(signal.SIGTTOU, old_ttou)

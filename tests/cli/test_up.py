"""`make up` / `gpumesh up` as a user meets them: Ctrl-C in a terminal, a second `up`."""

from __future__ import annotations

import os
import pty
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

from tests.conftest import ROOT, TEST_JOIN_TOKEN, _base_env, free_port, wait_for

GPUMESH = [sys.executable, "-m", "gpumesh.cli.main"]


def _env(tmp_path: Path, port: int, data_dir: Path) -> dict[str, str]:
    return _base_env(
        MESH_PORT=str(port), MESH_HOST="127.0.0.1", MESH_DATA_DIR=str(data_dir),
        MESH_EXECUTORS="process", NODE_NAME="desk", MESH_JOIN_TOKEN=TEST_JOIN_TOKEN,
        MESH_WORK_DIR=str(tmp_path / "work"),
    )


def _read_until(fd: int, needle: bytes, timeout: float) -> bytes:
    buf, deadline = b"", time.monotonic() + timeout
    while needle not in buf:
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"no {needle!r} within {timeout}s; saw:\n{buf.decode()}")
        if select.select([fd], [], [], left)[0]:
            try:
                chunk = os.read(fd, 4096)
            except OSError:  # the terminal closed: the process ended
                break
            if not chunk:
                break
            buf += chunk
    return buf


def test_ctrl_c_under_make_up_exits_0_and_says_what_happens_to_running_tasks(
    tmp_path: Path,
) -> None:
    """The real Makefile's `up` target on a real terminal (a pty); Ctrl-C is the ^C byte."""
    port, data_dir = free_port(), tmp_path / "mesh-data"
    venv = Path(sys.executable).parent.parent  # this venv: make must not rebuild it
    make = ["make", "-s", "-C", str(ROOT), "-o", f"{venv}/.installed", "up", f"VENV={venv}"]
    pid, fd = pty.fork()
    if pid == 0:  # the child: make on a terminal of its own, as in a user's shell
        os.execvpe(make[0], make, _env(tmp_path, port, data_dir))
    try:
        out = _read_until(fd, b"Ctrl-C stops", 60)
        token = (data_dir / "admin.token").read_text().strip()
        auth = {"Authorization": f"Bearer {token}"}
        r = httpx.post(f"http://127.0.0.1:{port}/tasks/submit", headers=auth,
                       json={"task_type": "custom", "script": "sleep 3; echo survived"})
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        wait_for(lambda: httpx.get(f"http://127.0.0.1:{port}/tasks/{task_id}", headers=auth)
                 .json()["status"] == "running", 30, "the task running")
        os.write(fd, b"\x03")  # the terminal turns it into SIGINT for its foreground group
        out += _read_until(fd, b"gpumesh stopped", 60)
        _, status = os.waitpid(pid, 0)
        pid = 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Error" not in text and "Interrupt" not in text and "Traceback" not in text, text
    assert "keep running" in text and "re-adopts" in text, text
    with socket.socket() as s:  # the coordinator is gone: the port is free again
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind(("127.0.0.1", port))
    # What the message promised: the running task went on, and the next `up` records it.
    again = subprocess.Popen([*GPUMESH, "up"], env=_env(tmp_path, port, data_dir), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), 60, "the second gpumesh up healthy")
        doc = wait_for(lambda: _finished(port, auth, task_id), 60, "the task recorded")
    finally:
        again.send_signal(signal.SIGTERM)
        again.wait(60)
    assert doc["status"] == "completed" and doc["attempt"] == 1, doc
    assert doc["result"]["output"].strip() == "survived", doc


def _finished(port: int, auth: dict[str, str], task_id: str) -> dict[str, object] | None:
    doc: dict[str, object] = httpx.get(
        f"http://127.0.0.1:{port}/tasks/{task_id}", headers=auth, timeout=5
    ).json()
    return doc if doc["status"] in ("completed", "failed", "cancelled") else None


def test_sigterm_stops_up_with_exit_0(tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "mesh-data"
    up = subprocess.Popen([*GPUMESH, "up"], env=_env(tmp_path, port, data_dir), cwd=ROOT,
                          stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: _healthy(port), 60, "gpumesh up healthy")
        up.send_signal(signal.SIGTERM)
        out, _ = up.communicate(timeout=60)
    finally:
        up.kill()
    assert up.returncode == 0, out.decode()
    assert b"gpumesh stopped" in out


def test_a_second_up_on_a_taken_port_refuses_and_touches_nothing(tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "second"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", port))
        taken.listen()
        r = subprocess.run([*GPUMESH, "up"], env=_env(tmp_path, port, data_dir), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and f"port {port}" in lines[0] and "taken" in lines[0], r.stderr
    assert "is up" not in r.stdout
    assert not data_dir.exists()


def test_a_second_up_on_a_data_dir_in_use_refuses_and_touches_nothing(tmp_path: Path) -> None:
    port, data_dir = free_port(), tmp_path / "mesh-data"
    first = subprocess.Popen([*GPUMESH, "up"], env=_env(tmp_path, port, data_dir), cwd=ROOT,
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _healthy(port), 60, "first gpumesh up healthy")
        wait_for(lambda: list(data_dir.rglob("*.credential")), 60, "its client joined")
        holder = (data_dir / "coordinator.lock").read_text()
        names = {p.relative_to(data_dir) for p in data_dir.rglob("*")}
        other = free_port()
        r = subprocess.run([*GPUMESH, "up"], env=_env(tmp_path, other, data_dir), cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "in use by a running coordinator" in lines[0], r.stderr
        assert f"(pid {holder.strip()})" in lines[0]  # the holder: the first coordinator
        # The coordinator itself refuses a data dir in use the same way.
        r = subprocess.run(
            [sys.executable, "-m", "coordinator", "--port", str(other), "--host", "127.0.0.1",
             "--data-dir", str(data_dir)], env=_env(tmp_path, other, data_dir), cwd=ROOT,
            capture_output=True, text=True, timeout=60,
        )
        assert r.returncode == 2 and "in use by a running coordinator" in r.stderr, r
        assert (data_dir / "coordinator.lock").read_text() == holder
        new = {p.relative_to(data_dir) for p in data_dir.rglob("*")} - names
        assert all(p.name.endswith(("-wal", "-shm", "-journal")) for p in new), new
        assert not _healthy(other)  # nothing was started on the second port
    finally:
        first.send_signal(signal.SIGTERM)
        first.wait(60)
    assert first.returncode == 0


def _healthy(port: int) -> bool:
    try:
        return httpx.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False

"""Limits under load (issue 10): coordinator RSS under a 200 MB POST and under a node that
sends and never reads, and the longest event-loop hold of `/tasks/active` at a 1,000,000-task
backlog.

    python -m benchmarks.limits active [--tasks 1000000]
    python -m benchmarks.limits rss [--root DIR] [--body-mb 200] [--deaf-s 20]

`rss` starts `python -m coordinator` from `--root` (default: this checkout; point it at an
older checkout for a before/after) with auth off, and reads its VmRSS from /proc.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent


# --- /tasks/active at a large backlog ------------------------------------------------------


async def active(n: int) -> dict[str, Any]:
    from coordinator.core.mesh import Mesh
    from coordinator.settings import Settings
    from coordinator.storage.store import Store
    from coordinator.web.edge import open_id_chunks, stream_tasks
    from coordinator.web.views import task_view
    from shared.tasks import TaskSubmit

    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "mesh.sqlite3")
        await store.open()
        mesh = Mesh(store, Settings(data_dir=Path(tmp)))  # not started: nothing dispatches
        spec = TaskSubmit(task_type="test")
        started = time.perf_counter()
        for _ in range(0, n, 10_000):  # stored and in memory, as after real submissions
            await mesh.submit([(spec, {})] * min(10_000, n - len(mesh.tasks)))
        built = time.perf_counter() - started
        t0 = time.perf_counter()
        snapshot = list(mesh.tasks)  # what the first version did on the loop, for comparison
        copy_s = time.perf_counter() - t0
        del snapshot
        body = stream_tasks(
            open_id_chunks(store), mesh.tasks.get, lambda t: task_view(t, mesh.queued_reason(t))
        )
        gc.set_threshold(50_000, 20, 100)  # as `python -m coordinator` runs
        gc.collect()
        gc.freeze()  # as the app does after loading
        gaps: list[float] = []
        running = True

        async def ticker() -> None:  # the loop's lag: the longest time anything held it
            while running:
                t0 = time.perf_counter()
                await asyncio.sleep(0)
                gaps.append(time.perf_counter() - t0)

        tick = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        size, t_all = 0, time.perf_counter()
        async for chunk in body:
            size += len(chunk)
        total = time.perf_counter() - t_all
        running = False
        await tick
        await store.close()
    gaps.sort()
    return {
        "tasks": n, "build_s": round(built, 1), "copy_of_ids_ms": round(copy_s * 1e3, 1),
        "longest_loop_hold_ms": round(gaps[-1] * 1e3, 2),
        "p99_loop_hold_ms": round(gaps[int(len(gaps) * 0.99)] * 1e3, 2),
        "total_s": round(total, 2), "bytes": size,
    }


# --- RSS of a coordinator process ----------------------------------------------------------


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def start_coordinator(root: Path, port: int, data: Path) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env.update(MESH_AUTH="off", MESH_TOKEN="bench", MESH_JOIN_TOKEN="bench",
               PYTHONPATH=str(root))
    proc = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(port),
         "--data-dir", str(data), "--log-level", "error"],
        cwd=root, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), 0.2).close()
            return proc
        except OSError:
            time.sleep(0.1)
    raise RuntimeError("coordinator did not start")


def big_post(port: int, mb: int, pid: int, chunked: bool) -> dict[str, Any]:
    """Send an `mb` MB body (declared, or chunked with no length), sampling the
    coordinator's RSS as it goes."""
    peak = rss_mb(pid)
    sent = 0
    status = b""
    framing = b"Transfer-Encoding: chunked" if chunked else b"Content-Length: %d" % (mb << 20)
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(b"POST /tasks/submit HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                  b"\r\n%s\r\n\r\n" % framing)
        chunk = b"x" * (1 << 20)
        if chunked:
            chunk = b"%x\r\n%s\r\n" % (len(chunk), chunk)
        try:
            for _ in range(mb):
                s.sendall(chunk)
                sent += 1
                peak = max(peak, rss_mb(pid))
        except OSError:
            pass
        s.settimeout(30)
        try:
            status = s.recv(200).split(b"\r\n", 1)[0]
        except OSError:
            pass
    time.sleep(0.5)
    return {"sent_mb": sent, "status": status.decode(errors="replace"),
            "peak_rss_mb": round(max(peak, rss_mb(pid)), 1)}


class DeafPeer:
    """A WebSocket client that never reads after the handshake: raw frames on a socket
    with a small receive buffer (a library client keeps reading into its own memory)."""

    def __init__(self, port: int, path: str) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(30)  # a send that blocks this long: the server stopped reading
        self.sock.sendall(
            b"GET %s HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            % path.encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            head += self.sock.recv(1)  # byte by byte: not one byte past the handshake
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(head.decode(errors="replace"))

    def send(self, text: str) -> None:
        data = text.encode()
        n = len(data)
        size = bytes([0x80 | n]) if n < 126 else (
            bytes([0x80 | 126]) + n.to_bytes(2, "big") if n < 1 << 16
            else bytes([0x80 | 127]) + n.to_bytes(8, "big"))
        self.sock.sendall(b"\x81" + size + b"\0\0\0\0" + data)  # masked with a zero key

    def close_code(self, timeout: float) -> int | str:
        """Read everything now; the close frame's code, or how the connection ended."""
        self.sock.settimeout(timeout)
        buf = b""
        try:
            while chunk := self.sock.recv(1 << 16):
                buf += chunk
        except TimeoutError:
            return "still open"
        except OSError:
            pass
        finally:
            self.sock.close()
        i = buf.rfind(b"\x88")  # the close frame: 0x88, length, 2-byte code
        if i >= 0 and len(buf) >= i + 4:
            return int.from_bytes(buf[i + 2:i + 4], "big")
        return "dropped without a close frame"


def deaf_peer(port: int, seconds: float, pid: int) -> dict[str, Any]:
    """A node that registers, then sends bad frames and never reads."""
    peer = DeafPeer(port, "/ws/deaf")
    peer.send(json.dumps({"type": "register", "token": "bench", "executors": []}))
    peak, frames = rss_mb(pid), 0
    deadline = time.monotonic() + seconds
    try:
        while time.monotonic() < deadline:
            for _ in range(200):
                peer.send('{"type": "nonsense", "pad": "' + "x" * 200 + '"}')
                frames += 1
            peak = max(peak, rss_mb(pid))
    except OSError:
        pass
    return {"frames_sent": frames, "peak_rss_mb": round(peak, 1),
            "close_code": peer.close_code(20)}


def deaf_node(port: int, tasks: int, kb: int, pid: int) -> dict[str, Any]:
    """A node with `tasks` slots that registers and never reads, while `tasks` tasks with
    `kb` KB of params each are submitted: their `assign` frames have nowhere to go."""
    import httpx

    peer = DeafPeer(port, "/ws/deaf-node")
    peer.send(json.dumps({"type": "register", "token": "bench", "executors": ["builtin"],
                          "cpu_count": 1, "slots": tasks}))
    peak = rss_mb(pid)
    per_batch = max(1, (3 << 20) // (kb << 10))
    body = [{"task_type": "test", "pad": "x" * (kb << 10)}] * per_batch
    with httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=60) as http:
        for _ in range(0, tasks, per_batch):
            http.post("/tasks/submit", json=body)
            peak = max(peak, rss_mb(pid))
    for _ in range(30):  # let dispatch and the writer settle
        time.sleep(0.1)
        peak = max(peak, rss_mb(pid))
    return {"tasks": tasks, "assign_kb": kb, "peak_rss_mb": round(peak, 1),
            "close_code": peer.close_code(20)}


def rss(root: Path, body_mb: int, deaf_s: float) -> dict[str, Any]:
    out: dict[str, Any] = {"root": str(root)}
    with tempfile.TemporaryDirectory() as tmp:
        for what in ("body", "chunked body", "deaf", "deaf node"):
            with socket.socket() as s:
                s.bind(("127.0.0.1", 0))
                port = s.getsockname()[1]
            proc = start_coordinator(root, port, Path(tmp) / what.replace(" ", "-"))
            try:
                time.sleep(1)
                base = rss_mb(proc.pid)
                if what in ("body", "chunked body"):
                    res = big_post(port, body_mb, proc.pid, chunked=what != "body")
                elif what == "deaf":
                    res = deaf_peer(port, deaf_s, proc.pid)
                else:
                    res = deaf_node(port, 4000, 40, proc.pid)
                out[what] = {"rss_before_mb": round(base, 1), **res,
                             "rss_after_mb": round(rss_mb(proc.pid), 1)}
            finally:
                proc.terminate()
                proc.wait(10)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.limits")
    sub = ap.add_subparsers(dest="cmd", required=True)
    a = sub.add_parser("active")
    a.add_argument("--tasks", type=int, default=1_000_000)
    r = sub.add_parser("rss")
    r.add_argument("--root", type=Path, default=ROOT)
    r.add_argument("--body-mb", type=int, default=200)
    r.add_argument("--deaf-s", type=float, default=20.0)
    args = ap.parse_args()
    if args.cmd == "active":
        print(json.dumps(asyncio.run(active(args.tasks))))
    else:
        print(json.dumps(rss(args.root, args.body_mb, args.deaf_s)))


if __name__ == "__main__":
    main()

"""`python -m benchmarks.failover [--lease 10 2] [--runs 5] [--tasks 1000]`: failover time.

For each run: a fresh database on a real PostgreSQL (tests/pgserver.py), coordinator A leads,
coordinator B stands by, `--tasks` tasks wait in the queue (no node), A is killed with SIGKILL
at a random point of its renewal period, and we time how long until B's `/health` says
`"role": "leader"` (the lease lapsing by the database's clock, plus B loading the mesh).
Prints the median, min and max per lease length.
"""

from __future__ import annotations

import argparse
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

from tests.pgserver import PgServer, free_port

TOKEN = "gm_failover-benchmark-admin-token"


def _coordinator(
    port: int, data: Path, dsn: str, lease_s: float, log: Path
) -> subprocess.Popen[bytes]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "NODE_"))}
    env.update(MESH_STORE=dsn, MESH_LEASE_S=str(lease_s),
               MESH_ADVERTISE_URL=f"http://127.0.0.1:{port}", MESH_ADMIN_TOKEN=TOKEN,
               MESH_JOIN_TOKEN="failover-bench", PYTHONUNBUFFERED="1")
    argv = [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(data), "--log-level", "warning"]
    with log.open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _role(http: httpx.Client, port: int) -> str:
    try:
        return str(http.get(f"http://127.0.0.1:{port}/health", timeout=1).json().get("role"))
    except (httpx.HTTPError, ValueError):
        return ""


def _wait(http: httpx.Client, port: int, role: str, timeout: float) -> float:
    start = time.monotonic()
    while _role(http, port) != role:
        if time.monotonic() - start > timeout:
            raise RuntimeError(f"port {port}: not {role} after {timeout}s")
        time.sleep(0.01)
    return time.monotonic() - start


def one_run(server: PgServer, lease_s: float, tasks: int, tmp: Path) -> float:
    dsn = server.create_database()
    pa, pb = free_port(), free_port()
    procs = []
    try:
        with httpx.Client(headers={"Authorization": f"Bearer {TOKEN}"}) as http:
            procs.append(a := _coordinator(pa, tmp / f"a{pa}", dsn, lease_s, tmp / "a.log"))
            _wait(http, pa, "leader", 60)
            procs.append(_coordinator(pb, tmp / f"b{pb}", dsn, lease_s, tmp / "b.log"))
            _wait(http, pb, "standby", 60)
            body = [{"task_type": "test", "name": f"t{i}"} for i in range(tasks)]
            for i in range(0, tasks, 1000):
                r = http.post(f"http://127.0.0.1:{pa}/tasks/submit", json=body[i:i + 1000],
                              timeout=60)
                r.raise_for_status()
            time.sleep(random.uniform(0, lease_s / 3))  # a random point of the renewal period
            a.send_signal(signal.SIGKILL)
            a.wait()
            return _wait(http, pb, "leader", lease_s * 3 + 60)
    finally:
        for p in procs:
            p.kill()
            p.wait()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--lease", type=float, nargs="+", default=[10.0, 2.0])
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--tasks", type=int, default=1000)
    args = p.parse_args()
    server = PgServer()
    server.start()
    try:
        with tempfile.TemporaryDirectory(prefix="gpumesh-failover-") as tmp:
            for lease_s in args.lease:
                times = [one_run(server, lease_s, args.tasks, Path(tmp))
                         for _ in range(args.runs)]
                print(f"lease {lease_s:>5.1f}s, {args.tasks} queued: failover median "
                      f"{statistics.median(times):.2f}s (min {min(times):.2f}, max "
                      f"{max(times):.2f}, n={len(times)}): "
                      + " ".join(f"{t:.2f}" for t in times), flush=True)
    finally:
        server.stop()


if __name__ == "__main__":
    main()

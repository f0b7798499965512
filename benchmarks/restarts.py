"""`python -m benchmarks.restarts [--tasks 600] [--kills 20] [--over 60] [--armed 0.5]`.

Issue 19's figure: short process tasks while compute clients are killed at random times with
their whole process group (SIGKILL, as `systemctl restart` with the default KillMode does)
and restarted at once by a supervisor; a share (`--armed`) of the restarts carry
GPUMESH_TEST_CRASH_AT=<random launch point>, so that client dies again in the middle of its
first launch (the window a random kill rarely hits). A real coordinator and real clients,
all subprocesses, default settings (max_attempts 3). Each task leaves one mark per run of
its command; at the end every task must be `completed` with its own output. Prints: tasks
completed and failed, commands that never ran or ran more than once, the infrastructure
losses the coordinator counted, and the highest attempt. Exit 1 if any task failed.

Takes about `--over` seconds plus the tail of the queue; not in the default test suite.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from gpu_client.executors.journal import CRASH_POINTS
from tests.pgserver import free_port

TOKEN = "gm_restarts-benchmark-admin-token"
JOIN = "restarts-bench"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "NODE_", "GPU"))}
    env.update(PYTHONUNBUFFERED="1", **extra)
    return env


def _coordinator(port: int, tmp: Path) -> subprocess.Popen[bytes]:
    argv = [sys.executable, "-m", "coordinator", "--host", "127.0.0.1", "--port", str(port),
            "--data-dir", str(tmp / "data"), "--log-level", "warning"]
    env = _env(MESH_ADMIN_TOKEN=TOKEN, MESH_JOIN_TOKEN=JOIN, MESH_ADVERTISE="off")
    with (tmp / "coordinator.log").open("ab") as out:
        return subprocess.Popen(argv, env=env, stdout=out, stderr=subprocess.STDOUT)


def _client(name: str, port: int, tmp: Path, **extra: str) -> subprocess.Popen[bytes]:
    env = _env(**extra, NODE_NAME=name, MESH_COORDINATOR_URL=f"ws://127.0.0.1:{port}",
               GPU_ENABLED="false", MESH_WORK_DIR=str(tmp / f"work-{name}"),
               MESH_STATE_DIR=str(tmp / f"state-{name}"), MESH_TOKEN=JOIN,
               MESH_EXECUTORS="process", MESH_SLOTS="2", MESH_RECONNECT_MAX_S="1",
               MESH_DISCOVERY="off")
    with (tmp / f"client-{name}.log").open("ab") as out:
        return subprocess.Popen([sys.executable, "-m", "gpu_client"], env=env, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _wait_health(http: httpx.Client, port: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            if http.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.05)
    raise RuntimeError("coordinator not up after 60 s")


class Supervisor(threading.Thread):
    """Restarts a dead client at once, as systemd's Restart=always or compose's
    `restart: unless-stopped` would. An `armed` restart carries GPUMESH_TEST_CRASH_AT=<a
    random launch point>, so that client dies again in the middle of its first launch."""

    def __init__(self, names: list[str], port: int, tmp: Path, armed: float) -> None:
        super().__init__(daemon=True)
        self.port, self.tmp, self.armed = port, tmp, armed
        self.procs = {n: _client(n, port, tmp) for n in names}
        self.lock = threading.Lock()
        self.stopping = threading.Event()
        self.restarts = 0

    def kill(self, name: str) -> None:
        with self.lock:
            _kill_group(self.procs[name])

    def run(self) -> None:
        while not self.stopping.wait(0.05):
            with self.lock:
                for name, proc in self.procs.items():
                    if proc.poll() is None:
                        continue
                    crash = {}
                    if random.random() < self.armed:
                        crash = {"GPUMESH_TEST_CRASH_AT": random.choice(CRASH_POINTS)}
                    self.procs[name] = _client(name, self.port, self.tmp, **crash)
                    self.restarts += 1

    def stop(self) -> None:
        self.stopping.set()
        self.join()
        for proc in self.procs.values():
            _kill_group(proc)


def run(
    tasks: int, kills: int, over: float, clients: int, sleep: float, armed: float, tmp: Path
) -> dict[str, float]:
    port = free_port()
    marks = tmp / "marks"
    marks.mkdir()
    script = f"echo x >> {marks}/$MESH_TASK_ID; sleep {sleep:g}; echo out-$MESH_TASK_ID"
    coord = _coordinator(port, tmp)
    base = f"http://127.0.0.1:{port}"
    sup: Supervisor | None = None
    try:
        with httpx.Client(base_url=base, headers={"Authorization": f"Bearer {TOKEN}"},
                          timeout=60) as http:
            _wait_health(http, port)
            names = [f"n{i}" for i in range(clients)]
            sup = Supervisor(names, port, tmp, armed)
            sup.start()
            body = [{"task_type": "custom", "script": script} for _ in range(tasks)]
            began = time.monotonic()
            ids = [a["task_id"] for a in http.post("/tasks/submit", json=body).json()["tasks"]]
            for t in sorted(random.uniform(0, over) for _ in range(kills)):
                time.sleep(max(0.0, began + t - time.monotonic()))
                sup.kill(random.choice(names))  # the supervisor starts it again
            docs = [_finished(http, i) for i in ids]
            took = time.monotonic() - began
            metrics = http.get("/metrics").text
    finally:
        if sup is not None:
            sup.stop()
        coord.kill()
        coord.wait()
    runs = {p.name: len(p.read_text().split()) for p in marks.iterdir()}
    bad = [d for d in docs if d["status"] != "completed"
           or (d["result"] or {}).get("output", "").strip() != f"out-{d['task_id']}"]
    losses = sum(float(v) for v in re.findall(
        r'^gpumesh_infra_losses_total\{node="[^"]*"\} (\S+)$', metrics, re.M))
    return {
        "tasks": tasks, "kills": kills, "launch_crashes": sum(
            p.read_text(errors="replace").count("GPUMESH_TEST_CRASH_AT=")
            for p in tmp.glob("client-*.log")),
        "seconds": round(took, 1),
        "completed": sum(d["status"] == "completed" for d in docs),
        "failed": sum(d["status"] == "failed" for d in docs),
        "wrong_output": len(bad), "never_ran": tasks - len(runs),
        "ran_twice_or_more": sum(n > 1 for n in runs.values()),
        "infra_losses": losses, "max_attempt": max(int(d["attempt"]) for d in docs),
    }


def _finished(http: httpx.Client, task_id: str) -> dict[str, object]:
    deadline = time.monotonic() + 600
    while True:
        doc: dict[str, object] = http.get(f"/tasks/{task_id}", params={"wait": "10"}).json()
        if doc["status"] in ("completed", "failed", "cancelled") or time.monotonic() > deadline:
            return doc


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.restarts", description=__doc__)
    p.add_argument("--tasks", type=int, default=600)
    p.add_argument("--kills", type=int, default=20)
    p.add_argument("--over", type=float, default=60.0, help="seconds the kills spread over")
    p.add_argument("--clients", type=int, default=2)
    p.add_argument("--sleep", type=float, default=0.5, help="each task's run time, seconds")
    p.add_argument("--runs", type=int, default=1)
    p.add_argument("--armed", type=float, default=0.5,
                   help="share of restarts armed to crash again mid-launch (GPUMESH_TEST_CRASH_AT)")
    p.add_argument("--keep", action="store_true", help="keep each run's logs and dirs")
    args = p.parse_args(argv)
    failed = 0
    for _ in range(args.runs):
        tmp = Path(tempfile.mkdtemp(prefix="gpumesh-restarts-"))
        print(f"# logs in {tmp}", flush=True)
        try:
            row = run(args.tasks, args.kills, args.over, args.clients, args.sleep, args.armed, tmp)
        finally:
            if not args.keep:
                shutil.rmtree(tmp, ignore_errors=True)
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        failed += int(row["failed"] + row["wrong_output"] + row["never_ran"] > 0)
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())

"""`gpumesh`: run a whole mesh on this machine, submit work, look at it.

    gpumesh up                    coordinator on :8001 plus one local compute client
    gpumesh submit '{"task_type": "test"}' [--wait 60]
    gpumesh status
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_URL = os.environ.get("MESH_URL", "http://127.0.0.1:8001")


def _request(method: str, url: str, body: bytes | None = None, timeout: float = 10) -> Any:
    req = urllib.request.Request(
        url, data=body, method=method, headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        return json.loads(exc.read() or b"{}") | {"http_status": exc.code}


def _wait_healthy(url: str, proc: subprocess.Popen[bytes], deadline_s: float) -> bool:
    deadline = time.monotonic() + deadline_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return False
        try:
            if _request("GET", f"{url}/health", timeout=1).get("status") == "healthy":
                return True
        except (urllib.error.URLError, OSError, ValueError):
            pass
        time.sleep(0.1)
    return False


def cmd_up(args: argparse.Namespace) -> int:
    env = dict(os.environ)
    coordinator = subprocess.Popen(
        [sys.executable, "-m", "coordinator", "--host", args.host, "--port", str(args.port),
         "--data-dir", str(args.data_dir)],
        env=env,
    )
    url = f"http://127.0.0.1:{args.port}"
    if not _wait_healthy(url, coordinator, 30):
        print("gpumesh up: the coordinator did not become healthy", file=sys.stderr)
        coordinator.terminate()
        return 1
    client_env = env | {
        "NODE_NAME": env.get("NODE_NAME") or socket.gethostname(),
        "NODE_ROLE": "compute",
        "MESH_COORDINATOR_URL": f"ws://127.0.0.1:{args.port}",
        "MESH_EXECUTORS": env.get("MESH_EXECUTORS", "process,docker"),
    }
    client = subprocess.Popen([sys.executable, "-m", "gpu_client"], env=client_env)
    print(
        f"gpumesh is up: coordinator {url} (data in {args.data_dir}), "
        f"local client {client_env['NODE_NAME']!r}.\n"
        f"  curl {url}/mesh/status\n"
        f"  curl -X POST {url}/tasks/submit -d '{{\"task_type\": \"test\"}}'\n"
        "Ctrl-C stops both.",
        flush=True,
    )
    procs = [coordinator, client]

    def stop(*_: object) -> None:
        for p in reversed(procs):
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    while all(p.poll() is None for p in procs):
        time.sleep(0.5)
    stop()
    for p in procs:
        try:
            p.wait(15)
        except subprocess.TimeoutExpired:
            p.kill()
    return coordinator.returncode or 0


def cmd_submit(args: argparse.Namespace) -> int:
    text = Path(args.task[1:]).read_text() if args.task.startswith("@") else args.task
    doc = _request("POST", f"{args.url}/tasks/submit", text.encode())
    if args.wait and "task_id" in doc:
        doc = _request(
            "GET", f"{args.url}/tasks/{doc['task_id']}?wait={args.wait}", timeout=args.wait + 10
        )
    print(json.dumps(doc, indent=2))
    return 1 if "error" in doc else 0


def cmd_status(args: argparse.Namespace) -> int:
    print(json.dumps(_request("GET", f"{args.url}/mesh/status"), indent=2))
    return 0


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="gpumesh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    up = sub.add_parser("up", help="run a coordinator and a local compute client")
    up.add_argument("--host", default=os.environ.get("MESH_HOST", "0.0.0.0"))
    up.add_argument("--port", type=int, default=int(os.environ.get("MESH_PORT", "8001")))
    up.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MESH_DATA_DIR", "./mesh-data")))
    up.set_defaults(fn=cmd_up)
    submit = sub.add_parser("submit", help="submit a task: JSON text or @file")
    submit.add_argument("task")
    submit.add_argument("--wait", type=float, default=0, help="seconds to wait for the result")
    submit.add_argument("--url", default=DEFAULT_URL)
    submit.set_defaults(fn=cmd_submit)
    status = sub.add_parser("status", help="print /mesh/status")
    status.add_argument("--url", default=DEFAULT_URL)
    status.set_defaults(fn=cmd_status)
    args = p.parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()

"""`gpumesh`: run a whole mesh on this machine, submit work, look at it.

    gpumesh up                    coordinator on :8001 plus one local compute client
    gpumesh submit '{"task_type": "test"}' [--wait 60]
    gpumesh status
    gpumesh token create --tenant T --role submit|read|admin [--name N]
    gpumesh token list
    gpumesh token revoke ID
    gpumesh node forget NAME

Every command but `up` sends the API token from MESH_API_TOKEN, else the admin token the
coordinator wrote to <MESH_DATA_DIR or ./mesh-data>/admin.token; --url or MESH_URL says where.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

DEFAULT_URL = os.environ.get("MESH_URL", "http://127.0.0.1:8001")


def token_file() -> Path:
    return Path(os.environ.get("MESH_DATA_DIR") or "./mesh-data") / "admin.token"


def api_token() -> str:
    """MESH_API_TOKEN, else the admin token file; "" when neither is there."""
    token = os.environ.get("MESH_API_TOKEN", "").strip()
    if token:
        return token
    try:
        return token_file().read_text().strip()
    except OSError:
        return ""


def _request(method: str, url: str, body: bytes | None = None, timeout: float = 10) -> Any:
    headers = {"Content-Type": "application/json"}
    token = api_token()
    if token:
        headers["Authorization"] = f"Bearer {token}"
    req = urllib.request.Request(url, data=body, method=method, headers=headers)
    try:
        ca = os.environ.get("MESH_CA_FILE", "").strip()  # a private CA for https:// URLs
        context = ssl.create_default_context(cafile=ca) if ca else None
        with urllib.request.urlopen(req, timeout=timeout, context=context) as resp:
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
    tokens = Path(args.data_dir) / "admin.token"
    if not _wait_healthy(url, coordinator, 30):
        print("gpumesh up: the coordinator did not become healthy", file=sys.stderr)
        coordinator.terminate()
        return 1
    client_env = env | {
        "NODE_NAME": env.get("NODE_NAME") or socket.gethostname(),
        "NODE_ROLE": "compute",
        "MESH_COORDINATOR_URL": f"ws://127.0.0.1:{args.port}",
        "MESH_EXECUTORS": env.get("MESH_EXECUTORS", "process,docker"),  # opted in: own desk
        # the coordinator wrote its join token there; the client's credential lives beside it
        "MESH_TOKEN_FILE": env.get("MESH_TOKEN_FILE", str(Path(args.data_dir) / "join.token")),
        "MESH_STATE_DIR": env.get("MESH_STATE_DIR", str(Path(args.data_dir) / "client-state")),
    }
    if env.get("MESH_JOIN_TOKEN"):
        client_env["MESH_TOKEN"] = env["MESH_JOIN_TOKEN"]
    client = subprocess.Popen([sys.executable, "-m", "gpu_client"], env=client_env)
    print(
        f"gpumesh is up: coordinator {url} (data in {args.data_dir}), "
        f"local client {client_env['NODE_NAME']!r}.\n"
        + (
            "  API token: the MESH_ADMIN_TOKEN you set\n  TOKEN=$MESH_ADMIN_TOKEN\n"
            if env.get("MESH_ADMIN_TOKEN") else
            f"  API token (admin) in {tokens}\n  TOKEN=$(cat {tokens})\n"
        )
        + f"  curl -H \"Authorization: Bearer $TOKEN\" {url}/mesh/status\n"
        f"  curl -X POST {url}/tasks/submit -H \"Authorization: Bearer $TOKEN\" "
        f"-H 'Content-Type: application/json' -d '{{\"task_type\": \"test\"}}'\n"
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
    doc = _request("GET", f"{args.url}/mesh/status")
    print(json.dumps(doc, indent=2))
    return 1 if "error" in doc else 0


def cmd_token(args: argparse.Namespace) -> int:
    if args.action == "create":
        body = {"tenant": args.tenant, "role": args.role, "name": args.name}
        doc = _request("POST", f"{args.url}/admin/tokens", json.dumps(body).encode())
    elif args.action == "list":
        doc = _request("GET", f"{args.url}/admin/tokens")
    else:
        doc = _request("DELETE", f"{args.url}/admin/tokens/{urllib.parse.quote(args.id)}")
    return _show(doc)


def _show(doc: Any) -> int:
    """Print an answer for a person; exit 1 when it is an `{"error", "reason"}`."""
    print(json.dumps(doc, indent=2))
    return 1 if "error" in doc else 0


def _token_parsers(sub: Any) -> None:
    token = sub.add_parser("token", help="manage API tokens (admin)")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new token; its secret is printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=["admin", "submit", "read"], default="submit")
    create.add_argument("--name", default="")
    actions.add_parser("list", help="every token (no secrets)")
    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id")
    for p in actions.choices.values():
        p.set_defaults(fn=cmd_token)
        p.add_argument("--url", default=DEFAULT_URL)


def cmd_node(args: argparse.Namespace) -> int:
    doc = _request("DELETE", f"{args.url}/mesh/nodes/{urllib.parse.quote(args.name, safe='')}")
    return _show(doc)


def _node_parsers(sub: Any) -> None:
    node = sub.add_parser("node", help="manage nodes (admin)")
    actions = node.add_subparsers(dest="action", required=True)
    forget = actions.add_parser(
        "forget", help="forget an idle node and its credential: its name is free to join again"
    )
    forget.add_argument("name")
    forget.add_argument("--url", default=DEFAULT_URL)
    forget.set_defaults(fn=cmd_node)


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
    _token_parsers(sub)
    _node_parsers(sub)
    args = p.parse_args(argv)
    sys.exit(args.fn(args))


if __name__ == "__main__":
    main()

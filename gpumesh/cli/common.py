"""What every `gpumesh` command shares: --url/--json, the SDK client, output, exit codes.

Exit codes (README "CLI"): 0 ok / completed; 1 the task failed, was cancelled or did not
finish in time, or the coordinator refused the request (its reason on one line); 2 a usage
error or no coordinator to talk to (one line on stderr, never a traceback).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from datetime import UTC, datetime
from typing import Any

import msgspec
from rich.console import Console
from rich.markup import escape

from gpumesh.sdk import AsyncClient, Client, MeshError, MeshUnreachable

OK, FAILED, USAGE = 0, 1, 2

Handler = Callable[[argparse.Namespace], int]


class UsageError(Exception):
    """A bad argument the parser could not catch (unreadable @file, JSON that does not
    parse): exit 2 with this line."""


def console(stderr: bool = False) -> Console:
    """Rich output; wide enough off a terminal that tables are never cut in a pipe."""
    stream = sys.stderr if stderr else sys.stdout
    width = None if stream.isatty() else int(os.environ.get("COLUMNS", "200"))
    return Console(file=stream, width=width, highlight=False, soft_wrap=False)


def add_common(p: argparse.ArgumentParser, json_flag: bool = True) -> None:
    p.add_argument("--url", default=None,
                   help="coordinator URL (default: $MESH_URL, else http://127.0.0.1:8001)")
    if json_flag:
        p.add_argument("--json", action="store_true", help="print JSON for scripts")


def client(args: argparse.Namespace) -> Client:
    """The token: $MESH_API_TOKEN, else <MESH_DATA_DIR>/admin.token."""
    return Client(args.url)


def async_client(args: argparse.Namespace) -> AsyncClient:
    return AsyncClient(args.url)


def print_json(doc: Any) -> None:
    doc = msgspec.to_builtins(doc)  # Structs, and lists or dicts holding them
    sys.stdout.write(json.dumps(doc, indent=2) + "\n")


def fail(line: str, code: int = USAGE) -> int:
    sys.stderr.write(f"gpumesh: {line}\n")
    return code


def run(args: argparse.Namespace) -> int:
    """Run a command's handler; turn every expected failure into an exit code and a line."""
    func: Handler = args.func
    try:
        return func(args)
    except MeshUnreachable as exc:
        return fail(f"{exc} (is the coordinator running? --url / MESH_URL)")
    except MeshError as exc:
        if getattr(args, "json", False):
            print_json({"error": exc.error, "reason": exc.reason, "http_status": exc.status})
        return fail(f"{exc.error}: {exc.reason} (HTTP {exc.status})" if exc.reason
                    else f"{exc.error} (HTTP {exc.status})", FAILED)
    except UsageError as exc:
        return fail(str(exc))
    except KeyboardInterrupt:
        return fail("interrupted", 130)
    except BrokenPipeError:
        return OK  # `gpumesh tasks | head`: the reader has what it wanted


def since(iso_time: str | None, now: datetime | None = None) -> str:
    """ "12s ago" / "3m ago" / "2h ago" / "4d ago" for an ISO time; "-" for none."""
    if not iso_time:
        return "-"
    try:
        then = datetime.fromisoformat(iso_time)
    except ValueError:
        return iso_time
    secs = max(0.0, ((now or datetime.now(UTC)) - then).total_seconds())
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if secs >= size:
            return f"{int(secs // size)}{unit} ago"
    return f"{int(secs)}s ago"


STATUS_STYLE = {
    "completed": "green", "failed": "red", "cancelled": "yellow", "running": "cyan",
    "assigned": "cyan", "queued": "white", "lost": "magenta",
    "online": "green", "draining": "yellow", "drained": "yellow", "disconnected": "magenta",
}


def styled(status: str) -> str:
    style = STATUS_STYLE.get(status)
    return f"[{style}]{escape(status)}[/]" if style else escape(status)


def exit_for(status: str) -> int:
    """A finished task's exit code: 0 completed, 1 failed or cancelled (or unfinished)."""
    return OK if status == "completed" else FAILED

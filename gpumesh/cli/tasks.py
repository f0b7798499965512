"""`gpumesh submit | tasks | task | logs | cancel`: work on the mesh, like sbatch/squeue.

    gpumesh submit '{"task_type": "custom", "script": "nvidia-smi"}' --wait 600
    gpumesh tasks [--state running] [--node gpu-01] [--tenant acme] [--all] [--limit 50]
    gpumesh task ID
    gpumesh logs [-f] [--rank N] ID
    gpumesh cancel ID
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import sys
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.markup import escape
from rich.table import Table

from gpumesh.cli.common import (
    FAILED,
    OK,
    UsageError,
    add_common,
    async_client,
    client,
    console,
    exit_for,
    fail,
    print_json,
    since,
    styled,
)
from gpumesh.sdk import FINISHED, UNFINISHED, AsyncClient, MeshError, TaskInfo

MAX_PAGES = 50  # a filtered listing reads at most this many pages of finished tasks


def register(sub: Any) -> None:
    p = sub.add_parser("submit", help="submit a task (JSON text, @file, or - for stdin)")
    p.add_argument("task", help='e.g. \'{"task_type": "test"}\'; a JSON list submits a batch')
    p.add_argument("--wait", type=float, default=0, metavar="S",
                   help="wait up to S seconds for the end, showing progress and logs")
    p.add_argument("--no-logs", action="store_true", help="with --wait: do not print logs")
    add_common(p)
    p.set_defaults(func=cmd_submit)

    p = sub.add_parser("tasks", help="list tasks (unfinished by default)")
    p.add_argument("--state", choices=[*UNFINISHED, *FINISHED])
    p.add_argument("--node")
    p.add_argument("--tenant", help="an admin's filter; other tokens see their tenant only")
    p.add_argument("--all", action="store_true", help="finished tasks too, newest first")
    p.add_argument("--limit", type=int, default=50)
    add_common(p)
    p.set_defaults(func=cmd_tasks)

    p = sub.add_parser("task", help="one task in detail")
    p.add_argument("id")
    add_common(p)
    p.set_defaults(func=cmd_task)

    p = sub.add_parser("logs", help="a task's output")
    p.add_argument("id")
    p.add_argument("-f", "--follow", action="store_true", help="follow until the task ends")
    p.add_argument("--rank", type=int, default=None, metavar="N",
                   help="a gang task: the output of its rank N")
    add_common(p)  # --json: one {"task_id", "line"} object per line (JSON Lines)
    p.set_defaults(func=cmd_logs)

    p = sub.add_parser("cancel", help="cancel a task")
    p.add_argument("id")
    add_common(p)
    p.set_defaults(func=cmd_cancel)


# --- submit ----------------------------------------------------------------------------------


def read_task(text: str) -> Any:
    try:
        if text == "-":
            text = sys.stdin.read()
        elif text.startswith("@"):
            text = Path(text[1:]).read_text()
    except OSError as exc:
        raise UsageError(f"cannot read {text[1:]!r}: {exc.strerror}") from None
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise UsageError(f"the task is not valid JSON: {exc}") from None
    if not isinstance(doc, dict | list):
        raise UsageError("the task must be a JSON object (or a list of them)")
    return doc


def cmd_submit(args: argparse.Namespace) -> int:
    body = read_task(args.task)
    with client(args) as c:
        subs = c.submit_many(body) if isinstance(body, list) else [c.submit(body)]
    if not args.wait:
        if args.json:
            print_json(subs if isinstance(body, list) else subs[0])
        else:
            for s in subs:
                sys.stdout.write(f"{s.task_id}\n")
        return OK
    try:
        done = asyncio.run(_wait_all(args, [s.task_id for s in subs]))
    except KeyboardInterrupt:
        ids = " ".join(s.task_id for s in subs)
        return fail(f"stopped waiting; the task goes on (gpumesh cancel {ids})", 130)
    if args.json:
        print_json(done if isinstance(body, list) else done[0])
    return max(exit_for(t.status) for t in done)


async def _wait_all(args: argparse.Namespace, ids: list[str]) -> list[TaskInfo]:
    out = console()
    deadline = time.monotonic() + args.wait
    results = []
    async with async_client(args) as c:
        for task_id in ids:
            show_logs = not args.json and not args.no_logs and len(ids) == 1
            t = await _watch(c, task_id, deadline, out, show_logs, quiet=args.json)
            results.append(t)
            if not args.json:
                _report_end(out, t)
    return results


async def _watch(c: AsyncClient, task_id: str, deadline: float, out: Console,
                 show_logs: bool, quiet: bool) -> TaskInfo:
    """Long-poll the task (1 s at a time, for the progress line) until it ends or the
    deadline; print its log lines meanwhile."""
    logs = asyncio.create_task(_print_logs(c, task_id, out)) if show_logs else None
    live = out.status(f"task {task_id}: submitted") if out.is_terminal and not quiet else None
    try:
        with live if live is not None else contextlib.nullcontext():
            poll = 0.0  # the state at once, then one long-poll a second for the progress line
            while True:
                left = deadline - time.monotonic()
                t = await c.wait(task_id, timeout=max(0.0, min(poll, left)))
                poll = 1.0
                if live is not None:
                    live.update(escape(f"task {task_id}: {describe(t)}"))
                if t.finished or left <= 0:
                    break
        if logs is not None and t.finished:
            with contextlib.suppress(TimeoutError):  # the follow ends with the task's log
                await asyncio.wait_for(asyncio.shield(logs), 5)
    finally:
        if logs is not None:
            logs.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await logs
    return t


async def _print_logs(c: AsyncClient, task_id: str, out: Console) -> None:
    try:
        async for line in c.logs(task_id, follow=True):
            out.print(line, markup=False, highlight=False, soft_wrap=True)
    except MeshError as exc:  # e.g. 429: too many followers; the wait goes on without logs
        out.print(f"(no live logs: {exc})", markup=False, style="dim")


def describe(t: TaskInfo) -> str:
    if t.status == "queued":
        return f"queued ({t.reason})" if t.reason else "queued"
    if t.status in ("assigned", "running"):
        return f"{t.status} on {t.node} (attempt {t.attempt})"
    return t.status


def _report_end(out: Console, t: TaskInfo) -> None:
    if t.status == "completed":
        out.print(f"[green]completed[/] {t.task_id} on {escape(t.node or '-')}")
    elif t.finished:
        why = f": {t.error}" if t.error else ""
        out.print(f"[red]{t.status}[/] {t.task_id}{escape(why)}")
    else:
        out.print(f"[yellow]not finished[/] {t.task_id}: still {escape(describe(t))}")


# --- tasks, task -----------------------------------------------------------------------------


def cmd_tasks(args: argparse.Namespace) -> int:
    rows: list[TaskInfo] = []
    cursor: str | None = None
    with client(args) as c:
        for _ in range(MAX_PAGES):
            page = c.tasks(args.state, args.node, args.tenant, max(args.limit - len(rows), 1),
                           cursor)
            rows += page.tasks
            cursor = page.next
            if cursor is None or len(rows) >= args.limit:
                break
            if cursor.startswith("done:") and not args.all and args.state is None:
                break
    rows = rows[:args.limit]
    if args.json:
        print_json(rows)
        return OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("ID", "NAME", "STATUS", "PRI", "NODE", "TRY", "AGE", "NOTE"):
        table.add_column(col, no_wrap=col != "NOTE", overflow="fold")
    for t in rows:
        note = t.reason if t.status == "queued" else (t.error or "")
        table.add_row(t.task_id, escape(t.name or t.task_type), styled(t.status),
                      str(t.priority), escape(t.node or "-"), f"{t.attempt}/{t.max_attempts}",
                      since(t.submitted_at), escape(note))
    out = console()
    out.print(table)
    if not rows:
        out.print("(no tasks)", style="dim")
    return OK


def cmd_task(args: argparse.Namespace) -> int:
    with client(args) as c:
        t = c.get(args.id)
    if args.json:
        print_json(t)
        return OK
    grid = Table.grid(padding=(0, 2))
    grid.add_column(style="bold")
    grid.add_column(overflow="fold")
    fields: list[tuple[str, Any]] = [
        ("id", t.task_id), ("name", t.name or "-"), ("type", t.task_type),
        ("status", t.status), ("priority", t.priority), ("tenant", t.tenant or "-"),
        ("node", t.node or "-"), ("gpus", ",".join(map(str, t.gpu_indices)) or "-"),
        ("attempt", f"{t.attempt}/{t.max_attempts}"), ("executor", t.executor),
        ("submitted", f"{t.submitted_at} ({since(t.submitted_at)})"),
        ("started", t.started_at or "-"), ("finished", t.finished_at or "-"),
    ]
    if t.status == "queued":
        fields.append(("waiting", t.reason or "-"))
    if t.error:
        fields.append(("error", t.error))
    for key, value in fields:
        grid.add_row(key, styled(value) if key == "status" else escape(str(value)))
    out = console()
    out.print(grid)
    output = (t.result or {}).get("output")
    if output:
        out.print("[bold]output[/] (tail; `gpumesh logs` has it all)")
        out.print("\n".join(str(output).splitlines()[-20:]), markup=False, highlight=False)
    return OK


# --- logs, cancel ----------------------------------------------------------------------------


def cmd_logs(args: argparse.Namespace) -> int:
    with client(args) as c:
        for line in c.logs(args.id, follow=args.follow, rank=args.rank):
            if args.json:
                line = json.dumps({"task_id": args.id, "line": line})
            sys.stdout.write(line + "\n")
            if args.follow:
                sys.stdout.flush()
    return OK


def cmd_cancel(args: argparse.Namespace) -> int:
    with client(args) as c:
        t = c.cancel(args.id)
    if args.json:
        print_json(t)
    else:
        where = f" (it was on {t.node})" if t.node else ""
        console().print(f"[yellow]cancelled[/] {t.task_id}{escape(where)}")
    return OK if t.status == "cancelled" else FAILED

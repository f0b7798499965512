"""`gpumesh nodes | node drain|undrain|forget | status | top`: the mesh's machines.

    gpumesh nodes                         GPUs, VRAM, utilisation, temperature, status
    gpumesh node drain gpu-01 --reason "kernel upgrade"
    gpumesh node undrain gpu-01
    gpumesh node forget gpu-01
    gpumesh status                        the mesh in one screen
    gpumesh top [--interval 2] [--once]   the same, live
"""

from __future__ import annotations

import argparse
import contextlib
import time
from typing import Any

from rich.console import Group
from rich.live import Live
from rich.markup import escape
from rich.table import Table

from gpumesh.cli.common import OK, add_common, client, console, print_json, since, styled
from gpumesh.sdk import Client, MeshStatus, NodeInfo, TaskInfo

QUEUE_ROWS = 15
# The task list comes from /tasks/active, which holds every unfinished task; past this many
# `status` and `top` show the counts only, rather than fetch it all at every refresh.
LIST_MAX = 5000


def register(sub: Any) -> None:
    p = sub.add_parser("nodes", help="list nodes: GPUs, VRAM, utilisation, temperature, status")
    add_common(p)
    p.set_defaults(func=cmd_nodes)

    node = sub.add_parser("node", help="drain, undrain or forget a node (admin)")
    actions = node.add_subparsers(dest="action", required=True)
    drain = actions.add_parser("drain", help="finish the node's work, give it no more")
    drain.add_argument("name")
    drain.add_argument("--reason", default="", help="why (shown in `gpumesh nodes`)")
    undrain = actions.add_parser("undrain", help="let the node take work again")
    undrain.add_argument("name")
    forget = actions.add_parser(
        "forget", help="forget an idle node and its credential: its name is free to join again"
    )
    forget.add_argument("name")
    for p in actions.choices.values():
        add_common(p)
        p.set_defaults(func=cmd_node)

    p = sub.add_parser("status", help="the mesh at a glance: nodes, GPUs, queue")
    add_common(p)
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("top", help="a live view of nodes and queue (Ctrl-C quits)")
    p.add_argument("--interval", type=float, default=2.0, help="seconds between refreshes")
    p.add_argument("--once", action="store_true", help="draw once and exit")
    add_common(p)  # --json: one snapshot (status, nodes, unfinished tasks), then exit
    p.set_defaults(func=cmd_top)


# --- tables ----------------------------------------------------------------------------------


def _gib(mb: float) -> str:
    return f"{mb / 1024:.1f}"


def node_note(n: NodeInfo) -> str:
    if n.drain is not None:
        return f"drain: {n.drain.reason}"
    if n.quarantined:
        return f"quarantined: {n.quarantine_reason}"
    return n.health


def nodes_table(nodes: list[NodeInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("NAME", "STATUS", "GPUS", "VRAM GiB", "UTIL", "TEMP", "TASKS", "EXECUTORS",
                "NOTE"):
        table.add_column(col, no_wrap=col != "NOTE", overflow="fold",
                         justify="right" if col in ("UTIL", "TEMP", "TASKS") else "left")
    for n in sorted(nodes, key=lambda n: n.name):
        gpus = n.gpus
        used = sum(g.memory_used_mb for g in gpus)
        total = sum(g.memory_total_mb for g in gpus)
        util = sum(g.utilization_pct for g in gpus) / len(gpus) if gpus else None
        temps = [g.temperature_c for g in gpus if g.temperature_c is not None]
        table.add_row(
            escape(n.name), styled(n.status),
            escape(f"{n.gpu_count}x {n.gpu_type}") if n.gpu_count else "-",
            f"{_gib(used)}/{_gib(total)}" if total else "-",
            f"{util:.0f}%" if util is not None else "-",
            f"{max(temps):.0f}C" if temps else "-",
            str(n.active_tasks), escape(",".join(n.executors) or "-"), escape(node_note(n)),
        )
    return table


def queue_table(tasks: list[TaskInfo]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False, title_justify="left")
    for col in ("ID", "NAME", "STATUS", "PRI", "NODE", "AGE", "NOTE"):
        table.add_column(col, no_wrap=col != "NOTE", overflow="fold")
    for t in tasks:
        table.add_row(t.task_id, escape(t.name or t.task_type), styled(t.status),
                      str(t.priority), escape(t.node or "-"), since(t.submitted_at),
                      escape(t.reason if t.status == "queued" else ""))
    return table


def summary(s: MeshStatus) -> Table:
    grid = Table.grid(padding=(0, 3))
    for _ in range(4):
        grid.add_column()
    q = s.queue_by_priority
    grid.add_row(
        f"[bold]{escape(s.coordinator)}[/] up {s.uptime_s:.0f}s",
        f"nodes [bold]{s.online_nodes}[/]/{s.total_nodes} online",
        f"GPUs [bold]{s.free_gpus}[/]/{s.total_gpus} free",
        f"VRAM {s.used_vram:.1f}/{s.total_vram:.1f} GiB used",
    )
    grid.add_row(
        f"tasks: [bold]{s.queued_tasks}[/] queued, [bold]{s.active_tasks}[/] active",
        f"[green]{s.completed_tasks}[/] completed",
        f"[red]{s.failed_tasks}[/] failed, [yellow]{s.cancelled_tasks}[/] cancelled",
        "queue: " + ", ".join(f"{k} {v}" for k, v in q.items() if v) if any(q.values())
        else "queue: empty",
    )
    return grid


def screen(c: Client) -> Group:
    """Everything `status` and `top` draw: summary, nodes, the head of the queue."""
    status, nodes = c.status(), c.nodes()
    parts: list[Any] = [summary(status), "", nodes_table(nodes)]
    if not nodes:
        parts.append("[dim](no nodes have joined)[/]")
    parts += ["", f"[bold]unfinished tasks[/] (highest priority first, {QUEUE_ROWS} at most)"]
    unfinished = status.queued_tasks + status.active_tasks
    if unfinished > LIST_MAX:
        parts.append(f"[dim]({unfinished} unfinished: too many to list at every refresh; "
                     "`gpumesh tasks --state queued --limit N` lists them)[/]")
        return Group(*parts)
    page = c.tasks(limit=QUEUE_ROWS)
    parts.append(queue_table(page.tasks) if page.tasks else "[dim](none)[/]")
    return Group(*parts)


# --- commands --------------------------------------------------------------------------------


def cmd_nodes(args: argparse.Namespace) -> int:
    with client(args) as c:
        nodes = c.nodes()
    if args.json:
        print_json(nodes)
        return OK
    out = console()
    out.print(nodes_table(nodes))
    if not nodes:
        out.print("(no nodes have joined)", style="dim")
    return OK


def cmd_node(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.action == "forget":
            doc: Any = c.forget(args.name)
            line = f"forgot node {args.name}: its name is free to join again"
        elif args.action == "drain":
            doc = c.drain(args.name, args.reason)
            line = (f"drained node {args.name} ({doc.status}, {doc.active_tasks} task(s) "
                    "still running): it gets no new work")
        else:
            doc = c.undrain(args.name)
            line = f"undrained node {args.name}: it takes new work again"
    if args.json:
        print_json(doc)
    else:
        console().print(escape(line))
    return OK


def cmd_status(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.json:
            print_json(c.request("GET", "/mesh/status"))
            return OK
        view = screen(c)
    console().print(view)
    return OK


def cmd_top(args: argparse.Namespace) -> int:
    out = console()
    with client(args) as c:
        if args.json:
            print_json({"status": c.request("GET", "/mesh/status"), "nodes": c.nodes(),
                        "tasks": c.tasks(limit=QUEUE_ROWS).tasks})
            return OK
        if args.once or not out.is_terminal:
            out.print(screen(c))
            return OK
        with Live(screen(c), console=out, screen=False, auto_refresh=False) as live:
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(max(args.interval, 0.2))
                    live.update(screen(c), refresh=True)
    return OK

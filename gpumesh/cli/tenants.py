"""`gpumesh tenants` and `gpumesh tenant set|show NAME`: weights, quotas, usage (admin).

    gpumesh tenants                                 usage, share, weight, quota, queue
    gpumesh tenant show lab
    gpumesh tenant set lab --weight 3 --max-gpus 8 --max-running 20 --max-queued 5000 \\
        --rate 50 --burst 200 --max-nonpreemptible 2

`set` sends the whole config: an option left out is unlimited (weight 1), not unchanged,
so what the command line says is what the tenant gets.
"""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from rich.markup import escape
from rich.table import Table

from gpumesh.cli.common import OK, add_common, client, console, print_json

QUOTAS = ("max_gpus", "max_running", "max_queued", "rate", "burst", "max_nonpreemptible")


def register(sub: Any) -> None:
    listing = sub.add_parser("tenants", help="every tenant: usage, share, weight, quota (admin)")
    add_common(listing)
    listing.set_defaults(func=cmd_tenants)
    tenant = sub.add_parser("tenant", help="show or set a tenant's weight and quotas (admin)")
    actions = tenant.add_subparsers(dest="action", required=True)
    show = actions.add_parser("show", help="one tenant")
    show.add_argument("name")
    put = actions.add_parser("set", help="a tenant's weight and quotas (left out: unlimited)")
    put.add_argument("name")
    put.add_argument("--weight", type=float, default=None, help="fair-share weight (1)")
    put.add_argument("--max-gpus", type=int, default=None, help="GPUs held at once")
    put.add_argument("--max-running", type=int, default=None, help="tasks placed at once")
    put.add_argument("--max-queued", type=int, default=None, help="tasks waiting (else 429)")
    put.add_argument("--rate", type=float, default=None, help="submissions per second")
    put.add_argument("--burst", type=int, default=None, help="submissions at once (rate)")
    put.add_argument("--max-nonpreemptible", type=int, default=None,
                     help="GPUs held by `preemptible: false` tasks")
    for p in (show, put):
        add_common(p)
        p.set_defaults(func=cmd_tenant)


def cmd_tenant(args: argparse.Namespace) -> int:
    path = f"/admin/tenants/{urllib.parse.quote(args.name, safe='')}"
    with client(args) as c:
        if args.action == "set":
            body = {k: v for k in ("weight", *QUOTAS) if (v := getattr(args, k)) is not None}
            doc = c.request("PUT", path, body)
        else:
            doc = c.request("GET", path)
    if args.json:
        print_json(doc)
        return OK
    _table([doc])
    return OK


def cmd_tenants(args: argparse.Namespace) -> int:
    with client(args) as c:
        doc = c.request("GET", "/admin/tenants")
    if args.json:
        print_json(doc)
        return OK
    rows: list[dict[str, Any]] = doc.get("tenants", [])
    if not rows:
        console().print("no tenants yet (none configured, none has submitted)")
        return OK
    _table(rows)
    return OK


def _quota(row: dict[str, Any]) -> str:
    quota = row.get("quota") or {}
    parts = [f"{k.removeprefix('max_')}={quota[k]:g}" for k in QUOTAS if quota.get(k) is not None]
    return " ".join(parts) or "unlimited"


def _table(rows: list[dict[str, Any]]) -> None:
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("TENANT", "WEIGHT", "SHARE", "TARGET", "USAGE GPU-S", "GPUS", "RUNNING",
                "QUEUED", "QUOTA"):
        table.add_column(col, no_wrap=True)
    for r in rows:
        table.add_row(
            escape(str(r.get("name", "?"))) + ("" if r.get("configured") else " (defaults)"),
            f"{r.get('weight', 1):g}",
            f"{100 * r.get('share', 0):.1f}%",
            f"{100 * r.get('target_share', 0):.1f}%",
            f"{r.get('usage_gpu_s', 0):.1f}",
            str(r.get("gpus", 0)),
            str(r.get("running", 0)),
            str(r.get("queued", 0)),
            escape(_quota(r)),
        )
    console().print(table)

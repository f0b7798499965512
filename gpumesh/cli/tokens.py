"""`gpumesh token create | list | revoke`: API tokens (admin).

    gpumesh token create --tenant acme --role submit [--name ci]   the secret is shown once
    gpumesh token list
    gpumesh token revoke ID
"""

from __future__ import annotations

import argparse
import urllib.parse
from typing import Any

from rich.markup import escape
from rich.table import Table

from gpumesh.cli.common import OK, add_common, client, console, print_json


def register(sub: Any) -> None:
    token = sub.add_parser("token", help="manage API tokens (admin)")
    actions = token.add_subparsers(dest="action", required=True)
    create = actions.add_parser("create", help="a new token; its secret is printed once")
    create.add_argument("--tenant", required=True)
    create.add_argument("--role", choices=["admin", "submit", "metrics", "read"], default="submit")
    create.add_argument("--name", default="")
    actions.add_parser("list", help="every token (no secrets)")
    revoke = actions.add_parser("revoke", help="revoke a token by its id")
    revoke.add_argument("id")
    for p in actions.choices.values():
        add_common(p)
        p.set_defaults(func=cmd_token)


def cmd_token(args: argparse.Namespace) -> int:
    with client(args) as c:
        if args.action == "create":
            body = {"tenant": args.tenant, "role": args.role, "name": args.name}
            doc = c.request("POST", "/admin/tokens", body)
        elif args.action == "list":
            doc = c.request("GET", "/admin/tokens")
        else:
            doc = c.request("DELETE", f"/admin/tokens/{urllib.parse.quote(args.id, safe='')}")
    if args.json or args.action == "create":
        print_json(doc)  # create: the secret, once, in a form a script can read
        return OK
    if args.action == "revoke":
        console().print(f"revoked token {escape(str(doc.get('id', args.id)))}")
        return OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    rows: list[dict[str, Any]] = doc.get("tokens", [])
    keys = [k for k in ("id", "tenant", "role", "name", "created_at", "revoked_at")
            if any(k in r for r in rows)] or ["id", "tenant", "role", "name"]
    for k in keys:
        table.add_column(k.upper(), no_wrap=True)
    for r in rows:
        table.add_row(*(escape(str(r.get(k) if r.get(k) is not None else "-")) for k in keys))
    console().print(table)
    return OK

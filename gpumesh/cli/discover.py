"""`gpumesh discover`: the coordinators this machine sees advertised on the local network.

Browses multicast DNS for `_gpumesh._tcp` for `--timeout` seconds, as a client without
`MESH_COORDINATOR_URL` would (gpu_client/discover.py), and lists each one's instance name,
URL, mesh name and protocol version. Being listed is not being trusted: a node joins only a
coordinator that proves it knows the join token. Exit 0 when at least one was found, 1 when
none, 2 when the network could not be browsed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any

from gpu_client.discover import Found, browse


def register(sub: Any) -> None:
    p = sub.add_parser("discover", help="list the coordinators advertised on the local network")
    p.add_argument("--timeout", type=float, default=3.0,
                   help="seconds to listen for answers (default 3)")
    p.add_argument("--json", action="store_true", help="print JSON for scripts")
    p.set_defaults(func=cmd_discover)


def table(found: list[Found]) -> str:
    rows = [("NAME", "URL", "MESH", "PROTO")] + [
        (f.name, f.url, f.mesh, "?" if f.proto is None else str(f.proto)) for f in found
    ]
    widths = [max(len(r[i]) for r in rows) for i in range(3)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(r[:3], widths, strict=True)) + "  " + r[3]
        for r in rows
    )


def cmd_discover(args: argparse.Namespace) -> int:
    if not args.timeout > 0:
        sys.stderr.write("gpumesh: --timeout must be a positive number of seconds\n")
        return 2
    try:
        found = asyncio.run(browse(args.timeout))
    except OSError as exc:
        sys.stderr.write(f"gpumesh: cannot browse the local network: {exc}\n")
        return 2
    if args.json:
        sys.stdout.write(json.dumps([f.as_dict() for f in found], indent=2) + "\n")
    elif found:
        sys.stdout.write(table(found) + "\n")
    else:
        sys.stderr.write(f"gpumesh: no coordinator advertised within {args.timeout:g}s "
                         "(a coordinator bound to 127.0.0.1 or with MESH_ADVERTISE=off is not)\n")
    return 0 if found else 1

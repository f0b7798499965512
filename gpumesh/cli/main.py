"""`gpumesh`: run a whole mesh on this machine, submit work, look at it, operate it.

    gpumesh up                    coordinator on :8001 plus one local compute client
    gpumesh submit '{"task_type": "test"}' [--wait 60]
    gpumesh tasks | task ID | logs [-f] ID | cancel ID          (gpumesh/cli/tasks.py)
    gpumesh nodes | node drain|undrain|forget NAME | status | top (gpumesh/cli/nodes.py)
    gpumesh detect                (gpumesh/cli/detect.py)
    gpumesh token create|list|revoke                           (gpumesh/cli/tokens.py)
    gpumesh simulate TRACE --cluster 8x8:V100 [--compare] [--report OUT.html]  (simulate.py)
    gpumesh serve NAME ... | services | service NAME | service rm NAME (gpumesh/cli/services.py)

Every command but `up` and `detect` talks to the coordinator through the SDK (gpumesh/sdk.py):
--url or MESH_URL says where; the token is MESH_API_TOKEN, else the admin
token the coordinator wrote to <MESH_DATA_DIR or ./mesh-data>/admin.token. `--json` on every
command. Exit codes: 0 ok/completed, 1 failed/cancelled/refused, 2 usage or connection error
(gpumesh/cli/common.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path
from typing import Any

from gpumesh.cli import (
    common as cli_common,
)
from gpumesh.cli import (
    detect as cli_detect,
)
from gpumesh.cli import (
    discover as cli_discover,
)
from gpumesh.cli import (
    nodes as cli_nodes,
)
from gpumesh.cli import (
    services as cli_services,
)
from gpumesh.cli import (
    simulate as cli_simulate,
)
from gpumesh.cli import (
    tasks as cli_tasks,
)
from gpumesh.cli import (
    tenants as cli_tenants,
)
from gpumesh.cli import (
    tokens as cli_tokens,
)
from gpumesh.cli.up import cmd_up
from gpumesh.sdk import token_file as token_file


def _up_parser(sub: Any) -> None:
    up = sub.add_parser("up", help="run a coordinator and a local compute client")
    up.add_argument("--host", default=os.environ.get("MESH_HOST", "0.0.0.0"))
    up.add_argument("--port", type=int, default=int(os.environ.get("MESH_PORT", "8001")))
    up.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MESH_DATA_DIR", "./mesh-data")))
    up.set_defaults(func=cmd_up)


def build_parser() -> argparse.ArgumentParser:
    """Every command. A module adding commands exposes `register(sub)` (it adds its
    subparsers and sets `func`) and gets one line here."""
    p = argparse.ArgumentParser(prog="gpumesh", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    # Also before the command, as `nomad -address` is: `gpumesh --url URL tasks --json`.
    p.add_argument("--url", dest="global_url", default=None, help="coordinator URL")
    p.add_argument("--json", dest="global_json", action="store_true", help="print JSON")
    sub = p.add_subparsers(dest="cmd", required=True)
    _up_parser(sub)
    cli_tasks.register(sub)
    cli_nodes.register(sub)
    cli_detect.register(sub)
    cli_tokens.register(sub)
    cli_discover.register(sub)
    cli_tenants.register(sub)
    cli_simulate.register(sub)
    cli_services.register(sub)
    return p


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    if args.global_url and getattr(args, "url", "absent") is None:
        args.url = args.global_url
    if args.global_json and hasattr(args, "json"):
        args.json = True
    sys.exit(cli_common.run(args))


if __name__ == "__main__":
    main()

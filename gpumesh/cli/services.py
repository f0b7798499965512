"""`gpumesh serve`, `gpumesh services`, `gpumesh service NAME`, `gpumesh service rm NAME`.

    gpumesh serve chat --model tiny --engine llama_cpp --param gguf=/models/tiny.gguf \\
        --min 1 --max 4 --gpus 1
    gpumesh serve chat --model tiny --command python3 -m my_server --port {port}
    gpumesh serve --file service.json          (the POST /services body; flags override it)
    gpumesh services                           every service of this tenant
    gpumesh service chat                       one service: replicas and history
    gpumesh service rm chat                    delete it; its replicas stop

`--command` takes the rest of the line as the argv; `{port}` is the port the node picks.
A service that exists already is replaced with `--replace` (PUT), else refused (409).
"""

from __future__ import annotations

import argparse
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from gpumesh.cli.common import OK, UsageError, add_common, client, console, print_json, styled
from gpumesh.sdk_types import ServiceInfo

STATE_STYLE = {"ready": "green", "starting": "cyan", "unhealthy": "red", "stopping": "yellow"}


def register(sub: Any) -> None:
    serve = sub.add_parser("serve", help="create a model service (OpenAI-compatible on /v1)")
    serve.add_argument("name", nargs="?", help="the service's name (or `name` in --file)")
    serve.add_argument("--file", type=Path, help="a JSON file holding the POST /services body")
    serve.add_argument("--model", help="the model name OpenAI clients ask for")
    serve.add_argument("--engine", help="an engine template: llama_cpp, vllm")
    serve.add_argument("--image", help="a container image to run (docker executor)")
    serve.add_argument("--script", help="a shell script to run (with {port})")
    serve.add_argument("--param", action="append", default=[], metavar="KEY=VALUE",
                       help="an engine parameter (repeatable), e.g. gguf=/models/x.gguf")
    serve.add_argument("--env", action="append", default=[], metavar="KEY=VALUE",
                       help="an environment variable of the replicas (repeatable)")
    serve.add_argument("--min", type=int, help="replicas kept at least (default 1)")
    serve.add_argument("--max", type=int, help="replicas at most (default 1)")
    serve.add_argument("--gpus", type=int, help="GPUs per replica")
    serve.add_argument("--gpu-type", help="a GPU name substring per replica (A100, 4090)")
    serve.add_argument("--executor", choices=["process", "docker"])
    serve.add_argument("--idle", type=float, dest="idle_s", help="seconds idle before "
                       "scaling down to --min")
    serve.add_argument("--target-ongoing", type=int, help="requests per replica before "
                       "scaling up")
    serve.add_argument("--routing", choices=["least", "prefix"])
    serve.add_argument("--health-path", help="what the node polls (default /v1/models)")
    serve.add_argument("--replace", action="store_true", help="replace it if it exists")
    serve.add_argument("--command", nargs=argparse.REMAINDER, dest="argv",
                       help="the replica's argv (the rest of the line), with {port}")
    add_common(serve)
    serve.set_defaults(func=cmd_serve)

    listing = sub.add_parser("services", help="the model services of this tenant")
    add_common(listing)
    listing.set_defaults(func=cmd_services)

    one = sub.add_parser("service", help="one service (`service NAME`), or `service rm NAME`")
    one.add_argument("words", nargs="+", metavar="NAME | rm NAME")
    one.add_argument("--history", type=int, default=20, help="events to show (default 20)")
    add_common(one)
    one.set_defaults(func=cmd_service)


def _pairs(items: list[str], flag: str) -> dict[str, str]:
    out = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise UsageError(f"{flag} takes KEY=VALUE, got {item!r}")
        out[key] = value
    return out


def spec_of(args: argparse.Namespace) -> dict[str, Any]:
    """The POST /services body: --file, then the flags over it."""
    doc: dict[str, Any] = {}
    if args.file is not None:
        try:
            doc = json.loads(args.file.read_text(encoding="utf-8"))
        except (OSError, ValueError) as exc:
            raise UsageError(f"--file {args.file}: {exc}") from None
        if not isinstance(doc, dict):
            raise UsageError(f"--file {args.file}: expected a JSON object")
    for key in ("name", "model", "engine", "image", "script", "executor", "idle_s",
                "target_ongoing", "routing", "health_path"):
        if (value := getattr(args, key)) is not None:
            doc[key] = value
    if args.argv:
        doc["command"] = list(args.argv)
    if args.param:
        doc["params"] = {**doc.get("params", {}), **_pairs(args.param, "--param")}
    if args.env:
        doc["env"] = {**doc.get("env", {}), **_pairs(args.env, "--env")}
    replicas = dict(doc.get("replicas", {}))
    for key in ("min", "max"):
        if (value := getattr(args, key)) is not None:
            replicas[key] = value
    if "min" in replicas and "max" not in replicas:
        replicas["max"] = max(replicas["min"], 1)
    if replicas:
        doc["replicas"] = replicas
    req = dict(doc.get("requirements", {}))
    if args.gpus is not None:
        req["gpu_count"] = args.gpus
    if args.gpu_type:
        req["gpu_type"] = args.gpu_type
    if req:
        doc["requirements"] = req
    if not doc.get("name"):
        raise UsageError("give the service's name (gpumesh serve NAME, or `name` in --file)")
    if not doc.get("model"):
        doc["model"] = doc["name"]
    return doc


def cmd_serve(args: argparse.Namespace) -> int:
    doc = spec_of(args)
    with client(args) as c:
        if args.replace and doc["name"] in {s.name for s in c.services()}:
            svc = c.update_service(doc["name"], doc)
        else:
            svc = c.serve(doc)
    if args.json:
        print_json(svc)
        return OK
    console().print(f"service [bold]{escape(svc.name)}[/] serves model "
                    f"[bold]{escape(svc.model)}[/] on /v1 "
                    f"({svc.scale.get('min', 0)}..{svc.scale.get('max', 0)} replicas)")
    return OK


def cmd_services(args: argparse.Namespace) -> int:
    with client(args) as c:
        rows = c.services()
    if args.json:
        print_json(rows)
        return OK
    if not rows:
        console().print("no services (gpumesh serve NAME --model M --engine llama_cpp ...)")
        return OK
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("SERVICE", "MODEL", "TENANT", "READY", "DESIRED", "MIN..MAX", "NODES",
                "REQUESTS", "MEAN"):
        table.add_column(col, no_wrap=True)
    for s in rows:
        table.add_row(*_row(s))
    console().print(table)
    return OK


def _row(s: ServiceInfo) -> list[str]:
    nodes = sorted({r.node for r in s.replicas if r.node})
    mean = s.requests.get("mean_s")
    return [
        escape(s.name), escape(s.model), escape(s.tenant or "-"),
        f"{s.ready}/{len(s.replicas)}", str(s.scale.get("desired", 0)),
        f"{s.scale.get('min', 0)}..{s.scale.get('max', 0)}",
        escape(",".join(nodes) or "-"), f"{s.requests.get('total') or 0:g}",
        f"{mean * 1000:.0f}ms" if mean is not None else "-",
    ]


def cmd_service(args: argparse.Namespace) -> int:
    words = args.words
    if words[0] == "rm":
        if len(words) != 2:
            raise UsageError("usage: gpumesh service rm NAME")
        with client(args) as c:
            doc = c.delete_service(words[1])
        if args.json:
            print_json(doc)
        else:
            console().print(f"service {escape(words[1])} deleted; "
                            f"{doc.get('replicas_stopping', 0)} replicas stopping")
        return OK
    if len(words) != 1:
        raise UsageError("usage: gpumesh service NAME | gpumesh service rm NAME")
    with client(args) as c:
        svc = c.service(words[0], history=args.history)
    if args.json:
        print_json(svc)
        return OK
    out = console()
    out.print(f"[bold]{escape(svc.name)}[/]  model {escape(svc.model)}  tenant "
              f"{escape(svc.tenant or '-')}  engine {escape(svc.engine or 'custom')}  "
              f"replicas {svc.scale.get('min', 0)}..{svc.scale.get('max', 0)} "
              f"(desired {svc.scale.get('desired', 0)}, ready {svc.ready})")
    table = Table(box=None, header_style="bold", pad_edge=False)
    for col in ("REPLICA", "NODE", "ATTEMPT", "STATE", "IN FLIGHT", "NOTE"):
        table.add_column(col, no_wrap=True)
    for r in svc.replicas:
        style = STATE_STYLE.get(r.state)
        state = f"[{style}]{escape(r.state)}[/]" if style else styled(r.state)
        note = "retiring" if r.retiring else r.reason
        table.add_row(r.task_id, escape(r.node or "-"), str(r.attempt), state,
                      str(r.outstanding), escape(note))
    out.print(table)
    for e in svc.history:
        at = datetime.fromtimestamp(e.get("at", 0), UTC).strftime("%H:%M:%S")
        detail = " ".join(f"{k}={v}" for k, v in (e.get("detail") or {}).items()
                          if k != "spec")
        out.print(f"  {at}  {escape(str(e.get('kind', '')))}  {escape(detail)}")
    return OK

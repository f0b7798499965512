"""`gpumesh simulate`: replay a GPU cluster trace through the real scheduler, on a virtual clock.

    gpumesh simulate philly.csv.gz --cluster 8x8:V100,4x4:T4 --policy fifo
    gpumesh simulate trace.csv --cluster 16x8 --compare --estimate x2 --report out.html
    gpumesh simulate trace.csv --from-mesh http://127.0.0.1:8001 --compare fifo,priority --json

The trace is a Philly, Helios (`cluster_log.csv`) or plain CSV file, told apart by its header
(coordinator/sim/traces.py). The cluster is `NODESxGPUS[:TYPE],...`, or the GPU nodes a live
mesh has connected now (`--from-mesh URL`, asked through the SDK with `--token` or the usual
MESH_API_TOKEN / admin.token). `--compare` runs several policies (all of them when no list
is given) on the same trace. `--json` prints one summary object per policy, one per line.
`--csv` writes every job's submit, start, end, queueing delay and node; `--report` writes a
self-contained HTML page with the plots. Exit 2 for a bad trace, cluster or policy.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path
from typing import Any

from rich.markup import escape
from rich.table import Table

from gpumesh.cli.common import OK, UsageError, console
from gpumesh.sdk import Client, NodeInfo

# Nodes --from-mesh counts: those connected now (a drained node is still part of the fleet).
CONNECTED = ("online", "draining", "drained")


def register(sub: Any) -> None:
    p = sub.add_parser("simulate", help="replay a job trace through the scheduler (what-if)",
                       description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("trace", type=Path, help="trace file: Philly, Helios or plain CSV (.gz too)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--cluster", help="NODESxGPUS[:TYPE],... e.g. 8x8:V100,4x4:T4")
    where.add_argument("--from-mesh", metavar="URL", help="take the cluster from a live mesh")
    p.add_argument("--token", default=None, help="API token for --from-mesh")
    p.add_argument("--policy", default=None, help="the policy to run (default: the live one's)")
    p.add_argument("--compare", nargs="?", const="", default=None, metavar="P1,P2,...",
                   help="run several policies side by side (no list: every policy)")
    p.add_argument("--estimate", default="exact",
                   help="users' timeout_s model: exact, x2, lognormal:SIGMA, cap:SECONDS")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--skip-bad", action="store_true",
                   help="leave bad trace rows out (counted) instead of refusing the file")
    p.add_argument("--limit", type=int, default=None, metavar="N",
                   help="only the first N jobs in submit order")
    p.add_argument("--json", action="store_true", help="one JSON summary per policy, per line")
    p.add_argument("--csv", type=Path, default=None, metavar="OUT", help="per-job CSV")
    p.add_argument("--report", type=Path, default=None, metavar="OUT.html", help="HTML report")
    p.set_defaults(func=cmd_simulate)


def cluster_from_nodes(nodes: list[NodeInfo]) -> str:
    """The connected GPU nodes as a cluster spec, grouped by (GPUs, type) in sorted order."""
    groups = Counter((n.gpu_count, _type(n.gpu_type)) for n in nodes
                     if n.status in CONNECTED and n.gpu_count > 0)
    return ",".join(f"{count}x{gpus}" + (f":{kind}" if kind else "")
                    for (gpus, kind), count in sorted(groups.items()))


def _type(name: str) -> str:
    """A GPU model as a cluster spec can write it ("NVIDIA H100 80GB" -> "NVIDIA_H100_80GB")."""
    kept = "".join(c if c.isalnum() or c in "_.-" else "_" for c in name.strip())
    return kept[:64]


def _policies(args: argparse.Namespace, known: tuple[str, ...], default: str) -> list[str]:
    if args.compare is not None:
        names = [p.strip() for p in args.compare.split(",") if p.strip()] or list(known)
    else:
        names = [args.policy or default]
    unknown = [p for p in names if p not in known]
    if unknown:
        raise UsageError(f"unknown policy {', '.join(unknown)} (known: {', '.join(known)})")
    return list(dict.fromkeys(names))


def _seconds(x: float) -> str:
    return f"{x:,.0f}"


def _table(summaries: list[dict[str, Any]]) -> Table:
    table = Table(box=None, header_style="bold", pad_edge=False)
    cols = ("POLICY", "JOBS", "MEAN JCT s", "P50 JCT s", "P99 JCT s", "MEAN QUEUE s",
            "P99 QUEUE s", "MAKESPAN s", "UTIL", "JAIN", "SIM s", "RSS MB")
    for col in cols:
        table.add_column(col, no_wrap=True, justify="left" if col == "POLICY" else "right")
    for s in summaries:
        table.add_row(escape(s["policy"]), f"{s['jobs']:,}", _seconds(s["mean_jct_s"]),
                      _seconds(s["p50_jct_s"]), _seconds(s["p99_jct_s"]),
                      _seconds(s["mean_queue_s"]), _seconds(s["p99_queue_s"]),
                      _seconds(s["makespan_s"]), f"{100 * s['utilization']:.1f}%",
                      f"{s['jain']:.3f}", f"{s['wall_s']:.1f}", f"{s['peak_rss_mb']:.0f}")
    return table


def cmd_simulate(args: argparse.Namespace) -> int:
    # The engine pulls in the scheduler; only this command pays for importing it.
    from coordinator.sim import engine, report, report_html, traces

    policies = _policies(args, engine.POLICIES, report.DEFAULT_POLICY)
    if args.limit is not None and args.limit < 1:
        raise UsageError("--limit must be 1 or more")
    spec = args.cluster
    if args.from_mesh:
        with Client(args.from_mesh, args.token) as c:
            spec = cluster_from_nodes(c.nodes())
        if not spec:
            raise UsageError(f"the mesh at {args.from_mesh} has no connected node with GPUs")
    try:
        cluster = traces.parse_cluster(spec)
        trace = traces.read_trace(args.trace, skip_bad=args.skip_bad, limit=args.limit)
    except ValueError as exc:  # TraceError, ClusterError
        raise UsageError(str(exc)) from None
    results, summaries = [], []
    for policy in policies:
        try:
            result = engine.simulate(trace.jobs, cluster, policy, estimate=args.estimate,
                                     seed=args.seed)
        except (ValueError, RuntimeError) as exc:  # a bad --estimate; jobs that never start
            raise UsageError(f"simulate: {exc}") from None
        results.append(result)
        summaries.append(report.summarize(result))
        if args.json:  # each policy's line as soon as it is known: a full trace takes a while
            sys.stdout.write(json.dumps(summaries[-1]) + "\n")
            sys.stdout.flush()
    total = sum(g.count * g.gpus_per_node for g in cluster)
    meta = {
        "trace": f"{args.trace.name} ({trace.format}, {len(trace.jobs):,} jobs"
                 + (f", {trace.skipped:,} bad rows skipped" if trace.skipped else "")
                 + (f", {trace.cpu_only:,} CPU-only jobs left out" if trace.cpu_only else "")
                 + ")",
        "cluster": f"{traces.format_cluster(cluster)} ({total:,} GPUs)"
                   + (f" from {args.from_mesh}" if args.from_mesh else ""),
        "estimate": args.estimate,
        "seed": str(args.seed),
    }
    try:
        if args.csv is not None:
            report.write_jobs_csv(results, args.csv)
        if args.report is not None:
            args.report.write_text(report_html.render_html(results, summaries, meta),
                                   encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"cannot write {exc.filename}: {exc.strerror or exc}") from None
    if args.json:
        return OK
    out = console()
    for key, value in meta.items():
        out.print(f"[bold]{key}[/]: {escape(value)}")
    out.print(_table(summaries))
    for path in (args.csv, args.report):
        if path is not None:
            out.print(f"wrote {escape(str(path))}")
    return OK

"""`python -m benchmarks [name ...] [--json] [--quick]`: run benchmarks, print a table.

With `--json`, stdout is JSON only (the tables go to stderr): for one benchmark, its list
of rows; for several, an object with `machine` and one list of rows per benchmark.
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import platform
import sys
import time
from typing import Any

from benchmarks.stats import Result
from benchmarks.stores import STORE_AWARE, databases

NAMES = ("placement", "roundtrip", "throughput", "scale", "backlog", "blocked", "serving")


def machine() -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        import psutil

        mem_gb = round(psutil.virtual_memory().total / 2**30, 1)
    except ImportError:
        mem_gb = None
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gb": mem_gb,
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "date": time.strftime("%Y-%m-%d"),
    }


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if math.isinf(value) or math.isnan(value):
            return str(value)
        return f"{value:,.2f}" if abs(value) < 1000 else f"{value:,.0f}"
    if isinstance(value, int) and not isinstance(value, bool):
        return f"{value:,}"
    return str(value)


def table(result: Result) -> str:
    cells = [[_cell(row.get(c)) for c in result.columns] for row in result.rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(result.columns)]
    lines = [f"== {result.name} =="]
    lines.append("  ".join(c.rjust(w) for c, w in zip(result.columns, widths, strict=True)))
    lines.append("  ".join("-" * w for w in widths))
    for r in cells:
        lines.append("  ".join(c.rjust(w) for c, w in zip(r, widths, strict=True)))
    lines += [f"  {note}" for note in result.notes]
    lines += [f"  goal {g}" for g in result.goals]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    p.add_argument("names", nargs="*", metavar="name", help=f"any of {', '.join(NAMES)}; none: all")
    p.add_argument("--json", action="store_true", help="JSON on stdout, tables on stderr")
    p.add_argument("--quick", action="store_true", help="smaller sizes, about 3 minutes for all")
    p.add_argument(
        "--store", metavar="URL",
        help="also run roundtrip and throughput on this PostgreSQL store (a postgresql:// "
        "URL, or `pg`: a private server started for the run), beside SQLite",
    )
    args = p.parse_args(argv)
    unknown = [n for n in args.names if n not in NAMES]
    if unknown:
        p.error(f"unknown benchmark {', '.join(unknown)}; choose from {', '.join(NAMES)}")
    names = args.names or list(NAMES)
    out = sys.stderr if args.json else sys.stdout
    info = machine()
    print(
        f"# {info['cpu']}, {info['cores']} cores, {info['memory_gb']} GB, {info['os']}, "
        f"Python {info['python']}{', --quick' if args.quick else ''}",
        file=out,
        flush=True,
    )
    results: dict[str, Result] = {}
    runs = [(n, "sqlite") for n in names]
    if args.store:
        runs += [(n, args.store) for n in names if n in STORE_AWARE]
    with databases(args.store or "sqlite") as database:
        for name, store in runs:
            began = time.monotonic()
            module = importlib.import_module(f"benchmarks.{name}")
            if store == "sqlite":
                result: Result = module.run(quick=args.quick)
            else:
                result = module.run(quick=args.quick, store=database())
                result.name += " (postgresql)"
            result.notes.append(f"({time.monotonic() - began:.0f} s)")
            results[name if store == "sqlite" else f"{name}_postgresql"] = result
            print(table(result), file=out, flush=True)
    if args.json:
        if len(results) == 1:
            doc: Any = next(iter(results.values())).rows
        else:
            doc = {"machine": info, "quick": args.quick, "store": args.store}
            doc.update({n: r.rows for n, r in results.items()})
        json.dump(doc, sys.stdout, indent=1, default=str)
        print()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

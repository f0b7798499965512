"""Placement decision latency at 10 to 10,000 nodes x 8 GPUs, busy GPUs and mixed requirements.

Only the decision is timed: `place(req, executor, nodes, priority)` from
coordinator/scheduling/placement.py, with `time.perf_counter_ns` around each call. When that module
has a `PlacementIndex`, it is built from the nodes (`index.update(node)` per node) and
`place` gets the index instead of the list. The nodes are the coordinator's own `Node`
records, filled as a registered node's would be; nothing is mutated between calls, so
every call sees the same busy GPUs (a decision, not an allocation).
"""

from __future__ import annotations

import gc
import os
import random
import time
from collections import Counter
from typing import Any

from benchmarks.stats import Result, percentile
from coordinator.model import Node
from coordinator.scheduling import placement
from shared.protocol import GpuInfo
from shared.tasks import Requirements

GPUS_PER_NODE = 8
SIZES = (10, 100, 1_000, 10_000)
BUSY_SHARE = 0.6  # share of GPUs allocated to a task
# (name, vendor, memory GB, compute capability, share of nodes)
MODELS = (
    ("NVIDIA A100-SXM4-80GB", "nvidia", 80, "8.0", 0.30),
    ("NVIDIA H100 80GB HBM3", "nvidia", 80, "9.0", 0.20),
    ("NVIDIA GeForce RTX 4090", "nvidia", 24, "8.9", 0.30),
    ("NVIDIA L4", "nvidia", 24, "8.9", 0.20),
)
GPU_COUNTS = ((1, 0.5), (2, 0.25), (4, 0.15), (8, 0.10))
MEMORY_GB = ((0.0, 0.4), (16.0, 0.3), (40.0, 0.2), (70.0, 0.1))
GPU_TYPES = (("", 0.6), ("A100", 0.15), ("H100", 0.1), ("4090", 0.1), ("L4", 0.05))
PRIORITIES = ((1, 0.2), (5, 0.6), (9, 0.2))
EXECUTORS = (("docker", 0.7), ("process", 0.3))


def _pick(rng: random.Random, choices: tuple[tuple[Any, float], ...]) -> Any:
    values, weights = zip(*choices, strict=True)
    return rng.choices(values, weights)[0]


def make_node(rng: random.Random, i: int) -> Node:
    name, vendor, mem_gb, cc, _ = rng.choices(MODELS, [m[4] for m in MODELS])[0]
    total = mem_gb * 1024
    node = Node(
        name=f"node-{i:05d}",
        executors=frozenset({"builtin", "process", "docker"}),
        labels={"zone": rng.choice(("eu", "us", "ap"))},
        slots=32,
        cpu_count=32,
        memory_mb=256 * 1024,
    )
    gpus = []
    for g in range(GPUS_PER_NODE):
        busy = rng.random() < BUSY_SHARE
        used = int(total * rng.uniform(0.4, 0.95)) if busy else int(total * rng.uniform(0, 0.1))
        gpus.append(
            GpuInfo(
                index=g,
                name=name,
                vendor=vendor,
                uuid=f"GPU-{i:05d}-{g}",
                memory_total_mb=total,
                memory_used_mb=used,
                compute_capability=cc,
                utilization_pct=rng.uniform(50, 100) if busy else 0.0,
            )
        )
        if busy:
            task_id = f"t-{i}-{g}"
            node.gpu_tasks[g] = {task_id}
            node.tasks.add(task_id)
    node.gpus = gpus
    return node


def make_requests(rng: random.Random, n: int) -> list[tuple[Requirements, str, int]]:
    return [
        (
            Requirements(
                gpu_count=_pick(rng, GPU_COUNTS),
                memory_gb=_pick(rng, MEMORY_GB),
                gpu_type=_pick(rng, GPU_TYPES),
            ),
            _pick(rng, EXECUTORS),
            _pick(rng, PRIORITIES),
        )
        for _ in range(n)
    ]


def build_view(nodes: list[Node]) -> tuple[Any, float, str]:
    """What `place` is given: a PlacementIndex when the module has one, else the list.

    GPUMESH_BENCH_PLACEMENT=list forces the list, to compare the two in one checkout.
    """
    index_cls = getattr(placement, "PlacementIndex", None)
    if index_cls is None or os.environ.get("GPUMESH_BENCH_PLACEMENT") == "list":
        return nodes, 0.0, "list"
    began = time.perf_counter()
    index = index_cls()
    for node in nodes:
        index.update(node)
    return index, (time.perf_counter() - began) * 1000, "PlacementIndex"


def _time_updates(view: Any, nodes: list[Node], calls: int) -> float | None:
    """p50 of one `index.update(node)` (what a heartbeat or a GPU change costs), in us."""
    if not hasattr(view, "update"):
        return None
    samples = []
    for i in range(calls):
        node = nodes[i % len(nodes)]
        t0 = time.perf_counter_ns()
        view.update(node)
        samples.append(time.perf_counter_ns() - t0)
    samples.sort()
    return round(percentile(samples, 50) / 1000, 2)


def measure(
    n_nodes: int, calls: int, budget_s: float, min_calls: int = 200, seed: int = 7
) -> dict[str, Any]:
    rng = random.Random(seed + n_nodes)
    nodes = [make_node(rng, i) for i in range(n_nodes)]
    requests = make_requests(rng, 997)  # a prime, so the cycle does not align with nodes
    view, build_ms, kind = build_view(nodes)
    place = placement.place
    for req, executor, prio in requests[:50]:  # warm-up
        place(req, executor, view, prio)
    samples: list[int] = []
    placed: list[int] = []
    nofit: list[int] = []
    gc.collect()
    deadline = time.perf_counter() + budget_s
    i = 0
    while i < calls and (i < min_calls or time.perf_counter() < deadline):
        req, executor, prio = requests[i % len(requests)]
        t0 = time.perf_counter_ns()
        decision = place(req, executor, view, prio)
        took = time.perf_counter_ns() - t0
        samples.append(took)
        (placed if isinstance(decision, placement.Placement) else nofit).append(took)
        i += 1
    samples.sort()
    placed.sort()
    nofit.sort()
    busy = sum(len(n.gpu_tasks) for n in nodes) / (n_nodes * GPUS_PER_NODE)
    return {
        "nodes": n_nodes,
        "gpus_per_node": GPUS_PER_NODE,
        "p50_us": round(percentile(samples, 50) / 1000, 2),
        "p99_us": round(percentile(samples, 99) / 1000, 2),
        "max_us": round(samples[-1] / 1000, 2),
        "calls": len(samples),
        "placed_pct": round(100 * len(placed) / len(samples), 1),
        "p99_placed_us": round(percentile(placed, 99) / 1000, 2),
        "p99_nofit_us": round(percentile(nofit, 99) / 1000, 2) if nofit else None,
        "busy_gpu_pct": round(100 * busy, 1),
        "api": kind,
        "build_ms": round(build_ms, 1),
        "update_p50_us": _time_updates(view, nodes, min(2000, 20 * n_nodes)),
    }


GANG_NODES = 8  # a gang of 8 members (issue 28), each asking the usual mixed requirements


def measure_gang(n_nodes: int, calls: int, budget_s: float, min_calls: int = 200,
                 seed: int = 7) -> dict[str, Any] | None:
    """`place_gang(req, 8, ...)` (coordinator/scheduling/gang.py) on the same nodes and
    requests as `measure`: N distinct nodes that each fit one member, or a GangNoFit with
    its count. None in a checkout without gangs."""
    try:
        from coordinator.scheduling.gang import place_gang
    except ImportError:
        return None
    rng = random.Random(seed + n_nodes)
    nodes = [make_node(rng, i) for i in range(n_nodes)]
    requests = make_requests(rng, 997)
    view, _, _ = build_view(nodes)
    for req, executor, prio in requests[:50]:
        place_gang(req, GANG_NODES, executor, view, prio)
    samples: list[int] = []
    cpu: list[int] = []  # the thread's CPU time: what a loaded machine's waits leave out
    placed = 0
    gc.collect()
    deadline = time.perf_counter() + budget_s
    i = 0
    while i < calls and (i < min_calls or time.perf_counter() < deadline):
        req, executor, prio = requests[i % len(requests)]
        c0, t0 = time.thread_time_ns(), time.perf_counter_ns()
        decision = place_gang(req, GANG_NODES, executor, view, prio)
        samples.append(time.perf_counter_ns() - t0)
        cpu.append(time.thread_time_ns() - c0)
        placed += isinstance(decision, list)
        i += 1
    samples.sort()
    cpu.sort()
    return {
        "nodes": n_nodes, "gang": GANG_NODES,
        "p50_us": round(percentile(samples, 50) / 1000, 2),
        "p99_us": round(percentile(samples, 99) / 1000, 2),
        "cpu_p99_us": round(percentile(cpu, 99) / 1000, 2),
        "max_us": round(samples[-1] / 1000, 2),
        "calls": len(samples), "placed_pct": round(100 * placed / len(samples), 1),
    }


def run(quick: bool = False) -> Result:
    calls, budget, least = (2_000, 1.0, 50) if quick else (20_000, 8.0, 300)
    rows = [measure(n, calls, budget, least) for n in SIZES]
    models = Counter(m[0] for m in MODELS)
    notes = [
        f"{int(BUSY_SHARE * 100)} % of GPUs busy; node models {', '.join(models)}; "
        "requests: gpu_count 1/2/4/8, memory_gb 0/16/40/70, gpu_type any/A100/H100/4090/L4, "
        "priority 1/5/9, executor docker/process",
        f"place() was given: {rows[0]['api']}",
    ]
    goal = next(r for r in rows if r["nodes"] == 1_000)["p99_us"]
    verdict = "met" if goal <= 50 else "MISSED"
    verdicts = [f"{verdict}: p99 {goal} us at 1,000 nodes x 8 GPUs (goal <= 50 us)"]
    gang = measure_gang(1_000, calls, budget, least)
    if gang is not None:
        notes.append(f"gang of {GANG_NODES} (place_gang) at 1,000 nodes x 8 GPUs: p50 "
                     f"{gang['p50_us']} us, p99 {gang['p99_us']} us (its CPU time: p99 "
                     f"{gang['cpu_p99_us']} us), max {gang['max_us']} us, "
                     f"{gang['calls']} calls, {gang['placed_pct']} % placed")
        gang_ok = "met" if gang["p99_us"] <= 1_000 else "MISSED"
        verdicts.append(f"{gang_ok}: gang of {GANG_NODES} p99 {gang['p99_us']} us at 1,000 "
                        "nodes x 8 GPUs (goal <= 1 ms)")
    return Result(
        "placement",
        rows,
        [
            "nodes",
            "gpus_per_node",
            "p50_us",
            "p99_us",
            "max_us",
            "calls",
            "placed_pct",
            "p99_placed_us",
            "p99_nofit_us",
            "api",
        ],
        notes,
        verdicts,
    )

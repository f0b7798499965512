"""What a node's messages change on its record: registration, telemetry, energy.

Pure bookkeeping on `Node` values; the Mesh decides when to call it.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from coordinator.model import Node, Task
from shared.protocol import SERVE, GpuInfo, Heartbeat, Register
from shared.services import SERVE_LABEL


def seed_gpus(msg: Register) -> list[GpuInfo]:
    info = msg.node_info
    if info is None:
        return []
    mb = int(info.gpu_memory * 1024)
    return [GpuInfo(index=i, name=info.gpu_type, memory_total_mb=mb) for i in range(info.gpu_count)]


def apply_register(node: Node, msg: Register) -> None:
    node.seed_form = msg.executors is None
    node.gpus = msg.gpus or seed_gpus(msg)
    node.executors = frozenset(msg.executors or ())
    node.policy = msg.policy
    node.isolation = msg.isolation
    node.hostname, node.role, node.version = msg.hostname, msg.role, msg.version
    node.protocol, node.labels = msg.protocol, dict(msg.labels)
    if SERVE in msg.features:  # it runs model-service replicas: theirs require this label
        node.labels[SERVE_LABEL] = "1"
    node.cpu_count, node.memory_mb = msg.cpu_count, msg.memory_mb
    node.slots = msg.slots or msg.cpu_count or 1
    node.address = msg.address  # where its peers reach it (a gang's MASTER_ADDR)


def apply_heartbeat(node: Node, msg: Heartbeat) -> None:
    if msg.gpus:
        node.gpus = msg.gpus
    node.cpu_pct, node.memory_used_mb, node.load1 = msg.cpu_pct, msg.memory_used_mb, msg.load1
    gpus = msg.gpus
    node.history.append((  # a tuple, not a dict: 10,000 nodes x 120 samples add up
        time.time(),
        msg.cpu_pct,
        sum(g.utilization_pct for g in gpus) / len(gpus) if gpus else 0.0,
        sum(g.memory_used_mb for g in gpus),
        sum(g.power_w or 0 for g in gpus),
    ))


def gpus_reshaped(old: list[GpuInfo], new: list[GpuInfo]) -> bool:
    if not new:
        return False  # a heartbeat without GPU readings leaves the last ones standing
    if len(old) != len(new):
        return True
    return any(
        a.index != b.index or a.name != b.name or a.memory_total_mb != b.memory_total_mb
        or a.vendor != b.vendor or a.fault != b.fault
        for a, b in zip(old, new, strict=True)
    )


def account_energy(
    node: Node, gpus: list[GpuInfo], tasks: Mapping[str, Task], cap_s: float
) -> None:
    """Integrate power over time per node, and per task for the GPUs it holds (a shared
    GPU's energy is split among its holders). Gaps longer than `cap_s` count as `cap_s`."""
    now = time.monotonic()
    dt = min(now - node.power_at, cap_s)
    node.power_at = now
    if dt <= 0:
        return
    for g in gpus:
        if g.power_w is None:
            continue
        joules = g.power_w * dt
        node.energy_j += joules
        holders = node.gpu_tasks.get(g.index)
        if holders:
            for task_id in holders:
                tasks[task_id].energy_j += joules / len(holders)

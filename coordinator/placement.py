"""Where a task goes: pure functions from (requirements, node snapshots) to a decision.

No I/O, no clock, nothing imported from the mesh, the store or the transport: `place()`
reads node views and returns a `Placement` (node, GPU indices) or a `NoFit` that counts
the nodes it filtered out by reason, so "why is my task still queued?" has an answer.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Protocol

from shared.protocol import GpuInfo
from shared.tasks import Requirements

CRITICAL = 8
LOW = 2


class NodeView(Protocol):
    """What placement may read of a node. The coordinator's `Node` satisfies it."""

    @property
    def name(self) -> str: ...
    @property
    def online(self) -> bool: ...
    @property
    def executors(self) -> frozenset[str]: ...
    @property
    def labels(self) -> Mapping[str, str]: ...
    @property
    def free_slots(self) -> int: ...
    @property
    def gpus(self) -> Sequence[GpuInfo]: ...
    @property
    def gpu_tasks(self) -> Mapping[int, object]: ...  # index -> holders; absent when free
    @property
    def load(self) -> float: ...


@dataclass(frozen=True, slots=True)
class Placement:
    node: str
    gpu_indices: tuple[int, ...] = ()
    score: float = 0.0


@dataclass(frozen=True, slots=True)
class NoFit:
    evaluated: int
    filtered: Mapping[str, int] = field(default_factory=dict)

    @property
    def reason(self) -> str:
        if not self.evaluated:
            return "no node has joined the mesh"
        parts = [f"{n} {why}" for why, n in sorted(self.filtered.items(), key=lambda i: -i[1])]
        noun = "node" if self.evaluated == 1 else "nodes"
        return f"no node fits ({self.evaluated} {noun}: " + "; ".join(parts) + ")"


def gpu_matches(req: Requirements, gpu: GpuInfo) -> bool:
    """Type, vendor and compute capability: what a GPU is, not whether it is free."""
    if req.gpu_type and req.gpu_type.lower() not in gpu.name.lower():
        return False
    if req.vendor and req.vendor.lower() != gpu.vendor.lower():
        return False
    if req.min_compute_capability:
        return _cc(gpu.compute_capability) >= _cc(req.min_compute_capability)
    return True


def _cc(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(p) for p in text.split("."))
    except ValueError:
        return (0,)


def free_mb(gpu: GpuInfo) -> int:
    return max(0, gpu.memory_total_mb - gpu.memory_used_mb)


def _gpu_need(req: Requirements) -> str:
    need = f"{req.gpu_count} free GPU{'s' if req.gpu_count > 1 else ''}"
    if req.memory_gb:
        need += f" with >= {req.memory_gb:g} GB free"
    if req.gpu_type:
        need += f" of type {req.gpu_type}"
    if req.vendor:
        need += f" from {req.vendor}"
    return need


def _usable_gpus(req: Requirements, node: NodeView) -> list[GpuInfo]:
    need_mb = req.memory_gb * 1024
    busy = node.gpu_tasks
    return [
        g
        for g in node.gpus
        if g.index not in busy and free_mb(g) >= need_mb and gpu_matches(req, g)
    ]


def place(
    req: Requirements, executor: str, nodes: Iterable[NodeView], priority: int = 5
) -> Placement | NoFit:
    filtered: Counter[str] = Counter()
    best: tuple[float, str, tuple[int, ...]] | None = None
    evaluated = 0
    for node in nodes:
        evaluated += 1
        if not node.online:
            filtered["are offline"] += 1
            continue
        if executor not in node.executors:
            filtered[f"do not offer the {executor} executor"] += 1
            continue
        if any(node.labels.get(k) != v for k, v in req.labels.items()):
            filtered["lack the required labels"] += 1
            continue
        if req.gpu_count == 0:
            if node.free_slots <= 0:
                filtered["have no free slot"] += 1
                continue
            score, indices = -node.load, ()
        else:
            usable = _usable_gpus(req, node)
            if len(usable) < req.gpu_count:
                filtered[f"have fewer than {_gpu_need(req)}"] += 1
                continue
            score, indices = _score_gpus(req, node, usable, priority)
        # Highest score wins; equal scores go to the alphabetically first node.
        if best is None or score > best[0] or (score == best[0] and node.name < best[1]):
            best = (score, node.name, indices)
    if best is None:
        return NoFit(evaluated, dict(filtered))
    return Placement(best[1], best[2], best[0])


def _score_gpus(
    req: Requirements, node: NodeView, usable: list[GpuInfo], priority: int
) -> tuple[float, tuple[int, ...]]:
    if priority >= CRITICAL:
        # Critical work takes the most powerful GPUs: the most memory stands in for power.
        chosen = sorted(usable, key=lambda g: (-g.memory_total_mb, g.index))[: req.gpu_count]
        return float(min(g.memory_total_mb for g in chosen)), _sorted_indices(chosen)
    chosen = sorted(usable, key=lambda g: (-free_mb(g), g.index))[: req.gpu_count]
    if priority <= LOW:
        return -node.load, _sorted_indices(chosen)
    # Normal work is balanced: the node with the most free GPUs left, then the least loaded.
    spare = len(usable) - req.gpu_count
    return spare - node.load, _sorted_indices(chosen)


def _sorted_indices(gpus: list[GpuInfo]) -> tuple[int, ...]:
    return tuple(sorted(g.index for g in gpus))


"""Which blocked requirement classes a node event could help: wake keys.

A class whose head did not fit is parked in the queue under one wake key, made from its
requirements. When a node gains capacity (it registers or reconnects, a GPU or slot is
freed, a heartbeat shows more free VRAM or other GPUs, a quarantine is lifted), the Mesh
asks for the keys that node could satisfy and wakes exactly the classes parked under
them; placement then decides for each, once. A key is a necessary condition, never a
sufficient one: when unsure, a node offers more keys (a class is tried for nothing),
never fewer (a class would wait for good).

- no GPU: `(executor, "cpu")`;
- a GPU type: `(executor, "type", T)` where T is the type normalized as placement
  compares it (`gpu_matches`: a substring of the normalized GPU name), cut to
  `TYPE_CHARS`. A node offers every substring (up to that length) of each of its few
  distinct GPU names, so ten thousand distinct types that
  no node has cost a few hundred dict lookups per event, not ten thousand placements;
- other GPU work: `(executor, "gpus", vendor, count)`; a node offers every count up to
  its number of GPUs (busy ones too: a shared GPU or a later release may serve), for
  vendor "" and for each of its vendors.

Labels, VRAM, compute capability and node policy are left to placement: the key narrows,
placement decides. The keys of a node depend only on its shape (executors, GPU names,
vendors, GPU count) and are cached by it.
"""

from __future__ import annotations

import functools
from collections.abc import Hashable, Sequence

from coordinator.model import Node
from coordinator.scheduling.placement import (
    _norm as norm_gpu_name,  # the one normalization of names
)
from shared.protocol import GpuInfo
from shared.tasks import Requirements

WakeKey = tuple[Hashable, ...]
TYPE_CHARS = 32  # a type key is at most this long: a prefix of a match is a match too


def class_wake_key(req: Requirements, executor: str) -> WakeKey:
    """The key a blocked class waits under."""
    if req.gpu_count == 0:
        return (executor, "cpu")
    gpu_type = norm_gpu_name(req.gpu_type) if req.gpu_type else ""
    if gpu_type:
        return (executor, "type", gpu_type[:TYPE_CHARS])
    return (executor, "gpus", req.vendor.lower(), req.gpu_count)


def node_wake_keys(node: Node, *, gpus_only: bool = False) -> frozenset[WakeKey]:
    """Every key whose classes this node could possibly serve (empty while offline).
    `gpus_only` leaves out CPU work: for an event that changed only GPU readings."""
    if not node.online:
        return frozenset()
    names = tuple(sorted({norm_gpu_name(g.name) for g in node.gpus}))
    return _keys(node.executors, names, _vendors(node.gpus), len(node.gpus), gpus_only)


def _vendors(gpus: Sequence[GpuInfo]) -> tuple[str, ...]:
    return tuple(sorted({g.vendor.lower() for g in gpus}))


@functools.lru_cache(maxsize=128)  # a few hundred keys per shape; fleets have few shapes
def _keys(
    executors: frozenset[str], names: tuple[str, ...], vendors: tuple[str, ...],
    gpu_count: int, gpus_only: bool,
) -> frozenset[WakeKey]:
    parts: set[str] = set()
    for name in names:
        parts.update(
            name[i:j]
            for i in range(len(name))
            for j in range(i + 1, min(i + TYPE_CHARS, len(name)) + 1)
        )
    keys: set[WakeKey] = set()
    for ex in executors:
        if not gpus_only:
            keys.add((ex, "cpu"))
        keys.update((ex, "type", part) for part in parts)
        for vendor in {"", *vendors}:
            keys.update((ex, "gpus", vendor, n) for n in range(1, gpu_count + 1))
    return frozenset(keys)


def vram_freed(old: Sequence[GpuInfo], new: Sequence[GpuInfo]) -> bool:
    """Whether a heartbeat's readings show more free memory on some GPU than before."""
    before = {g.index: g.memory_total_mb - g.memory_used_mb for g in old}
    return any(
        g.memory_total_mb - g.memory_used_mb > before.get(g.index, -1) for g in new
    )

"""Where a task goes: pure functions from (requirements, node views) to a decision.

No I/O, no clock, nothing imported from the mesh, the store or the transport. `place()`
returns a `Placement` (node, GPU indices) or a `NoFit` that counts the nodes it filtered
out by reason, so "why is my task still queued?" has an answer.

Two paths give the same kind of answer:
- `_scan` looks at every node: feasibility filters, then a score. It is exact, and it is
  the only path that can explain a NoFit.
- `PlacementIndex` keeps online nodes in buckets by (hourly cost, GPU model, free GPUs of
  that model), updated by the Mesh when a node's allocation or telemetry changes. A
  decision walks buckets best-first and stops at the first node that fits, so it touches
  a handful of nodes instead of every GPU of every node. When the walk finds nothing
  (a request only a mixed-model node can serve, a shared GPU, or nothing at all), the
  scan decides.

Scoring (DESIGN.md): owned nodes before nodes with an hourly cost (label
`cost_per_hour`); then by balancing mode: `speed` (the most powerful free GPUs; critical
tasks always use it), `efficiency` (performance per watt), `balanced` (most free GPUs
left, then least load; low-priority work goes to the least-loaded node), `endurance`
(the coolest GPUs).
"""

from __future__ import annotations

import functools
from collections import Counter
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Protocol

# The balancing modes: defined with the setting that picks one, re-exported here.
from coordinator.settings import MODES as MODES
from shared.policy import PolicyAsk, refusal
from shared.protocol import GpuInfo, NodePolicy
from shared.tasks import Requirements

CRITICAL = 8
LOW = 2

# Dense FP16/BF16 tensor TFLOPS and board power (W) by name fragment, longest first: a
# stand-in for "how powerful" and "how efficient" that needs no benchmark on the node.
_KNOWN: tuple[tuple[str, float, float], ...] = tuple(
    sorted(
        [
            ("B200", 2250, 1000), ("GH200", 989, 900), ("H200", 989, 700),
            ("H100", 989, 700), ("MI300X", 1307, 750), ("MI250", 362, 560),
            ("MI210", 181, 300), ("L40S", 362, 350), ("L40", 181, 300), ("L4", 121, 72),
            ("A100", 312, 400), ("A40", 150, 300), ("A10", 125, 150), ("RTX6000", 182, 300),
            ("RTX5090", 210, 575), ("RTX4090", 165, 450), ("RTX4080", 97, 320),
            ("RTX3090", 71, 350), ("RX7900", 123, 355), ("V100", 125, 300), ("T4", 65, 70),
            ("MAX1550", 832, 600), ("MAX1100", 352, 300), ("ARC", 39, 225),
            ("M3MAX", 28, 90), ("M4MAX", 34, 90), ("M2ULTRA", 27, 150),
        ],
        key=lambda k: -len(k[0]),
    )
)


@functools.lru_cache(maxsize=4096)
def _norm(name: str) -> str:
    return name.upper().replace(" ", "").replace("-", "").replace("_", "")


@functools.lru_cache(maxsize=1024)
def _known(name: str) -> tuple[float, float] | None:
    n = _norm(name)
    for frag, tflops, watts in _KNOWN:
        if frag in n:
            return tflops, watts
    return None


def gpu_tflops(g: GpuInfo) -> float:
    known = _known(g.name)
    return known[0] if known else g.memory_total_mb / 1024 * 2  # unknown: more memory, bigger


def gpu_watts(g: GpuInfo) -> float:
    if g.power_limit_w:
        return g.power_limit_w
    known = _known(g.name)
    return known[1] if known else 300.0


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
    def gpu_shared_mb(self) -> Mapping[int, int]: ...  # held only by shared tasks: MB taken
    @property
    def load(self) -> float: ...
    @property
    def policy(self) -> NodePolicy | None: ...  # what the node agrees to run; None: unstated
    @property
    def unavailable(self) -> str: ...  # why an online node gets no work (quarantine, health)


@dataclass(frozen=True, slots=True)
class Placement:
    node: str
    gpu_indices: tuple[int, ...] = ()
    score: float = 0.0


class NoFit:
    """Nothing fits: how many nodes were looked at and how many fell to each filter.

    The index can know that nothing fits without counting why; it then hands over
    `explain`, a scan run only when someone reads the counts (a queued task's reason).
    """

    __slots__ = ("_evaluated", "_filtered", "_explain")

    def __init__(
        self,
        evaluated: int = 0,
        filtered: Mapping[str, int] | None = None,
        explain: Callable[[], NoFit | Placement] | None = None,
    ) -> None:
        self._evaluated, self._filtered, self._explain = evaluated, filtered or {}, explain

    def _resolve(self) -> None:
        if self._explain is not None:
            explained, self._explain = self._explain(), None
            if isinstance(explained, NoFit):
                self._evaluated, self._filtered = explained.evaluated, explained.filtered

    @property
    def evaluated(self) -> int:
        self._resolve()
        return self._evaluated

    @property
    def filtered(self) -> Mapping[str, int]:
        self._resolve()
        return self._filtered

    def __repr__(self) -> str:
        return f"NoFit({self.reason!r})"

    @property
    def reason(self) -> str:
        if not self.evaluated:
            return "no node has joined the mesh"
        parts = [
            f"{n} {why if n > 1 else _singular(why)}"
            for why, n in sorted(self.filtered.items(), key=lambda i: -i[1])
        ]
        noun = "node" if self.evaluated == 1 else "nodes"
        return f"no node fits ({self.evaluated} {noun}: " + "; ".join(parts) + ")"


_SINGULAR = {"have": "has", "are": "is", "do": "does", "lack": "lacks", "refuse": "refuses"}


def _singular(why: str) -> str:
    verb, _, rest = why.partition(" ")
    return f"{_SINGULAR.get(verb, verb)} {rest}"


# --- feasibility ---------------------------------------------------------------------------


def gpu_matches(req: Requirements, gpu: GpuInfo) -> bool:
    """Type, vendor and compute capability: what a GPU is, not whether it is free."""
    if req.gpu_type and _norm(req.gpu_type) not in _norm(gpu.name):
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


def node_cost(node: NodeView) -> float:
    try:
        return max(0.0, float(node.labels.get("cost_per_hour", 0) or 0))
    except ValueError:
        return 0.0


def _labels_ok(req: Requirements, node: NodeView) -> bool:
    labels = node.labels
    return all(labels.get(k) == v for k, v in req.labels.items()) and all(
        labels.get(k) == v for k, v in req.node_selector.items()
    )


def _usable_gpus(req: Requirements, node: NodeView) -> list[GpuInfo]:
    need_mb = req.memory_gb * 1024
    busy, shared = node.gpu_tasks, node.gpu_shared_mb
    usable = []
    for g in node.gpus:
        if g.fault:
            continue  # the driver reported a fault: this GPU is out, the node is not
        if g.index not in busy:
            if free_mb(g) >= need_mb and gpu_matches(req, g):
                usable.append(g)
        elif req.shared and g.index in shared:
            room = g.memory_total_mb - max(g.memory_used_mb, shared[g.index])
            if room >= need_mb and gpu_matches(req, g):
                usable.append(g)
    return usable


def _gpu_need(req: Requirements) -> str:
    need = f"{req.gpu_count} free GPU{'s' if req.gpu_count > 1 else ''}"
    if req.memory_gb:
        need += f" with >= {req.memory_gb:g} GB free"
    if req.gpu_type:
        need += f" of type {req.gpu_type}"
    if req.vendor:
        need += f" from {req.vendor}"
    if req.min_compute_capability:
        need += f" of compute capability >= {req.min_compute_capability}"
    return need


# --- scoring -------------------------------------------------------------------------------


def effective_mode(req: Requirements, priority: int, mesh_mode: str) -> str:
    if req.balancing:
        return req.balancing
    if priority >= CRITICAL:
        return "speed"
    return mesh_mode


def _temp(g: GpuInfo) -> float:
    return g.temperature_c if g.temperature_c is not None else 50.0


_CHOOSE: dict[str, Callable[[GpuInfo], tuple[float, ...]]] = {
    "speed": lambda g: (-gpu_tflops(g), -free_mb(g), g.index),
    "efficiency": lambda g: (-gpu_tflops(g) / gpu_watts(g), -free_mb(g), g.index),
    "balanced": lambda g: (-free_mb(g), g.index),
    "endurance": lambda g: (_temp(g), -free_mb(g), g.index),
}


def choose_gpus(
    req: Requirements, node: NodeView, usable: list[GpuInfo], mode: str, priority: int
) -> tuple[float, tuple[int, ...]]:
    """The GPUs this node would give, and how good that is (higher is better)."""
    chosen = sorted(usable, key=_CHOOSE[mode])[: req.gpu_count]
    indices = tuple(sorted(g.index for g in chosen))
    if mode == "speed":
        return min(gpu_tflops(g) for g in chosen) - node.load, indices
    if mode == "efficiency":
        return min(gpu_tflops(g) / gpu_watts(g) for g in chosen) - node.load, indices
    if mode == "endurance":
        return -max(_temp(g) for g in chosen) - node.load, indices
    if priority <= LOW:
        return -node.load, indices
    return len(usable) - req.gpu_count - node.load, indices


def _policy_refuses(node: NodeView, ask: PolicyAsk | None) -> str:
    """Why the node's policy refuses the task ("" if it does not): a pure filter. A task that
    asks for no image, volume or env passes at once (its executor is checked already), unless
    the node runs only its owner's process tasks (NodePolicy.owner_tenant)."""
    if ask is None or node.policy is None or (ask.trivial and not node.policy.owner_tenant):
        return ""
    return refusal(node.policy, ask)


def _evaluate(
    req: Requirements, executor: str, node: NodeView, priority: int, mode: str,
    filtered: Counter[str] | None, ask: PolicyAsk | None = None,
) -> tuple[float, tuple[int, ...]] | None:
    if not node.online:
        why = "are offline"
    elif node.unavailable:
        why = node.unavailable
    elif executor not in node.executors:
        why = f"do not offer the {executor} executor"
    elif policy_why := _policy_refuses(node, ask):
        why = f"refuse it by node policy: {policy_why}"
    elif (req.labels or req.node_selector) and not _labels_ok(req, node):
        why = "lack the required labels"
    elif req.gpu_count == 0:
        if node.free_slots > 0:
            return -node.load, ()
        why = "have no free slot"
    else:
        usable = _usable_gpus(req, node)
        if len(usable) >= req.gpu_count:
            return choose_gpus(req, node, usable, mode, priority)
        if filtered is None:
            return None
        why = f"have fewer than {_gpu_need(req)}"
        faulted = sum(1 for g in node.gpus if g.fault)
        if faulted:
            why += f" ({faulted} GPU{'s' if faulted > 1 else ''} out with a fault)"
    if filtered is not None:
        filtered[why] += 1
    return None


def _scan(
    req: Requirements, executor: str, nodes: Iterable[NodeView], priority: int, mode: str,
    ask: PolicyAsk | None = None,
) -> Placement | NoFit:
    filtered: Counter[str] = Counter()
    best: tuple[float, float, str, tuple[int, ...]] | None = None  # (cost, -score, name, gpus)
    evaluated = 0
    for node in nodes:
        evaluated += 1
        fit = _evaluate(req, executor, node, priority, mode, filtered, ask)
        if fit is None:
            continue
        key = (node_cost(node), -fit[0], node.name, fit[1])
        if best is None or key < best:
            best = key
    if best is None:
        return NoFit(evaluated, dict(filtered))
    return Placement(best[2], best[3], -best[1])


def place(
    req: Requirements,
    executor: str,
    nodes: Iterable[NodeView] | PlacementIndex,
    priority: int = 5,
    mode: str = "balanced",
    ask: PolicyAsk | None = None,
) -> Placement | NoFit:
    """`ask`: what the task asks of node policy (image, volumes, env names); None skips it."""
    mode = effective_mode(req, priority, mode)
    if isinstance(nodes, PlacementIndex):
        found = nodes.fast(req, executor, priority, mode, ask)
        if found is not None:
            return found
        everyone = nodes.nodes.values()
        if nodes.walk_is_complete(req):  # nothing fits: count why only if someone asks
            return NoFit(
                explain=lambda: _scan(req, executor, list(everyone), priority, mode, ask)
            )
        return _scan(req, executor, everyone, priority, mode, ask)
    return _scan(req, executor, nodes, priority, mode, ask)


# --- the index -----------------------------------------------------------------------------

Model = tuple[str, str, int, str]  # vendor, name, total MB, compute capability
GpuKey = tuple[float, Model]  # (hourly cost, model)


def _model(g: GpuInfo) -> Model:
    return (g.vendor, g.name, g.memory_total_mb, g.compute_capability)


class PlacementIndex:
    """Online nodes bucketed by (cost, GPU model) -> free GPUs of that model, and by
    (cost, free CPU slots). `update(node)` after any change to the node; O(GPU models)."""

    def __init__(self) -> None:
        self.nodes: dict[str, NodeView] = {}
        self._gpu: dict[GpuKey, dict[int, dict[str, None]]] = {}
        self._cpu: dict[tuple[float, int], dict[str, None]] = {}
        self._member: dict[str, tuple[list[tuple[GpuKey, int]], tuple[float, int] | None]] = {}
        self._models: dict[GpuKey, GpuInfo] = {}
        self._matching: dict[tuple[str, str, str, float], list[GpuKey]] = {}
        self._mixed: set[str] = set()  # online nodes with free GPUs of more than one model
        self.changes: dict[str, int] = {}  # node -> updates so far: what a cache keys on

    def __len__(self) -> int:
        return len(self.nodes)

    def update(self, node: NodeView) -> None:
        self.nodes[node.name] = node
        self.changes[node.name] = self.changes.get(node.name, 0) + 1
        self._unlink(node.name)
        if not node.online or node.unavailable:
            return
        cost = node_cost(node)
        free: Counter[GpuKey] = Counter()
        busy = node.gpu_tasks
        for g in node.gpus:
            key = (cost, _model(g))
            if key not in self._models:
                self._models[key] = g
                self._matching.clear()
            if g.index not in busy and not g.fault:
                free[key] += 1
        if len(free) > 1:
            self._mixed.add(node.name)
        gpu_links = []
        for key, k in free.items():
            self._gpu.setdefault(key, {}).setdefault(k, {})[node.name] = None
            gpu_links.append((key, k))
        cpu_link = None
        if node.free_slots > 0:
            cpu_link = (cost, node.free_slots)
            self._cpu.setdefault(cpu_link, {})[node.name] = None
        self._member[node.name] = (gpu_links, cpu_link)

    def remove(self, name: str) -> None:
        self.changes.pop(name, None)
        self._unlink(name)
        self.nodes.pop(name, None)

    def walk_is_complete(self, req: Requirements) -> bool:
        """Whether `fast` finding nothing proves that nothing fits: true unless a shared
        GPU or a node whose free GPUs span several models could still serve `req`."""
        return not req.shared and (req.gpu_count <= 1 or not self._mixed)

    def _unlink(self, name: str) -> None:
        self._mixed.discard(name)
        links = self._member.pop(name, None)
        if links is None:
            return
        gpu_links, cpu_link = links
        for key, k in gpu_links:
            bucket = self._gpu[key][k]
            del bucket[name]
            if not bucket:
                del self._gpu[key][k]
        if cpu_link is not None:
            bucket = self._cpu[cpu_link]
            del bucket[name]
            if not bucket:
                del self._cpu[cpu_link]

    def _keys_for(self, req: Requirements) -> list[GpuKey]:
        sig = (req.gpu_type, req.vendor, req.min_compute_capability, req.memory_gb)
        keys = self._matching.get(sig)
        if keys is None:
            need = req.memory_gb * 1024
            keys = [
                k for k, g in self._models.items()
                if g.memory_total_mb >= need and gpu_matches(req, g)
            ]
            self._matching[sig] = keys
        return keys

    def fast(
        self, req: Requirements, executor: str, priority: int, mode: str,
        ask: PolicyAsk | None = None,
    ) -> Placement | None:
        if req.shared:
            return None  # shared GPUs sit outside the free buckets: let the scan decide
        if req.gpu_count == 0:
            return self._fast_cpu(req, executor, ask)
        keys = self._keys_for(req)
        order: Iterable[tuple[GpuKey, int]]
        if mode in ("speed", "efficiency"):
            rank = _CHOOSE[mode]
            keys = sorted(keys, key=lambda k: (k[0], rank(self._models[k])))
            order = ((key, k) for key in keys for k in sorted(self._gpu.get(key, ()),
                                                               reverse=True))
        else:
            order = self._by_free_count(keys)
        pick: list[tuple[float, str, tuple[int, ...]]] = []
        for key, k in order:
            if k < req.gpu_count:
                continue  # a node that needs GPUs of two models to fit is left to the scan
            for name in self._gpu[key][k]:
                fit = _evaluate(req, executor, self.nodes[name], priority, mode, None, ask)
                if fit is None:
                    continue
                if mode != "endurance":
                    return Placement(name, fit[1], fit[0])
                pick.append((-fit[0], name, fit[1]))
                if len(pick) >= 8:
                    break
            if len(pick) >= 8:
                break
        if pick:
            score, name, gpus = min(pick)
            return Placement(name, gpus, -score)
        return None

    def _by_free_count(self, keys: list[GpuKey]) -> Iterable[tuple[GpuKey, int]]:
        """(model, free count) pairs: cheapest tier first, then most free GPUs first."""
        pairs = [(key, k) for key in keys for k in self._gpu.get(key, ())]
        return sorted(pairs, key=lambda p: (p[0][0], -p[1]))

    def _fast_cpu(
        self, req: Requirements, executor: str, ask: PolicyAsk | None = None
    ) -> Placement | None:
        for cost, slots in sorted(self._cpu, key=lambda c: (c[0], -c[1])):
            for name in self._cpu[(cost, slots)]:
                node = self.nodes[name]
                if (executor in node.executors and _labels_ok(req, node)
                        and not _policy_refuses(node, ask)):
                    return Placement(name, (), -node.load)
        return None

"""Where a gang goes: N distinct nodes that each fit one member, or why not. Pure.

`place_gang` answers all or nothing: a list of N placements (rank order: the best node is
rank 0) or a `GangNoFit` that says how many nodes fit now ("2 of 3 nodes fit") and, through
placement's NoFit, why the others do not. No I/O, no clock: the Mesh (coordinator/core/
gangs.py) turns the answer into transitions.

With a `PlacementIndex` it walks the same buckets as a single task's fast path, best first,
and stops once N nodes fit, so a gang of 8 on 1,000 nodes touches about as many nodes as
eight single decisions. When the walk cannot prove that nothing more fits (shared GPUs, a
node whose free GPUs span models), it scans every node, as single placement does.

`reserved` (node names kept for a gang at the head of its queue) and `backfill_ok` let the
caller keep nodes for a waiting gang: a reserved node is skipped unless `backfill_ok`.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Collection, Iterable, Mapping

from coordinator.model import Node, Task, TaskState
from coordinator.scheduling.placement import (
    NodeView,
    NoFit,
    Placement,
    PlacementIndex,
    _evaluate,
    _singular,
    effective_mode,
    node_cost,
)
from coordinator.scheduling.policy import Reservation, may_pass, reserve
from coordinator.scheduling.policy import _node_outlook as node_outlook
from shared.policy import PolicyAsk
from shared.tasks import Requirements


class GangNoFit(NoFit):
    """Nothing fits a whole gang: `fit` of `need` nodes fit now (`why` says why the rest
    do not, counted as placement counts them)."""

    __slots__ = ("fit", "need")

    def __init__(self, fit: int, need: int, evaluated: int = 0,
                 filtered: dict[str, int] | None = None,
                 explain: Callable[[], NoFit | Placement] | None = None) -> None:
        super().__init__(evaluated, filtered, explain)
        self.fit, self.need = fit, need

    @property
    def reason(self) -> str:
        more = self.need - self.fit
        base = (f"{self.fit} of {self.need} nodes fit; waiting for {more} more node"
                f"{'s' if more > 1 else ''} to fit")
        filtered = self.filtered
        if filtered:
            parts = "; ".join(f"{n} {why if n > 1 else _singular(why)}"
                              for why, n in sorted(filtered.items(), key=lambda i: -i[1]))
            base += f" (the others: {parts})"
        return base


def _candidates(req: Requirements, index: PlacementIndex) -> Iterable[str]:
    """Node names best first, from the index's free buckets (as its fast path walks them)."""
    if req.gpu_count == 0:
        for cost, slots in sorted(index._cpu, key=lambda c: (c[0], -c[1])):
            yield from index._cpu[(cost, slots)]
        return
    for key, k in index._by_free_count(index._keys_for(req)):
        if k >= req.gpu_count:
            yield from index._gpu[key][k]


def place_gang(
    req: Requirements,
    n: int,
    executor: str,
    nodes: Iterable[NodeView] | PlacementIndex,
    priority: int = 5,
    mode: str = "balanced",
    ask: PolicyAsk | None = None,
    reserved: Collection[str] = (),
) -> list[Placement] | GangNoFit:
    """`n` placements on `n` distinct nodes, rank 0 first, or a GangNoFit. Nodes named in
    `reserved` are left out (kept for another gang)."""
    mode = effective_mode(req, priority, mode)
    if isinstance(nodes, PlacementIndex):
        picked: list[Placement] = []
        seen: set[str] = set()
        for name in _candidates(req, nodes):
            if name in seen or name in reserved:
                continue
            seen.add(name)
            fit = _evaluate(req, executor, nodes.nodes[name], priority, mode, None, ask)
            if fit is not None:
                picked.append(Placement(name, fit[1], fit[0]))
                if len(picked) == n:
                    return picked
        index = nodes
        if not req.shared and (req.gpu_count <= 1 or not index._mixed):
            # The walk saw every node that could fit: `picked` is all of them. Why the rest
            # do not fit is counted only if someone reads it (a queued task's reason).
            return GangNoFit(len(picked), n, explain=lambda: _explain(
                req, n, executor, list(index.nodes.values()), priority, mode, ask, reserved))
        nodes = index.nodes.values()  # shared GPUs, mixed nodes: the scan decides
    return _scan_gang(req, n, executor, nodes, priority, mode, ask, reserved)


def _explain(
    req: Requirements, n: int, executor: str, nodes: Iterable[NodeView], priority: int,
    mode: str, ask: PolicyAsk | None, reserved: Collection[str],
) -> NoFit:
    found = _scan_gang(req, n, executor, nodes, priority, mode, ask, reserved)
    return found if isinstance(found, NoFit) else NoFit(0, {})


def _scan_gang(
    req: Requirements, n: int, executor: str, nodes: Iterable[NodeView], priority: int,
    mode: str, ask: PolicyAsk | None, reserved: Collection[str],
) -> list[Placement] | GangNoFit:
    filtered: Counter[str] = Counter()
    fits: list[tuple[float, float, str, tuple[int, ...]]] = []
    evaluated = 0
    for node in nodes:
        evaluated += 1
        if node.name in reserved:
            filtered["are kept for a gang ahead of it"] += 1
            continue
        fit = _evaluate(req, executor, node, priority, mode, filtered, ask)
        if fit is not None:
            fits.append((node_cost(node), -fit[0], node.name, fit[1]))
    if len(fits) >= n:
        fits.sort()
        return [Placement(name, gpus, -score) for _, score, name, gpus in fits[:n]]
    return GangNoFit(min(len(fits), n), n, evaluated, dict(filtered))


# --- the reservation of a gang at the head of the queue (MESH_POLICY=priority) -------------


class GangHold:
    """Why a task that fits now waits: nodes are kept for a gang ahead of it in the queue."""

    def __init__(self, gang: str, at: float | None) -> None:
        self.gang, self.at = gang, at

    @property
    def reason(self) -> str:
        when = ("" if self.at is None else
                " until its expected start (tasks whose timeout_s ends before it may use them)")
        return (f"waiting: the nodes it fits on are kept for gang task {self.gang}, ahead of "
                f"it in the queue{when}")


class GangBackoff:
    """Why a gang waits although it may fit: its last attempt did not start in time."""

    def __init__(self, until: float) -> None:
        self.until = until

    @property
    def reason(self) -> str:
        return ("backing off: its members did not all start within MESH_GANG_READY_S last "
                "time; tried again shortly")


class GangReservation:
    """Nodes kept for the first gang in the queue that does not fit (under the `priority`
    policy; `backfill` reserves for any head, gangs included: coordinator/scheduling/policy.py).

    The gang's N nodes are the ones with room for a member first, by the expected ends of
    the work on them (start + `timeout_s`). Until the gang is placed, a task may start on
    one of them only if it ends (now + its own `timeout_s`) by the gang's expected start, or
    uses only what the gang leaves spare there (backfill). When no estimate exists (work
    without `timeout_s`), every node the gang could run on is kept as it frees up. One gang
    holds the reservation at a time, so two gangs never split the nodes between them."""

    def __init__(self) -> None:
        self.holder = ""  # the gang task's id; "" when none
        self.res: Reservation | None = None
        # gang task id -> wall time before which it is not tried again (its members did not
        # all start in time: backoff, as Kueue's waitForPodsReady requeues)
        self.backoff: dict[str, float] = {}

    def clear(self) -> None:
        self.holder, self.res = "", None

    def refresh(self, tasks: Mapping[str, Task]) -> None:
        """Let go once the holder is no longer queued (placed, cancelled, gone)."""
        if self.holder:
            t = tasks.get(self.holder)
            if t is None or t.state is not TaskState.QUEUED:
                self.clear()

    def hold(self, gang: Task, nodes: Iterable[Node], tasks: Mapping[str, Task],
             now: float) -> None:
        """`gang` was tried and does not fit: it holds the reservation unless another does."""
        if self.holder and self.holder != gang.id:
            return
        self.holder, self.res = gang.id, reserve(gang, nodes, tasks, now)

    def allows(self, t: Task, where: Placement, nodes: Mapping[str, Node],
               tasks: Mapping[str, Task], now: float) -> bool:
        """Whether `t` may start at `where` now without delaying the holder."""
        if not self.holder or t.id == self.holder:
            return True
        if self.res is not None:
            return may_pass(self.res, t, where, now)
        gang = tasks.get(self.holder)
        node = nodes.get(where.node)
        return gang is None or node is None or node_outlook(gang, node, tasks, now) is None

    def kept(self) -> Collection[str]:
        """The nodes kept now (those of a finite reservation)."""
        return self.res.spare.keys() if self.res is not None else ()

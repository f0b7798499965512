"""place_gang (coordinator/scheduling/gang.py): N distinct nodes or a counted reason, pure."""

from __future__ import annotations

from coordinator.model import Node
from coordinator.scheduling.gang import GangNoFit, place_gang
from coordinator.scheduling.placement import PlacementIndex
from shared.protocol import GpuInfo
from shared.tasks import Requirements


def _node(name: str, free: int, busy: int = 0, executors: tuple[str, ...] = ("process",),
          labels: dict[str, str] | None = None) -> Node:
    node = Node(name=name, executors=frozenset(executors), labels=labels or {}, slots=4,
                cpu_count=4)
    node.gpus = [GpuInfo(index=i, name="NVIDIA H100 80GB HBM3", vendor="nvidia",
                         memory_total_mb=81920) for i in range(free + busy)]
    for i in range(free, free + busy):
        node.gpu_tasks[i] = {f"t-{name}-{i}"}
        node.tasks.add(f"t-{name}-{i}")
    return node


def _index(nodes: list[Node]) -> PlacementIndex:
    index = PlacementIndex()
    for n in nodes:
        index.update(n)
    return index


def test_n_distinct_nodes_each_fitting_one_member() -> None:
    nodes = [_node(f"n{i}", free=8) for i in range(5)] + [_node("small", free=2, busy=6)]
    req = Requirements(gpu_count=8)
    for view in (nodes, _index(nodes)):
        found = place_gang(req, 4, "process", view)
        assert isinstance(found, list) and len(found) == 4
        assert len({p.node for p in found}) == 4 and "small" not in {p.node for p in found}
        assert all(len(p.gpu_indices) == 8 for p in found)


def test_too_few_nodes_is_a_counted_reason_from_the_index_and_the_list() -> None:
    nodes = [_node("a", free=8), _node("b", free=8), _node("c", free=4, busy=4),
             _node("d", free=8, executors=("docker",)),
             _node("e", free=8, labels={"rack": "r2"})]
    req = Requirements(gpu_count=8)
    for view in (nodes, _index(nodes)):
        found = place_gang(req, 4, "process", view)
        assert isinstance(found, GangNoFit)
        assert (found.fit, found.need) == (3, 4)
        assert found.reason.startswith("3 of 4 nodes fit; waiting for 1 more node to fit")
        assert "1 has fewer than 8 free GPUs" in found.reason, found.reason
        assert "1 does not offer the process executor" in found.reason, found.reason
    racked = Requirements(gpu_count=8, labels={"rack": "r2"})  # a gang kept within one rack
    found = place_gang(racked, 2, "process", _index(nodes))
    assert isinstance(found, GangNoFit) and found.fit == 1


def test_reserved_nodes_are_left_out() -> None:
    nodes = [_node(f"n{i}", free=8) for i in range(3)]
    found = place_gang(Requirements(gpu_count=1), 2, "process", _index(nodes),
                       reserved={"n0", "n1"})
    assert isinstance(found, GangNoFit) and found.fit == 1
    assert "kept for a gang" in found.reason
    ok = place_gang(Requirements(gpu_count=1), 2, "process", _index(nodes), reserved={"n0"})
    assert isinstance(ok, list) and {p.node for p in ok} == {"n1", "n2"}


def test_cpu_gangs_use_slots() -> None:
    nodes = [_node(f"c{i}", free=0) for i in range(3)]
    found = place_gang(Requirements(), 3, "process", _index(nodes))
    assert isinstance(found, list) and sorted(p.node for p in found) == ["c0", "c1", "c2"]
    assert all(p.gpu_indices == () for p in found)

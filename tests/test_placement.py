"""Placement as a pure function: node views in, a decision or a counted reason out."""

from __future__ import annotations

from dataclasses import dataclass, field

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.placement import NoFit, Placement, place
from shared.protocol import GpuInfo
from shared.tasks import Requirements


@dataclass
class View:
    name: str
    online: bool = True
    executors: frozenset[str] = frozenset({"builtin", "process", "docker"})
    labels: dict[str, str] = field(default_factory=dict)
    free_slots: int = 4
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_tasks: dict[int, set[str]] = field(default_factory=dict)
    load: float = 0.0


def gpus(*specs: tuple[str, int, int]) -> list[GpuInfo]:
    """(name, total GB, used GB) per GPU."""
    return [
        GpuInfo(index=i, name=n, vendor="nvidia", memory_total_mb=t * 1024,
                memory_used_mb=u * 1024)
        for i, (n, t, u) in enumerate(specs)
    ]


def test_cpu_task_goes_to_the_idle_node() -> None:
    nodes = [View("busy", load=0.5), View("idle", load=0.0), View("half", load=0.25)]
    assert place(Requirements(), "process", nodes) == Placement("idle", (), 0.0)


def test_ties_go_to_the_first_name() -> None:
    nodes = [View("b"), View("a"), View("c")]
    decision = place(Requirements(), "process", nodes)
    assert isinstance(decision, Placement) and decision.node == "a"


@pytest.mark.parametrize(
    ("req", "executor", "nodes", "needle"),
    [
        (Requirements(), "process", [], "no node has joined"),
        (Requirements(), "process", [View("a", online=False)], "1 are offline"),
        (Requirements(), "docker", [View("a", executors=frozenset({"process"}))],
         "do not offer the docker executor"),
        (Requirements(), "process", [View("a", free_slots=0)], "no free slot"),
        (Requirements(labels={"zone": "eu"}), "process", [View("a")], "labels"),
        (Requirements(gpu_count=1, memory_gb=16), "docker", [View("a")],
         "fewer than 1 free GPU with >= 16 GB free"),
        (Requirements(gpu_count=1, memory_gb=16), "docker",
         [View("a", gpus=gpus(("RTX 4090", 24, 10)))], ">= 16 GB"),
        (Requirements(gpu_count=1, gpu_type="A100"), "docker",
         [View("a", gpus=gpus(("RTX 4090", 24, 0)))], "of type A100"),
        (Requirements(gpu_count=2), "docker",
         [View("a", gpus=gpus(("A100", 80, 0), ("A100", 80, 0)), gpu_tasks={1: {"t"}})],
         "fewer than 2 free GPUs"),
    ],
)
def test_no_fit_says_why(
    req: Requirements, executor: str, nodes: list[View], needle: str
) -> None:
    decision = place(req, executor, nodes)
    assert isinstance(decision, NoFit), decision
    assert needle in decision.reason, decision.reason


def test_gpu_task_gets_free_gpus_with_enough_memory() -> None:
    node = View("a", gpus=gpus(("A100", 80, 70), ("A100", 80, 0), ("A100", 80, 0)),
                gpu_tasks={2: {"other"}})
    decision = place(Requirements(gpu_count=1, memory_gb=40), "docker", [node])
    assert decision == Placement("a", (1,), decision.score)  # 0 lacks memory, 2 is taken


def test_critical_prefers_the_biggest_gpu() -> None:
    small = View("small", gpus=gpus(("RTX 4090", 24, 0), ("RTX 4090", 24, 0)))
    big = View("big", gpus=gpus(("H100", 80, 0)), load=0.9)
    decision = place(Requirements(gpu_count=1), "docker", [small, big], priority=9)
    assert isinstance(decision, Placement) and decision.node == "big"
    low = place(Requirements(gpu_count=1), "docker", [small, big], priority=1)
    assert isinstance(low, Placement) and low.node == "small"  # least loaded


@st.composite
def meshes(draw: st.DrawFn) -> list[View]:
    views = []
    for n in range(draw(st.integers(0, 6))):
        count = draw(st.integers(0, 4))
        specs = [(draw(st.sampled_from(["A100", "H100", "RTX 4090"])),
                  draw(st.sampled_from([16, 24, 80])), 0) for _ in range(count)]
        g = gpus(*specs)
        for gpu in g:
            gpu.memory_used_mb = draw(st.integers(0, gpu.memory_total_mb))
        busy = {i: {"x"} for i in range(count) if draw(st.booleans())}
        views.append(View(f"n{n}", online=draw(st.booleans()), gpus=g, gpu_tasks=busy,
                          free_slots=draw(st.integers(0, 3)), load=draw(st.floats(0, 1))))
    return views


@settings(max_examples=300, deadline=None)
@given(
    nodes=meshes(),
    count=st.integers(0, 3),
    memory=st.sampled_from([0, 8, 20, 40, 79]),
    priority=st.integers(0, 10),
)
def test_never_overallocates_and_memory_always_fits(
    nodes: list[View], count: int, memory: int, priority: int
) -> None:
    req = Requirements(gpu_count=count, memory_gb=memory)
    decision = place(req, "docker", nodes, priority)
    if isinstance(decision, NoFit):
        return
    node = next(n for n in nodes if n.name == decision.node)
    assert node.online
    assert len(decision.gpu_indices) == count == len(set(decision.gpu_indices))
    by_index = {g.index: g for g in node.gpus}
    for i in decision.gpu_indices:
        assert i not in node.gpu_tasks
        g = by_index[i]
        assert g.memory_total_mb - g.memory_used_mb >= memory * 1024
    if count == 0:
        assert node.free_slots > 0

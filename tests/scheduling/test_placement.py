"""Placement as a pure function: node views in, a decision or a counted reason out.

Node snapshots come from tests/fixtures/workers/ (named by hardware, as gpustack keeps
them). Every case runs twice: on a plain list (the exact scan) and through
`PlacementIndex` (the fast path the Mesh uses); both must give a feasible answer, and
they must agree on whether anything fits.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass, field
from pathlib import Path

import msgspec
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from coordinator.scheduling.placement import NoFit, Placement, PlacementIndex, free_mb, place
from shared.protocol import GpuInfo
from shared.tasks import Requirements

FIXTURES = Path(__file__).parents[1] / "fixtures" / "workers"


@dataclass
class View:
    name: str
    online: bool = True
    executors: frozenset[str] = frozenset({"builtin", "process", "docker"})
    labels: dict[str, str] = field(default_factory=dict)
    free_slots: int = 4
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_tasks: dict[int, set[str]] = field(default_factory=dict)
    gpu_shared_mb: dict[int, int] = field(default_factory=dict)
    load: float = 0.0
    unavailable: str = ""


def load_worker(stem: str, **changes: object) -> View:
    doc = json.loads((FIXTURES / f"{stem}.json").read_text())
    view = View(
        name=doc["name"], labels=doc["labels"], free_slots=doc["slots"],
        executors=frozenset(doc["executors"]),
        gpus=msgspec.convert(doc["gpus"], list[GpuInfo]),
    )
    for key, value in changes.items():
        setattr(view, key, value)
    return view


WORKERS = sorted(p.stem for p in FIXTURES.glob("*.json"))
FLEET = [load_worker(stem) for stem in WORKERS]


def gpus(*specs: tuple[str, int, int]) -> list[GpuInfo]:
    """(name, total GB, used GB) per GPU."""
    return [
        GpuInfo(index=i, name=n, vendor="nvidia", memory_total_mb=t * 1024,
                memory_used_mb=u * 1024)
        for i, (n, t, u) in enumerate(specs)
    ]


def both(req: Requirements, executor: str, nodes: list[View], priority: int = 5,
         mode: str = "balanced") -> tuple[Placement | NoFit, Placement | NoFit]:
    index = PlacementIndex()
    for n in nodes:
        index.update(n)
    return place(req, executor, nodes, priority, mode), place(req, executor, index, priority,
                                                             mode)


def assert_feasible(req: Requirements, nodes: list[View], decision: Placement) -> None:
    node = next(n for n in nodes if n.name == decision.node)
    assert node.online
    assert len(decision.gpu_indices) == req.gpu_count == len(set(decision.gpu_indices))
    by_index = {g.index: g for g in node.gpus}
    for i in decision.gpu_indices:
        g = by_index[i]
        if req.shared and i in node.gpu_shared_mb:
            assert g.memory_total_mb - max(g.memory_used_mb, node.gpu_shared_mb[i]) >= \
                req.memory_gb * 1024
        else:
            assert i not in node.gpu_tasks
            assert free_mb(g) >= req.memory_gb * 1024
        if req.gpu_type:
            assert req.gpu_type.lower().replace(" ", "") in g.name.lower().replace(" ", "")
        if req.vendor:
            assert g.vendor == req.vendor
    if req.gpu_count == 0:
        assert node.free_slots > 0


# --- expectations, case by case ---------------------------------------------------------

EXPECT = [
    # (requirements, executor, priority, expected node or None, why)
    (Requirements(), "process", 5, None, "cpu task anywhere that offers process"),
    (Requirements(gpu_count=1, memory_gb=100), "docker", 5, "linux_amd_MI300X_192gx8",
     "only MI300X has > 80 GB"),
    (Requirements(gpu_count=8, memory_gb=80), "docker", 5, None, "H100 or MI300X"),
    (Requirements(gpu_count=8, gpu_type="H100"), "docker", 5, "linux_nvidia_H100_80gx8", ""),
    (Requirements(gpu_count=1, vendor="intel"), "docker", 5, "linux_intel_arc_a770_16gx1", ""),
    (Requirements(gpu_count=1, vendor="apple"), "process", 5, "macos_metal_m3max_48g", ""),
    (Requirements(gpu_count=1, vendor="apple"), "docker", 5, "NOFIT", "mac offers no docker"),
    (Requirements(gpu_count=1, min_compute_capability="9.0"), "docker", 5,
     "linux_nvidia_H100_80gx8", "only Hopper is 9.0"),
    (Requirements(gpu_count=1, gpu_type="A40"), "docker", 5, "linux_nvidia_A40_48gx2_rented",
     "the rented node is used when it is the only fit"),
    (Requirements(gpu_count=2, gpu_type="4090"), "docker", 5, "NOFIT", "one 4090 only"),
    (Requirements(gpu_count=9), "docker", 5, "NOFIT", "no node has 9 GPUs"),
    (Requirements(labels={"os": "macos"}), "process", 5, "macos_metal_m3max_48g", ""),
    (Requirements(node_selector={"rack": "r2"}, gpu_count=1), "docker", 5,
     "linux_amd_MI300X_192gx8", ""),
    (Requirements(labels={"rack": "r9"}), "process", 5, "NOFIT", "no such label"),
    (Requirements(gpu_count=1), "docker", 9, "linux_amd_MI300X_192gx8",
     "critical takes the most powerful GPU (MI300X by TFLOPS)"),
    (Requirements(gpu_count=1, vendor="nvidia"), "docker", 9, "linux_nvidia_H100_80gx8",
     "critical among NVIDIA: H100"),
    (Requirements(gpu_count=1, balancing="endurance", vendor="nvidia"), "docker", 5,
     "linux_nvidia_4090_24gx1", "coolest NVIDIA card"),
    (Requirements(gpu_count=1, balancing="efficiency", vendor="nvidia"), "docker", 5,
     "linux_nvidia_H100_80gx8", "H100: most TFLOPS per watt among the NVIDIA cards here"),
    (Requirements(gpu_count=2, memory_gb=16), "docker", 5, None, "a mixed node never fits 2"),
]


@pytest.mark.parametrize("use_index", [False, True], ids=["scan", "index"])
@pytest.mark.parametrize(("req", "executor", "priority", "expected", "why"), EXPECT)
def test_fleet_expectations(
    req: Requirements, executor: str, priority: int, expected: str | None, why: str,
    use_index: bool,
) -> None:
    scan, fast = both(req, executor, FLEET, priority)
    decision = fast if use_index else scan
    if expected == "NOFIT":
        assert isinstance(decision, NoFit), why
        assert decision.reason.startswith("no node fits"), decision.reason
        return
    assert isinstance(decision, Placement), (why, decision)
    assert_feasible(req, FLEET, decision)
    if expected is not None:
        assert decision.node == expected, why


def test_owned_nodes_come_before_rented_ones() -> None:
    rented = load_worker("linux_nvidia_A40_48gx2_rented")
    owned = load_worker("linux_nvidia_4090_24gx1")
    for decision in both(Requirements(gpu_count=1, memory_gb=16), "docker", [rented, owned]):
        assert isinstance(decision, Placement) and decision.node == owned.name
    owned.gpu_tasks = {0: {"busy"}}
    for decision in both(Requirements(gpu_count=1, memory_gb=16), "docker", [rented, owned]):
        assert isinstance(decision, Placement) and decision.node == rented.name


def test_cpu_task_goes_to_the_idle_node() -> None:
    nodes = [View("busy", load=0.5, free_slots=1), View("idle", load=0.0, free_slots=4),
             View("half", load=0.25, free_slots=2)]
    for decision in both(Requirements(), "process", nodes):
        assert isinstance(decision, Placement) and decision.node == "idle"


def test_ties_go_to_the_first_name_on_the_scan() -> None:
    decision = place(Requirements(), "process", [View("b"), View("a"), View("c")])
    assert isinstance(decision, Placement) and decision.node == "a"


@pytest.mark.parametrize(
    ("req", "executor", "nodes", "needle"),
    [
        (Requirements(), "process", [], "no node has joined"),
        (Requirements(), "process", [View("a", online=False)], "1 is offline"),
        (Requirements(), "docker", [View("a", executors=frozenset({"process"}))],
         "1 does not offer the docker executor"),
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
        (Requirements(gpu_count=1, min_compute_capability="9.0"), "docker",
         [load_worker("linux_nvidia_4090_24gx1")], "compute capability >= 9.0"),
    ],
)
def test_no_fit_says_why(
    req: Requirements, executor: str, nodes: list[View], needle: str
) -> None:
    for decision in both(req, executor, nodes):
        assert isinstance(decision, NoFit), decision
        assert needle in decision.reason, decision.reason


def test_gpu_task_gets_free_gpus_with_enough_memory() -> None:
    node = View("a", gpus=gpus(("A100", 80, 70), ("A100", 80, 0), ("A100", 80, 0)),
                gpu_tasks={2: {"other"}})
    for decision in both(Requirements(gpu_count=1, memory_gb=40), "docker", [node]):
        assert isinstance(decision, Placement) and decision.gpu_indices == (1,)


def test_low_priority_goes_to_the_least_loaded_node() -> None:
    small = View("small", gpus=gpus(("RTX 4090", 24, 0), ("RTX 4090", 24, 0)), load=0.1)
    big = View("big", gpus=gpus(("H100", 80, 0)), load=0.9)
    crit = place(Requirements(gpu_count=1), "docker", [small, big], priority=9)
    assert isinstance(crit, Placement) and crit.node == "big"
    low = place(Requirements(gpu_count=1), "docker", [small, big], priority=1)
    assert isinstance(low, Placement) and low.node == "small"


def test_shared_gpu_is_reused_only_by_shared_tasks_when_memory_fits() -> None:
    node = View("a", gpus=gpus(("A100", 80, 0)), gpu_tasks={0: {"s1"}},
                gpu_shared_mb={0: 30 * 1024})
    for decision in both(Requirements(gpu_count=1, memory_gb=40, shared=True), "docker",
                         [node]):
        assert isinstance(decision, Placement) and decision.gpu_indices == (0,)
    for decision in both(Requirements(gpu_count=1, memory_gb=60, shared=True), "docker",
                         [node]):
        assert isinstance(decision, NoFit)
    for decision in both(Requirements(gpu_count=1, memory_gb=1), "docker", [node]):
        assert isinstance(decision, NoFit)  # an exclusive task never joins a shared GPU
    node.gpu_shared_mb = {}  # held exclusively: not even shared tasks join
    for decision in both(Requirements(gpu_count=1, memory_gb=1, shared=True), "docker",
                         [node]):
        assert isinstance(decision, NoFit)


def test_index_follows_updates() -> None:
    node = load_worker("linux_nvidia_4090_24gx1")
    index = PlacementIndex()
    index.update(node)
    req = Requirements(gpu_count=1)
    assert isinstance(place(req, "docker", index), Placement)
    node.gpu_tasks = {0: {"t"}}
    index.update(node)
    assert isinstance(place(req, "docker", index), NoFit)
    node.gpu_tasks = {}
    node.online = False
    index.update(node)
    assert "offline" in place(req, "docker", index).reason  # type: ignore[union-attr]
    index.remove(node.name)
    assert len(index) == 0


# --- the cross product: every fixture pair x requirement shape x priority ----------------

SHAPES = [
    Requirements(),
    Requirements(gpu_count=1),
    Requirements(gpu_count=1, memory_gb=20),
    Requirements(gpu_count=2, memory_gb=40),
    Requirements(gpu_count=4),
    Requirements(gpu_count=1, vendor="amd"),
    Requirements(gpu_count=1, gpu_type="RTX"),
    Requirements(gpu_count=1, balancing="endurance"),
    Requirements(gpu_count=2, balancing="efficiency"),
]
PAIRS = list(itertools.combinations(WORKERS, 2))[::3]


@pytest.mark.parametrize("priority", [1, 5, 9])
@pytest.mark.parametrize("shape", range(len(SHAPES)))
@pytest.mark.parametrize("pair", PAIRS, ids=lambda p: f"{p[0][:18]}+{p[1][:18]}")
def test_fixture_pairs(pair: tuple[str, str], shape: int, priority: int) -> None:
    nodes = [load_worker(stem) for stem in pair]
    nodes[1].gpu_tasks = {g.index: {"busy"} for g in nodes[1].gpus[::2]}  # half busy
    req = SHAPES[shape]
    scan, fast = both(req, "docker", nodes, priority)
    assert isinstance(scan, Placement) == isinstance(fast, Placement), (scan, fast)
    for decision in (scan, fast):
        if isinstance(decision, Placement):
            assert_feasible(req, nodes, decision)


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
        shared = {i: draw(st.integers(0, 40 * 1024)) for i in busy if draw(st.booleans())}
        labels = {"cost_per_hour": "2"} if draw(st.booleans()) else {}
        views.append(View(f"n{n}", online=draw(st.booleans()), gpus=g, gpu_tasks=busy,
                          gpu_shared_mb=shared, labels=labels,
                          free_slots=draw(st.integers(0, 3)), load=draw(st.floats(0, 1))))
    return views


@settings(max_examples=400, deadline=None)
@given(
    nodes=meshes(),
    count=st.integers(0, 3),
    memory=st.sampled_from([0, 8, 20, 40, 79]),
    priority=st.integers(0, 10),
    shared=st.booleans(),
    mode=st.sampled_from(["speed", "efficiency", "balanced", "endurance"]),
)
def test_never_overallocates_and_both_paths_agree(
    nodes: list[View], count: int, memory: int, priority: int, shared: bool, mode: str
) -> None:
    req = Requirements(gpu_count=count, memory_gb=memory, shared=shared)
    scan, fast = both(req, "docker", nodes, priority, mode)
    assert isinstance(scan, Placement) == isinstance(fast, Placement)
    for decision in (scan, fast):
        if isinstance(decision, Placement):
            assert_feasible(req, nodes, decision)

"""The engine: a trace of jobs through the live coordinator's scheduling code, on a virtual clock.

`simulate(jobs, cluster, policy)` builds simulated nodes (real `coordinator.model.Node`s with
fake GPUs), turns each job into a real `Task` when it is submitted, and runs the same
dispatch pass the Mesh runs (`coordinator/core/dispatch.py`): the same queue
(coordinator/scheduling/fairqueue.py, queue.py), fair share and quotas (tenants.py), placement
(placement.py), wake-ups of parked classes (wake.py) and policy (policy.py). A change to any
of them changes the simulation; there is no second scheduler here.

What the engine does in the Mesh's place is only the bookkeeping of a transition: a placed
job holds its GPUs from its start to start + its true duration (no node round trip, no
accept step: assigned is running), then lets go, and the same wake-ups follow as in the
Mesh (`_node_changed`, the tenant's quota wake). The clock jumps from event to event; at
each instant, finishes first, then submissions, then one dispatch pass. Nothing sleeps,
nothing touches a socket or a store; the same input and seed give the same output.

What the scheduler sees of a job's length is its `timeout_s`, drawn from `estimate`:
`exact` (the true duration), `x2` (twice it), `lognormal:SIGMA` (the true duration times
e^N(0, SIGMA), from `seed`), `cap:SECONDS` (everyone asks for the site's limit, SECONDS).
A job runs its true duration whatever its estimate (the simulator never ends one at its
`timeout_s`).

A job with `nodes` > 1 is a gang task (coordinator/core/gangs.py): its GPUs split evenly
over that many nodes, placed all or nothing by the live code (coordinator/scheduling/gang.py),
a member task holding each node's share. A job wider than every node that could run it
becomes such a gang over as few nodes as hold it (64 GPUs on 8-GPU nodes: 8 x 8). What
cannot run at all is skipped and counted in `SimResult.skipped` (the live coordinator
refuses it at submit): no GPU asked, no node of its type, GPUs that do not split evenly,
more nodes than the cluster has for it. Not simulated: node failures, and preemption (no
trace here carries critical work).
"""

from __future__ import annotations

import heapq
import math
import random
import resource
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import msgspec

from coordinator.core.dispatch import dispatch_pass
from coordinator.model import Node, Task, TaskState
from coordinator.scheduling.fairqueue import FairQueue
from coordinator.scheduling.fairshare import tenant_of
from coordinator.scheduling.placement import Placement, PlacementIndex
from coordinator.scheduling.placement import _norm as norm_gpu_name  # placement's own rule
from coordinator.scheduling.policy import STRICT, queue_class, rank
from coordinator.scheduling.tenants import Tenants
from coordinator.scheduling.wake import node_wake_keys
from coordinator.settings import POLICIES as POLICIES
from coordinator.settings import Settings
from shared.protocol import GpuInfo
from shared.tasks import MAX_GANG_NODES, Requirements, TaskSubmit

TIMELINE_POINTS = 5_000  # the most samples a SimResult's timeline keeps
GPU_MB = 81_920  # the memory of every simulated GPU (jobs ask for none)
EXECUTOR = "process"

_enc = msgspec.json.Encoder()


@dataclass(frozen=True, slots=True)
class SimJob:
    id: str
    submit_s: float
    duration_s: float
    gpus: int
    tenant: str
    priority: int = 5
    nodes: int = 1
    gpu_type: str = ""


@dataclass(frozen=True, slots=True)
class NodeGroup:
    count: int
    gpus_per_node: int
    gpu_type: str


@dataclass(slots=True)
class JobRecord:
    job: SimJob
    start_s: float
    end_s: float
    node: str  # node names joined by "," for a gang
    held: tuple[tuple[str, tuple[int, ...]], ...] = ()  # (node, GPU indices) per node


@dataclass
class SimResult:
    policy: str
    records: list[JobRecord]  # in submission order
    timeline: list[tuple[float, int, int]]  # (t, queued jobs, busy GPUs)
    total_gpus: int
    wall_s: float
    peak_rss_mb: float  # the peak resident memory of this process so far
    skipped: dict[str, int] = field(default_factory=dict)  # why -> jobs not simulated
    estimate: str = "exact"
    cpu_s: float = 0.0  # the CPU time the simulation took (wall_s counts waits for a CPU too)


def estimator(estimate: str, seed: int) -> Callable[[float], float]:
    """The model of users' `timeout_s`: a job's true duration in, what it asks for out."""
    kind, _, arg = estimate.partition(":")
    if kind == "exact" and not arg:
        return lambda d: d
    if kind == "x2" and not arg:
        return lambda d: 2.0 * d
    try:
        value = float(arg)
    except ValueError:
        value = math.nan
    if kind == "lognormal" and math.isfinite(value) and value >= 0:
        rng = random.Random(seed)
        return lambda d: d * math.exp(rng.gauss(0.0, value))
    if kind == "cap" and math.isfinite(value) and value > 0:
        return lambda d: value
    raise ValueError(f"estimate {estimate!r}: expected exact | x2 | lognormal:SIGMA (>= 0) | "
                     "cap:SECONDS (> 0)")


class _Cluster:
    """The dispatch pass's host (coordinator/core/dispatch.py `DispatchHost`): the simulated
    nodes, the queue, the tenants and the unfinished tasks, on a virtual clock."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.now = 0.0
        self.fair = Tenants(settings, clock=lambda: self.now)
        self.tasks: dict[str, Task] = {}  # unfinished, gang members included
        self.members: dict[str, list[Task]] = {}  # a running gang's member tasks
        self.nodes: dict[str, Node] = {}
        self.index = PlacementIndex()
        self.queue = FairQueue(self._is_queued, self.fair.choose,
                               by_head=settings.policy in STRICT)

    def _is_queued(self, task_id: str) -> bool:
        t = self.tasks.get(task_id)
        return t is not None and t.state is TaskState.QUEUED

    def add_node(self, name: str, gpus: int, gpu_type: str) -> None:
        node = Node(name=name, executors=frozenset({EXECUTOR}), slots=0, gpus=[
            GpuInfo(index=i, name=gpu_type or "GPU", vendor="nvidia", memory_total_mb=GPU_MB)
            for i in range(gpus)
        ])
        self.nodes[name] = node
        self.index.update(node)

    def enqueue(self, t: Task) -> None:
        """As `Mesh._new_task` and `Mesh._enqueue`."""
        self.tasks[t.id] = t
        self.fair.count(t, None, TaskState.QUEUED)
        settings = self.settings
        self.queue.push(queue_class(t, settings.policy),
                        rank(settings.policy, settings.aging_s, t),
                        t.seq, t.id, tenant_of(t.tenant))

    def start(self, t: Task, where: list[Placement]) -> None:
        """As the Mesh's queued -> assigned edge (`_queued_assigned`, `_count`); a gang
        (several placements) as core/gangs.py `start`: a member task per node holds its
        GPUs, the gang's own task none."""
        holders = [t]
        if t.gang_size > 1:
            holders = [self._member(t, rank) for rank in range(len(where))]
            self.members[t.id] = holders
            self._hold(t, None)
        for m, p in zip(holders, where, strict=True):
            self._hold(m, p)

    def _member(self, t: Task, rank: int) -> Task:
        m = Task(id=f"{t.id}.{rank}", seq=t.seq, task_type=t.task_type, priority=t.priority,
                 executor=t.executor, req_raw=t.req_raw, spec_raw=t.spec_raw,
                 params_raw=t.params_raw, max_attempts=1, tenant=t.tenant,
                 submitted_at=self.now, _spec=t.spec)
        self.tasks[m.id] = m
        self.fair.count(m, None, TaskState.QUEUED)
        return m

    def _hold(self, t: Task, where: Placement | None) -> None:
        t.attempt += 1
        t.assigned_at = t.started_at = self.now
        if where is not None:
            node = self.nodes[where.node]
            t.node, t.gpu_indices = node.name, where.gpu_indices
            node.hold(t)
            self.index.update(node)
        t.state = TaskState.RUNNING
        self.fair.count(t, TaskState.QUEUED, TaskState.RUNNING)

    def finish(self, t: Task) -> None:
        """As the Mesh's running -> completed edge (`_finish`, `_node_changed`, `_count`),
        for each member of a gang first."""
        for m in self.members.pop(t.id, ()):
            self.finish(m)
        t.finished_at = self.now
        if t.node is not None:
            node = self.nodes[t.node]
            node.release(t)
            self.index.update(node)
            if self.queue.blocked:
                self.queue.wake(node_wake_keys(node))
        del self.tasks[t.id]
        t.state = TaskState.COMPLETED
        if self.fair.count(t, TaskState.RUNNING, TaskState.COMPLETED):
            self.queue.wake_tenant(tenant_of(t.tenant))


def _node_names(cluster: Sequence[NodeGroup]) -> list[tuple[str, int, str]]:
    nodes = []
    for g, group in enumerate(cluster):
        if group.count < 0 or group.gpus_per_node < 1:
            raise ValueError(f"node group {g}: {group.count} nodes x {group.gpus_per_node} GPUs: "
                             "expected >= 0 nodes of >= 1 GPU")
        kind = group.gpu_type or "gpu"
        nodes += [(f"{kind}-{g}-{k:04d}", group.gpus_per_node, group.gpu_type)
                  for k in range(group.count)]
    return nodes


def _shape(job: SimJob, cluster: Sequence[NodeGroup]) -> tuple[int, int] | str:
    """(nodes, GPUs per node) the job runs on, or why it cannot be simulated. A job wider
    than every node that could run it is split evenly over as few nodes as hold it: a gang,
    as `nodes` > 1 is (coordinator/core/gangs.py)."""
    if job.gpus < 1:
        return "asks no GPU"
    if job.nodes < 1:
        return "asks no node"
    fits = [g for g in cluster if g.count > 0 and (
        not job.gpu_type or norm_gpu_name(job.gpu_type) in norm_gpu_name(g.gpu_type or "GPU"))]
    if not fits:
        return "no node of its GPU type"
    widest = max(g.gpus_per_node for g in fits)
    nodes = job.nodes
    if nodes == 1 and job.gpus > widest:
        nodes = math.ceil(job.gpus / widest)
    if job.gpus % nodes:
        return "its GPUs do not split evenly over its nodes"
    per_node = job.gpus // nodes
    if nodes > MAX_GANG_NODES:
        return f"a gang of more than {MAX_GANG_NODES} nodes"
    if nodes > sum(g.count for g in fits if g.gpus_per_node >= per_node):
        return "more nodes than the cluster has for it"
    return nodes, per_node


def simulate(
    jobs: Sequence[SimJob], cluster: Sequence[NodeGroup], policy: str, *,
    estimate: str = "exact", seed: int = 0,
) -> SimResult:
    """Replay `jobs` on `cluster` under `policy` (one of POLICIES); see the module docstring."""
    began, cpu = time.perf_counter(), time.process_time()
    if policy not in POLICIES:
        raise ValueError(f"policy {policy!r}: expected one of {', '.join(POLICIES)}")
    guess = estimator(estimate, seed)
    for job in jobs:
        if not (math.isfinite(job.submit_s) and math.isfinite(job.duration_s)
                and job.duration_s >= 0):
            raise ValueError(f"job {job.id}: submit {job.submit_s} and duration "
                             f"{job.duration_s} must be finite, the duration >= 0")
    host = _Cluster(Settings(policy=policy))
    total_gpus = 0
    for name, gpus, gpu_type in _node_names(cluster):
        host.add_node(name, gpus, gpu_type)
        total_gpus += gpus

    order = sorted(range(len(jobs)), key=lambda i: (jobs[i].submit_s, i))
    skipped: dict[str, int] = {}
    todo: list[tuple[SimJob, int, int]] = []  # (job, nodes, GPUs per node)
    for i in order:
        shape = _shape(jobs[i], cluster)
        if isinstance(shape, str):
            skipped[shape] = skipped.get(shape, 0) + 1
        else:
            todo.append((jobs[i], *shape))

    encoded: dict[tuple[int, str], bytes] = {}
    records: list[JobRecord | None] = [None] * len(todo)
    ends: list[tuple[float, int, str]] = []  # (end, seq, task id): the finishes to come
    timeline: list[tuple[float, int, int]] = []
    busy = queued = 0

    def submit(seq: int, job: SimJob, nodes: int, per_node: int) -> None:
        requirements = Requirements(gpu_count=per_node, gpu_type=job.gpu_type)
        spec = TaskSubmit(task_type="custom", command=["simulated"], priority=job.priority,
                          requirements=requirements, tenant=job.tenant, nodes=nodes,
                          timeout_s=guess(job.duration_s))
        req_raw = encoded.get((per_node, job.gpu_type))
        if req_raw is None:
            req_raw = encoded[(per_node, job.gpu_type)] = _enc.encode(requirements)
        host.enqueue(Task(
            id=str(seq), seq=seq, task_type="custom", priority=job.priority, executor=EXECUTOR,
            req_raw=req_raw, spec_raw=_enc.encode(spec), params_raw=b"{}", max_attempts=1,
            tenant=job.tenant, submitted_at=job.submit_s, _spec=spec,
        ))

    def assign_gang(t: Task, found: list[Placement]) -> None:
        nonlocal busy, queued
        host.start(t, found)
        job = todo[t.seq][0]
        end = host.now + job.duration_s
        records[t.seq] = JobRecord(job, host.now, end, ",".join(p.node for p in found),
                                   tuple((p.node, p.gpu_indices) for p in found))
        heapq.heappush(ends, (end, t.seq, t.id))
        busy += sum(len(p.gpu_indices) for p in found)
        queued -= 1

    def assign(t: Task, where: Placement, hold_s: float) -> None:
        assign_gang(t, [where])

    nxt = 0
    while nxt < len(todo) or ends:
        now = min(todo[nxt][0].submit_s if nxt < len(todo) else math.inf,
                  ends[0][0] if ends else math.inf)
        host.now = now
        while ends and ends[0][0] <= now:
            seq = heapq.heappop(ends)[1]
            record = records[seq]
            assert record is not None
            busy -= sum(len(gpus) for _, gpus in record.held)
            host.finish(host.tasks[str(seq)])
        while nxt < len(todo) and todo[nxt][0].submit_s <= now:
            submit(nxt, *todo[nxt])
            queued += 1
            nxt += 1
        dispatch_pass(host, assign, assign_gang=assign_gang)
        if not timeline or timeline[-1][1:] != (queued, busy):
            timeline.append((now, queued, busy))

    done = [r for r in records if r is not None]
    if len(done) != len(todo):
        raise RuntimeError(f"{len(todo) - len(done)} jobs never started: the cluster cannot run "
                           "them (a dispatch pass left work queued with nothing running)")
    return SimResult(
        policy=policy, records=done, timeline=_downsample(timeline), total_gpus=total_gpus,
        wall_s=time.perf_counter() - began,
        peak_rss_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        skipped=skipped, estimate=estimate, cpu_s=time.process_time() - cpu,
    )


def _downsample(timeline: list[tuple[float, int, int]]) -> list[tuple[float, int, int]]:
    """At most TIMELINE_POINTS samples, evenly spaced by index, the last one kept."""
    if len(timeline) <= TIMELINE_POINTS:
        return timeline
    step = math.ceil(len(timeline) / (TIMELINE_POINTS - 1))
    return timeline[::step] + [timeline[-1]]

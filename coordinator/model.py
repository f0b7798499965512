"""The coordinator's records: a task and its lifecycle states, a node and what it holds."""

from __future__ import annotations

import asyncio
import hashlib
import secrets
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Protocol

import msgspec

from shared.policy import PolicyAsk
from shared.protocol import GpuInfo, Msg, NodePolicy
from shared.tasks import GangRef, TaskSubmit


class TaskState(StrEnum):
    QUEUED = "queued"
    ASSIGNED = "assigned"
    RUNNING = "running"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    LOST = "lost"  # transient: its node went away; next comes queued or failed


ACTIVE = frozenset({TaskState.ASSIGNED, TaskState.RUNNING})
UNFINISHED = frozenset({TaskState.QUEUED, TaskState.ASSIGNED, TaskState.RUNNING, TaskState.LOST})
FINISHED = frozenset({TaskState.COMPLETED, TaskState.FAILED, TaskState.CANCELLED})

def new_task_id() -> str:
    """A UUIDv7 (RFC 9562) in 32 hex digits: 74 random bits under a millisecond clock.

    Unique and opaque like uuid4, but later ids sort later, so the store's primary-key
    index grows at its end: with uuid4 every insert lands on a random page, and the
    submit rate at 1M queued fell to half of the rate at 1k.
    """
    ms, rand = time.time_ns() // 1_000_000, secrets.randbits(74)
    version, variant = 0x7 << 76, 0b10 << 62
    value = ms << 80 | version | (rand >> 62) << 64 | variant | (rand & (1 << 62) - 1)
    return uuid.UUID(int=value).hex


_spec_decoder = msgspec.json.Decoder(TaskSubmit)
_enc_ask = msgspec.json.Encoder()
# Submissions are encoded without defaults: a spec without these keys asks nothing of policy.
_POLICY_KEYS = (b'"image"', b'"volumes"', b'"env"')
_PINNED = b'"preemptible":false'  # encoded without defaults: present only when false


@dataclass(slots=True, eq=False)
class Task:
    """One task. `spec_raw` stays encoded until it is needed (assignment, display)."""

    id: str
    seq: int  # submission order: a requeued task keeps it, so it runs before newer work
    task_type: str
    priority: int
    executor: str
    req_raw: bytes  # canonical msgspec encoding: equal requirements, equal bytes
    spec_raw: bytes
    params_raw: bytes
    max_attempts: int
    tenant: str
    submitted_at: float
    state: TaskState = TaskState.QUEUED
    attempt: int = 0
    node: str | None = None
    gpu_indices: tuple[int, ...] = ()
    assigned_at: float | None = None
    started_at: float | None = None
    finished_at: float | None = None
    result: dict[str, Any] | None = None
    error: str = ""
    energy_j: float = 0.0  # integrated from the power of its GPUs while it held them
    _spec: TaskSubmit | None = None
    infra_retries: int = 0  # requeues after node faults: they do not spend max_attempts
    # Why each attempt that was not the task's own outcome ended (node lost, node fault,
    # lost with a client restart): {at, attempt, node, cause, infra}. Durable; after a
    # restart infra_retries is rebuilt from it (the count of `infra` events).
    history: list[dict[str, Any]] = field(default_factory=list)
    _ask: PolicyAsk | None = None  # what node policy judges; cached, derived from the spec
    # The store write of its latest transition; until it resolves, nothing outside may see it.
    pending: asyncio.Future[None] | None = None
    # (attempt, node epoch, n): that attempt's `assign` was the n-th sent on that connection
    # (Node.assigns_sent); a heartbeat counting fewer was made before the node had it.
    sent_as: tuple[int, int, int] | None = None
    _gang: tuple[int, GangRef | None] | None = None  # (gang size, member ref), from the spec

    @property
    def spec(self) -> TaskSubmit:
        if self._spec is None:
            self._spec = _spec_decoder.decode(self.spec_raw)
        return self._spec

    def _gang_of(self) -> tuple[int, GangRef | None]:
        if self._gang is None:  # the substring test spares most tasks a decode of their spec
            raw = self.spec_raw
            if b'"nodes":' in raw or b'"gang":' in raw:
                self._gang = (self.spec.nodes, self.spec.gang)
            else:
                self._gang = (1, None)
        return self._gang

    @property
    def gang_size(self) -> int:
        """More than 1: a gang task (coordinator/core/gangs.py), placed all or nothing."""
        return self._gang_of()[0]

    @property
    def member_of(self) -> GangRef | None:
        """Set when this task is one member (one rank) of a gang's attempt."""
        return self._gang_of()[1]

    @property
    def class_key(self) -> tuple[str, bytes]:
        """Tasks that placement cannot tell apart share a queue class: same executor and
        requirements, and (for node policy) the same image, volumes and env names.
        `preemptible: false` work has classes of its own: a tenant's quota of it
        (coordinator/scheduling/tenants.py) must not hold preemptible work queued behind it."""
        digest = self.policy_digest
        key = self.req_raw + b"\0" + digest if digest else self.req_raw
        if self.gang_size > 1:  # a gang never shares a class with single tasks
            key += b"\0gang%d" % self.gang_size
        return (self.executor, key + b"\0np" if _PINNED in self.spec_raw else key)

    @property
    def policy_ask(self) -> PolicyAsk:
        if self._ask is None:
            self._ask = PolicyAsk(self.executor, tenant=self.tenant)
            if any(k in self.spec_raw for k in _POLICY_KEYS):
                spec = self.spec
                self._ask = PolicyAsk(
                    self.executor, spec.image or "", tuple(sorted(spec.volumes)),
                    tuple(sorted(spec.env)), self.tenant,
                )
        return self._ask

    @property
    def policy_digest(self) -> bytes:
        ask = self.policy_ask
        if ask.trivial:
            return b""
        return hashlib.blake2b(
            _enc_ask.encode((ask.image, ask.volumes, ask.env_names)), digest_size=8
        ).digest()

    def log_context(self, **more: Any) -> dict[str, Any]:
        return {"task": self.id, "attempt": self.attempt, "node": self.node, **more}


class Link(Protocol):
    """Where the Mesh sends a node's messages. Sending never blocks; the transport drains."""

    def send(self, msg: Msg) -> None: ...

    def close(self, code: int, reason: str) -> None: ...


@dataclass(frozen=True, slots=True)
class DrainMark:
    """An admin's drain of a node (coordinator/core/drain.py): why, since when (epoch s), by
    whom."""

    reason: str
    since: float
    by: str


@dataclass(eq=False)
class Node:
    name: str
    status: str = "online"  # online | disconnected | lost
    link: Link | None = None
    epoch: int = 0  # bumped on every (re)connect, so old timers know they are stale
    hostname: str = ""
    role: str = "compute"
    version: str = ""
    protocol: int = 1
    seed_form: bool = False
    executors: frozenset[str] = frozenset()
    policy: NodePolicy | None = None  # what it agrees to run, from its register
    isolation: str = ""  # how it isolates process tasks: user+cgroup | user | none ("": unstated)
    labels: dict[str, str] = field(default_factory=dict)
    slots: int = 1
    cpu_count: int = 0
    memory_mb: int = 0
    gpus: list[GpuInfo] = field(default_factory=list)
    gpu_tasks: dict[int, set[str]] = field(default_factory=dict)  # GPU index -> task ids
    gpu_shared_mb: dict[int, int] = field(default_factory=dict)  # held by shared tasks only
    cpu_tasks: set[str] = field(default_factory=set)  # tasks holding a CPU slot
    tasks: set[str] = field(default_factory=set)  # every task currently placed here
    cpu_pct: float = 0.0
    memory_used_mb: int = 0
    load1: float = 0.0
    last_seen: float = field(default_factory=time.monotonic)
    connected_at: float = field(default_factory=time.time)
    completed: int = 0
    failed: int = 0
    # (time, cpu %, mean GPU utilisation %, GPU memory used MB, GPU power W) per heartbeat
    history: deque[tuple[float, float, float, int, float]] = field(
        default_factory=lambda: deque(maxlen=120)
    )
    energy_j: float = 0.0
    power_at: float = 0.0  # monotonic time of the last power sample
    grace: asyncio.TimerHandle | None = None
    # Failing well (coordinator/core/faults.py): the node's own health report, its quarantine,
    # its infrastructure errors, and the reconciliation of heartbeats' `running` lists.
    health: str = ""  # "" when the node says it can run work; else why not
    quarantine_reason: str = ""  # "" when not quarantined
    quarantined_at: float = 0.0  # monotonic
    infra_errors: deque[float] = field(default_factory=lambda: deque(maxlen=64))
    infra_total: int = 0
    infra_last: str = ""
    hb_epoch: int = -1  # the connection the reconciliation baseline belongs to
    hb_prev_at: float = 0.0  # wall time of the previous heartbeat on this connection
    missing: dict[str, int] = field(default_factory=dict)  # task id -> heartbeats missed
    assigns_sent: int = 0  # `assign` messages sent on the current connection (epoch)
    drain: DrainMark | None = None  # an admin drained it: no new work (coordinator/core/drain.py)
    address: str = ""  # where peers reach it: its register's `address`, else its socket's peer

    @property
    def online(self) -> bool:
        return self.status == "online"

    @property
    def unavailable(self) -> str:
        """Why placement must skip this online node ("" when it may get work)."""
        if self.drain is not None:
            return "are draining"
        if self.quarantine_reason:
            return f"are quarantined ({self.quarantine_reason})"
        if self.health:
            return f"are unhealthy ({self.health})"
        return ""

    @property
    def free_slots(self) -> int:
        return self.slots - len(self.cpu_tasks)

    def free_gpu_count(self) -> int:
        return sum(1 for g in self.gpus if not self.gpu_tasks.get(g.index) and not g.fault)

    @property
    def load(self) -> float:
        """Share of this node's capacity in use, 0..1: what "idle first" compares."""
        capacity = self.slots + len(self.gpus)
        return len(self.tasks) / capacity if capacity else 1.0

    def hold(self, task: Task) -> None:
        self.tasks.add(task.id)
        if not task.gpu_indices:
            self.cpu_tasks.add(task.id)
            return
        req = task.spec.requirements
        for i in task.gpu_indices:
            holders = self.gpu_tasks.setdefault(i, set())
            if req.shared and (not holders or i in self.gpu_shared_mb):
                self.gpu_shared_mb[i] = self.gpu_shared_mb.get(i, 0) + int(req.memory_gb * 1024)
            else:
                self.gpu_shared_mb.pop(i, None)  # an exclusive holder: nobody may join
            holders.add(task.id)

    def release(self, task: Task) -> None:
        self.tasks.discard(task.id)
        self.cpu_tasks.discard(task.id)
        req = task.spec.requirements if task.gpu_indices else None
        for i in task.gpu_indices:
            holders = self.gpu_tasks.get(i)
            if holders is None:
                continue
            holders.discard(task.id)
            if not holders:
                del self.gpu_tasks[i]
                self.gpu_shared_mb.pop(i, None)
            elif req is not None and req.shared and i in self.gpu_shared_mb:
                self.gpu_shared_mb[i] -= int(req.memory_gb * 1024)

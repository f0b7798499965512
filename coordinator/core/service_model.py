"""The records of model services (issue 27): a service, its replicas, and what the control
plane (coordinator/core/services.py) reads on the Mesh. The router reads these too."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from coordinator.model import Task
from shared.services import ServiceSpec
from shared.tasks import TaskSubmit

if TYPE_CHECKING:
    from coordinator.settings import Settings
    from coordinator.storage.store_core import GroupCommitStore, Write

STARTING, READY, UNHEALTHY, STOPPING = "starting", "ready", "unhealthy", "stopping"


@dataclass(eq=False)
class Replica:
    """One replica: one task; `attempt` and `node` are those its last report came from."""

    task_id: str
    attempt: int
    node: str
    state: str  # "starting" | "ready" | "unhealthy" | "stopping"
    outstanding: int = 0  # requests in flight: the router changes it via started/finished
    port: int = 0
    retiring: bool = False  # to be replaced: stopped once a new replica is ready
    ready_timer: asyncio.TimerHandle | None = None  # MESH_SERVICE_READY_S after placement
    unhealthy_timer: asyncio.TimerHandle | None = None  # MESH_SERVICE_UNHEALTHY_S after unhealthy
    reason: str = ""


@dataclass(eq=False)
class Service:
    name: str
    model: str
    tenant: str
    spec: ServiceSpec
    task: TaskSubmit  # what each replica runs (an engine template filled in)
    created_at: float
    updated_at: float
    replicas: dict[str, Replica] = field(default_factory=dict)  # by task id
    desired: int = 0
    adding: int = 0  # replicas being submitted, not yet marked (coordinator/core/services.py)
    outstanding: int = 0
    last_request: float = field(default_factory=time.monotonic)
    crashes: int = 0  # consecutive replica ends since one was last ready
    backoff_until: float = 0.0  # monotonic: no new replica before
    restart_timer: asyncio.TimerHandle | None = None
    idle_timer: asyncio.TimerHandle | None = None
    ready_event: asyncio.Event = field(default_factory=asyncio.Event)
    deleted: bool = False

    @property
    def key(self) -> tuple[str, str]:
        return (self.tenant, self.name)

    def states(self) -> list[str]:
        return [r.state for r in self.replicas.values()]

    def live(self) -> list[Replica]:
        """Replicas that count towards `desired`: neither stopping nor being replaced."""
        return [r for r in self.replicas.values() if r.state != STOPPING and not r.retiring]


class ServiceExists(ValueError):
    """The tenant already has a service of that name or that model (HTTP 409)."""


class ServiceHost(Protocol):
    """What the control plane reads and calls on the Mesh (coordinator/core/mesh.py)."""

    @property
    def store(self) -> GroupCommitStore: ...
    @property
    def settings(self) -> Settings: ...
    @property
    def tasks(self) -> dict[str, Task]: ...
    @property
    def loaded(self) -> asyncio.Event: ...
    @property
    def drains(self) -> Mapping[str, Any]: ...  # drained node names (coordinator/core/drain.py)

    async def submit(
        self, specs: list[tuple[TaskSubmit, dict[str, Any]]],
        also: Callable[[list[Task]], Write] | None = None,
    ) -> list[Task]: ...

    async def cancel(self, task_id: str, reason: str = ..., also: Write | None = None) -> Task: ...

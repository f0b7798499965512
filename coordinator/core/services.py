"""The control plane of model services (issue 27): services, their replicas, and scaling.

A part the Mesh holds (`mesh.services`). A service is a durable, tenant-owned spec (table
`services`); each replica is a task submitted through `Mesh.submit` like any other (same
placement, quotas, fencing, requeue on node loss, reload after a restart), with no timeout,
marked as the service's replica in table `service_replicas` in the same transaction as its
insert. The mark lives only there and in `by_task`, never in the task's own fields, so no
`POST /tasks/submit` can make a task a replica: the `assign` of a marked task carries
`service` (`run_for`), any other none.

Each service keeps `desired` replicas: `replicas.min` to start; one more when requests in
flight per replica pass `target_ongoing` (up to `replicas.max`); one when a request finds
none (`wait_ready`, scale from zero); back to `min` after `idle_s` without requests (one
timer per service). `_reconcile` brings the live replicas to `desired`. A replica whose
task ends while it was wanted (crash, exit, failure) is replaced after a backoff that
doubles per consecutive crash (MESH_SERVICE_RESTART_S up to MESH_SERVICE_RESTART_MAX_S) and
resets once a replica is ready. A replica to be replaced (its node drained, its service
updated, or unhealthy for MESH_SERVICE_UNHEALTHY_S without a break: an engine wedged without
exiting) is `retiring`: a new one is started first and the old one cancelled once a new one
is ready. Every change is an event of the service's history (table `service_events`) and
a metric (coordinator/core/service_metrics.py).

Readiness comes only from the nodes' `replica` reports of the current attempt; after a
coordinator restart every replica starts as "starting" until its node reports it again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING, Any

import msgspec
import orjson

from coordinator.core.service_metrics import ServiceMetrics
from coordinator.core.service_model import (
    READY,
    STARTING,
    STOPPING,
    UNHEALTHY,
    Replica,
    Service,
    ServiceExists,
    ServiceHost,
)
from coordinator.model import ACTIVE, FINISHED, Task, TaskState
from coordinator.storage.store_core import ServiceWrite
from shared.protocol import ReplicaState, ServiceRun
from shared.services import DEFAULT_HEALTH_PATH, ServiceSpec
from shared.tasks import TaskSubmit

if TYPE_CHECKING:
    from coordinator.storage.store_core import Write

log = logging.getLogger(__name__)
__all__ = ["Replica", "Service", "ServiceExists", "ServiceHost", "ServiceManager"]

_spec_dec = msgspec.json.Decoder(ServiceSpec)
_task_dec = msgspec.json.Decoder(TaskSubmit)
_enc = msgspec.json.Encoder()


class ServiceManager:
    def __init__(self, mesh: ServiceHost, metrics: ServiceMetrics) -> None:
        self._mesh = mesh
        self.metrics = metrics
        self._reset()

    def _reset(self) -> None:
        self.services: dict[tuple[str, str], Service] = {}
        self.by_model: dict[tuple[str, str], Service] = {}
        self.by_task: dict[str, Service] = {}
        self._background: set[asyncio.Task[Any]] = set()

    # --- what the router calls (coordinator/web/openai.py) -----------------------------

    def lookup(self, tenant: str, model: str) -> Service | None:
        return self.by_model.get((tenant, model))

    def models(self, tenant: str) -> list[Service]:
        return sorted((s for s in self.services.values() if s.tenant == tenant and not s.deleted),
                      key=lambda s: s.model)

    def ready(self, svc: Service) -> list[Replica]:
        return [r for r in svc.replicas.values() if r.state == READY]

    async def wait_ready(self, svc: Service, timeout_s: float) -> list[Replica]:
        """Scale from zero: at least one replica wanted; wait until one is ready."""
        if (ready := self.ready(svc)) or svc.deleted:
            return ready
        svc.last_request = time.monotonic()
        if svc.desired < 1 and not svc.deleted:
            self._scale(svc, 1, "scaled up from zero: a request found no replica")
        # A waiting request is in flight: the idle timer must not stop the replica it waits
        # for while that one still loads (an engine may take longer than idle_s to start).
        svc.outstanding += 1
        try:
            async with asyncio.timeout(timeout_s):
                while not (ready := self.ready(svc)):
                    svc.ready_event.clear()
                    await svc.ready_event.wait()
        except TimeoutError:
            return []
        finally:
            svc.outstanding = max(0, svc.outstanding - 1)
            svc.last_request = time.monotonic()
        return ready

    def started(self, svc: Service, replica: Replica) -> None:
        replica.outstanding += 1
        svc.outstanding += 1
        svc.last_request = time.monotonic()
        if svc.outstanding <= svc.spec.target_ongoing:  # the common case: no count needed
            return
        live = len(svc.live())
        if (svc.outstanding > svc.spec.target_ongoing * max(live, 1)
                and svc.desired < svc.spec.replicas.max and not svc.deleted):
            self._scale(svc, svc.desired + 1,
                        f"scaled up: {svc.outstanding} requests in flight over {live} "
                        f"replicas (target {svc.spec.target_ongoing} each)")

    def finished(self, svc: Service, replica: Replica, *, status: int, ttft_s: float | None,
                 duration_s: float, completion_tokens: int | None) -> None:
        replica.outstanding = max(0, replica.outstanding - 1)
        svc.outstanding = max(0, svc.outstanding - 1)
        svc.last_request = time.monotonic()
        self.metrics.request(svc.tenant, svc.name, status, ttft_s, duration_s, completion_tokens)

    # --- what the node side calls ------------------------------------------------------

    def replica_report(self, node: str, msg: ReplicaState) -> None:
        """A node's `replica` frame: applied only for the task's current attempt there."""
        svc = self.by_task.get(msg.task_id)
        t = self._mesh.tasks.get(msg.task_id)
        if (svc is None or t is None or t.state not in ACTIVE or t.node != node
                or t.attempt != msg.attempt):
            log.info("stale replica report for %s attempt %d from %s: ignored",
                     msg.task_id, msg.attempt, node, extra={"task": msg.task_id, "node": node})
            self.metrics.stale_reports += 1
            return
        r = svc.replicas[msg.task_id]
        r.attempt, r.node, r.port = msg.attempt, node, msg.port
        if r.state == STOPPING or (r.state == msg.state and r.reason == msg.reason):
            return
        r.state, r.reason = msg.state, msg.reason[:512]
        self._event(svc, f"replica {msg.state}", {"task_id": r.task_id, "node": node,
                                                  "attempt": msg.attempt, "reason": r.reason})
        if msg.state != UNHEALTHY:
            _disarm_unhealthy(r)  # a break: the next spell of unhealthy starts a new count
        elif r.unhealthy_timer is None and not r.retiring:
            r.unhealthy_timer = asyncio.get_running_loop().call_later(
                self._mesh.settings.service_unhealthy_s, self._unhealthy, svc, r, msg.attempt)
        if msg.state == READY:
            _disarm(r)
            svc.crashes = 0
            svc.ready_event.set()
            if not r.retiring:
                self._retire_one(svc)

    def check(self) -> None:
        """Cross-checks of services, replicas and their tasks (Mesh.check_invariants)."""
        loaded = self._mesh.loaded.is_set()
        for task_id, svc in self.by_task.items():
            r = svc.replicas.get(task_id)
            assert r is not None, f"task {task_id} marked for {svc.key} but not its replica"
            t = self._mesh.tasks.get(task_id)
            assert t is not None or not loaded, f"replica {task_id} of {svc.key}: no such task"
            assert r.unhealthy_timer is None or r.state == UNHEALTHY, (
                f"replica {task_id} is {r.state} with its unhealthy deadline armed")
            if r.state == READY:
                assert t is not None and t.state in ACTIVE and (t.node, t.attempt) == (
                    r.node, r.attempt), f"replica {task_id} ready but its task is not there"
        for svc in self.services.values():
            for task_id in svc.replicas:
                assert self.by_task.get(task_id) is svc, f"{svc.key}: {task_id} not marked"
            if not svc.deleted:
                assert self.by_model.get((svc.tenant, svc.model)) is svc, f"{svc.key}: model"
                assert 0 <= svc.desired <= svc.spec.replicas.max, f"{svc.key}: desired"

    def run_for(self, task_id: str) -> ServiceRun | None:
        """What makes an `assign` of this task a replica (Mesh._assign_msg); None if it is
        not one."""
        svc = self.by_task.get(task_id)
        if svc is None:
            return None
        return ServiceRun(service=svc.name, model=svc.model,
                          health_path=svc.spec.health_path or DEFAULT_HEALTH_PATH)

    def task_moved(self, t: Task, to: TaskState) -> None:
        """A replica's task changed state (Mesh._transition calls this for marked tasks)."""
        svc = self.by_task.get(t.id)
        if svc is None:
            return
        r = svc.replicas[t.id]
        if to is not TaskState.RUNNING:  # started: its deadline to be ready still runs
            _disarm(r)
        if to is TaskState.ASSIGNED:
            r.attempt, r.node = t.attempt, t.node or ""
            if r.state != STOPPING:
                r.state = STARTING
                r.ready_timer = asyncio.get_running_loop().call_later(
                    self._mesh.settings.service_ready_s, self._not_ready, svc, r, t.attempt)
            self._event(svc, "replica placed", {"task_id": t.id, "node": r.node,
                                                "attempt": t.attempt})
        elif to in (TaskState.LOST, TaskState.QUEUED):
            if r.state != STOPPING:
                r.state = STARTING
            if to is TaskState.LOST:
                self._event(svc, "replica lost", {"task_id": t.id, "node": r.node,
                                                  "attempt": t.attempt})
            r.node = ""
            self._ready_changed(svc)
        elif to in FINISHED:
            self._ended(svc, r, t, to)

    def _ended(self, svc: Service, r: Replica, t: Task, to: TaskState) -> None:
        del svc.replicas[t.id]
        del self.by_task[t.id]
        self._ready_changed(svc)
        self._write(ServiceWrite("unreplica", (t.id,)))
        wanted = r.state != STOPPING and not svc.deleted
        self._event(svc, "replica ended", {
            "task_id": t.id, "node": r.node, "status": to.value, "error": t.error[:512],
            "wanted": wanted})
        if svc.deleted:
            self._forget_if_gone(svc)
            return
        if wanted and not r.retiring:
            self._arm_restart(svc, self._crashed(svc, t.id))
        else:
            self._reconcile(svc)

    def _crashed(self, svc: Service, task_id: str) -> float:
        """One more crash in a row: the backoff before the next replica, in seconds."""
        svc.crashes += 1
        s = self._mesh.settings
        delay = float(min(s.service_restart_s * 2 ** (svc.crashes - 1), s.service_restart_max_s))
        svc.backoff_until = time.monotonic() + delay
        self._event(svc, "replica restart", {"task_id": task_id, "in_s": round(delay, 3),
                                             "crashes": svc.crashes})
        self.metrics.scaled(svc.tenant, svc.name, "restart")
        return delay

    def _not_ready(self, svc: Service, r: Replica, attempt: int) -> None:
        """A replica placed MESH_SERVICE_READY_S ago and never ready (an engine that hangs
        while loading): stopped and replaced after the crash backoff, like a crash."""
        r.ready_timer = None
        if svc.replicas.get(r.task_id) is not r or r.attempt != attempt or r.state not in (
                STARTING, UNHEALTHY) or svc.deleted:
            return
        ready_s = self._mesh.settings.service_ready_s
        self._event(svc, "replica not ready", {"task_id": r.task_id, "node": r.node,
                                               "within_s": ready_s})
        self._crashed(svc, r.task_id)
        self._stop(svc, r, f"not ready within {ready_s:g}s (MESH_SERVICE_READY_S)")

    def _unhealthy(self, svc: Service, r: Replica, attempt: int) -> None:
        """A replica unhealthy for MESH_SERVICE_UNHEALTHY_S without a break (an engine wedged
        without exiting: the node's health checks fail, its process lives on) is replaced as
        a drained node's is: a new replica first, this one cancelled once a new one is ready."""
        r.unhealthy_timer = None
        if svc.replicas.get(r.task_id) is not r or r.attempt != attempt or (
                r.state != UNHEALTHY or r.retiring or svc.deleted):
            return
        why = f"unhealthy for {self._mesh.settings.service_unhealthy_s:g} s: {r.reason}"
        r.retiring = True
        self._event(svc, "replica retiring", {"task_id": r.task_id, "node": r.node,
                                              "attempt": attempt, "why": why})
        self.metrics.scaled(svc.tenant, svc.name, "restart")
        log.warning("service %s/%s: replica %s on %s %s; replacing it", svc.tenant, svc.name,
                    r.task_id, r.node, why, extra={"task": r.task_id, "node": r.node})
        self._reconcile(svc)

    # --- create, update, delete (coordinator/web/services_api.py) ----------------------

    async def create(self, tenant: str, spec: ServiceSpec, task: TaskSubmit,
                     audit: Write) -> Service:
        """Store a new service (with its audit record, one transaction), then start it."""
        self._check_free(tenant, spec, None)
        now = time.time()
        svc = Service(spec.name, spec.model, tenant, spec, task, now, now,
                      desired=spec.replicas.min)
        self.services[svc.key] = svc  # claimed now: a second create in flight gets 409
        self.by_model[(tenant, spec.model)] = svc
        writes = [self._put(svc), self._event(svc, "created", {"spec": _builtins(spec)}),
                  self._mesh.store.write(audit)]
        try:
            await asyncio.shield(asyncio.gather(*writes))
        except BaseException:
            self._drop(svc)
            raise
        self.metrics.added(tenant, svc.name)
        self._reconcile(svc)
        return svc

    async def update(self, svc: Service, spec: ServiceSpec, task: TaskSubmit,
                     audit: Write) -> Service:
        """Replace the spec; replicas that run an older task are replaced, new ones first."""
        self._check_free(svc.tenant, spec, svc)
        old_task, old_model = svc.task, svc.model
        svc.spec, svc.task, svc.model, svc.updated_at = spec, task, spec.model, time.time()
        if old_model != spec.model:
            self.by_model.pop((svc.tenant, old_model), None)
            self.by_model[(svc.tenant, spec.model)] = svc
        writes = [self._put(svc), self._event(svc, "updated", {"spec": _builtins(spec)}),
                  self._mesh.store.write(audit)]
        await asyncio.shield(asyncio.gather(*writes))
        svc.desired = min(max(svc.desired, spec.replicas.min), spec.replicas.max)
        if _enc.encode(task) != _enc.encode(old_task):
            for r in svc.replicas.values():
                r.retiring = True
        self._reconcile(svc)
        return svc

    async def delete(self, svc: Service, audit: Write) -> None:
        """Forget the service (durably, with its audit record), then stop its replicas."""
        svc.deleted = True
        self._cancel_timers(svc)
        writes = [self._mesh.store.write(ServiceWrite("delete", svc.key)),
                  self._mesh.store.write(ServiceWrite("forget", svc.key)),
                  self._mesh.store.write(audit)]
        await asyncio.shield(asyncio.gather(*writes))
        self.by_model.pop((svc.tenant, svc.model), None)
        svc.desired = 0
        for r in list(svc.replicas.values()):
            self._stop(svc, r, "service deleted")
        self._forget_if_gone(svc)

    def get(self, tenant: str, name: str) -> Service | None:
        svc = self.services.get((tenant, name))
        return None if svc is None or svc.deleted else svc

    def all(self, tenant: str | None) -> list[Service]:
        return sorted((s for s in self.services.values()
                       if not s.deleted and (tenant is None or s.tenant == tenant)),
                      key=lambda s: (s.tenant, s.name))

    async def history(self, svc: Service, limit: int) -> list[dict[str, Any]]:
        return await self._mesh.store.service_events(svc.tenant, svc.name, limit)

    def _check_free(self, tenant: str, spec: ServiceSpec, this: Service | None) -> None:
        other = self.services.get((tenant, spec.name))
        if this is None and other is not None and not other.deleted:
            raise ServiceExists(f"this tenant already has a service named {spec.name!r}")
        by_model = self.by_model.get((tenant, spec.model))
        if by_model is not None and by_model is not this:
            raise ServiceExists(
                f"service {by_model.name!r} of this tenant already serves model {spec.model!r}")
        if this is None and len(self.services) >= self._mesh.settings.max_services:
            raise ServiceExists(
                f"{len(self.services)} services exist; the limit is "
                f"{self._mesh.settings.max_services} (MESH_MAX_SERVICES)")

    # --- replicas ----------------------------------------------------------------------

    def _scale(self, svc: Service, desired: int, why: str) -> None:
        was, svc.desired = svc.desired, desired
        kind = "scaled up" if desired > was else "scaled down"
        self._event(svc, kind, {"from": was, "to": desired, "why": why})
        self.metrics.scaled(svc.tenant, svc.name, "up" if desired > was else "down")
        log.info("service %s/%s %s to %d: %s", svc.tenant, svc.name, kind, desired, why)
        self._reconcile(svc)

    def _reconcile(self, svc: Service) -> None:
        """Start or stop replicas until the live ones are `desired`; arm the idle timer."""
        if svc.deleted:
            return
        live = svc.live()
        missing = svc.desired - len(live) - svc.adding  # adding: submitted, not yet marked
        if missing > 0:
            wait = svc.backoff_until - time.monotonic()
            if wait > 0:
                self._arm_restart(svc, wait)
            else:
                for _ in range(missing):
                    svc.adding += 1
                    self._spawn(self._add_replica(svc))
        elif missing < 0:
            extra = sorted(live, key=lambda r: (r.state == READY, r.outstanding))
            for r in extra[:-missing]:
                self._stop(svc, r, f"scaled down to {svc.desired}")
        if svc.desired == 0:
            for r in list(svc.replicas.values()):
                if r.retiring and r.state != STOPPING:
                    self._stop(svc, r, "replaced: no replica wanted")
        self._arm_idle(svc)

    async def _add_replica(self, svc: Service) -> None:
        """Submit one replica; `mark` runs in the same turn as the task's creation, before
        dispatch can place it, so its `assign` already carries `service`."""
        marked = False

        def mark(tasks: list[Task]) -> Write:
            nonlocal marked
            marked, svc.adding = True, svc.adding - 1
            t = tasks[0]
            svc.replicas[t.id] = Replica(t.id, 0, "", STARTING)
            self.by_task[t.id] = svc
            self._event(svc, "replica started", {"task_id": t.id})
            if svc.deleted or len(svc.live()) > svc.desired:  # wanted no more meanwhile
                asyncio.get_running_loop().call_soon(self._surplus, svc)
            return ServiceWrite("replica", (t.id, svc.tenant, svc.name))

        try:
            await self._mesh.submit([(svc.task, dict(svc.spec.params))], also=mark)
        except Exception:  # noqa: BLE001 - a failed write rebuilds the Mesh and us with it
            log.exception("service %s/%s: replica not stored", svc.tenant, svc.name)
        finally:
            if not marked:
                svc.adding -= 1

    def _surplus(self, svc: Service) -> None:
        if svc.deleted:
            for r in list(svc.replicas.values()):
                self._stop(svc, r, "service deleted")
        else:
            self._reconcile(svc)

    def _stop(self, svc: Service, r: Replica, why: str) -> None:
        if r.state == STOPPING:
            return
        r.state = STOPPING
        _disarm(r)
        self._ready_changed(svc)
        self._event(svc, "replica stopping", {"task_id": r.task_id, "node": r.node, "why": why})
        self._spawn(self._cancel(r.task_id, why))

    async def _cancel(self, task_id: str, why: str) -> None:
        try:
            await self._mesh.cancel(task_id, f"service: {why}")
        except LookupError:
            pass  # ended meanwhile
        except Exception:  # noqa: BLE001 - already finished, or the Mesh is rebuilding
            log.info("replica %s not cancelled (%s)", task_id, why, exc_info=True)

    def _retire_one(self, svc: Service) -> None:
        for r in svc.replicas.values():
            if r.retiring and r.state != STOPPING:
                self._stop(svc, r, "replaced by a ready replica")
                return

    def node_drained(self, node: str) -> None:
        """A drained node's replicas are replaced: new ones first, these stopped once a new
        one is ready (coordinator/core/drain.py calls this)."""
        for svc in self.services.values():
            touched = False
            for r in svc.replicas.values():
                if r.node == node and r.state != STOPPING and not r.retiring:
                    r.retiring = touched = True
                    self._event(svc, "replica retiring", {"task_id": r.task_id, "node": node,
                                                          "why": "its node is draining"})
            if touched:
                self._reconcile(svc)

    def _ready_changed(self, svc: Service) -> None:
        if self.ready(svc):
            svc.ready_event.set()
        else:
            svc.ready_event.clear()

    # --- timers ------------------------------------------------------------------------

    def _arm_restart(self, svc: Service, delay: float) -> None:
        if svc.restart_timer is not None:
            svc.restart_timer.cancel()

        def fire() -> None:
            svc.restart_timer = None
            self._reconcile(svc)

        svc.restart_timer = asyncio.get_running_loop().call_later(max(delay, 0.0), fire)

    def _arm_idle(self, svc: Service, delay: float | None = None) -> None:
        """One timer per service while it runs more than `min`: at `idle_s` after the last
        request, back to `min` if no request is in flight; else it looks again later."""
        if svc.idle_timer is not None or svc.desired <= svc.spec.replicas.min or svc.deleted:
            return
        idle_s = svc.spec.idle_s
        if delay is None:
            delay = idle_s - (time.monotonic() - svc.last_request)

        def fire() -> None:
            svc.idle_timer = None
            idle = time.monotonic() - svc.last_request
            if svc.outstanding == 0 and idle >= idle_s:
                self._scale(svc, svc.spec.replicas.min,
                            f"no request for {idle:.1f}s (idle_s {idle_s:g})")
            else:
                self._arm_idle(svc, idle_s if svc.outstanding else idle_s - idle)

        svc.idle_timer = asyncio.get_running_loop().call_later(max(delay, 0.0), fire)

    def _cancel_timers(self, svc: Service) -> None:
        for timer in (svc.restart_timer, svc.idle_timer):
            if timer is not None:
                timer.cancel()
        svc.restart_timer = svc.idle_timer = None

    # --- the store ---------------------------------------------------------------------

    def _put(self, svc: Service) -> asyncio.Future[None]:
        return self._mesh.store.write(ServiceWrite("put", (
            svc.tenant, svc.name, _enc.encode(svc.spec), _enc.encode(svc.task),
            svc.created_at, svc.updated_at)))

    def _event(self, svc: Service, kind: str, detail: dict[str, Any]) -> asyncio.Future[None]:
        fut = self._write(ServiceWrite("event", (svc.tenant, svc.name, time.time(), kind,
                                                 orjson.dumps(detail))))
        self._write(ServiceWrite("prune", (*svc.key, *svc.key)))
        return fut

    def _write(self, op: ServiceWrite) -> asyncio.Future[None]:
        """A write nobody awaits: a failure rebuilds the Mesh (the store tells it)."""
        fut = self._mesh.store.write(op)
        fut.add_done_callback(_retrieved)
        return fut

    def _drop(self, svc: Service) -> None:
        if self.services.get(svc.key) is svc:
            del self.services[svc.key]
        if self.by_model.get((svc.tenant, svc.model)) is svc:
            del self.by_model[(svc.tenant, svc.model)]

    def _forget_if_gone(self, svc: Service) -> None:
        if svc.deleted and not svc.replicas:
            self._drop(svc)

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    # --- start, after a restart or a rebuild -------------------------------------------

    async def load(self) -> None:
        """Reload services and replica marks (Mesh.start, before any node can report):
        a marked task that is placed or queued is that service's replica again."""
        self._stop_all()
        self._reset()
        store = self._mesh.store
        for tenant, name, spec_raw, task_raw, created, updated in await store.services():
            spec = _spec_dec.decode(spec_raw)
            svc = Service(name, spec.model, tenant, spec, _task_dec.decode(task_raw),
                          created, updated, desired=spec.replicas.min)
            self.services[svc.key] = svc
            self.by_model[(tenant, spec.model)] = svc
            self.metrics.added(tenant, name)
        marks = await store.service_replicas()
        for task_id, tenant, name in marks:
            owner = self.services.get((tenant, name))
            if owner is None:
                self._write(ServiceWrite("unreplica", (task_id,)))
                continue
            t = self._mesh.tasks.get(task_id)
            owner.replicas[task_id] = Replica(
                task_id, t.attempt if t else 0, (t.node or "") if t else "", STARTING)
            self.by_task[task_id] = owner

    async def run(self) -> None:
        """Once every task is back (queued ones stream in after `load`): forget the marks of
        replicas that ended while the coordinator was away and reconcile every service; then
        hold the timers until cancelled with the Mesh's loops."""
        try:
            await self._mesh.loaded.wait()
            self._reloaded()
            await asyncio.Event().wait()  # held until the Mesh stops its loops
        finally:
            self._stop_all()

    def _reloaded(self) -> None:
        for task_id, svc in list(self.by_task.items()):
            if task_id not in self._mesh.tasks:  # ended while the coordinator was away
                del svc.replicas[task_id]
                del self.by_task[task_id]
                self._write(ServiceWrite("unreplica", (task_id,)))
        for name in self._mesh.drains:  # a drained node's replicas are replaced, as before
            self.node_drained(name)
        for svc in self.services.values():
            svc.desired = max(svc.desired, min(len(svc.live()), svc.spec.replicas.max))
            self._reconcile(svc)
        log.info("%d services reloaded, %d replicas", len(self.services), len(self.by_task))

    def _stop_all(self) -> None:
        for svc in self.services.values():
            self._cancel_timers(svc)
            for r in svc.replicas.values():
                _disarm(r)
        for task in self._background:
            task.cancel()


def _disarm(r: Replica) -> None:
    if r.ready_timer is not None:
        r.ready_timer.cancel()
        r.ready_timer = None
    _disarm_unhealthy(r)


def _disarm_unhealthy(r: Replica) -> None:
    if r.unhealthy_timer is not None:
        r.unhealthy_timer.cancel()
        r.unhealthy_timer = None


def _retrieved(fut: asyncio.Future[None]) -> None:
    if not fut.cancelled():
        fut.exception()


def _builtins(spec: ServiceSpec) -> Any:
    return msgspec.to_builtins(spec)

"""Routes of model services (issue 27): `POST /services`, `GET /services`,
`GET|PUT|DELETE /services/{name}`.

Tenant-scoped: a caller sees and changes only its own tenant's services (another tenant's
is a 404, never listed); an admin sees every tenant's and picks one with `?tenant=`. A
create or update is checked whole at the edge before anything changes (422 naming the
field: the spec, shared/services.py; the replica task it makes, coordinator/web/engines.py),
then committed with its audit record in one transaction before the answer (durable before
visible); the control plane (coordinator/core/services.py) then places the replicas.
"""

from __future__ import annotations

from typing import Any

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from coordinator.access.auth import Principal, principal_of
from coordinator.core.mesh import Mesh
from coordinator.core.services import Service, ServiceExists, ServiceManager
from coordinator.web.api import JSON, error
from coordinator.web.edge import BodyTooLarge, read_body
from coordinator.web.engines import replica_task, with_health_path
from shared.services import ServiceSpec, decode_service
from shared.tasks import executor_for

MAX_SERVICE_BODY = 256 << 10  # bytes in a POST or PUT /services body
MAX_HISTORY = 1000  # events in one GET /services/{name}?history=N


def _mesh(request: Request) -> Mesh:
    mesh: Mesh = request.app.state.mesh
    return mesh


def _tenant(request: Request, who: Principal) -> str:
    """Whose services this call is about: the caller's tenant; an admin's `?tenant=`."""
    if who.sees_all_tenants:
        return request.query_params.get("tenant", who.tenant)
    return who.tenant


def _find(request: Request) -> Service | JSON:
    """The service the path names, as this caller may see it, or a 404 (or 409 for an
    admin whose name matches several tenants' services)."""
    who, name = principal_of(request), request.path_params["name"]
    services = _mesh(request).services
    if who.sees_all_tenants and "tenant" not in request.query_params:
        found = [s for s in services.all(None) if s.name == name]
        if len(found) > 1:
            tenants = ", ".join(sorted(s.tenant for s in found))
            return error(409, "ambiguous service",
                         f"tenants {tenants} each have a service {name!r}: add ?tenant=")
        svc = found[0] if found else None
    else:
        svc = services.get(_tenant(request, who), name)
    if svc is None:
        return error(404, "unknown service", f"no service {name!r}")
    return svc


async def _spec(request: Request, tenant: str) -> tuple[ServiceSpec, Any] | JSON:
    try:
        body = await read_body(request, MAX_SERVICE_BODY)
    except BodyTooLarge as exc:
        return error(413, "body too large", str(exc))
    spec = decode_service(body)
    if isinstance(spec, str):
        return error(422, "invalid service", spec)
    engines = request.app.state.engines
    task = replica_task(spec, engines, tenant)
    if isinstance(task, str):
        return error(422, "invalid service", task)
    return with_health_path(spec, engines), task


async def create_service(request: Request) -> JSON:
    who = principal_of(request)
    tenant = _tenant(request, who)
    checked = await _spec(request, tenant)
    if isinstance(checked, JSON):
        return checked
    spec, task = checked
    mesh = _mesh(request)
    await mesh.settled()  # 503 while the Mesh rebuilds
    audit = request.app.state.audit.row(who, "service.create", f"{tenant}/{spec.name}",
                                        {"model": spec.model})
    try:
        svc = await mesh.services.create(tenant, spec, task, audit)
    except ServiceExists as exc:
        return error(409, "service exists", str(exc))
    return JSON(service_view(mesh.services, svc), status_code=201)


async def list_services(request: Request) -> JSON:
    who = principal_of(request)
    mesh = _mesh(request)
    await mesh.settled()
    only = None if who.sees_all_tenants and "tenant" not in request.query_params else (
        _tenant(request, who))
    views = [service_view(mesh.services, s) for s in mesh.services.all(only)]
    return JSON({"services": views, "count": len(views)})


async def get_service(request: Request) -> JSON:
    mesh = _mesh(request)
    await mesh.settled()
    svc = _find(request)
    if isinstance(svc, JSON):
        return svc
    raw = request.query_params.get("history", "50")
    if not raw.isdigit() or not 0 <= int(raw) <= MAX_HISTORY:
        return error(400, "bad request", f"`history` must be an integer from 0 to {MAX_HISTORY}")
    view = service_view(mesh.services, svc)
    view["history"] = await mesh.services.history(svc, int(raw)) if int(raw) else []
    return JSON(view)


async def put_service(request: Request) -> JSON:
    found = _find(request)
    if isinstance(found, JSON):
        return found
    checked = await _spec(request, found.tenant)
    if isinstance(checked, JSON):
        return checked
    spec, task = checked
    if spec.name != found.name:
        return error(422, "invalid service",
                     f"$.name: {spec.name!r} differs from the path's {found.name!r}; "
                     "a service cannot be renamed")
    mesh = _mesh(request)
    await mesh.settled()
    audit = request.app.state.audit.row(principal_of(request), "service.update",
                                        f"{found.tenant}/{found.name}", {"model": spec.model})
    try:
        svc = await mesh.services.update(found, spec, task, audit)
    except ServiceExists as exc:
        return error(409, "service exists", str(exc))
    return JSON(service_view(mesh.services, svc))


async def delete_service(request: Request) -> JSON:
    found = _find(request)
    if isinstance(found, JSON):
        return found
    mesh = _mesh(request)
    await mesh.settled()
    audit = request.app.state.audit.row(principal_of(request), "service.delete",
                                        f"{found.tenant}/{found.name}", {"model": found.model})
    await mesh.services.delete(found, audit)
    return JSON({"deleted": found.name, "tenant": found.tenant,
                 "replicas_stopping": len(found.replicas)})


def service_view(services: ServiceManager, svc: Service) -> dict[str, Any]:
    spec = svc.spec
    replicas = [{"task_id": r.task_id, "node": r.node or None, "attempt": r.attempt,
                 "state": r.state, "outstanding": r.outstanding, "retiring": r.retiring,
                 **({"reason": r.reason} if r.reason else {})}
                for r in svc.replicas.values()]
    return {
        "name": svc.name, "model": svc.model, "tenant": svc.tenant,
        "engine": spec.engine or None, "executor": executor_for(svc.task),
        "replicas": replicas,
        "scale": {"min": spec.replicas.min, "max": spec.replicas.max, "desired": svc.desired,
                  "ready": len(services.ready(svc))},
        "outstanding": svc.outstanding,
        "routing": spec.routing, "health_path": spec.health_path, "idle_s": spec.idle_s,
        "target_ongoing": spec.target_ongoing,
        "requests": services.metrics.summary(svc.tenant, svc.name),
        "created_at": svc.created_at, "updated_at": svc.updated_at,
        "spec": msgspec.to_builtins(spec),
    }


service_routes = [
    Route("/services", create_service, methods=["POST"]),
    Route("/services", list_services),
    Route("/services/{name}", get_service),
    Route("/services/{name}", put_service, methods=["PUT"]),
    Route("/services/{name}", delete_service, methods=["DELETE"]),
]

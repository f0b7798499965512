"""Admin routes for tenants: `GET /admin/tenants`, `GET|PUT /admin/tenants/{name}`.

The middleware already required `admin`. A PUT commits the config with its audit record in
one transaction, then applies it and wakes every queued class (a raised quota may let work
through): durable before visible.
"""

from __future__ import annotations

import asyncio
import time

import msgspec
from starlette.requests import Request
from starlette.routing import Route

from coordinator.access.auth import principal_of
from coordinator.core.mesh import Mesh
from coordinator.scheduling.fairshare import TenantConfig
from coordinator.storage.store_core import TenantPut
from coordinator.web.admin_api import TENANT
from coordinator.web.api import JSON, error

MAX_BODY = 16 * 1024
_enc = msgspec.json.Encoder()
_dec = msgspec.json.Decoder(TenantConfig)


def _mesh(request: Request) -> Mesh:
    mesh: Mesh = request.app.state.mesh
    return mesh


def _view(mesh: Mesh, name: str) -> dict[str, object]:
    return mesh.fair.view(name, mesh.gpu_seconds.get(name, 0.0))


async def list_tenants(request: Request) -> JSON:
    mesh = _mesh(request)
    views = [_view(mesh, n) for n in mesh.fair.names()]
    return JSON({"tenants": views, "count": len(views),
                 "defaults": msgspec.to_builtins(mesh.fair.defaults)})


async def get_tenant(request: Request) -> JSON:
    return JSON(_view(_mesh(request), request.path_params["name"]))


async def put_tenant(request: Request) -> JSON:
    mesh, name = _mesh(request), request.path_params["name"]
    if not TENANT.match(name):
        return error(422, "invalid tenant",
                     "a tenant is 1-64 of A-Z a-z 0-9 . _ - (starting with a letter/digit)")
    body = await request.body()
    if len(body) > MAX_BODY:
        return error(413, "body too large", f"at most {MAX_BODY} bytes")
    try:
        config = _dec.decode(body or b"{}")
    except msgspec.DecodeError as exc:  # ValidationError too: the reason names the field
        return error(422, "invalid tenant config", str(exc))
    await mesh.settled()  # raises MeshUnavailable (503) while the Mesh rebuilds
    audit = request.app.state.audit.row(
        principal_of(request), "tenant.set", name, msgspec.to_builtins(config)
    )
    writes = [mesh.store.write(TenantPut((name, _enc.encode(config), time.time()))),
              mesh.store.write(audit)]  # one turn of the loop: one transaction
    await asyncio.shield(asyncio.gather(*writes))
    mesh.fair.set(name, config)
    mesh.wake_queued()
    return JSON(_view(mesh, name))


tenant_routes = [
    Route("/admin/tenants", list_tenants),
    Route("/admin/tenants/{name}", get_tenant),
    Route("/admin/tenants/{name}", put_tenant, methods=["PUT"]),
]

"""`POST /mesh/nodes/{name}/drain` and `/undrain`: an admin stops new work going to a node,
and lets it come again (coordinator/core/drain.py). The auth middleware lets only admin tokens
reach these routes; each change is audited (`node.drain`, `node.undrain`) in the same
transaction as the mark.

    POST /mesh/nodes/gpu-01/drain    {"reason": "kernel upgrade"}   (the body is optional)
    -> {"node": "gpu-01", "draining": true, "status": "draining", "active_tasks": 2,
        "drain": {"reason": "kernel upgrade", "since": "...", "by": "token:abc"}}

Draining a node that is drained already replaces its reason; undraining one that is not
drained answers 200 with `"draining": false`. A name the mesh does not know (not
registered, not drained) is 404.
"""

from __future__ import annotations

from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from coordinator.access.audit import Audit
from coordinator.access.auth import principal_of
from coordinator.core import drain as drains
from coordinator.core.mesh import Mesh
from coordinator.model import DrainMark
from coordinator.web.api import JSON, error
from coordinator.web.edge import BodyTooLarge, read_body
from shared.protocol import valid_node_name

MAX_BODY = 16 * 1024


def _state(mesh: Mesh, name: str, mark: DrainMark | None) -> dict[str, Any]:
    node = mesh.nodes.get(name)
    return {
        "node": name,
        "draining": mark is not None,
        "status": drains.view_status(node) if node is not None else "not connected",
        "active_tasks": len(node.tasks) if node is not None else 0,
        "drain": drains.drain_view(mark),
    }


async def _reason(request: Request) -> str | JSON:
    try:
        body = await read_body(request, MAX_BODY)  # refused as it passes the limit
    except BodyTooLarge as exc:
        return error(413, "body too large", str(exc))
    try:
        doc = orjson.loads(body) if body.strip() else {}
    except orjson.JSONDecodeError as exc:
        return error(400, "invalid JSON", str(exc))
    reason = doc.get("reason", "") if isinstance(doc, dict) else None
    if not isinstance(reason, str) or not reason.isprintable():
        return error(422, "invalid drain request", "`reason`: printable text, if given")
    return reason


def _known(mesh: Mesh, name: str) -> JSON | None:
    if valid_node_name(name) and (name in mesh.nodes or name in mesh.drains):
        return None
    return error(404, "unknown node", f"no node named {name!r}")


async def drain_node(request: Request) -> JSON:
    mesh: Mesh = request.app.state.mesh
    name = request.path_params["name"]
    if (unknown := _known(mesh, name)) is not None:
        return unknown
    reason = await _reason(request)
    if isinstance(reason, JSON):
        return reason
    who = principal_of(request)
    audit: Audit = request.app.state.audit
    row = audit.row(who, "node.drain", name, {"reason": reason})
    mark = await drains.drain(mesh, name, reason, who.actor, row)
    return JSON(_state(mesh, name, mark))


async def undrain_node(request: Request) -> JSON:
    mesh: Mesh = request.app.state.mesh
    name = request.path_params["name"]
    if (unknown := _known(mesh, name)) is not None:
        return unknown
    who = principal_of(request)
    audit: Audit = request.app.state.audit
    row = audit.row(who, "node.undrain", name, {"was_drained": name in mesh.drains})
    await drains.undrain(mesh, name, who.actor, row)
    return JSON(_state(mesh, name, None))


drain_routes = [
    Route("/mesh/nodes/{name}/drain", drain_node, methods=["POST"]),
    Route("/mesh/nodes/{name}/undrain", undrain_node, methods=["POST"]),
]

"""`DELETE /mesh/nodes/{name}`: an admin forgets a node and its credential.

A node that holds tasks is refused with 409 (drain it or cancel its tasks first): forgetting
it would leave its work with a node the mesh no longer knows. A connected idle node is
closed with 4004 (fatal for its client); its name is free for the next node that joins,
undrained (a drain mark of the name is lifted with it, audited as `node.undrain`).
The auth middleware lets only admin tokens reach this route.
"""

from __future__ import annotations

from starlette.requests import Request
from starlette.routing import Route

from coordinator.access.audit import Audit
from coordinator.access.auth import principal_of
from coordinator.core.drain import undrain
from coordinator.core.mesh import Mesh
from coordinator.link.identity import NodeIdentities
from coordinator.web.api import JSON, error
from shared.protocol import valid_node_name


async def forget_node(request: Request) -> JSON:
    name = request.path_params["name"]
    if not valid_node_name(name):
        return error(404, "unknown node", f"no node named {name!r}")
    mesh: Mesh = request.app.state.mesh
    ids: NodeIdentities = request.app.state.identities
    node = mesh.nodes.get(name)
    if node is not None and node.tasks:
        return error(
            409, "node busy",
            f"node {name!r} holds {len(node.tasks)} task(s); cancel them or wait for them to "
            "finish, then forget it",
        )
    registered = mesh.forget_node(name, "node forgotten by an admin")
    had_credential = await ids.forget(name)
    if not registered and not had_credential and name not in mesh.drains:
        return error(404, "unknown node", f"no node named {name!r}")
    audit: Audit = request.app.state.audit
    if name in mesh.drains:  # the next node to join under this name starts undrained
        row = audit.row(principal_of(request), "node.undrain", name, {"why": "forgotten"})
        await undrain(mesh, name, principal_of(request).actor, row)
    await audit.record(principal_of(request), "node.forget", name,
                       {"was_registered": registered, "had_credential": had_credential})
    return JSON({"node": name, "forgotten": True, "was_registered": registered,
                 "had_credential": had_credential})


node_routes = [Route("/mesh/nodes/{name}", forget_node, methods=["DELETE"])]

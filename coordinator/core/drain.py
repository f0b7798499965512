"""Draining a node: it finishes the work it holds and is given no more.

An admin drains a node (`POST /mesh/nodes/{name}/drain`, coordinator/web/drain_api.py) before
maintenance, and undrains it after. The mark is durable (table `node_drains`, written in the
same transaction as its audit record) and outlives a coordinator restart and the node's
reconnects; it may name a node that is not connected right now.

What a drain does, in order (durable before visible):
- memory first, synchronously: `Node.drain` is set, so placement skips the node with the
  reason "draining" (`Node.unavailable`) and the placement index drops it;
- then the store write (shielded); a failed write rebuilds the Mesh from the store, where
  the drain is not, like any other write;
- then the node is told (`Drain`, or `Drain(lifted=True)` on undrain), and after every
  later `register` again (`drain_notice`), so its client logs it and refuses stray work.

Tasks already on the node run to their end. Views show `status: "draining"` while the node
holds tasks and `"drained"` once it holds none (`view_status`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Protocol

from coordinator.model import DrainMark, Node
from coordinator.storage.store_core import DrainPut, Write
from shared.protocol import Drain

if TYPE_CHECKING:
    from coordinator.core.services import ServiceManager
    from coordinator.storage.store_core import GroupCommitStore

log = logging.getLogger(__name__)

MAX_REASON = 512


class HasDrains(Protocol):
    """The Mesh as `on_register` and `drain_notice` read it: its drain marks by node name."""

    @property
    def drains(self) -> Mapping[str, DrainMark]: ...


class DrainHost(Protocol):
    """What draining reads and changes on the Mesh (coordinator/core/mesh.py)."""

    drains: dict[str, DrainMark]  # replaced by `load_drains`

    @property
    def store(self) -> GroupCommitStore: ...
    @property
    def nodes(self) -> Mapping[str, Node]: ...
    @property
    def _wake(self) -> asyncio.Event: ...  # set: ask for a dispatch pass

    def _serving(self) -> None: ...  # raises MeshUnavailable while the Mesh rebuilds
    @property
    def services(self) -> ServiceManager: ...  # model services (coordinator/core/services.py)
    def _node_changed(self, node: Node) -> None: ...  # re-index it, wake what it may fit


def view_status(node: Node) -> str:
    """A node's status as views show it: a drained online node is "draining" while it still
    holds tasks and "drained" once it holds none; otherwise its connection status."""
    if node.drain is None or not node.online:
        return node.status
    return "draining" if node.tasks else "drained"


def drain_view(mark: DrainMark | None) -> dict[str, object] | None:
    if mark is None:
        return None
    since = datetime.fromtimestamp(mark.since, UTC).isoformat(timespec="milliseconds")
    return {"reason": mark.reason, "since": since, "by": mark.by}


async def load_drains(mesh: DrainHost) -> None:
    """Read the drain marks from the store onto the Mesh (at start and after a rebuild),
    and mark the nodes already known (placeholders of nodes that hold tasks)."""
    rows = await mesh.store.node_drains()
    mesh.drains = {name: DrainMark(reason, since, by) for name, reason, since, by in rows}
    for name, mark in mesh.drains.items():
        node = mesh.nodes.get(name)
        if node is not None:
            node.drain = mark
            mesh._node_changed(node)
    if rows:
        log.info("%d drained node(s): %s", len(rows), ", ".join(sorted(mesh.drains)))


def on_register(mesh: HasDrains, node: Node) -> None:
    """A node (re)joins: it carries its durable drain mark, if it has one."""
    node.drain = mesh.drains.get(node.name)


def drain_notice(mesh: HasDrains, name: str) -> Drain | None:
    """What to send a node right after its `registered`: a `Drain` if it is drained."""
    mark = mesh.drains.get(name)
    return None if mark is None else Drain(reason=mark.reason)


async def drain(mesh: DrainHost, name: str, reason: str, by: str, also: Write) -> DrainMark:
    """Drain `name` (again: the reason and time are replaced). Returns once durable."""
    mesh._serving()
    mark = DrainMark(reason[:MAX_REASON] or f"drained by {by}", time.time(), by)
    mesh.drains[name] = mark
    node = mesh.nodes.get(name)
    if node is not None:
        node.drain = mark
        mesh._node_changed(node)  # placement skips it from now on
    put = DrainPut((name, mark.reason, mark.since, mark.by))
    await asyncio.shield(asyncio.gather(mesh.store.write(put), mesh.store.write(also)))
    log.warning("node %s drained by %s: %s", name, by, mark.reason, extra={"node": name})
    _tell(mesh, name, Drain(reason=mark.reason))
    mesh.services.node_drained(name)  # its service replicas: replaced before they stop
    return mark


async def undrain(mesh: DrainHost, name: str, by: str, also: Write) -> DrainMark | None:
    """Lift the drain of `name`; returns the mark it had (None: it was not drained)."""
    mesh._serving()
    mark = mesh.drains.get(name)
    writes = [mesh.store.write(also)]
    if mark is not None:
        writes.append(mesh.store.write(DrainPut((name,))))
    # Durable before visible: the node stays drained in memory until the lift is stored.
    await asyncio.shield(asyncio.gather(*writes))
    if mark is None or mesh.drains.get(name) is not mark:
        return mark  # it was not drained, or was drained again while this was written
    del mesh.drains[name]
    log.warning("node %s undrained by %s", name, by, extra={"node": name})
    node = mesh.nodes.get(name)
    if node is not None:
        node.drain = None
        # Told before placement may use it: the link is FIFO, so `lifted` precedes any
        # assign. Waking placement first sent an assign the still-draining client refused,
        # a false node fault on every undrain with queued work.
        _tell(mesh, name, Drain(reason=f"undrained by {by}", lifted=True))
        mesh._node_changed(node)  # wakes work that its capacity fits
        mesh._wake.set()
    return mark


def _tell(mesh: DrainHost, name: str, msg: Drain) -> None:
    node = mesh.nodes.get(name)  # looked up again: it may have reconnected meanwhile
    if node is not None and node.link is not None:
        node.link.send(msg)

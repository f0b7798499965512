"""The audit trail: who changed what, when. Durable and logged.

Records live in the mesh's own store (table `audit`) and go through its group commit, so a
submission's record commits in the same transaction as its tasks (`row()` + `Mesh.submit(
also=...)`): no extra commit per request, and never a task without its record.

One call for every state-changing action, from the HTTP routes and the node socket alike:

    await app.state.audit.record(principal, "task.submit", task_id, {"n": 3})
    await app.state.audit.record("node:gpu-01", "node.admit", "gpu-01", {"new": True})

`principal` is a `Principal` (token id and tenant) or a string naming the actor ("node:NAME").
Each record is also one structured log line on the `gpumesh.audit` logger.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson

from coordinator.access.auth import Principal
from coordinator.storage.store import AuditInsert
from coordinator.storage.store_core import GroupCommitStore

log = logging.getLogger("gpumesh.audit")

MAX_PAGE = 1000
MAX_TARGET = 512


class Audit:
    def __init__(self, store: GroupCommitStore) -> None:
        self.store = store

    def row(
        self, principal: Principal | str, action: str, target: str,
        detail: dict[str, Any] | None = None,
    ) -> AuditInsert:
        """The record as a store write (logged now), for a caller that commits it with the
        change it describes."""
        if isinstance(principal, Principal):
            actor, token_id, tenant = principal.actor, principal.token_id, principal.tenant
        else:
            actor, token_id, tenant = principal, "", ""
        target = target[:MAX_TARGET]
        detail = detail or {}
        log.info(
            "audit action=%s actor=%s tenant=%s target=%r", action, actor, tenant, target,
            extra={"audit": {"action": action, "actor": actor, "token_id": token_id,
                             "tenant": tenant, "target": target, "detail": detail}},
        )
        return AuditInsert((time.time(), actor, token_id, tenant, action, target,
                            orjson.dumps(detail)))

    async def record(
        self, principal: Principal | str, action: str, target: str,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Returns once the record is committed; raises `StoreError` if it could not be."""
        await self.store.write(self.row(principal, action, target, detail))

    async def page(self, after: int, limit: int, tenant: str | None) -> dict[str, Any]:
        rows = await self.store.audit_page(after, min(limit, MAX_PAGE), tenant)
        nxt = rows[-1]["seq"] if len(rows) == limit else None
        return {"records": rows, "count": len(rows), "next_after": nxt}

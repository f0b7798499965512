"""Admin routes: API tokens and the audit trail. The middleware already required `admin`."""

from __future__ import annotations

import logging
import re
from typing import Any

import orjson
from starlette.requests import Request
from starlette.routing import Route

from coordinator.access.audit import MAX_PAGE, Audit
from coordinator.access.auth import ADMIN_TOKEN_FILE, ROLES, Principal, TokenBook, principal_of
from coordinator.settings import Settings
from coordinator.storage.authstore import AuthStore
from coordinator.storage.store_core import GroupCommitStore
from coordinator.storage.store_pg import PgAuthStore, PgStore
from coordinator.web.api import JSON, _param, error

log = logging.getLogger(__name__)

TENANT = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")
MAX_NAME = 128


def _book(request: Request) -> TokenBook | None:
    book: TokenBook | None = request.app.state.tokens
    return book


async def create_token(request: Request) -> JSON:
    book, audit = _book(request), request.app.state.audit
    if book is None:
        return error(409, "auth is off", "MESH_AUTH=off: there are no tokens to manage")
    body = await request.body()
    if len(body) > 64 * 1024:
        return error(413, "body too large", "at most 65536 bytes")
    try:
        doc = orjson.loads(body or b"{}")
    except orjson.JSONDecodeError as exc:
        return error(400, "invalid JSON", str(exc))
    if not isinstance(doc, dict):
        return error(422, "invalid token request", "expected an object")
    tenant, role, name = doc.get("tenant"), doc.get("role", "submit"), doc.get("name", "")
    if not isinstance(tenant, str) or not TENANT.match(tenant):
        return error(422, "invalid token request",
                     "`tenant` must be 1-64 of A-Z a-z 0-9 . _ - (starting with a letter/digit)")
    if role not in ROLES:
        return error(422, "invalid token request", f"`role` must be one of {', '.join(ROLES)}")
    if not isinstance(name, str) or len(name) > MAX_NAME or not name.isprintable():
        return error(422, "invalid token request", f"`name`: printable text, <= {MAX_NAME}")
    token, row = await book.create(tenant, role, name)
    await audit.record(principal_of(request), "token.create", row.id,
                       {"tenant": tenant, "role": role, "name": name})
    return JSON(row.view() | {"token": token,
                              "note": "the token is shown only now; keep it secret"})


async def list_tokens(request: Request) -> JSON:
    book = _book(request)
    rows = [] if book is None else await book.store.tokens()
    return JSON({"tokens": [r.view() for r in rows], "count": len(rows)})


async def revoke_token(request: Request) -> JSON:
    book, audit = _book(request), request.app.state.audit
    token_id = request.path_params["token_id"]
    row = None if book is None else await book.revoke(token_id)
    if row is None:
        return error(404, "unknown token", f"no token {token_id!r}")
    await audit.record(principal_of(request), "token.revoke", row.id,
                       {"tenant": row.tenant, "role": row.role})
    return JSON(row.view())


async def audit_log(request: Request) -> JSON:
    audit: Audit = request.app.state.audit
    after = int(_param(request, "after", int, 0, 2**62) or 0)
    limit = int(_param(request, "limit", int, 1, MAX_PAGE) or 100)
    return JSON(await audit.page(after, limit, request.query_params.get("tenant")))


admin_routes = [
    Route("/admin/tokens", create_token, methods=["POST"]),
    Route("/admin/tokens", list_tokens),
    Route("/admin/tokens/{token_id}", revoke_token, methods=["DELETE"]),
    Route("/admin/audit", audit_log),
]


async def open_auth(
    state: Any, settings: Settings, mesh_store: GroupCommitStore
) -> AuthStore | PgAuthStore:
    """Open auth.sqlite3 and put `tokens` (None with MESH_AUTH=off) and `audit` (kept in the
    mesh's store, so a change and its record commit together) on app.state."""
    store: AuthStore | PgAuthStore = (
        PgAuthStore(mesh_store) if isinstance(mesh_store, PgStore)
        else AuthStore(settings.data_dir / "auth.sqlite3", settings.sqlite_synchronous)
    )
    await store.open()
    state.audit = Audit(mesh_store)
    state.tokens = None
    if settings.auth == "off":
        log.warning(
            "MESH_AUTH=off: API authentication is DISABLED; anyone who can reach %s:%d can "
            "submit work that runs on every node. Use it only on a trusted desk.",
            settings.host, settings.port,
        )
        return store
    book = TokenBook(store)
    await book.load()
    if settings.admin_token:
        book.add_memory_only(settings.admin_token, Principal("admin-env", "admin", "admin"))
        log.info("API auth on: the admin token is the MESH_ADMIN_TOKEN set at start")
    else:
        path, created = await book.ensure_file(settings.data_dir / ADMIN_TOKEN_FILE, "admin",
                                               "admin")
        log.info("API auth on: admin token %s %s (send it as `Authorization: Bearer ...`)",
                 "written to" if created else "in", path)
    if settings.metrics_token_file is not None:  # for a scraper running as another user
        try:
            path, _ = await book.ensure_file(
                settings.metrics_token_file, "monitoring", "metrics", 0o644
            )
            log.info("a metrics token for scraping /metrics is in %s", path)
        except OSError as exc:  # serve anyway: only the scraper goes without
            log.error("MESH_METRICS_TOKEN_FILE: cannot write %s: %s", exc.filename, exc.strerror)
    state.tokens = book
    return store

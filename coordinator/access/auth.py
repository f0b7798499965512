"""Who is calling: bearer tokens, roles, tenants, and the ASGI middleware that checks them.

Tokens are `gm_` + `secrets.token_urlsafe(32)` (256 random bits). They are stored as the
SHA-256 of the token: a slow password hash buys nothing for a 256-bit random secret, which
cannot be guessed or brute-forced from its hash. Lookups go by hash in an in-memory dict
loaded at start and kept in step with `auth.sqlite3` (a change is applied to the dict only
after it committed); the stored hash is then compared with `hmac.compare_digest`.

`AuthMiddleware` is plain ASGI (BaseHTTPMiddleware costs a task and a queue per request). It
resolves the caller once, puts the `Principal` in `scope["state"]["principal"]` (so
`request.state.principal` in routes), refuses non-JSON POST bodies with 415 before anything
is read, and refuses WebSocket handshakes from browser origins that are not allowed.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import os
import secrets
import time
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from coordinator.storage.authstore import TokenRow, TokenStore

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

log = logging.getLogger(__name__)

# read: look (its own tenant's tasks; other tenants only as anonymous totals); submit: also
# submit and cancel; admin: everything, every tenant. `metrics` is a scraper's: read, and the
# per-tenant series of /metrics (coordinator/core/metrics.py) that only admins see otherwise;
# it ranks with read, so submit and admin tokens are not metrics tokens by rank (see `can`).
ROLES = ("read", "metrics", "submit", "admin")
_RANK = {"read": 0, "metrics": 0, "submit": 1, "admin": 2}
PREFIX = "gm_"
ADMIN_TOKEN_FILE = "admin.token"


@dataclass(frozen=True, slots=True)
class Principal:
    token_id: str  # "" for the anonymous caller when MESH_AUTH=off
    tenant: str
    role: str

    def can(self, role: str) -> bool:
        if role == "metrics":  # not a rank: only a metrics token and an admin read them
            return self.role in ("metrics", "admin")
        return _RANK[self.role] >= _RANK[role]

    @property
    def actor(self) -> str:
        return f"token:{self.token_id}" if self.token_id else "anonymous"

    def sees(self, tenant: str) -> bool:
        """Whether a task of `tenant` is visible to this caller (admins see every tenant)."""
        return self.role == "admin" or tenant == self.tenant

    @property
    def sees_all_tenants(self) -> bool:
        """Whether other tenants' task ids, names and usage are shown to this caller (an
        admin, or anyone with MESH_AUTH=off); others see theirs and anonymous totals."""
        return self.role == "admin"


ANONYMOUS = Principal(token_id="", tenant="", role="admin")  # MESH_AUTH=off: a trusted desk


def new_token() -> str:
    return PREFIX + secrets.token_urlsafe(32)


def token_hash(token: bytes) -> str:
    return hashlib.sha256(token).hexdigest()


def new_token_id() -> str:
    return "tok_" + secrets.token_hex(6)


class TokenBook:
    """Live tokens by hash, in memory; every change goes through the store first."""

    def __init__(self, store: TokenStore) -> None:
        self.store = store
        self._by_hash: dict[str, tuple[str, Principal]] = {}

    async def load(self) -> None:
        for row in await self.store.tokens():
            if row.revoked_at is None:
                self._by_hash[row.hash] = (row.hash, Principal(row.id, row.tenant, row.role))

    def add_memory_only(self, token: str, principal: Principal) -> None:
        """MESH_ADMIN_TOKEN: known while this process runs, never written anywhere."""
        h = token_hash(token.encode())
        self._by_hash[h] = (h, principal)

    def resolve(self, token: bytes) -> Principal | None:
        h = token_hash(token)
        hit = self._by_hash.get(h)
        if hit is None or not hmac.compare_digest(hit[0], h):
            return None
        return hit[1]

    async def create(self, tenant: str, role: str, name: str = "") -> tuple[str, TokenRow]:
        token = new_token()
        row = TokenRow(new_token_id(), token_hash(token.encode()), tenant, role, name,
                       time.time(), None)
        await self.store.add_token(row)  # durable first, then usable
        self._by_hash[row.hash] = (row.hash, Principal(row.id, tenant, role))
        return token, row

    async def revoke(self, token_id: str) -> TokenRow | None:
        row = await self.store.revoke(token_id)  # durable first, then refused
        if row is not None:
            self._by_hash.pop(row.hash, None)
        return row

    async def ensure_file(
        self, path: Path, tenant: str, role: str, mode: int = 0o600
    ) -> tuple[Path, bool]:
        """A token of `role` kept in `path` (created with `mode`, never wider): (path, created).

        An existing file is kept; if auth.sqlite3 lost its token, the token is known again."""
        try:
            known = (await asyncio.to_thread(path.read_text)).strip()
        except FileNotFoundError:
            known = ""
        if known:
            h = token_hash(known.encode())
            rows = [r for r in await self.store.tokens() if r.hash == h]
            if not rows:
                row = TokenRow(new_token_id(), h, tenant, role, path.name, time.time(), None)
                await self.store.add_token(row)
                self._by_hash[h] = (h, Principal(row.id, tenant, role))
            elif rows[0].revoked_at is not None:
                log.warning("the token in %s was revoked; delete the file to get a new one", path)
            elif rows[0].role != role:  # e.g. a scraper's read token from before `metrics`
                log.warning("the token in %s has role %s, not %s; delete the file to get a "
                            "new one", path, rows[0].role, role)
            return path, False
        token, _ = await self.create(tenant, role, path.name)
        if not path.parent.is_dir():  # the process umask is 077: a scraper's dir stays open
            path.parent.mkdir(parents=True, exist_ok=True)
            os.chmod(path.parent, 0o755 if mode & 0o044 else 0o700)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
        os.fchmod(fd, mode)  # exactly `mode`, whatever the umask
        with os.fdopen(fd, "w") as f:
            f.write(token + "\n")
        return path, True


# --- which role each route needs ------------------------------------------------------------

PUBLIC = frozenset({("GET", "/"), ("GET", "/health"), ("HEAD", "/"), ("HEAD", "/health")})
# The API document and the pages: they describe and render, hold no data (coordinator/web/ui.py)
PUBLIC_PAGES = ("/openapi.json", "/docs", "/ui")
# PUT /nodes/{node}/tasks/...: node credential (coordinator/web/artifacts.py)
NODE_UPLOADS = "/nodes/"


def required_role(method: str, path: str) -> str | None:
    """The least role a request needs; None for the public routes."""
    if (method, path) in PUBLIC:
        return None
    if method in ("GET", "HEAD") and (path in PUBLIC_PAGES or path.startswith("/ui/assets/")):
        return None
    if method == "PUT" and path.startswith(NODE_UPLOADS):
        return None  # a node's artifact upload: the route checks the node's credential
    if path.startswith("/admin/") or path == "/admin":
        return "admin"
    if path.startswith("/mesh/") and method not in ("GET", "HEAD"):
        return "admin"  # DELETE /mesh/nodes/{name} (forget), drains: operators only
    if method in ("GET", "HEAD"):
        return "read"
    return "submit"  # submit and cancel


def how_to_get_a_token(data_dir: Path, from_env: bool) -> str:
    where = ("the MESH_ADMIN_TOKEN the coordinator was started with" if from_env
             else f"the admin token in {data_dir / ADMIN_TOKEN_FILE} on the coordinator host")
    return (f"send `Authorization: Bearer <token>`; use {where}, or ask an admin for one "
            "(POST /admin/tokens, `gpumesh token create --tenant T --role submit`)")


# --- the middleware -------------------------------------------------------------------------

def headers_of(scope: Scope) -> dict[bytes, bytes]:
    return {k.lower(): v for k, v in scope.get("headers", ())}


# The OpenAI-compatible API answers its refusals in OpenAI's shape (coordinator/web/openai.py)
OPENAI_PREFIX = "/v1/"
_OPENAI_CODES = {401: ("invalid_api_key", "invalid_request_error"),
                 403: ("insufficient_permissions", "invalid_request_error"),
                 415: ("unsupported_media_type", "invalid_request_error")}


async def _reply(send: Send, status: int, what: str, reason: str, openai: bool = False) -> None:
    if openai:
        code, kind = _OPENAI_CODES[status]
        body = orjson.dumps({"error": {"message": f"{what}: {reason}", "type": kind,
                                       "param": None, "code": code}})
    else:
        body = orjson.dumps({"error": what, "reason": reason})
    await send({
        "type": "http.response.start", "status": status,
        "headers": [(b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode())]
        + ([(b"www-authenticate", b'Bearer realm="gpumesh"')] if status == 401 else []),
    })
    await send({"type": "http.response.body", "body": body})


def is_json(content_type: bytes | None) -> bool:
    if content_type is None:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or (
        media.startswith(b"application/") and media.endswith(b"+json")
    )


def _has_body(h: dict[bytes, bytes]) -> bool:
    length = h.get(b"content-length", b"").strip()
    return b"transfer-encoding" in h or (length not in (b"", b"0"))


class AuthMiddleware:
    def __init__(
        self, app: ASGIApp, *, enabled: bool, origins: tuple[str, ...],
        book: Callable[[], TokenBook | None], hint: Callable[[], str],
    ) -> None:
        self.app, self.enabled, self.book, self.hint = app, enabled, book, hint
        self.any_origin = "*" in origins
        self.origins = frozenset(o.encode() for o in origins)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        kind = scope["type"]
        if kind == "websocket":
            origin = headers_of(scope).get(b"origin")
            if origin is not None and not self.any_origin and origin not in self.origins:
                await send({"type": "websocket.close", "code": 1008,
                            "reason": "origin not allowed"})  # before accept: HTTP 403
                return
            await self.app(scope, receive, send)
            return
        if kind != "http":
            await self.app(scope, receive, send)
            return
        h = headers_of(scope)
        method = scope["method"]
        openai = scope["path"].startswith(OPENAI_PREFIX)
        if method in ("POST", "PUT", "PATCH") and (
            _has_body(h) or b"content-type" in h
        ) and not is_json(h.get(b"content-type")) and not (
            method == "PUT" and scope["path"].startswith(NODE_UPLOADS)  # artifact bytes
        ):
            await _reply(send, 415, "unsupported media type",
                         "POST bodies must be JSON: send `Content-Type: application/json`",
                         openai)
            return
        principal = self._principal(h)
        if self.enabled:
            need = required_role(method, scope["path"])
            if need is not None:
                if principal is None:
                    await _reply(send, 401, "unauthorized", self.hint(), openai)
                    return
                if not principal.can(need):
                    await _reply(
                        send, 403, "forbidden",
                        f"this token's role is {principal.role}; {method} {scope['path']} "
                        f"needs {need}", openai,
                    )
                    return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)

    def _principal(self, h: dict[bytes, bytes]) -> Principal | None:
        return caller_of(h, self.enabled, self.book())


def caller_of(h: dict[bytes, bytes], enabled: bool, book: TokenBook | None) -> Principal | None:
    """The caller named by a request's (lower-cased) headers: its bearer token's principal,
    None for no token or an unknown one; ANONYMOUS when auth is off."""
    if not enabled:
        return ANONYMOUS
    raw = h.get(b"authorization")
    if raw is None or book is None:
        return None
    scheme, _, token = raw.strip().partition(b" ")
    if scheme.lower() != b"bearer" or not token.strip():
        return None
    return book.resolve(token.strip())


def principal_of(request: Any) -> Principal:
    """The caller of a route (the middleware set it; public routes may have None)."""
    p: Principal | None = request.scope.get("state", {}).get("principal")
    return p if p is not None else Principal(token_id="", tenant="\x00none", role="read")

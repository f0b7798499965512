"""The Starlette app: the Mesh is built in the lifespan and kept on app.state."""

from __future__ import annotations

import contextlib
import gc
import logging
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import WebSocketRoute

from coordinator.access.auth import AuthMiddleware, how_to_get_a_token
from coordinator.core.mesh import Mesh
from coordinator.core.metrics import MeshMetrics
from coordinator.leader.advertise import Advertiser
from coordinator.leader.standby import BodyRefused, StandbyGate, fence_store, serve_role
from coordinator.link.identity import NodeIdentities
from coordinator.link.streams import StreamMetrics
from coordinator.link.ws import Connections, node_socket
from coordinator.settings import Settings
from coordinator.storage.store import StoreError, open_store
from coordinator.storage.store_pg import PgCredentials, PgStore
from coordinator.web.admin_api import admin_routes, open_auth
from coordinator.web.api import as_json, error, not_stored, routes
from coordinator.web.artifacts import ArtifactFiles, artifact_routes
from coordinator.web.drain_api import drain_routes
from coordinator.web.edge import BodyTooLarge, read_body
from coordinator.web.engines import load_engines
from coordinator.web.fastlane import FastLane
from coordinator.web.node_api import node_routes
from coordinator.web.openai import Router
from coordinator.web.openai import routes as openai_routes
from coordinator.web.openapi import openapi_routes
from coordinator.web.services_api import service_routes
from coordinator.web.templates import load_templates
from coordinator.web.tenant_api import tenant_routes
from coordinator.web.ui import ui_routes

log = logging.getLogger(__name__)


async def _http_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, HTTPException)
    what = {400: "bad request", 404: "not found", 405: "method not allowed"}.get(
        exc.status_code, "error"
    )
    reason = exc.detail if exc.status_code == 400 else f"{request.method} {request.url.path}"
    return error(exc.status_code, what, reason)


async def _store_error(request: Request, exc: Exception) -> Response:
    return as_json(not_stored(exc))


def _body_reader(limit: int) -> Callable[[Request], Awaitable[bytes]]:
    """A standby's reader of the bodies it forwards (StandbyGate): the edge's, under `limit`."""

    async def read(request: Request) -> bytes:
        try:
            return await read_body(request, limit)
        except BodyTooLarge as exc:
            raise BodyRefused(str(exc)) from exc

    return read


def create_app(settings: Settings, *, freeze_gc: bool = False) -> Starlette:
    templates = load_templates(settings.templates)  # a bad file stops the start, with why
    engines = load_engines(settings.templates)  # [engine.*] of model services, the same file

    @contextlib.asynccontextmanager
    async def leading(
        app: Starlette, epoch: int | None = None, depose: Callable[[str], None] | None = None
    ) -> AsyncIterator[None]:
        """Serve as the leader: open the store (fenced at `epoch` with PostgreSQL), build the
        Mesh from it as after a restart; on exit stop it and close everything."""
        metrics = MeshMetrics()
        store = open_store(settings, on_commit=metrics.store_committed)  # MESH_STORE
        await store.open()
        auth_store = await open_auth(app.state, settings, store)
        identities = await NodeIdentities.open(
            settings.data_dir, settings.token, settings.join_token_file,
            PgCredentials(store) if isinstance(store, PgStore) else None,
        )
        app.state.identities = identities
        mesh = Mesh(store, settings, metrics)
        if epoch is not None and depose is not None:
            fence_store(store, epoch, depose)  # a refused write (Deposed) steps down at once
        connections = Connections()
        metrics.watch(mesh, lambda: connections.open)
        app.state.mesh = mesh
        app.state.connections = connections
        app.state.templates = templates
        app.state.engines = engines
        router = app.state.router = Router(settings)  # /v1 (coordinator/web/openai.py)
        app.state.streams = router.streams  # the node link hands it stream frames
        metrics.registry.register(StreamMetrics(router.streams))
        await mesh.start()
        artifacts = ArtifactFiles(settings.data_dir / "artifacts", mesh,
                                  settings.artifact_retention_s, settings.artifacts_max_bytes)
        app.state.artifacts = artifacts
        await artifacts.start()  # partial uploads removed, the ledger read; the sweeper
        mesh.node_side.artifacts = artifacts.vet  # a result records only what was stored here
        if freeze_gc:
            gc.collect()
            gc.freeze()  # what was loaded at start lives long: keep it out of every collection
        log.info("coordinator %s ready; data in %s", settings.name, settings.data_dir)
        advertiser = Advertiser(settings, app.state)  # mDNS, while leading; withdrawn first
        await advertiser.start()
        try:
            yield
        finally:
            router.streams.shutdown("the coordinator stopped leading")
            await advertiser.stop()
            await artifacts.stop()
            await mesh.stop()
            await store.close()
            await auth_store.close()
            await identities.close()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with serve_role(app.state, settings, lambda e, d: leading(app, e, d)):
            yield

    hint = how_to_get_a_token(settings.data_dir, bool(settings.admin_token))
    app: Starlette = Starlette(  # typed here: the lambdas below read it
        routes=[*routes, *service_routes, *admin_routes, *node_routes,
                WebSocketRoute("/ws/{node_id}", node_socket),
                *openapi_routes, *ui_routes(), *artifact_routes, *drain_routes, *tenant_routes,
                *openai_routes],
        middleware=[
            *([Middleware(  # submit and read a task without the stack below (fastlane.py)
                FastLane, state=lambda: app.state, auth=settings.auth != "off",
                book=lambda: getattr(app.state, "tokens", None),
                max_body_bytes=settings.max_body_bytes,
            )] if settings.fast_lane else []),
            Middleware(  # a standby forwards HTTP to the leader and points nodes at it
                StandbyGate, role=lambda: getattr(app.state, "role", None),
                read_body=_body_reader(settings.max_body_bytes),
            ),
            Middleware(  # answers preflights, adds headers to every answer
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["Authorization", "Content-Type"],
            ),
            Middleware(
                AuthMiddleware, enabled=settings.auth != "off", origins=settings.cors_origins,
                book=lambda: getattr(app.state, "tokens", None), hint=lambda: hint,
            ),
        ],
        exception_handlers={HTTPException: _http_error, StoreError: _store_error},
        lifespan=lifespan,
    )
    return app

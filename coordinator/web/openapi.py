"""`GET /openapi.json`: the API described as OpenAPI 3.1, built from the app's own routes.

Schemas come from msgspec (`msgspec.json.schema_components`) over the types the routes
decode with (shared.tasks.TaskSubmit, the wire messages in shared.protocol) and the answer
types in coordinator/web/api_types.py; what each route does is in coordinator/web/openapi_routes.py;
the role each needs is `auth.required_role`, the function the middleware enforces. The
document is built once per app, on first request, from `app.routes`.

/openapi.json, /docs and /ui are public, like `/` and `/health`: they describe the API and
hold no data and no power (every call the pages make carries the caller's own token), and
the same text ships in the package anyone can read. Tools can fetch the contract without
a secret.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import msgspec
import orjson
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import BaseRoute, Mount, Route, WebSocketRoute

from coordinator.access.auth import required_role
from coordinator.web import api_types
from coordinator.web.openapi_routes import ROUTES, WEBSOCKET, Op
from shared import __version__
from shared.protocol import ClientMsg, ServerMsg

REF = "#/components/schemas/{name}"

ERRORS: dict[int, str] = {
    400: "Bad request: JSON that does not parse, or a bad query parameter",
    401: "No token, or one that is unknown or revoked (`reason` says where to get one)",
    403: "The token's role is too small for this route",
    404: "Not found (another tenant's task is not found either)",
    409: "Conflict with the current state (already finished, node busy, auth off)",
    410: "Gone: kept for a while, then deleted (the reason says when)",
    413: "Body or task too large (the reason names the limit)",
    415: "A POST body that is not `application/json`",
    422: "A body that does not validate (the reason names the field)",
    429: "Over a limit for now (queue full, too many log followers): see Retry-After",
    503: "Not stored: the store could not commit, or the coordinator is rebuilding; "
         "retry after Retry-After",
    507: "Not stored: the coordinator's disk refused the write; retry later",
}


def _template(path: str) -> str:
    """Starlette's `{name:path}` is OpenAPI's `{name}`."""
    return re.sub(r"\{(\w+):\w+\}", r"{\1}", path)


def mounted(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    """(method, path template) of every route the app answers; HEAD goes with GET, and a
    WebSocket route is listed under WEBSOCKET."""
    for r in routes:
        if isinstance(r, Route):
            for method in sorted((r.methods or {"GET"}) - {"HEAD"}):
                yield method, _template(prefix + r.path)
        elif isinstance(r, WebSocketRoute):
            yield WEBSOCKET, _template(prefix + r.path)
        elif isinstance(r, Mount):
            inner = getattr(r.app, "routes", None)
            if inner is not None:
                yield from mounted(inner, prefix + r.path)
            else:
                yield "GET", f"{prefix}{r.path}/{{path}}"


def _op_id(method: str, path: str) -> str:
    words = [w.strip("{}") for w in path.split("/") if w] or ["index"]
    return "_".join([method.lower(), *words]).replace(".", "_").replace("-", "_")


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _error(status: int) -> dict[str, Any]:
    return {"description": ERRORS[status], "content": _json({"$ref": REF.format(name="ErrorBody")})}


class _Schemas:
    """Every type the document names, turned into schemas in one msgspec call."""

    def __init__(self) -> None:
        self.types: list[Any] = [api_types.ErrorBody, ClientMsg, ServerMsg]
        self.out: list[dict[str, Any]] = []

    def ref(self, tp: Any) -> int:
        self.types.append(tp)
        return len(self.types) - 1

    def build(self) -> dict[str, Any]:
        out, components = msgspec.json.schema_components(self.types, ref_template=REF)
        self.out = list(out)
        components["ClientMessage"] = out[1]
        components["ServerMessage"] = out[2]
        return dict(sorted(components.items()))


def _parameters(path: str, op: Op) -> list[dict[str, Any]]:
    params = [
        {"name": seg[1:-1], "in": "path", "required": True, "schema": {"type": "string"}}
        for seg in path.split("/") if seg.startswith("{") and seg.endswith("}")
    ]
    params += [
        {"name": q.name, "in": "query", "required": False, "schema": q.schema,
         "description": q.description}
        for q in op.query
    ]
    return params


def _operation(method: str, path: str, op: Op, schemas: _Schemas) -> dict[str, Any]:
    """The operation with type indexes where schemas go (filled in by `_resolve`)."""
    role = None if method == WEBSOCKET or op.caller else required_role(method, path)
    doc: dict[str, Any] = {
        "operationId": _op_id("ws" if method == WEBSOCKET else method, path),
        "tags": [op.tag],
        "summary": op.summary,
        "x-role": role or op.caller or ("join token" if method == WEBSOCKET else "public"),
    }
    if op.description:
        doc["description"] = op.description
    if params := _parameters(path, op):
        doc["parameters"] = params
    if isinstance(op.body, dict):
        doc["requestBody"] = {"required": True, "content": {
            m: {"schema": {"type": "string", "description": d}} for m, d in op.body.items()}}
    elif op.body is not None:
        doc["requestBody"] = {"required": True, "content": _json({"x-type": schemas.ref(op.body)})}
    responses: dict[str, Any] = {}
    if method == WEBSOCKET:
        responses["101"] = {"description": "Switching Protocols: the node's WebSocket"}
        doc["x-websocket"] = {"client": {"$ref": REF.format(name="ClientMessage")},
                              "server": {"$ref": REF.format(name="ServerMessage")}}
    elif isinstance(op.ok, dict):
        responses["200"] = {"description": "OK",
                            "content": {m: {"schema": {"type": "string", "description": d}}
                                        for m, d in op.ok.items()}}
    else:
        kinds = op.ok if isinstance(op.ok, tuple) else (op.ok,)
        refs = [{"x-type": schemas.ref(tp)} for tp in kinds]
        schema = refs[0] if len(refs) == 1 else {"oneOf": refs}
        responses["200"] = {"description": "OK", "content": _json(schema)}
    for status, tp in op.also.items():
        desc = {200: "OK", 201: "Created"}.get(status) or ERRORS.get(status, str(status))
        responses[str(status)] = {"description": desc,
                                  "content": _json({"x-type": schemas.ref(tp)})}
    errors = set(op.errors)
    if role is not None:
        errors |= {401, 403, 503}
    doc["security"] = [{"bearer": []}] if role is not None or op.caller else []
    if method in ("POST", "PUT", "PATCH") and op.body is not None and not isinstance(op.body,
                                                                                    dict):
        errors.add(415)
    for status in sorted(errors - set(op.also)):
        responses[str(status)] = _error(status)
    doc["responses"] = responses
    return doc


def _resolve(node: Any, schemas: _Schemas) -> Any:
    """Replace each `{"x-type": i}` placeholder by the schema msgspec made for type i."""
    if isinstance(node, dict):
        if set(node) == {"x-type"}:
            return schemas.out[node["x-type"]]
        return {k: _resolve(v, schemas) for k, v in node.items()}
    if isinstance(node, list):
        return [_resolve(v, schemas) for v in node]
    return node


def build_document(routes: Sequence[BaseRoute]) -> dict[str, Any]:
    schemas = _Schemas()
    paths: dict[str, dict[str, Any]] = {}
    for method, path in mounted(routes):
        op = ROUTES.get((method, path))
        if op is None:  # tests/web/test_openapi.py fails on this; the document stays honest
            op = Op("undocumented", "(not documented yet)", {"*/*": "not documented"})
        verb = "get" if method == WEBSOCKET else method.lower()
        paths.setdefault(path, {})[verb] = _operation(method, path, op, schemas)
    components = schemas.build()
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "gpumesh",
            "version": __version__,
            "summary": "One API for every GPU you own",
            "description": (
                "Send `Authorization: Bearer <token>` (roles read < submit < admin; `x-role` "
                "on each operation is the least it needs). `/`, `/health`, this document, "
                "`/docs` and `/ui` are public. Every refusal is `{\"error\", \"reason\"}`. "
                "Answers may gain fields in later versions; none is ever renamed."
            ),
        },
        "jsonSchemaDialect": "https://spec.openapis.org/oas/3.1/dialect/base",
        "tags": [{"name": n} for n in ("tasks", "mesh", "admin", "service", "console", "nodes",
                                            "services")],
        "paths": _resolve(paths, schemas),
        "components": {
            "schemas": components,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer",
                                           "description": "a gpumesh API token (gm_...)"}},
        },
    }


async def openapi_json(request: Request) -> Response:
    cached: bytes | None = getattr(request.app.state, "openapi", None)
    if cached is None:
        cached = orjson.dumps(build_document(request.app.routes))
        request.app.state.openapi = cached
    return Response(cached, media_type="application/json")


openapi_routes = [Route("/openapi.json", openapi_json)]

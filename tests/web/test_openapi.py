"""/openapi.json: a valid OpenAPI 3.1 document that names every route the app mounts (and
nothing else), and that a real server keeps: every documented operation is called on a real
coordinator with a real node, and each answer is checked against the documented status
codes, media types and schemas, with every object closed (a key the schema does not name
fails, so a field added to a view without being documented is caught)."""

from __future__ import annotations

import copy
import inspect
import re
from collections.abc import Callable
from dataclasses import replace
from typing import Any

import httpx
import jsonschema
import pytest
from openapi_spec_validator import validate as validate_spec
from starlette.routing import Route

from coordinator.settings import Settings
from coordinator.web.app import create_app
from coordinator.web.openapi import WEBSOCKET, build_document, mounted
from coordinator.web.openapi_routes import ROUTES
from tests.conftest import LiveCoordinator, Proc, run_coordinator, wait_until

PUBLIC = ("/openapi.json", "/docs", "/ui", "/ui/assets/console.js")


def test_every_mounted_route_is_documented_and_nothing_else(settings: Settings) -> None:
    app = create_app(settings)
    routes = set(mounted(app.routes))
    undocumented = sorted(routes - set(ROUTES))
    stale = sorted(set(ROUTES) - routes)
    assert not undocumented, f"mounted, not in coordinator/web/openapi_routes.py: {undocumented}"
    assert not stale, f"in coordinator/web/openapi_routes.py, not mounted: {stale}"


def test_every_status_a_route_answers_with_is_documented(settings: Settings) -> None:
    """Each `error(NNN, ...)` written in a route's own function is a documented answer."""
    app = create_app(settings)
    doc = build_document(app.routes)
    missing = []
    for r in app.routes:
        if not isinstance(r, Route):
            continue
        source = inspect.getsource(r.endpoint)
        codes = {int(c) for c in re.findall(r"\berror\(\s*(\d{3})", source)}
        for method in (r.methods or set()) - {"HEAD"}:
            path = re.sub(r"\{(\w+):\w+\}", r"{\1}", r.path)
            documented = {int(s) for s in doc["paths"][path][method.lower()]["responses"]}
            missing += [f"{method} {path}: {c}" for c in sorted(codes - documented)]
    where = "coordinator/web/openapi_routes.py"
    assert not missing, f"answered but not documented ({where}): {missing}"


def closed(doc: dict[str, Any]) -> dict[str, Any]:
    """The document's schemas with `additionalProperties: false` on every object that
    names its properties and says nothing about others."""
    components = copy.deepcopy(doc["components"])

    def close(node: Any) -> None:
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node:
                node["additionalProperties"] = False
            for v in node.values():
                close(v)
        elif isinstance(node, list):
            for v in node:
                close(v)

    close(components["schemas"])
    return components


class Contract:
    """Checks real answers against the document; remembers which operations were seen."""

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc, self.components = doc, closed(doc)
        self.seen: set[tuple[str, str]] = set()

    def check(self, method: str, path: str, r: httpx.Response) -> None:
        op = self.doc["paths"][path][method.lower()]
        self.seen.add((method, path))
        status = str(r.status_code)
        assert status in op["responses"], (
            f"{method} {path} answered {status}, documented: {sorted(op['responses'])}: {r.text}"
        )
        content = op["responses"][status].get("content", {})
        media = r.headers.get("content-type", "").split(";")[0].strip()
        assert media in content, f"{method} {path} {status}: {media!r} not in {list(content)}"
        if media != "application/json" or path == "/openapi.json":
            return
        schema = {"$schema": "https://json-schema.org/draft/2020-12/schema",
                  "components": self.components, **content[media]["schema"]}
        try:
            jsonschema.validate(r.json(), schema, cls=jsonschema.Draft202012Validator)
        except jsonschema.ValidationError as exc:
            where = "/".join(str(p) for p in exc.absolute_path)
            raise AssertionError(f"{method} {path} {status} at {where!r}: {exc.message}") from None


async def test_document_validates_and_every_route_answers_in_its_documented_shape(
    coordinator: LiveCoordinator, spawn_client: Callable[..., Proc], settings: Settings
) -> None:
    http = coordinator.http
    anon = httpx.AsyncClient(base_url=coordinator.url, timeout=30)
    r = await anon.get("/openapi.json")  # public: it describes, it holds no data
    assert r.status_code == 200
    doc = r.json()
    validate_spec(doc)  # OpenAPI 3.1, with its JSON Schema dialect
    assert doc["openapi"] == "3.1.0"
    c = Contract(doc)
    c.check("GET", "/openapi.json", r)

    spawn_client("n1", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
    spawn_client("spare", coordinator.ws_url)
    await wait_until(lambda: {"n1", "spare"} <= {n for n, v in coordinator.mesh.nodes.items()
                                                 if v.online}, 30, "both nodes online")
    await wait_until(lambda: coordinator.mesh.nodes["n1"].gpus, 10, "n1's GPUs")

    async def call(method: str, path: str, url: str | None = None, *, client: Any = None,
                   **kw: Any) -> httpx.Response | None:
        if method.lower() not in doc["paths"].get(path, {}):
            return None  # not mounted in this build (the first test names what is)
        resp = await (client or http).request(method, url or path, **kw)
        c.check(method, path, resp)
        return resp

    for page in PUBLIC:
        resp = await call("GET", "/ui/assets/{name}" if "assets" in page else page, page,
                          client=anon)
        assert resp is not None and resp.status_code == 200
    await call("GET", "/ui/assets/{name}", "/ui/assets/nope.js")
    await call("GET", "/")
    await call("GET", "/health", client=anon)
    await call("GET", "/metrics")
    await call("GET", "/mesh/status", client=anon)  # 401 without a token
    await call("GET", "/mesh/nodes/{name}", "/mesh/nodes/nobody")

    ok = await call("POST", "/tasks/submit", json={"task_type": "test", "name": "probe"})
    assert ok is not None
    done = await coordinator.wait_finished(ok.json()["task_id"])
    assert done["status"] == "completed"
    batch = await call("POST", "/tasks/submit", json=[
        {"task_type": "custom", "script": "echo hi; sleep 30", "priority": 9, "tenant": "t1"},
        {"task_type": "custom", "script": "true", "requirements": {"gpu_count": 8}},
    ])
    assert batch is not None
    running, waiting = (t["task_id"] for t in batch.json()["tasks"])
    await wait_until(lambda: coordinator.mesh.tasks[running].state == "running", 20, "running")
    await call("POST", "/tasks/submit", json={"task_type": "custom"})  # 422
    await call("POST", "/tasks/submit", content=b"{", headers={"content-type":
                                                                "application/json"})  # 400
    await call("POST", "/tasks/submit", content=b"x", headers={"content-type": "text/plain"})

    await call("GET", "/mesh/status")
    await call("GET", "/mesh/nodes")
    await call("GET", "/mesh/nodes/{name}", "/mesh/nodes/n1")
    await call("GET", "/tasks/active")
    await call("GET", "/tasks/{task_id}", f"/tasks/{waiting}")  # queued, with its reason
    await call("GET", "/tasks/{task_id}", f"/tasks/{running}")
    await call("GET", "/tasks/{task_id}", "/tasks/nope")
    await call("GET", "/tasks/{task_id}", f"/tasks/{running}?wait=x")
    await call("GET", "/tasks/{task_id}/logs", f"/tasks/{running}/logs")
    await call("GET", "/tasks/{task_id}/logs", "/tasks/nope/logs")
    await call("POST", "/tasks/{task_id}/cancel", f"/tasks/{running}/cancel")
    await call("DELETE", "/tasks/{task_id}", f"/tasks/{waiting}")
    await call("DELETE", "/tasks/{task_id}", f"/tasks/{waiting}")  # 409: finished
    await call("POST", "/tasks/{task_id}/cancel", "/tasks/nope/cancel")
    await call("GET", "/tasks/completed", "/tasks/completed?limit=2")
    await call("GET", "/tasks/completed", "/tasks/completed?limit=0")

    made = await call("POST", "/admin/tokens", json={"tenant": "t1", "role": "read"})
    await call("POST", "/admin/tokens", json={"tenant": "bad tenant!"})
    assert made is not None
    reader = {"Authorization": f"Bearer {made.json()['token']}"}
    await call("POST", "/admin/tokens", json={"tenant": "t2"}, headers=reader)  # 403
    await call("GET", "/admin/tokens")
    await call("DELETE", "/admin/tokens/{token_id}", f"/admin/tokens/{made.json()['id']}")
    await call("DELETE", "/admin/tokens/{token_id}", "/admin/tokens/tok_nope")
    await call("GET", "/admin/audit", "/admin/audit?limit=5")
    await call("GET", "/admin/audit", "/admin/audit?limit=-1")

    await call("PUT", "/admin/tenants/{name}", "/admin/tenants/t1",
               json={"weight": 2, "max_queued": 100})
    await call("PUT", "/admin/tenants/{name}", "/admin/tenants/t1", json={"weight": -1})
    await call("GET", "/admin/tenants")
    await call("GET", "/admin/tenants/{name}", "/admin/tenants/t1")

    await call("POST", "/mesh/nodes/{name}/drain", "/mesh/nodes/n1/drain",
               json={"reason": "kernel upgrade"})
    await call("POST", "/mesh/nodes/{name}/drain", "/mesh/nodes/ghost/drain", json={})
    await call("GET", "/mesh/nodes/{name}", "/mesh/nodes/n1")  # with its drain
    await call("GET", "/mesh/status")
    await call("POST", "/mesh/nodes/{name}/undrain", "/mesh/nodes/n1/undrain", json={})

    svc = {"name": "chat", "model": "tiny", "replicas": {"min": 1, "max": 1},
           "command": ["python3", "-c", "import time; time.sleep(60)", "{port}"]}
    await call("POST", "/services", json=svc)
    await call("POST", "/services", json=svc)  # 409
    await call("POST", "/services", json={**svc, "name": "x y"})  # 422
    await call("PUT", "/services/{name}", "/services/chat", json={**svc, "model": "tiny2"})
    await call("GET", "/services")
    await wait_until(lambda: any(s.replicas for s in coordinator.mesh.services.all(None)), 10,
                     "a replica")
    await call("GET", "/services/{name}", "/services/chat?history=5")
    await call("GET", "/services/{name}", "/services/chat?history=x")  # 400
    await call("GET", "/services/{name}", "/services/nope")  # 404
    await call("DELETE", "/services/{name}", "/services/chat")

    # /v1 (its real answers are tests/serving/test_router.py's): the shapes of its refusals
    await call("GET", "/v1/models")
    await call("GET", "/v1/models", client=anon)  # 401, in OpenAI's shape
    await call("GET", "/v1/models/{model}", "/v1/models/nope")  # 404
    await call("POST", "/v1/chat/completions", json={"model": "nope", "messages": []})  # 404
    await call("POST", "/v1/completions", content=b"{", headers={"content-type":
                                                                 "application/json"})  # 400
    await call("POST", "/v1/embeddings", json={"input": "x"})  # 400: no model

    await call("DELETE", "/mesh/nodes/{name}", "/mesh/nodes/spare")
    await call("DELETE", "/mesh/nodes/{name}", "/mesh/nodes/ghost")

    missing = {
        (m, p) for p, item in doc["paths"].items() for m in (k.upper() for k in item)
        if (m, p) not in c.seen and (WEBSOCKET, p) not in ROUTES
    }
    # Not called here, each tested where it lives: artifact transfers (tests/test_files*.py).
    missing -= {("PUT", "/nodes/{node}/tasks/{task_id}/{attempt}/artifacts/{name}"),
                ("GET", "/tasks/{task_id}/artifacts/{name}")}
    assert not missing, f"documented, never called here: {sorted(missing)}"
    await anon.aclose()


@pytest.mark.parametrize("path", ["/ui", "/docs"])
async def test_pages_are_public_and_forbid_inline_script(
    coordinator: LiveCoordinator, path: str
) -> None:
    async with httpx.AsyncClient(base_url=coordinator.url) as anon:
        r = await anon.get(path)
        assert r.status_code == 200
        csp = r.headers["content-security-policy"]
        assert "default-src 'self'" in csp and "script-src 'self'" in csp
        assert "unsafe-inline" not in csp
        assert "<script>" not in r.text  # every script is a file under /ui/assets
        assert "http://" not in r.text and "https://" not in r.text  # nothing from elsewhere
        assert (await anon.get("/mesh/status")).status_code == 401  # the data is not public


async def test_auth_off_documents_the_same_routes(settings: Settings) -> None:
    async with run_coordinator(replace(settings, auth="off")) as live:
        doc = (await live.http.get("/openapi.json")).json()
        assert doc["paths"]["/mesh/status"]["get"]["x-role"] == "read"
        assert doc["paths"]["/health"]["get"]["security"] == []

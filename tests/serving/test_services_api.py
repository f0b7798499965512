"""`/services` (issue 27): create, list, get, update, delete; tenants, roles, refusals.

A real coordinator on loopback with auth on; no node is needed to store a service, and one
with `replicas.min: 0` places nothing. The replica side is tests/serving/test_service_replicas.py.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Callable
from typing import Any

import httpx
import pytest

from coordinator.web.engines import load_engines
from tests.cdp import CHROMIUM, Browser
from tests.conftest import LiveCoordinator

STANDIN = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]


def spec(name: str = "chat", model: str = "tiny", **more: Any) -> dict[str, Any]:
    return {"name": name, "model": model, "command": STANDIN,
            "replicas": {"min": 0, "max": 2}, **more}


@pytest.fixture
async def tokens(coordinator: LiveCoordinator) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def make(tenant: str, role: str) -> httpx.AsyncClient:
        r = await coordinator.http.post("/admin/tokens", json={"tenant": tenant, "role": role})
        assert r.status_code == 200, r.text
        c = httpx.AsyncClient(base_url=coordinator.url, timeout=30,
                              headers={"Authorization": f"Bearer {r.json()['token']}"})
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


async def test_create_list_get_update_delete(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    alice = await tokens("alice", "submit")
    r = await alice.post("/services", json=spec(env={"PORT_IS": "{port}"}))
    assert r.status_code == 201, r.text
    view = r.json()
    assert view["name"] == "chat" and view["model"] == "tiny" and view["tenant"] == "alice"
    assert view["scale"] == {"min": 0, "max": 2, "desired": 0, "ready": 0}
    assert view["replicas"] == [] and view["executor"] == "process"

    listed = (await alice.get("/services")).json()
    assert [s["name"] for s in listed["services"]] == ["chat"] and listed["count"] == 1
    got = (await alice.get("/services/chat")).json()
    assert got["spec"]["command"] == STANDIN
    assert [e["kind"] for e in got["history"]] == ["created"]

    r = await alice.put("/services/chat", json=spec(model="tiny-2", target_ongoing=3))
    assert r.status_code == 200, r.text
    assert r.json()["model"] == "tiny-2" and r.json()["target_ongoing"] == 3
    got = (await alice.get("/services/chat")).json()
    assert [e["kind"] for e in got["history"]] == ["created", "updated"]
    services = coordinator.mesh.services
    assert services.lookup("alice", "tiny-2") is not None
    assert services.lookup("alice", "tiny") is None

    r = await alice.delete("/services/chat")
    assert r.status_code == 200 and r.json()["deleted"] == "chat"
    assert (await alice.get("/services/chat")).status_code == 404
    assert (await alice.get("/services")).json()["count"] == 0
    assert services.lookup("alice", "tiny-2") is None

    audit = (await coordinator.http.get("/admin/audit")).json()["records"]
    actions = [a["action"] for a in audit if a["action"].startswith("service.")]
    assert actions == ["service.create", "service.update", "service.delete"]


async def test_tenants_see_only_their_own(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    alice, bob = await tokens("alice", "submit"), await tokens("bob", "submit")
    bob_reader = await tokens("bob", "read")
    assert (await alice.post("/services", json=spec())).status_code == 201
    # another tenant may use the same name and model: services are per tenant
    assert (await bob.post("/services", json=spec())).status_code == 201
    assert (await bob.put("/services/chat", json=spec(model="m2"))).status_code == 200
    assert (await alice.get("/services/chat")).json()["model"] == "tiny"
    assert coordinator.mesh.services.lookup("bob", "tiny") is None
    assert [s["tenant"] for s in (await bob_reader.get("/services")).json()["services"]] == [
        "bob"]
    assert (await bob.delete("/services/chat")).status_code == 200
    # alice's is untouched, and bob cannot see, change or delete it
    assert (await bob.get("/services/chat")).status_code == 404
    assert (await bob.put("/services/chat", json=spec())).status_code == 404
    assert (await bob.delete("/services/chat")).status_code == 404
    assert (await alice.get("/services/chat")).status_code == 200
    # a read token cannot create; the admin sees every tenant's
    r = await bob_reader.post("/services", json=spec(name="x", model="x"))
    assert r.status_code == 403
    every = (await coordinator.http.get("/services")).json()["services"]
    assert [(s["tenant"], s["name"]) for s in every] == [("alice", "chat")]
    assert (await coordinator.http.get("/services/chat")).json()["tenant"] == "alice"
    r = await coordinator.http.get("/services", params={"tenant": "bob"})
    assert r.json()["count"] == 0


async def test_one_name_and_one_model_per_tenant(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    alice = await tokens("alice", "submit")
    assert (await alice.post("/services", json=spec())).status_code == 201
    r = await alice.post("/services", json=spec(model="other"))
    assert r.status_code == 409 and "named 'chat'" in r.json()["reason"]
    r = await alice.post("/services", json=spec(name="chat2"))
    assert r.status_code == 409 and "already serves model 'tiny'" in r.json()["reason"]
    assert (await alice.post("/services", json=spec(name="b", model="m2"))).status_code == 201
    r = await alice.put("/services/b", json=spec(name="b", model="tiny"))
    assert r.status_code == 409, r.text


@pytest.mark.parametrize(("body", "status", "reason"), [
    ({"model": "m", "command": STANDIN}, 422, "`name`"),
    (spec(name="bad name"), 422, "$.name"),
    (spec(name="-x"), 422, "$.name"),
    (spec(model=""), 422, "$.model"),
    (spec(model="x" * 201), 422, "$.model"),
    (spec(model="a\nb"), 422, "$.model"),
    (spec(replicas={"min": 3, "max": 2}), 422, "$.replicas.min"),
    (spec(replicas={"min": 0, "max": 0}), 422, "$.replicas.max"),
    (spec(replicas={"min": 0, "max": 65}), 422, "$.replicas.max"),
    (spec(replicas={"min": -1, "max": 1}), 422, "$.replicas.min"),
    (spec(idle_s=0), 422, "$.idle_s"),
    (spec(target_ongoing=0), 422, "$.target_ongoing"),
    (spec(health_path="v1/models"), 422, "$.health_path"),
    (spec(health_path="/v1/a b"), 422, "$.health_path"),
    (spec(routing="random"), 422, "$.routing"),
    (spec(command=["python3", "-m", "http.server"]), 422, "{port}"),
    ({"name": "n", "model": "m"}, 422, "needs an `engine`"),
    (spec(engine="llama_cpp"), 422, "$.engine"),
    ({"name": "n", "model": "m", "engine": "nope"}, 422, "no engine 'nope'"),
    ({"name": "n", "model": "m", "engine": "llama_cpp"}, 422, "needs `gguf`"),
    (spec(env={"BAD NAME": "1"}), 422, "$.env"),
    (spec(env={"X": "a\x00b"}), 422, "NUL"),
    (spec(command=["python3", "a\x00{port}"]), 422, "NUL"),
    (spec(image="Not An Image"), 422, "$.image"),
    (spec(surprise=1), 422, "surprise"),
    (spec(priority=11), 422, "$.priority"),
    (spec(requirements={"gpu_count": 65}), 422, "$.requirements.gpu_count"),
    (spec(params={"deep": json.loads("[" * 40 + "]" * 40)}), 422, "nesting deeper than 32"),
    (spec(params={"big": 2**70}), 422, "$.params.big"),
])
async def test_refusals_name_the_field(
    coordinator: LiveCoordinator, body: dict[str, Any], status: int, reason: str
) -> None:
    r = await coordinator.http.post("/services", json=body)
    assert r.status_code == status, r.text
    assert reason in r.json()["reason"], r.json()
    assert (await coordinator.http.get("/services")).json()["count"] == 0


async def test_bodies_are_bounded_and_json(coordinator: LiveCoordinator) -> None:
    big = spec(env={"X": "x" * (300 << 10), "P": "{port}"})
    assert (await coordinator.http.post("/services", json=big)).status_code == 413
    r = await coordinator.http.post("/services", content=b"{not json",
                                    headers={"Content-Type": "application/json"})
    assert r.status_code == 422
    r = await coordinator.http.get("/services/nope")
    assert r.status_code == 404 and r.json()["error"] == "unknown service"
    r = await coordinator.http.post("/services", json=spec())
    r = await coordinator.http.get("/services/chat", params={"history": "x"})
    assert r.status_code == 400


async def test_put_cannot_rename(coordinator: LiveCoordinator) -> None:
    assert (await coordinator.http.post("/services", json=spec())).status_code == 201
    r = await coordinator.http.put("/services/chat", json=spec(name="other"))
    assert r.status_code == 422 and "cannot be renamed" in r.json()["reason"]


def test_engine_templates_fill_the_model_and_leave_the_port() -> None:
    from coordinator.web.engines import replica_task
    from shared.services import decode_service

    engines = load_engines()
    llama = decode_service(b'{"name": "c", "model": "tiny", "engine": "llama_cpp",'
                           b' "params": {"gguf": "/models/tiny.gguf", "embedding": "true"}}')
    assert not isinstance(llama, str)
    task = replica_task(llama, engines, "t")
    assert not isinstance(task, str)
    assert task.requirements.executor == "process" and task.timeout_s is None
    argv = task.command or []
    assert argv[argv.index("--model") + 1] == "/models/tiny.gguf"
    assert argv[argv.index("--port") + 1] == "{port}"
    assert argv[argv.index("--host") + 1] == "127.0.0.1"
    assert argv[argv.index("--embedding") + 1] == "true"
    assert argv[argv.index("--model_alias") + 1] == "tiny"
    vllm = decode_service(b'{"name": "v", "model": "qwen", "engine": "vllm"}')
    assert not isinstance(vllm, str)
    task = replica_task(vllm, engines, "t")
    assert not isinstance(task, str)
    assert task.image is not None and task.image.startswith("vllm/vllm-openai")
    assert task.requirements.executor == "docker" and task.requirements.gpu_count == 1
    assert "{port}" in (task.command or [])


async def test_cli_serve_services_service_rm(coordinator: LiveCoordinator, tmp_path: Any) -> None:
    from tests.cli.test_cli import _one_line_error, _row, gpumesh

    res = await gpumesh("serve", "chat", "--model", "tiny", "--min", "0", "--max", "3",
                        "--idle", "30", "--env", "A=1", "--command", *STANDIN,
                        live=coordinator)
    assert res.returncode == 0, res.stderr
    assert "service chat serves model tiny" in res.stdout
    spec_file = tmp_path / "svc.json"
    spec_file.write_text('{"name": "emb", "model": "embed", "engine": "llama_cpp",'
                         ' "params": {"gguf": "/m/x.gguf"}, "replicas": {"min": 0, "max": 1}}')
    res = await gpumesh("serve", "--file", str(spec_file), "--param", "embedding=true",
                        "--json", live=coordinator)
    assert res.returncode == 0, res.stderr
    made = json.loads(res.stdout)
    assert made["engine"] == "llama_cpp" and made["spec"]["params"]["embedding"] == "true"

    res = await gpumesh("services", live=coordinator)
    assert res.returncode == 0, res.stderr
    assert _row(res.stdout, "chat")[1:3] == ["tiny", "admin"]
    assert _row(res.stdout, "emb")[1] == "embed"
    res = await gpumesh("service", "chat", live=coordinator)
    assert res.returncode == 0 and "created" in res.stdout, res.stdout
    # a second create of the same name: refused in one line, exit 1; --replace updates it
    res = await gpumesh("serve", "chat", "--model", "tiny", "--command", *STANDIN,
                        live=coordinator)
    assert res.returncode == 1 and "service exists" in _one_line_error(res)
    res = await gpumesh("serve", "chat", "--model", "tiny", "--max", "2", "--replace",
                        "--json", "--command", *STANDIN, live=coordinator)
    assert res.returncode == 0 and json.loads(res.stdout)["scale"]["max"] == 2, res.stderr
    res = await gpumesh("serve", "bad", "--param", "x", live=coordinator)
    assert res.returncode == 2 and "KEY=VALUE" in _one_line_error(res)

    res = await gpumesh("service", "rm", "chat", live=coordinator)
    assert res.returncode == 0 and "deleted" in res.stdout, res.stderr
    res = await gpumesh("service", "chat", live=coordinator)
    assert res.returncode == 1 and "unknown service" in _one_line_error(res)
    res = await gpumesh("services", "--json", live=coordinator)
    assert [s["name"] for s in json.loads(res.stdout)] == ["emb"]


async def test_sdk_service_calls(coordinator: LiveCoordinator) -> None:
    from gpumesh import AsyncClient, MeshError
    from tests.conftest import admin_token

    async with AsyncClient(coordinator.url, admin_token(coordinator.settings)) as mesh:
        made = await mesh.serve(spec(), target_ongoing=2)
        assert made.name == "chat" and made.target_ongoing == 2 and made.ready == 0
        assert [s.model for s in await mesh.services()] == ["tiny"]
        updated = await mesh.update_service("chat", spec(model="tiny-b"))
        assert updated.model == "tiny-b"
        one = await mesh.service("chat", history=10)
        assert [e["kind"] for e in one.history] == ["created", "updated"]
        with pytest.raises(MeshError) as refused:
            await mesh.serve(spec())
        assert refused.value.status == 409
        assert (await mesh.delete_service("chat"))["deleted"] == "chat"
        assert await mesh.services() == []


@pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")
async def test_console_lists_services_with_replicas_nodes_and_latency(
    coordinator: LiveCoordinator, tmp_path: Any
) -> None:
    from tests.conftest import admin_token, wait_until
    from tests.security.handnode import HandNode

    node = HandNode("n1", coordinator.ws_url)
    node.register_extra = {"executors": ["process"], "features": ["serve"],
                           "isolation": "user+cgroup"}
    await node.connect()
    assert (await coordinator.http.post("/services", json=spec(
        replicas={"min": 1, "max": 3}))).status_code == 201
    assign = await node.frame(type="assign")
    ref = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
    node.running.append(ref)
    await node.send({"type": "task_started", **ref})
    await node.send({"type": "replica", **ref, "state": "ready"})
    services = coordinator.mesh.services
    svc = services.all(None)[0]
    (replica,) = await wait_until(lambda: services.ready(svc), 10, "ready")
    for ttft in (0.02, 0.04):
        services.started(svc, replica)
        services.finished(svc, replica, status=200, ttft_s=ttft, duration_s=0.1,
                          completion_tokens=10)
    async with Browser(tmp_path / "chromium") as page:
        await page.goto(f"{coordinator.url}/ui")
        await page.type("#token", admin_token(coordinator.settings))
        await page.click("#token-save")
        row = "tr.service-row[data-service='chat']"
        await page.wait_for(f"document.querySelector(\"{row}\") !== null", what="the row")
        assert await page.text(f"{row} td.model") == "tiny"
        assert await page.text(f"{row} td.replicas") == "1 / 1 (1..3)"
        assert await page.text(f"{row} td.nodes") == "n1"
        assert await page.text(f"{row} td.latency") == "100 ms"
        assert await page.text(f"{row} td.ttft") == "30 ms"
        services.started(svc, replica)  # the next refresh has a rate
        services.finished(svc, replica, status=200, ttft_s=0.03, duration_s=0.1,
                          completion_tokens=None)
        await page.wait_for(f"document.querySelector(\"{row} td.rps\").textContent !== '–'",
                            what="a request rate")
    await node.close()


async def test_service_series_are_per_tenant_metrics(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    """gpumesh_service_* carry a tenant label: an admin or a `metrics` token sees them, a
    tenant's read or submit token does not (docs/security.md, tenant privacy)."""
    alice = await tokens("alice", "submit")
    assert (await alice.post("/services", json=spec())).status_code == 201
    scraper = await tokens("ops", "metrics")
    for client, sees in ((coordinator.http, True), (scraper, True), (alice, False)):
        body = (await client.get("/metrics")).text
        assert ('gpumesh_service_requests_total{service="chat",status="2xx",tenant="alice"} 0.0'
                in body) is sees
        assert ("gpumesh_service_replicas_desired" in body) is sees


async def test_an_admin_names_the_tenant_when_a_name_is_ambiguous(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    alice, bob = await tokens("alice", "submit"), await tokens("bob", "submit")
    assert (await alice.post("/services", json=spec())).status_code == 201
    assert (await bob.post("/services", json=spec(model="b"))).status_code == 201
    r = await coordinator.http.get("/services/chat")
    assert r.status_code == 409 and "?tenant=" in r.json()["reason"]
    r = await coordinator.http.get("/services/chat", params={"tenant": "bob"})
    assert r.status_code == 200 and r.json()["model"] == "b"
    r = await coordinator.http.delete("/services/chat", params={"tenant": "alice"})
    assert r.status_code == 200 and r.json()["tenant"] == "alice"
    assert (await coordinator.http.get("/services/chat")).json()["tenant"] == "bob"
    # an admin creates in a tenant it names
    r = await coordinator.http.post("/services", params={"tenant": "carol"},
                                    json=spec(name="c", model="c"))
    assert r.status_code == 201 and r.json()["tenant"] == "carol"


async def test_the_health_path_is_the_services_else_the_engines_else_v1_models(
    coordinator: LiveCoordinator,
) -> None:
    llama = {"name": "l", "model": "l", "engine": "llama_cpp", "params": {"gguf": "/m.gguf"},
             "replicas": {"min": 0, "max": 1}}
    cases = [
        (llama, "/openapi.json"),  # llama-cpp-python's /v1/models waits while it generates
        ({**llama, "name": "l2", "model": "l2", "health_path": "/v1/models"}, "/v1/models"),
        ({"name": "v", "model": "v", "engine": "vllm", "replicas": {"min": 0, "max": 1}},
         "/health"),
        (spec(), "/v1/models"),
    ]
    for body, path in cases:
        r = await coordinator.http.post("/services", json=body)
        assert r.status_code == 201, r.text
        assert r.json()["health_path"] == path
        assert r.json()["spec"]["health_path"] == path  # stored resolved
    svc = next(s for s in coordinator.mesh.services.all(None) if s.name == "l")
    run = coordinator.mesh.services.run_for("nope")
    assert run is None and svc.spec.health_path == "/openapi.json"

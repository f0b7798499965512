"""API auth on a real server: tokens, roles, tenants, browser safety, audit, and the CLI."""

from __future__ import annotations

import asyncio
import os
import re
import stat
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
import websockets
from starlette.routing import Route

from coordinator.access.auth import PUBLIC_PAGES
from coordinator.settings import Settings
from tests.conftest import ROOT, LiveCoordinator, Proc, free_port, run_coordinator, wait_until

BAD_HEADERS: list[list[tuple[bytes, bytes]]] = [
    [],  # anonymous
    [(b"authorization", b"Bearer gm_not-a-token")],
    [(b"authorization", "Bearer gm_t\u00f6ken\u00e9".encode("latin-1"))],  # non-ASCII
    [(b"authorization", b"Bearer \xff\xfe\x80")],  # not even text
    [(b"authorization", b"Basic YWRtaW46YWRtaW4=")],
    [(b"authorization", b"Bearer")],
    [(b"authorization", b"Bearer    ")],
    [(b"authorization", b"gm_no-scheme")],
]


def every_route(live: LiveCoordinator) -> list[tuple[str, str]]:
    """(method, path) for every HTTP route the app serves, path parameters filled in."""
    app = live.server.config.loaded_app.app  # type: ignore[attr-defined]
    out = []
    for route in app.routes:
        if not isinstance(route, Route):
            continue
        path = re.sub(r"\{[^}]+\}", "1", route.path)  # {name}, {n:int}, {name:path}
        out += [(m, path) for m in sorted(route.methods or ()) if m != "HEAD"]
    return out


async def raw_request(
    live: LiveCoordinator, method: str, path: str, headers: list[tuple[bytes, bytes]],
    body: bytes = b"",
) -> tuple[int, bytes]:
    """An HTTP/1.1 request written by hand: httpx will not send every header byte we test."""
    reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
    lines = [f"{method} {path} HTTP/1.1".encode(), b"host: 127.0.0.1", b"connection: close",
             f"content-length: {len(body)}".encode()]
    if body:
        lines.append(b"content-type: application/json")
    lines += [k + b": " + v for k, v in headers]
    writer.write(b"\r\n".join(lines) + b"\r\n\r\n" + body)
    await writer.drain()
    data = await reader.read()
    writer.close()
    head, _, rest = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), rest


@pytest.fixture
async def tokens(coordinator: LiveCoordinator) -> AsyncIterator[Callable[..., Any]]:
    """`await make(tenant, role)` -> an httpx client that sends a fresh token of that kind."""
    clients: list[httpx.AsyncClient] = []

    async def make(tenant: str, role: str) -> httpx.AsyncClient:
        r = await coordinator.http.post("/admin/tokens", json={"tenant": tenant, "role": role})
        assert r.status_code == 200, r.text
        token = r.json()["token"]
        assert token.startswith("gm_") and len(token) > 40
        c = httpx.AsyncClient(base_url=coordinator.url, timeout=30,
                              headers={"Authorization": f"Bearer {token}"})
        c.token_id = r.json()["id"]  # type: ignore[attr-defined]
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


async def test_every_route_but_the_public_pages_refuses_bad_or_missing_tokens(
    coordinator: LiveCoordinator,
) -> None:
    routes = every_route(coordinator)
    assert ("POST", "/tasks/submit") in routes and ("GET", "/admin/audit") in routes
    body = b'{"task_type": "custom", "script": "touch /tmp/gpumesh-pwned"}'
    for method, path in routes:
        for headers in BAD_HEADERS:
            code, text = await raw_request(coordinator, method, path, headers,
                                           body if method == "POST" else b"")
            if method == "GET" and (path in ("/", "/health", *PUBLIC_PAGES)
                                    or path.startswith("/ui/assets/")):
                # They describe and render; every call the pages make carries a token.
                assert code in (200, 404), (method, path, headers)
                continue
            assert code == 401, (method, path, headers, code, text)
            if path.startswith("/nodes/"):  # a node's upload: its node credential is asked for
                continue
            assert b"admin.token" in text and b"POST /admin/tokens" in text, text
    assert not coordinator.mesh.tasks
    assert (await coordinator.http.get("/tasks/completed")).json()["count"] == 0
    audit = (await coordinator.http.get("/admin/audit")).json()
    assert audit["count"] == 0, audit


async def test_non_json_posts_are_415_and_nothing_is_queued(
    coordinator: LiveCoordinator,
) -> None:
    body = '{"task_type":"custom","script":"id > /tmp/pwned"}'
    for headers in (
        # the curl, exactly, and then the same with a valid token
        {"Origin": "http://evil.example", "Content-Type": "text/plain"},
        {"Origin": "http://evil.example", "Content-Type": "text/plain",
         "Authorization": coordinator.http.headers["Authorization"]},
        {"Content-Type": "application/x-www-form-urlencoded"},
        {"Content-Type": "multipart/form-data; boundary=x"},
    ):
        async with httpx.AsyncClient(base_url=coordinator.url) as anyone:
            r = await anyone.post("/tasks/submit", content=body, headers=headers)
        assert r.status_code == 415, (headers, r.text)
        assert set(r.json()) == {"error", "reason"}
        assert "access-control-allow-origin" not in r.headers
    assert not coordinator.mesh.tasks
    ok = await coordinator.http.post("/tasks/submit", content=body.replace("id > /tmp/pwned",
                                     "true"), headers={"Content-Type": "application/json"})
    assert ok.status_code == 200, ok.text


async def test_tenants_see_and_touch_only_their_own_tasks(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    alice, bob = await tokens("alice", "submit"), await tokens("bob", "submit")
    alice_reader = await tokens("alice", "read")
    r = await alice.post("/tasks/submit", json={"task_type": "test", "tenant": "bob"})
    a_id = r.json()["task_id"]
    b_id = (await bob.post("/tasks/submit", json={"task_type": "test"})).json()["task_id"]
    assert coordinator.mesh.tasks[a_id].tenant == "alice"  # the token's, not the body's
    for path in (f"/tasks/{a_id}", f"/tasks/{a_id}/logs", f"/tasks/{a_id}?wait=1"):
        r = await bob.get(path)
        assert r.status_code == 404 and r.json()["reason"] == f"no task {a_id}", path
    assert (await bob.post(f"/tasks/{a_id}/cancel")).status_code == 404
    assert (await bob.delete(f"/tasks/{a_id}")).status_code == 404
    assert coordinator.mesh.tasks[a_id].state.value == "queued"
    assert list((await bob.get("/tasks/active")).json()["tasks"]) == [b_id]
    assert list((await alice_reader.get("/tasks/active")).json()["tasks"]) == [a_id]
    assert (await alice_reader.get(f"/tasks/{a_id}")).json()["tenant"] == "alice"
    assert set((await coordinator.http.get("/tasks/active")).json()["tasks"]) == {a_id, b_id}
    only = await coordinator.http.get("/tasks/active", params={"tenant": "bob"})
    assert list(only.json()["tasks"]) == [b_id]
    # a read token reads, never submits or cancels
    for r in (await alice_reader.post("/tasks/submit", json={"task_type": "test"}),
              await alice_reader.post(f"/tasks/{a_id}/cancel")):
        assert r.status_code == 403 and "role is read" in r.json()["reason"], r.text
    assert (await alice.get("/admin/tokens")).status_code == 403
    assert (await alice.delete("/mesh/nodes/somebody")).status_code == 403
    # finished work: each tenant pages through its own
    assert (await alice.post(f"/tasks/{a_id}/cancel")).status_code == 200
    assert (await bob.delete(f"/tasks/{b_id}")).status_code == 200
    done = (await bob.get("/tasks/completed")).json()
    assert list(done["tasks"]) == [b_id] and done["total"] is None
    all_done = (await coordinator.http.get("/tasks/completed")).json()
    assert set(all_done["tasks"]) == {a_id, b_id} and all_done["total"] == 2
    a_only = await coordinator.http.get("/tasks/completed", params={"tenant": "alice"})
    assert list(a_only.json()["tasks"]) == [a_id]


async def test_revoked_token_stops_working_and_everything_is_audited(
    coordinator: LiveCoordinator, tokens: Callable[..., Any]
) -> None:
    carol = await tokens("carol", "submit")
    task_id = (await carol.post("/tasks/submit", json={"task_type": "test"})).json()["task_id"]
    listed = (await coordinator.http.get("/admin/tokens")).json()["tokens"]
    assert "token" not in str(listed).replace("admin.token", "").replace("'token", "")
    assert any(t["id"] == carol.token_id and not t["revoked"] for t in listed)  # type: ignore
    r = await coordinator.http.delete(f"/admin/tokens/{carol.token_id}")  # type: ignore
    assert r.status_code == 200 and r.json()["revoked"]
    assert (await carol.get(f"/tasks/{task_id}")).status_code == 401
    assert (await carol.post("/tasks/submit", json={"task_type": "test"})).status_code == 401
    assert (await coordinator.http.delete("/admin/tokens/tok_nope")).status_code == 404
    assert (await coordinator.http.post("/admin/tokens", json={"tenant": "../x"})).status_code \
        == 422
    page = (await coordinator.http.get("/admin/audit", params={"limit": 2})).json()
    rest = (await coordinator.http.get("/admin/audit",
                                       params={"after": page["next_after"]})).json()
    records = page["records"] + rest["records"]
    assert [r["action"] for r in records] == ["token.create", "task.submit", "token.revoke"]
    submit = records[1]
    assert submit["token_id"] == carol.token_id and submit["tenant"] == "carol"  # type: ignore
    assert submit["target"] == task_id and submit["actor"].startswith("token:tok_")
    assert records[2]["target"] == carol.token_id  # type: ignore


async def test_tokens_and_admin_file_survive_a_restart(settings: Settings) -> None:
    async with run_coordinator(settings) as live:
        path = settings.data_dir / "admin.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        r = await live.http.post("/admin/tokens", json={"tenant": "dave", "role": "read"})
        dave = r.json()["token"]
        admin = path.read_text().strip()
    async with run_coordinator(settings) as live:
        assert path.read_text().strip() == admin
        for token in (admin, dave):
            r = await live.http.get("/mesh/status", headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200, r.text
        assert (await live.http.get("/metrics", headers={"Authorization": f"Bearer {dave}"})) \
            .status_code == 200


async def test_auth_off_is_an_explicit_opt_out(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    async with run_coordinator(replace(settings, auth="off")) as live:
        async with httpx.AsyncClient(base_url=live.url) as anyone:
            r = await anyone.post("/tasks/submit", json={"task_type": "test"})
        assert r.status_code == 200
        assert not (settings.data_dir / "admin.token").exists()
    assert any("MESH_AUTH=off" in r.message and r.levelname == "WARNING" for r in caplog.records)


async def test_browser_origins_closed_by_default(settings: Settings) -> None:
    async with run_coordinator(replace(settings, cors_origins=("http://ok.example",))) as live:
        for origin, allowed in (("http://ok.example", True), ("http://evil.example", False)):
            r = await live.http.options("/tasks/submit", headers={
                "Origin": origin, "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization, content-type"})
            assert (r.headers.get("access-control-allow-origin") == origin) is allowed
            if allowed:
                assert "authorization" in r.headers["access-control-allow-headers"].lower()
        with pytest.raises(websockets.InvalidStatus) as refused:
            async with websockets.connect(f"{live.ws_url}/ws/n1",
                                          origin="http://evil.example"):  # type: ignore
                pass
        assert refused.value.response.status_code == 403
        async with websockets.connect(f"{live.ws_url}/ws/n1",
                                      origin="http://ok.example") as ws:  # type: ignore
            assert ws.protocol.state.name == "OPEN"


def _cli(args: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gpumesh.cli.main", *args], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60)


async def test_cli_works_with_no_token_typed(
    spawn_coordinator: Callable[..., Proc], tmp_path: Path
) -> None:
    port, data = free_port(), tmp_path / "mesh-data"
    coord = spawn_coordinator(port, data, MESH_ADMIN_TOKEN="")  # it writes admin.token
    url = f"http://127.0.0.1:{port}"

    async def up() -> bool:
        assert coord.popen is not None and coord.popen.poll() is None, coord.output()
        return (data / "admin.token").exists() and await asyncio.to_thread(
            lambda: _cli(["status"], env).returncode == 0)

    env = {k: v for k, v in os.environ.items() if not k.startswith("MESH_")}
    env |= {"MESH_DATA_DIR": str(data), "MESH_URL": url}
    await wait_until(up, 30, "the CLI reaching the coordinator")
    res = await asyncio.to_thread(_cli, ["token", "create", "--tenant", "eve", "--role",
                                         "submit"], env)
    assert res.returncode == 0, res.stdout + res.stderr
    assert '"token": "gm_' in res.stdout
    eve = env | {"MESH_API_TOKEN": res.stdout.split('"token": "')[1].split('"')[0]}
    res = await asyncio.to_thread(_cli, ["submit", '{"task_type": "test"}', "--json"], eve)
    assert res.returncode == 0 and '"task_id"' in res.stdout, res.stdout
    listed = await asyncio.to_thread(_cli, ["token", "list"], eve)  # submit role: refused
    assert listed.returncode == 1 and "forbidden" in listed.stderr
    no_token = env | {"MESH_DATA_DIR": str(tmp_path / "elsewhere")}
    res = await asyncio.to_thread(_cli, ["status"], no_token)
    assert res.returncode == 1 and "admin.token" in res.stderr

"""The fast lane (coordinator/web/fastlane.py) answers exactly as the full stack does.

Two real coordinators, one with MESH_FAST_LANE on and one with it off, get the same requests;
status, body (task ids aside) and headers (date aside) must match, refusals included."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.settings import Settings
from coordinator.web import fastlane
from tests.conftest import FAST, LiveCoordinator, admin_token, run_coordinator

Pair = tuple[LiveCoordinator, LiveCoordinator]


@pytest.fixture
def lane_hits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """How many answers the fast lane sent itself (so a test cannot pass with it idle)."""
    hits: list[int] = []
    real = fastlane._send

    async def counted(send: Any, answer: Any) -> None:
        hits.append(answer[0])
        await real(send, answer)

    monkeypatch.setattr(fastlane, "_send", counted)
    return hits


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    base = replace(FAST, max_body_bytes=4096, max_queued=30, max_wait_s=5.0)
    fast = replace(base, data_dir=tmp_path / "fast", fast_lane=True)
    full = replace(base, data_dir=tmp_path / "full", fast_lane=False)
    async with run_coordinator(fast) as a, run_coordinator(full) as b:
        yield a, b


def _shape(r: httpx.Response) -> tuple[int, Any, list[tuple[str, str]]]:
    try:
        doc: Any = r.json()
    except ValueError:
        doc = r.text
    if isinstance(doc, dict):  # ids and times differ between the two coordinators
        doc = {k: v for k, v in doc.items() if k not in ("task_id", "submitted_at")}
        if "tasks" in doc and isinstance(doc["tasks"], list):
            doc["tasks"] = [{k: v for k, v in t.items() if k != "task_id"} for t in doc["tasks"]]
        if isinstance(doc.get("reason"), str):  # the data dirs differ: /fast/ and /full/
            doc["reason"] = doc["reason"].replace("/fast/", "/D/").replace("/full/", "/D/")
        error = doc.get("error")
        if isinstance(error, dict) and isinstance(error.get("message"), str):  # OpenAI's shape
            doc["error"] = error | {"message": error["message"].replace(
                "/fast/", "/D/").replace("/full/", "/D/")}
    headers = sorted((k, v) for k, v in r.headers.items() if k not in ("date",))
    return r.status_code, doc, headers


async def _both(pair: Pair, method: str, path: str, token: str | None = "admin",
                **kw: Any) -> tuple[httpx.Response, httpx.Response]:
    out = []
    for live in pair:
        headers = dict(kw.get("headers", {}))
        if token == "admin":
            headers["Authorization"] = f"Bearer {admin_token(live.settings)}"
        elif token is not None:
            headers["Authorization"] = token
        args = {k: v for k, v in kw.items() if k != "headers"}
        async with httpx.AsyncClient(base_url=live.url, timeout=20) as http:
            out.append(await http.request(method, path, headers=headers, **args))
    return out[0], out[1]


async def _same(pair: Pair, method: str, path: str, **kw: Any) -> httpx.Response:
    fast, full = await _both(pair, method, path, **kw)
    assert _shape(fast) == _shape(full), (method, path, kw)
    return fast


async def test_submissions_and_refusals_match(pair: Pair, lane_hits: list[int]) -> None:
    ok = await _same(pair, "POST", "/tasks/submit", json={"task_type": "test"})
    assert ok.status_code == 200 and ok.json()["status"] == "queued"
    batch = await _same(pair, "POST", "/tasks/submit", json=[{"task_type": "test"}] * 3)
    assert batch.json()["count"] == 3
    cases: list[tuple[int, dict[str, Any]]] = [
        (400, {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        (400, {"json": []}),
        (422, {"json": {"task_type": "no-such-type"}}),
        (422, {"json": {"task_type": "test", "requirements": {"gpu_cout": 1}}}),
        (422, {"json": [{"task_type": "test"}, 7]}),
        (415, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
        (401, {"json": {"task_type": "test"}, "token": None}),
        (401, {"json": {"task_type": "test"}, "token": "Bearer gm_wrong"}),
        (401, {"json": {"task_type": "test"}, "token": "Basic YWRtaW46YWRtaW4="}),
        (413, {"json": {"task_type": "test", "name": "x" * 8000}}),
    ]
    for status, kw in cases:
        r = await _same(pair, "POST", "/tasks/submit", **kw)
        assert r.status_code == status, (r.status_code, r.text, kw)

    async def streamed() -> AsyncIterator[bytes]:  # no Content-Length: counted as it comes
        for _ in range(10):
            yield b" " * 1000
        yield b'{"task_type": "test"}'

    for live in pair:
        r = await live.http.post("/tasks/submit", content=streamed(),
                                 headers={"Content-Type": "application/json"})
        assert r.status_code == 413, r.text
    small = [b'{"task_type":', b' "test"}']

    async def chunks() -> AsyncIterator[bytes]:
        for c in small:
            yield c
            await asyncio.sleep(0.01)

    for live in pair:
        r = await live.http.post("/tasks/submit", content=chunks(),
                                 headers={"Content-Type": "application/json"})
        assert r.status_code == 200, r.text
    # a browser's request keeps its CORS answer (the stack's)
    r = await _same(pair, "POST", "/tasks/submit", json={"task_type": "test"},
                    headers={"Origin": "https://evil.example"})
    assert r.status_code == 200
    # the queue cap: 429 with Retry-After, same both ways
    r = await _same(pair, "POST", "/tasks/submit", json=[{"task_type": "test"}] * 40)
    assert r.status_code == 429 and r.headers["retry-after"] == "5"
    # the lane answered the plain ones itself (200, 400, 422, 429), never 401/413/415
    assert {200, 400, 422, 429} <= set(lane_hits) and not {401, 403, 413, 415} & set(lane_hits)


async def test_reads_match(pair: Pair, lane_hits: list[int]) -> None:
    ids = [await live.submit(task_type="test") for live in pair]
    for query, status in [("", 200), ("?wait=0", 200), ("?wait=0.05", 200), ("?wait=abc", 400),
                          ("?wait=-1", 400), ("?wait=nan", 400), ("?wait=inf", 400),
                          ("?wait=99", 400), ("?wait=0.1&x=1", 200), ("?x=1", 200)]:
        rs = []
        for live, task_id in zip(pair, ids, strict=True):
            r = await live.http.get(f"/tasks/{task_id}{query}")
            rs.append(r)
        assert _shape(rs[0]) == _shape(rs[1]), query
        assert rs[0].status_code == status, (query, rs[0].text)
    assert lane_hits.count(200) >= 4 and 400 not in lane_hits  # a bad `wait`: the route's 400
    for path in ("/tasks/nope", "/tasks/submit"):
        await _same(pair, "GET", path)
    for path in ("/tasks/active", "/tasks/completed"):  # routes of their own, not a task id
        fast, full = await _both(pair, "GET", path)
        assert fast.status_code == full.status_code == 200 and "tasks" in fast.json()
    for token in (None, "Bearer gm_wrong"):
        for live, task_id in zip(pair, ids, strict=True):
            r = await _both((live, live), "GET", f"/tasks/{task_id}", token=token)
            assert r[0].status_code == 401


async def test_tenants_and_roles(pair: Pair) -> None:
    """A tenant's token sees its own tasks only; a read token cannot submit (403)."""
    tokens = []
    for live in pair:
        made = {}
        for tenant, role in (("a", "submit"), ("b", "submit"), ("a", "read")):
            r = await live.http.post("/admin/tokens", json={"tenant": tenant, "role": role})
            assert r.status_code in (200, 201), r.text
            made[(tenant, role)] = r.json()["token"]
        tokens.append(made)
    for (live, made) in zip(pair, tokens, strict=True):
        async with httpx.AsyncClient(base_url=live.url) as http:
            def auth(key: tuple[str, str], made: dict[Any, str] = made) -> dict[str, str]:
                return {"Authorization": f"Bearer {made[key]}"}

            r = await http.post("/tasks/submit", json={"task_type": "test", "tenant": "b"},
                                headers=auth(("a", "submit")))
            assert r.status_code == 200
            task_id = r.json()["task_id"]
            mine = await http.get(f"/tasks/{task_id}", headers=auth(("a", "read")))
            assert mine.status_code == 200 and mine.json()["tenant"] == "a"  # stamped, not "b"
            theirs = await http.get(f"/tasks/{task_id}", headers=auth(("b", "submit")))
            assert theirs.status_code == 404
            read = await http.post("/tasks/submit", json={"task_type": "test"},
                                   headers=auth(("a", "read")))
            assert read.status_code == 403, read.text


async def test_long_poll_and_standby_paths_untouched(tmp_path: Path) -> None:
    """With no node a long poll times out after `wait` on the fast lane as on the stack."""
    settings: Settings = replace(FAST, data_dir=tmp_path / "d")
    async with run_coordinator(settings) as live:
        task_id = await live.submit(task_type="test")
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        doc = await live.task(task_id, wait=0.3)
        assert doc["status"] == "queued" and loop.time() - t0 >= 0.29


async def test_a_rebuilding_mesh_answers_503_both_ways(pair: Pair, lane_hits: list[int]) -> None:
    """While the Mesh rebuilds from its store (after a failed write), a read and a
    submission answer 503 with Retry-After on the fast lane as through the stack."""
    ids = [await live.submit(task_type="test") for live in pair]
    for live in pair:
        live.mesh.broken = "injected: a commit failed"
    try:
        rs = [await live.http.get(f"/tasks/{task_id}") for live, task_id in zip(pair, ids,
                                                                             strict=True)]
        assert _shape(rs[0]) == _shape(rs[1])
        assert rs[0].status_code == 503 and rs[0].headers["retry-after"] == "1", rs[0].text
        r = await _same(pair, "POST", "/tasks/submit", json={"task_type": "test"})
        assert r.status_code == 503 and r.headers["retry-after"] == "1", r.text
        assert lane_hits.count(503) == 2  # both answered by the lane itself
    finally:
        for live in pair:
            live.mesh.broken = ""


async def test_openai_requests_match(pair: Pair, monkeypatch: pytest.MonkeyPatch) -> None:
    """`POST /v1/...` with a plain caller goes straight to the router; its answers, refusals
    included, are the full stack's, and what the lane does not take (no token, a read token,
    not JSON, a browser) the stack answers as before."""
    relayed: list[str] = []
    real = fastlane.Relay

    def counted(scope: Any, receive: Any, send: Any) -> Any:
        relayed.append(scope["path"])
        return real(scope, receive, send)

    monkeypatch.setattr(fastlane, "Relay", counted)
    reads = []
    for live in pair:
        r = await live.http.post("/admin/tokens", json={"tenant": "a", "role": "read"})
        reads.append(r.json()["token"])
    chat = "/v1/chat/completions"
    cases: list[tuple[int, str, dict[str, Any]]] = [
        (404, chat, {"json": {"model": "nope", "messages": []}}),
        (404, "/v1/embeddings", {"json": {"model": "nope", "input": "x"}}),
        (400, "/v1/completions", {"json": {"prompt": "x"}}),
        (400, chat, {"json": [1, 2]}),
        (400, chat, {"content": b"{not json", "headers": {"Content-Type": "application/json"}}),
        (413, chat, {"json": {"model": "m", "pad": "x" * (600 << 10)}}),
        (415, chat, {"content": b"{}", "headers": {"Content-Type": "text/plain"}}),
        (401, chat, {"json": {"model": "nope"}, "token": None}),
        (401, chat, {"json": {"model": "nope"}, "token": "Bearer gm_wrong"}),
        (404, chat, {"json": {"model": "nope"}, "headers": {"Origin": "https://x.example"}}),
    ]
    for status, path, kw in cases:
        r = await _same(pair, "POST", path, **kw)
        assert r.status_code == status, (r.status_code, r.text, kw)
        if status != 415:
            assert r.json()["error"]["code"], r.text  # OpenAI's error shape
    assert len(relayed) == 6  # the 404s, 400s and the 413 of plain callers
    fast, full = [], []
    for live, read, out in zip(pair, reads, (fast, full), strict=True):
        r = await live.http.post(chat, json={"model": "nope"},
                                 headers={"Authorization": f"Bearer {read}"})
        out.append(r)
    assert _shape(fast[0]) == _shape(full[0]) and fast[0].status_code == 403
    assert len(relayed) == 6

"""Issue 27 through HA (issue 13): the OpenAI API /v1 at a standby coordinator.

A leader and a standby are real coordinator processes on a real PostgreSQL (as in
tests/leader/test_failover.py); the replica's node is driven by hand over a real WebSocket to
the leader (tests/security/handnode.py), so the test sees what the node receives and answers
each `stream_open` itself, chunk by chunk. Every request goes to the standby, which forwards
it to the leader (coordinator/leader/standby.py).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from coordinator.leader.standby import forwarding_client
from coordinator.settings import Settings
from tests.conftest import ADMIN_HEADERS, Proc, free_port, wait_until
from tests.leader.test_failover import _coordinator_env, _role_is, _url
from tests.pgserver import PgServer, pg_server  # noqa: F401 - the session fixture
from tests.security.handnode import HandNode
from tests.serving.test_router import ANSWER, CHAT, SERVE, STANDIN, answer, make_ready, next_open


@pytest.fixture
def db(request: pytest.FixtureRequest) -> str:
    server: PgServer = request.getfixturevalue("pg_server")
    return server.create_database()


async def _ready(standby: httpx.AsyncClient) -> bool:
    r = await standby.get("/services/tiny")
    return r.status_code == 200 and r.json()["scale"]["ready"] == 1


async def _leader_and_standby(
    db: str, spawn_coordinator: Callable[..., Proc], tmp_path: Path,
) -> tuple[int, int, str]:
    """A leads, B stands by; a submit token of tenant alice."""
    pa, pb = free_port(), free_port()
    async with httpx.AsyncClient(headers=ADMIN_HEADERS, timeout=30) as admin:
        spawn_coordinator(pa, tmp_path / "a", **_coordinator_env(db, pa, "coord-a"))
        await wait_until(_role_is(admin, pa, "leader", _url(pa)), 30, "A to lead")
        spawn_coordinator(pb, tmp_path / "b", **_coordinator_env(db, pb, "coord-b"))
        await wait_until(_role_is(admin, pb, "standby", _url(pa)), 30, "B to stand by for A")
        r = await admin.post(f"{_url(pb)}/admin/tokens", json={"tenant": "alice",
                                                               "role": "submit"})
        assert r.status_code == 200, r.text
        token: str = r.json()["token"]
    return pa, pb, token


async def test_v1_through_a_standby_streams_answers_refuses_and_cancels(
    db: str, spawn_coordinator: Callable[..., Proc], tmp_path: Path,
) -> None:
    pa, pb, token = await _leader_and_standby(db, spawn_coordinator, tmp_path)
    node = HandNode("n1", f"ws://127.0.0.1:{pa}")
    node.register_extra = dict(SERVE)
    await node.connect()
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=_url(pb), headers=auth, timeout=30) as standby:
        try:
            await _serve_through(standby, node, pa)
        finally:
            await node.close()


async def _one_ready_replica(standby: httpx.AsyncClient, node: HandNode) -> None:
    doc = {"name": "tiny", "model": "tiny", "command": STANDIN,
           "replicas": {"min": 1, "max": 1}}
    r = await standby.post("/services", json=doc)
    assert r.status_code == 201, r.text
    await make_ready(node)
    await wait_until(lambda: _ready(standby), 20, "the replica ready (seen via the standby)")


async def _serve_through(standby: httpx.AsyncClient, node: HandNode, leader_port: int) -> None:
    await _one_ready_replica(standby, node)

    # /v1/models: the caller's tenant's models
    r = await standby.get("/v1/models")
    assert r.status_code == 200, r.text
    assert [(m["id"], m["owned_by"]) for m in r.json()["data"]] == [("tiny", "alice")]

    # a wrong token: the leader's 401, in OpenAI's error shape, as the leader gives it
    bad = {"Authorization": "Bearer not-a-token"}
    r = await standby.post("/v1/chat/completions", json=CHAT, headers=bad)
    direct = await standby.post(f"{_url(leader_port)}/v1/chat/completions", json=CHAT,
                                headers=bad)
    assert r.status_code == 401 == direct.status_code, r.text
    error = r.json()["error"]
    assert error["message"] and {"message", "type", "code"} <= set(error)
    assert r.json() == direct.json()

    # not streamed: the whole answer, as the replica sent it in two pieces
    call = asyncio.ensure_future(standby.post("/v1/chat/completions", json=CHAT))
    frame = await next_open(node)
    assert json.loads(frame["body"]) == CHAT
    await answer(node, frame["stream"], ANSWER[:20], ANSWER[20:])
    r = await call
    assert r.status_code == 200 and r.json() == json.loads(ANSWER), r.text

    # streamed: each chunk reaches the caller before the replica sends the next
    head = asyncio.ensure_future(_first_chunk(node, 1, 'data: {"n": 1}\n\n'))
    async with standby.stream("POST", "/v1/chat/completions",
                              json={**CHAT, "stream": True}) as r:
        sid = await head
        assert r.status_code == 200
        assert r.headers["content-type"] == "text/event-stream"
        chunks = r.aiter_raw()
        assert await asyncio.wait_for(chunks.__anext__(), 10) == b'data: {"n": 1}\n\n'
        await node.send({"type": "stream_data", "stream": sid, "data": "data: 2\n\n"})
        assert await asyncio.wait_for(chunks.__anext__(), 10) == b"data: 2\n\n"
    # the caller left mid-answer at the standby: the leader tells the node to cancel
    cancel = await node.frame(type="stream_cancel", stream=sid)
    assert "disconnect" in cancel["reason"]

    # not streamed, the caller gone before the answer's head: the node is told to cancel
    call = asyncio.ensure_future(standby.post("/v1/chat/completions", json=CHAT))
    frame = await next_open(node, skip=2)
    call.cancel()  # httpx closes its connection to the standby
    cancel = await node.frame(type="stream_cancel", stream=frame["stream"])
    assert "disconnect" in cancel["reason"]

    # a streamed answer that ends: every chunk, then the end, through the standby
    whole = asyncio.ensure_future(_whole(node, 3, "data: a\n\n", "data: [DONE]\n\n"))
    async with standby.stream("POST", "/v1/chat/completions",
                              json={**CHAT, "stream": True}) as r:
        await whole
        assert r.status_code == 200
        assert b"".join([c async for c in r.aiter_raw()]) == b"data: a\n\ndata: [DONE]\n\n"

    # the official client, pointed at the standby
    token = standby.headers["Authorization"].removeprefix("Bearer ")
    v1 = str(standby.base_url).rstrip("/") + "/v1"
    client = openai.AsyncOpenAI(base_url=v1, api_key=token, max_retries=0)
    try:
        assert [m.id async for m in client.models.list()] == ["tiny"]
        pieces = ["he", "llo"]
        sse = [f"data: {json.dumps(_chunk(p))}\n\n" for p in pieces] + ["data: [DONE]\n\n"]
        whole = asyncio.ensure_future(_whole(node, 4, *sse))
        stream = await client.chat.completions.create(model="tiny", messages=CHAT["messages"],
                                                      stream=True)
        got = [c.choices[0].delta.content async for c in stream]
        await whole
        assert got == pieces
        wrong = openai.AsyncOpenAI(base_url=v1, api_key="nope",
                                   max_retries=0)
        with pytest.raises(openai.AuthenticationError):
            await wrong.models.list()
        await wrong.close()
    finally:
        await client.close()


def _chunk(content: str) -> dict[str, Any]:
    return {"id": "c2", "object": "chat.completion.chunk", "created": 0, "model": "tiny",
            "choices": [{"index": 0, "delta": {"content": content}, "finish_reason": None}]}


async def _first_chunk(node: HandNode, skip: int, data: str) -> int:
    """Answer the node's next stream with its head and one chunk; its stream id."""
    frame = await next_open(node, skip)
    await answer(node, frame["stream"], data, ctype="text/event-stream", end=False)
    sid: int = frame["stream"]
    return sid


async def _whole(node: HandNode, skip: int, *chunks: str) -> None:
    frame = await next_open(node, skip)
    await answer(node, frame["stream"], *chunks, ctype="text/event-stream")


async def test_the_forwarder_waits_as_long_as_the_leader_may_stay_silent() -> None:
    """A non-streamed completion's head comes with its end: the leader may wait for a
    replica to start and then for its answer's head before it sends a byte, and the standby
    must not give up first (it gave up after MESH_MAX_WAIT_S + 30 s)."""
    s = Settings(max_wait_s=300.0, serve_cold_start_s=120.0, serve_head_timeout_s=600.0)
    client = forwarding_client(s)
    try:
        read = client.timeout.read
        assert read is not None and read > s.serve_cold_start_s + s.serve_head_timeout_s
        assert client.timeout.connect == 3.0  # a leader that does not answer: 503 soon
    finally:
        await client.aclose()


MANY = 110  # more than httpx's default pool (100 connections) held the standby to


async def test_a_standby_forwards_more_streams_at_once_than_a_default_pool(
    db: str, spawn_coordinator: Callable[..., Proc], tmp_path: Path,
) -> None:
    """Each forwarded request holds one connection to the leader for as long as its answer
    lasts: a hundred long streams must not make the next caller wait for one and get 503."""
    pa, pb, token = await _leader_and_standby(db, spawn_coordinator, tmp_path)
    node = HandNode("n1", f"ws://127.0.0.1:{pa}")
    node.register_extra = dict(SERVE)
    await node.connect()
    auth = {"Authorization": f"Bearer {token}"}
    async with httpx.AsyncClient(base_url=_url(pb), headers=auth, timeout=30,
                                 limits=httpx.Limits(max_connections=MANY)) as standby:
        try:
            await _one_ready_replica(standby, node)
            calls = [asyncio.ensure_future(standby.post(
                "/v1/chat/completions", json={**CHAT, "stream": True})) for _ in range(MANY)]
            opened = await wait_until(lambda: len(node.seen(type="stream_open")) >= MANY or [
                c.result().text for c in calls if c.done()], 30,
                f"{MANY} streams open on the node at once")
            assert isinstance(opened, bool), opened  # the text of an early answer
            for frame in node.seen(type="stream_open"):
                await answer(node, frame["stream"], "data: [DONE]\n\n",
                             ctype="text/event-stream")
            for r in await asyncio.gather(*calls):
                assert r.status_code == 200 and r.text == "data: [DONE]\n\n", r.text
        finally:
            await node.close()

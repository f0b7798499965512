"""The OpenAI-compatible /v1 (coordinator/web/openai.py) end to end, with hand-driven nodes.

A real coordinator on loopback; services created through `/services`; each replica is a task
assigned to a node driven by hand over a real WebSocket (tests/security/handnode.py), which
registers with the "serve" feature, reports its replica ready and answers `stream_open` by
hand: chunk by chunk, slowly, out of its window, or by going away. The real engine behind a
real client is tests/serving/test_serving_e2e.py.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

import httpx
import pytest

from coordinator.link.streams import StreamTable
from coordinator.settings import Settings
from tests.conftest import LiveCoordinator, run_coordinator, wait_until
from tests.security.handnode import HandNode

STANDIN = ["python3", "-m", "http.server", "--bind", "127.0.0.1", "{port}"]
WINDOW = 64 << 10
SERVE = {"executors": ["process"], "features": ["serve"], "isolation": "user+cgroup"}


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveCoordinator]:
    fast = replace(settings, serve_window_bytes=WINDOW, serve_cold_start_s=0.5,
                   serve_max_body_bytes=4096)
    async with run_coordinator(fast) as live:
        yield live


@pytest.fixture
async def tokens(live: LiveCoordinator) -> AsyncIterator[Callable[..., Any]]:
    clients: list[httpx.AsyncClient] = []

    async def make(tenant: str, role: str = "submit") -> httpx.AsyncClient:
        r = await live.http.post("/admin/tokens", json={"tenant": tenant, "role": role})
        assert r.status_code == 200, r.text
        c = httpx.AsyncClient(base_url=live.url, timeout=30,
                              headers={"Authorization": f"Bearer {r.json()['token']}"})
        clients.append(c)
        return c

    yield make
    for c in clients:
        await c.aclose()


def streams(live: LiveCoordinator) -> StreamTable:
    table: StreamTable = live.server.config.loaded_app.app.state.streams
    return table


async def serve_node(live: LiveCoordinator, name: str) -> HandNode:
    node = HandNode(name, live.ws_url)
    node.register_extra = dict(SERVE)
    await node.connect()
    return node


async def make_ready(node: HandNode, skip: int = 0) -> dict[str, Any]:
    """Take the node's next replica `assign`, run it (by hand) and report it ready."""
    assign: dict[str, Any] = (await wait_until(lambda: node.seen(type="assign")[skip:], 20,
                                               f"an assign to {node.name}"))[0]
    assert assign["service"]["model"]
    ref = {"task_id": assign["task_id"], "attempt": assign["attempt"]}
    node.running.append(ref)
    await node.send({"type": "task_accepted", **ref})
    await node.send({"type": "task_started", **ref})
    await node.send({"type": "replica", **ref, "state": "ready", "port": 9999})
    return assign


async def service(live: LiveCoordinator, client: httpx.AsyncClient, model: str = "tiny",
                  replicas: int = 1, **more: Any) -> None:
    doc = {"name": model, "model": model, "command": STANDIN,
           "replicas": {"min": replicas, "max": max(1, replicas)}, **more}
    r = await client.post("/services", json=doc)
    assert r.status_code == 201, r.text


async def ready_count(live: LiveCoordinator, tenant: str, model: str, n: int) -> None:
    services = live.mesh.services

    def ok() -> bool:
        svc = services.lookup(tenant, model)
        return svc is not None and len(services.ready(svc)) == n

    await wait_until(ok, 20, f"{n} ready replicas of {model}")


async def answer(node: HandNode, sid: int, *chunks: str, status: int = 200,
                 ctype: str = "application/json", end: bool = True) -> None:
    await node.send({"type": "stream_head", "stream": sid, "status": status,
                     "content_type": ctype})
    for chunk in chunks:
        await node.send({"type": "stream_data", "stream": sid, "data": chunk})
    if end:
        await node.send({"type": "stream_end", "stream": sid})


async def next_open(node: HandNode, skip: int = 0) -> dict[str, Any]:
    found = await wait_until(lambda: node.seen(type="stream_open")[skip:], 20,
                             f"a stream_open to {node.name}")
    frame: dict[str, Any] = found[0]
    return frame


async def first_chunk(node: HandNode, data: str, ctype: str) -> int:
    """Answer the node's next stream with its head and one chunk; its stream id."""
    frame = await next_open(node)
    await answer(node, frame["stream"], data, ctype=ctype, end=False)
    sid: int = frame["stream"]
    return sid


CHAT = {"model": "tiny", "messages": [{"role": "user", "content": "hi"}]}
ANSWER = json.dumps({"id": "c1", "object": "chat.completion", "choices": [],
                     "usage": {"prompt_tokens": 3, "completion_tokens": 7, "total_tokens": 10}})


async def test_a_request_reaches_the_replica_and_its_answer_comes_back(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    node = await serve_node(live, "n1")
    try:
        await service(live, alice)
        assign = await make_ready(node)
        await ready_count(live, "alice", "tiny", 1)
        models = (await alice.get("/v1/models")).json()
        assert models["object"] == "list"
        assert [(m["id"], m["object"], m["owned_by"]) for m in models["data"]] == [
            ("tiny", "model", "alice")]
        call = asyncio.ensure_future(alice.post("/v1/chat/completions", json=CHAT))
        frame = await next_open(node)
        assert frame["task_id"] == assign["task_id"] and frame["attempt"] == assign["attempt"]
        assert frame["path"] == "/v1/chat/completions" and frame.get("method", "POST") == "POST"
        assert json.loads(frame["body"]) == CHAT
        await answer(node, frame["stream"], ANSWER[:20], ANSWER[20:])
        r = await call
        assert r.status_code == 200 and r.json() == json.loads(ANSWER)
        assert r.headers["content-type"] == "application/json"
        svc = live.mesh.services.lookup("alice", "tiny")
        assert svc is not None and svc.outstanding == 0
        assert len(streams(live)) == 0
        # the control plane heard of it: status, time to first byte, the engine's usage
        seen = live.mesh.services.metrics.summary("alice", "tiny")
        assert seen["total"] == 1 and seen["errors"] == 0
        assert seen["completion_tokens"] == 7 and seen["ttft_mean_s"] is not None
    finally:
        await node.close()


async def test_streaming_passes_chunks_through_as_they_come_and_a_disconnect_cancels(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    node = await serve_node(live, "n1")
    try:
        await service(live, alice)
        await make_ready(node)
        await ready_count(live, "alice", "tiny", 1)
        head = asyncio.ensure_future(first_chunk(node, 'data: {"n": 1}\n\n', "text/event-stream"))
        async with alice.stream("POST", "/v1/chat/completions",
                                json={**CHAT, "stream": True}) as r:
            sid = await head
            assert r.status_code == 200
            assert r.headers["content-type"] == "text/event-stream"
            chunks = r.aiter_raw()
            first = await asyncio.wait_for(chunks.__anext__(), 10)
            assert first == b'data: {"n": 1}\n\n'  # the node has not sent the second yet
            await node.send({"type": "stream_data", "stream": sid, "data": "data: 2\n\n"})
            assert await asyncio.wait_for(chunks.__anext__(), 10) == b"data: 2\n\n"
        # the caller closed mid-answer: the node is told to abort the engine's request
        cancel = await node.frame(type="stream_cancel", stream=sid)
        assert "disconnect" in cancel["reason"]
        await wait_until(lambda: len(streams(live)) == 0, 10, "the stream forgotten")
        svc = live.mesh.services.lookup("alice", "tiny")
        await wait_until(lambda: svc is not None and svc.outstanding == 0, 10, "no outstanding")
    finally:
        await node.close()


async def test_load_spreads_over_ready_replicas(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    a, b = await serve_node(live, "na"), await serve_node(live, "nb")
    try:
        await service(live, alice, replicas=2)
        await asyncio.gather(make_ready(a), make_ready(b))
        await ready_count(live, "alice", "tiny", 2)
        calls = [asyncio.ensure_future(alice.post("/v1/chat/completions", json=CHAT))
                 for _ in range(6)]
        await wait_until(lambda: len(a.seen(type="stream_open")) + len(
            b.seen(type="stream_open")) == 6, 20, "six streams opened")
        # each pick goes to the replica with fewer in flight: three and three
        assert len(a.seen(type="stream_open")) == len(b.seen(type="stream_open")) == 3
        for node in (a, b):
            for frame in node.seen(type="stream_open"):
                await answer(node, frame["stream"], ANSWER)
        assert [r.status_code for r in await asyncio.gather(*calls)] == [200] * 6
    finally:
        await a.close()
        await b.close()


async def test_prefix_routing_keeps_a_shared_prompt_on_one_replica(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    a, b = await serve_node(live, "na"), await serve_node(live, "nb")
    try:
        await service(live, alice, replicas=2, routing="prefix")
        await asyncio.gather(make_ready(a), make_ready(b))
        await ready_count(live, "alice", "tiny", 2)
        system = {"role": "system", "content": "You answer in haiku. " * 20}
        owners = []
        for i in range(8):  # one at a time: the owner of the prefix always has room
            body = {**CHAT, "messages": [system, {"role": "user", "content": f"q{i}"}]}
            call = asyncio.ensure_future(alice.post("/v1/chat/completions", json=body))
            node = await wait_until(_opened_on((a, b)), 20, "the next stream_open")
            frame = node.seen(type="stream_open")[-1]
            owners.append(node.name)
            await answer(node, frame["stream"], ANSWER)
            assert (await call).status_code == 200
        assert len(set(owners)) == 1, owners
        spread = []
        for i in range(20):  # prompts that differ from the start spread over both
            body = {**CHAT, "messages": [{"role": "user", "content": f"{i} is different"}]}
            call = asyncio.ensure_future(alice.post("/v1/chat/completions", json=body))
            node = await wait_until(_opened_on((a, b)), 20, "the next stream_open")
            spread.append(node.name)
            await answer(node, node.seen(type="stream_open")[-1]["stream"], ANSWER)
            assert (await call).status_code == 200
        assert set(spread) == {"na", "nb"}, spread
    finally:
        await a.close()
        await b.close()


def _opened_on(nodes: tuple[HandNode, ...]) -> Callable[[], HandNode | None]:
    """A check: the node that got a new stream_open since it was made (None until one did)."""
    before = {n.name: len(n.seen(type="stream_open")) for n in nodes}

    def check() -> HandNode | None:
        return next((n for n in nodes if len(n.seen(type="stream_open")) > before[n.name]),
                    None)

    return check


async def test_a_node_lost_before_the_first_byte_is_retried_on_another_replica(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    a, b = await serve_node(live, "na"), await serve_node(live, "nb")
    try:
        await service(live, alice, replicas=2)
        await asyncio.gather(make_ready(a), make_ready(b))
        await ready_count(live, "alice", "tiny", 2)
        call = asyncio.ensure_future(alice.post("/v1/chat/completions", json=CHAT))
        first = await wait_until(lambda: a.seen(type="stream_open") or b.seen(
            type="stream_open"), 20, "the first stream_open")
        lost, other = (a, b) if a.seen(type="stream_open") else (b, a)
        await lost.send({"type": "stream_head", "stream": first[0]["stream"], "status": 200})
        await lost.close()  # before a byte of the body: nothing reached the caller
        again = await next_open(other)
        assert again["body"] == first[0]["body"]
        await answer(other, again["stream"], ANSWER)
        r = await call
        assert r.status_code == 200 and r.json()["id"] == "c1"
    finally:
        await a.close()
        await b.close()


async def test_a_node_lost_after_the_first_byte_ends_the_answer(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    node = await serve_node(live, "n1")
    await service(live, alice)
    await make_ready(node)
    await ready_count(live, "alice", "tiny", 1)
    head = asyncio.ensure_future(first_chunk(node, 'data: {"n": 1}\n\n', "text/event-stream"))
    async with alice.stream("POST", "/v1/chat/completions",
                            json={**CHAT, "stream": True}) as r:
        await head
        chunks = r.aiter_raw()
        assert await asyncio.wait_for(chunks.__anext__(), 10) == b'data: {"n": 1}\n\n'
        await node.close()
        rest = b"".join([c async for c in chunks])
    # SSE: an error event, then the end; never retried (bytes had reached the caller)
    assert rest.startswith(b"data: ") and rest.endswith(b"\n\n")
    event = json.loads(rest[6:])
    assert event["error"]["code"] == "replica_failed" and "went away" in event["error"]["message"]

    node2 = await serve_node(live, "n2")
    try:
        await make_ready(node2)
        await ready_count(live, "alice", "tiny", 1)
        head = asyncio.ensure_future(first_chunk(node2, '{"id": "c1", ', "application/json"))
        with pytest.raises(httpx.RemoteProtocolError):  # not SSE: the body is cut, not short
            async with alice.stream("POST", "/v1/chat/completions", json=CHAT) as r:
                await head
                chunks = r.aiter_raw()
                assert await asyncio.wait_for(chunks.__anext__(), 10) == b'{"id": "c1", '
                await node2.close()
                async for _ in chunks:
                    pass
    finally:
        await node2.close()


async def test_refusals_in_openai_shape(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice, bob = await tokens("alice"), await tokens("bob")
    reader = await tokens("alice", "read")
    await service(live, alice, replicas=0)  # stored; no replica wanted
    # another tenant's model, and an unknown one: 404 model_not_found
    for who, model in ((bob, "tiny"), (alice, "nope")):
        r = await who.post("/v1/chat/completions", json={**CHAT, "model": model})
        assert r.status_code == 404, r.text
        err = r.json()["error"]
        assert err["code"] == "model_not_found" and err["param"] == "model"
        assert err["type"] == "invalid_request_error" and model in err["message"]
    assert (await bob.get("/v1/models")).json() == {"object": "list", "data": []}
    assert (await bob.get("/v1/models/tiny")).status_code == 404
    assert (await alice.get("/v1/models/tiny")).json()["id"] == "tiny"
    # no token, and a read token for a POST
    async with httpx.AsyncClient(base_url=live.url) as anonymous:
        r = await anonymous.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
    r = await reader.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 403 and r.json()["error"]["type"] == "invalid_request_error"
    assert (await reader.get("/v1/models")).status_code == 200
    # bad bodies
    r = await alice.post("/v1/chat/completions", content=b"{not json",
                         headers={"content-type": "application/json"})
    assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_json"
    r = await alice.post("/v1/completions", json=["a list"])
    assert r.status_code == 400 and r.json()["error"]["type"] == "invalid_request_error"
    r = await alice.post("/v1/embeddings", json={"input": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = await alice.post("/v1/chat/completions", json={**CHAT, "pad": "x" * 5000})
    assert r.status_code == 413 and "MESH_SERVE_MAX_BODY_BYTES" in r.json()["error"]["message"]
    # no ready replica within MESH_SERVE_COLD_START_S (no node can run it): 503 + Retry-After
    r = await alice.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 503, r.text
    assert r.json()["error"]["code"] == "no_ready_replica" and int(r.headers["retry-after"]) >= 1
    svc = live.mesh.services.lookup("alice", "tiny")
    assert svc is not None and svc.desired == 1  # the request asked for one (scale from zero)


async def test_tenant_rate_applies_per_request(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    r = await live.http.put("/admin/tenants/alice", json={"rate": 0.01, "burst": 1})
    assert r.status_code == 200, r.text
    await service(live, alice, replicas=0)
    first = await alice.post("/v1/chat/completions", json={**CHAT, "model": "none"})
    assert first.status_code == 404  # took the one token of the burst
    r = await alice.post("/v1/chat/completions", json=CHAT)
    assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
    assert int(r.headers["retry-after"]) >= 1


async def test_memory_is_bounded_for_a_caller_that_never_reads(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    alice = await tokens("alice")
    node = await serve_node(live, "n1")
    try:
        await service(live, alice)
        await make_ready(node)
        await ready_count(live, "alice", "tiny", 1)
        # a raw socket that sends the request and then never reads a byte
        token = alice.headers["authorization"]
        body = json.dumps({**CHAT, "stream": True}).encode()
        reader, writer = await asyncio.open_connection("127.0.0.1", live.port)
        writer.write(b"POST /v1/chat/completions HTTP/1.1\r\nhost: x\r\n"
                     b"content-type: application/json\r\nauthorization: " + token.encode()
                     + b"\r\ncontent-length: " + str(len(body)).encode() + b"\r\n\r\n" + body)
        await writer.drain()
        frame = await next_open(node)
        sid = frame["stream"]
        await answer(node, sid, ctype="text/event-stream", end=False)
        chunk = "x" * (16 << 10)
        sent = 0

        def granted() -> int:
            credit: int = sum(c["bytes"] for c in node.seen(type="stream_credit", stream=sid))
            return WINDOW + credit

        stream = next(iter(streams(live)))
        # a well-behaved node sends while it has credit; the caller's socket fills, the
        # relay stops taking, credit stops, and the node stalls with a bounded amount sent
        while True:
            if sent + len(chunk) <= granted():
                await node.send({"type": "stream_data", "stream": sid, "data": chunk})
                sent += len(chunk)
                continue
            if await _stalled(sent + len(chunk), granted):
                break
        await wait_until(lambda: stream.received == sent, 10, "the coordinator got it all")
        assert stream.buffered <= WINDOW  # what the coordinator holds for this caller
        assert sent < 64 << 20  # bounded by the window plus the socket's buffers
        writer.close()
        await node.frame(type="stream_cancel", stream=sid)
    finally:
        await node.close()


async def _stalled(need: int, granted: Callable[[], int]) -> bool:
    """True when credit for `need` bytes in all does not come within a second (the relay
    is blocked on the caller)."""
    try:
        await wait_until(lambda: need <= granted(), 1.0, "credit")
    except AssertionError:
        return True
    return False


async def test_caps_on_streams_and_the_wait_for_an_answer(settings: Settings) -> None:
    capped = replace(settings, serve_max_streams=2, serve_max_streams_per_node=1,
                     serve_head_timeout_s=3.0)
    async with run_coordinator(capped) as live:
        r = await live.http.post("/admin/tokens", json={"tenant": "alice", "role": "submit"})
        headers = {"Authorization": f"Bearer {r.json()['token']}"}
        async with httpx.AsyncClient(base_url=live.url, timeout=30, headers=headers) as alice:
            a, b = await serve_node(live, "na"), await serve_node(live, "nb")
            try:
                await service(live, alice, replicas=2)
                await asyncio.gather(make_ready(a), make_ready(b))
                await ready_count(live, "alice", "tiny", 2)
                first = asyncio.ensure_future(alice.post("/v1/chat/completions", json=CHAT))
                await wait_until(_opened_on((a, b)), 20, "the first stream_open")
                second = asyncio.ensure_future(alice.post("/v1/chat/completions", json=CHAT))
                # one stream per node: the second goes to the other node
                await wait_until(lambda: a.seen(type="stream_open") and b.seen(
                    type="stream_open"), 20, "a stream to each node")
                r = await alice.post("/v1/chat/completions", json=CHAT)  # a third: no room
                assert r.status_code == 503, r.text
                assert "MESH_SERVE_MAX_STREAMS" in r.json()["error"]["message"]
                assert int(r.headers["retry-after"]) >= 1
                # nobody answers: past MESH_SERVE_HEAD_TIMEOUT_S the caller gets 504 and the
                # node is told to stop
                for call in (first, second):
                    r = await call
                    assert r.status_code == 504, r.text
                    assert r.json()["error"]["code"] == "replica_timeout"
                for node in (a, b):
                    sid = node.seen(type="stream_open")[0]["stream"]
                    await node.frame(type="stream_cancel", stream=sid)
                assert len(streams(live)) == 0
            finally:
                await a.close()
                await b.close()


async def test_the_openai_client_reads_answers_refusals_and_a_broken_stream(
    live: LiveCoordinator, tokens: Callable[..., Any],
) -> None:
    openai = pytest.importorskip("openai")
    alice = await tokens("alice")
    token = alice.headers["authorization"].removeprefix("Bearer ")
    client = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key=token, max_retries=0)
    node = await serve_node(live, "n1")
    try:
        await service(live, alice)
        await make_ready(node)
        await ready_count(live, "alice", "tiny", 1)
        assert [m.id for m in (await client.models.list()).data] == ["tiny"]
        with pytest.raises(openai.NotFoundError) as nf:
            await client.chat.completions.create(model="nope", messages=CHAT["messages"])
        assert nf.value.code == "model_not_found"
        stranger = openai.AsyncOpenAI(base_url=f"{live.url}/v1", api_key="gm_nope",
                                      max_retries=0)
        with pytest.raises(openai.AuthenticationError) as denied:
            await stranger.models.list()
        await stranger.close()
        assert denied.value.code == "invalid_api_key"

        async def serve_one_stream() -> None:
            frame = await next_open(node)
            chunk = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "tiny",
                     "choices": [{"index": 0, "delta": {"content": "hel"}}]}
            await answer(node, frame["stream"], f"data: {json.dumps(chunk)}\n\n",
                         ctype="text/event-stream", end=False)
            await node.send({"type": "stream_end", "stream": frame["stream"],
                             "error": "engine died"})

        serving = asyncio.ensure_future(serve_one_stream())
        stream = await client.chat.completions.create(model="tiny", messages=CHAT["messages"],
                                                      stream=True)
        got = []
        with pytest.raises(openai.APIError, match="engine died"):
            async for chunk in stream:
                got.append(chunk.choices[0].delta.content)
        assert got == ["hel"]  # what came before the break, then the error
        await stream.close()
        await serving
    finally:
        await client.close()
        await node.close()

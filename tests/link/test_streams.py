"""The stream table (coordinator/link/streams.py) against a live coordinator and hand-driven
nodes over real WebSockets: chunks pass through as they come, credit flows back as they are
taken, and whatever a node sends about a stream it was not given, or past its window, breaks
nothing but that stream."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import replace
from typing import Any

import pytest

from coordinator.link.streams import Stream, StreamBroken, StreamTable
from coordinator.settings import Settings
from tests.conftest import LiveCoordinator, run_coordinator, wait_until
from tests.security.handnode import HandNode

WINDOW = 1024


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveCoordinator]:
    async with run_coordinator(replace(settings, serve_window_bytes=WINDOW)) as live:
        yield live


def table(live: LiveCoordinator) -> StreamTable:
    streams: StreamTable = live.server.config.loaded_app.app.state.streams  # type: ignore[attr-defined]
    return streams


async def serve_node(live: LiveCoordinator, name: str) -> HandNode:
    node = HandNode(name, live.ws_url)
    node.register_extra = {"features": ["serve"]}
    registered = await node.connect()
    assert "serve" in registered["features"]
    await wait_until(lambda: (n := live.mesh.nodes.get(name)) is not None and n.link is not None,
                     10, f"{name} registered")
    return node


def open_to(live: LiveCoordinator, node: str, body: str = '{"model": "m"}') -> Stream:
    link = live.mesh.nodes[node].link
    assert link is not None
    return table(live).open(node, link, "task-1", 1, "/v1/chat/completions", body)


async def opened(node: HandNode, stream: Stream) -> dict[str, Any]:
    return await node.frame(type="stream_open", stream=stream.id)


async def test_chunks_pass_through_one_by_one_as_they_come(live: LiveCoordinator) -> None:
    node = await serve_node(live, "n1")
    try:
        stream = open_to(live, "n1", '{"model": "m", "stream": true}')
        frame = await opened(node, stream)
        assert frame["task_id"] == "task-1" and frame["attempt"] == 1
        assert frame["path"] == "/v1/chat/completions"
        assert frame["body"] == '{"model": "m", "stream": true}'
        assert frame["window"] == WINDOW
        await node.send({"type": "stream_head", "stream": stream.id, "status": 200,
                         "content_type": "text/event-stream"})
        await node.send({"type": "stream_data", "stream": stream.id, "data": "data: one\n\n"})
        await stream.started(10)
        assert stream.status == 200 and stream.content_type == "text/event-stream"
        assert await stream.read() == b"data: one\n\n"  # before the node sent the second
        await node.send({"type": "stream_data", "stream": stream.id, "data": "data: twö\n\n"})
        assert await stream.read() == "data: twö\n\n".encode()
        await node.send({"type": "stream_end", "stream": stream.id})
        assert await stream.read() is None
        assert len(table(live)) == 0 and not table(live).per_node
        stream.close()  # after a complete answer: nothing is sent to the node
        assert not node.seen(type="stream_cancel")
    finally:
        await node.close()


async def test_credit_goes_back_as_the_caller_takes_bytes(live: LiveCoordinator) -> None:
    node = await serve_node(live, "n1")
    try:
        stream = open_to(live, "n1")
        await opened(node, stream)
        await node.send({"type": "stream_head", "stream": stream.id, "status": 200,
                         "content_type": "application/json"})
        for _ in range(4):  # the whole window, unacknowledged: allowed
            await node.send({"type": "stream_data", "stream": stream.id, "data": "x" * 256})
        await wait_until(lambda: stream.buffered == WINDOW, 10, "the window buffered")
        assert stream.buffered <= stream.window  # a caller that does not read holds this much
        assert await stream.read() == b"x" * WINDOW
        assert not node.seen(type="stream_credit")  # not taken yet: on the next read
        await node.send({"type": "stream_data", "stream": stream.id, "data": "y"})
        assert await stream.read() == b"y"
        credit = await node.frame(type="stream_credit", stream=stream.id)
        assert credit["bytes"] == WINDOW
        await node.send({"type": "stream_data", "stream": stream.id, "data": "z" * (WINDOW - 1)})
        await node.send({"type": "stream_end", "stream": stream.id})
        assert await stream.read() == b"z" * (WINDOW - 1)
        assert await stream.read() is None
    finally:
        await node.close()


async def test_a_node_past_its_window_breaks_only_that_stream(live: LiveCoordinator) -> None:
    node = await serve_node(live, "n1")
    try:
        over, fine = open_to(live, "n1"), open_to(live, "n1")
        await opened(node, fine)
        for s in (over, fine):
            await node.send({"type": "stream_head", "stream": s.id, "status": 200})
        await node.send({"type": "stream_data", "stream": over.id, "data": "x" * WINDOW})
        await node.send({"type": "stream_data", "stream": over.id, "data": "x"})
        err = await node.frame(type="error", code="stream_window")
        assert f"stream {over.id}" in err["reason"]
        cancel = await node.frame(type="stream_cancel", stream=over.id)
        assert "granted" in cancel["reason"]
        with pytest.raises(StreamBroken, match="granted"):
            await over.started(10)
        assert table(live).broken_by_node == 1
        # the other stream and the connection carry on
        await node.send({"type": "stream_data", "stream": fine.id, "data": "ok"})
        await node.send({"type": "stream_end", "stream": fine.id})
        await fine.started(10)
        assert await fine.read() == b"ok" and await fine.read() is None
        assert live.mesh.nodes["n1"].link is not None
    finally:
        await node.close()


async def test_frames_for_streams_not_opened_to_the_node_are_refused(
    live: LiveCoordinator,
) -> None:
    a, b = await serve_node(live, "na"), await serve_node(live, "nb")
    try:
        stream = open_to(live, "na")
        await opened(a, stream)
        for doc in ({"type": "stream_head", "stream": stream.id, "status": 500},
                    {"type": "stream_data", "stream": stream.id, "data": "forged"},
                    {"type": "stream_end", "stream": stream.id, "error": "forged"},
                    {"type": "stream_data", "stream": 10**12, "data": "never opened"}):
            await b.send(doc)
        await wait_until(lambda: len(b.seen(type="error", code="unknown_stream")) == 4, 10,
                         "four refusals to nb")
        assert not stream.ended and stream.status == 0 and stream.buffered == 0
        assert table(live).refused_frames == 4
        text = (await live.http.get("/metrics")).text
        assert "gpumesh_serve_stream_frames_refused_total 4.0" in text
        assert "gpumesh_serve_streams_open 1.0" in text
        await a.send({"type": "stream_head", "stream": stream.id, "status": 200})
        await a.send({"type": "stream_data", "stream": stream.id, "data": "real"})
        await stream.started(10)
        assert await stream.read() == b"real"
        stream.close()  # the caller gave up: the node is told
        await a.frame(type="stream_cancel", stream=stream.id)
        await a.send({"type": "stream_data", "stream": stream.id, "data": "late"})  # crossed
        await a.send({"type": "heartbeat"})
        await wait_until(lambda: live.mesh.nodes["na"].link is not None, 5, "na still there")
        assert not a.seen(type="error")  # a late frame of an ended stream is dropped quietly
        assert live.mesh.nodes["nb"].link is not None
    finally:
        await a.close()
        await b.close()


async def test_protocol_breaks_end_the_stream_with_a_reason(live: LiveCoordinator) -> None:
    node = await serve_node(live, "n1")
    try:
        early, twice, header = open_to(live, "n1"), open_to(live, "n1"), open_to(live, "n1")
        informational = open_to(live, "n1")
        await opened(node, informational)
        await node.send({"type": "stream_data", "stream": early.id, "data": "no head"})
        await node.send({"type": "stream_head", "stream": twice.id, "status": 200})
        await node.send({"type": "stream_head", "stream": twice.id, "status": 200})
        await node.send({"type": "stream_head", "stream": header.id, "status": 200,
                         "content_type": "text/plain\r\nSet-Cookie: x=1"})
        await node.send({"type": "stream_head", "stream": informational.id, "status": 101})
        for s, why in ((early, "before stream_head"), (twice, "second stream_head"),
                       (header, "plain header value"), (informational, "status 101")):
            with pytest.raises(StreamBroken, match=why):
                await s.started(10)
            await node.frame(type="stream_cancel", stream=s.id)
        await wait_until(lambda: len(node.seen(type="error", code="bad_stream")) == 4, 10,
                         "four bad_stream errors")
    finally:
        await node.close()


async def test_a_lost_node_ends_its_streams_and_no_head_in_time_cancels(
    live: LiveCoordinator,
) -> None:
    node = await serve_node(live, "n1")
    slow = open_to(live, "n1")
    with pytest.raises(StreamBroken, match="no response within") as exc:
        await slow.started(0.2)
    assert exc.value.timeout
    await node.frame(type="stream_cancel", stream=slow.id)
    stream = open_to(live, "n1")
    await opened(node, stream)
    await node.send({"type": "stream_head", "stream": stream.id, "status": 200})
    await node.send({"type": "stream_data", "stream": stream.id, "data": "partial"})
    await stream.started(10)
    assert await stream.read() == b"partial"
    await node.close()
    with pytest.raises(StreamBroken, match="went away"):
        await stream.read()
    assert len(table(live)) == 0


async def test_warnings_about_a_nodes_bogus_stream_frames_are_bounded(
    live: LiveCoordinator, caplog: pytest.LogCaptureFixture,
) -> None:
    node = await serve_node(live, "n1")
    try:
        with caplog.at_level("WARNING", logger="coordinator.link.streams"):
            for i in range(50):
                await node.send({"type": "stream_data", "stream": 10**9 + i, "data": "x"})
            await wait_until(lambda: table(live).refused_frames == 50, 10, "50 refusals")
        lines = [r for r in caplog.records if r.name == "coordinator.link.streams"]
        assert 1 <= len(lines) <= 10  # NodeLogLimit: 10 of a kind per node per 10 s
    finally:
        await node.close()

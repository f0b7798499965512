"""gpu_client/enginehttp.py against real loopback servers written here, byte by byte, so each
can misbehave exactly as an engine might: close a kept-alive connection, break off a chunked
body, send a head too large, fall silent, or watch its caller go away."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import pytest

from gpu_client.enginehttp import MAX_HEAD, EngineClient, EngineError
from tests.conftest import wait_until

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter, int], Awaitable[None]]
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"


@asynccontextmanager
async def engine(handler: Handler) -> AsyncIterator[tuple[int, list[str]]]:
    """A server on a free loopback port; `handler(reader, writer, n)` serves connection n.
    Yields the port and a list the handlers note events in."""
    notes: list[str] = []
    count = 0

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        nonlocal count
        count += 1
        notes.append(f"conn {count}")
        try:
            await handler(reader, writer, count)
        except (ConnectionError, asyncio.IncompleteReadError):
            notes.append("reset")
        finally:
            writer.close()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1], notes
    finally:
        server.close()


async def head(reader: asyncio.StreamReader) -> bytes:
    """Read one request (head, then a Content-Length body)."""
    raw = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in raw.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return raw + await reader.readexactly(length)


async def test_a_connection_is_kept_alive_and_reused() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                req = await head(r)
            except asyncio.IncompleteReadError:
                return
            assert b"Host: 127.0.0.1:" in req and b"Accept-Encoding: identity" in req
            w.write(OK)
            await w.drain()

    async with engine(handler) as (port, notes):
        client = EngineClient()
        for _ in range(3):
            async with client.request(port, "POST", "/v1/x", content_type="application/json",
                                      body=b"{}") as answer:
                assert (answer.status, answer.content_type) == (200, "application/json")
                assert await answer.read(100) == b"{}"
        assert notes == ["conn 1"]
        client.close()


async def test_a_kept_alive_connection_the_engine_dropped_is_retried_once_afresh() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await head(r)
        w.write(OK)
        await w.drain()
        if n == 1:
            await head(r)  # the second request on it: dropped unanswered
            return

    async with engine(handler) as (port, notes):
        client = EngineClient()
        for _ in range(2):
            async with client.request(port, "GET", "/v1/models") as answer:
                assert await answer.read(100) == b"{}"
        assert notes == ["conn 1", "conn 2"]
        client.close()


async def test_a_broken_chunked_body_a_huge_head_and_silence_are_errors() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        req = await head(r)
        if b"/broken" in req:
            w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
        elif b"/huge" in req:
            w.write(b"HTTP/1.1 200 OK\r\nX-Big: " + b"a" * 4 * MAX_HEAD + b"\r\n\r\n")
        elif b"/silent" in req:
            await asyncio.sleep(30)
        await w.drain()

    async with engine(handler) as (port, _):
        client = EngineClient(read_timeout_s=0.3)
        got: list[bytes] = []
        with pytest.raises(EngineError, match="closed|HTTP/1.1"):
            async with client.request(port, "GET", "/v1/broken") as answer:
                assert answer.status == 200
                async for piece in answer.body():
                    got.append(piece)
        assert b"".join(got) == b"hello"  # what came before the break was passed on
        with pytest.raises(EngineError, match="HTTP/1.1"):
            async with client.request(port, "GET", "/v1/huge"):
                pass
        with pytest.raises(EngineError, match="sent nothing for 0.3s"):
            async with client.request(port, "GET", "/v1/silent"):
                pass
        closed = EngineClient()
        with pytest.raises(EngineError):
            async with closed.request(_closed_port(), "GET", "/v1/models"):
                pass


async def test_leaving_mid_body_closes_the_connection() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await head(r)
        w.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        for _ in range(10_000):
            w.write(b"6\r\ntick\n\n\r\n")
            await w.drain()
            await asyncio.sleep(0.01)

    async with engine(handler) as (port, notes):
        client = EngineClient()

        async def read_some() -> None:
            async with client.request(port, "POST", "/v1/stream", body=b"{}") as answer:
                async for _piece in answer.body():
                    await asyncio.sleep(3600)  # a caller that stops reading

        task = asyncio.create_task(read_some())
        await wait_until(lambda: notes == ["conn 1"], 10, "the request")
        task.cancel()  # the stream_cancel
        await asyncio.gather(task, return_exceptions=True)
        await wait_until(lambda: "reset" in notes, 10, "the engine saw its caller go")


def _closed_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port

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


def _chunks(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)


CHUNKED = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n" \
          b"Transfer-Encoding: chunked\r\n\r\n"


async def test_what_came_before_the_caller_took_it_arrives_as_one_piece() -> None:
    """Coalescing: the HTTP chunks of one read, and of reads the caller had not taken yet,
    reach it joined; nothing waits to gather more."""
    sent = asyncio.Event()

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            req = await head(r)
            w.write(CHUNKED)
            if b"/one-read" in req:
                w.write(_chunks(b"data: 1\n\n", b"data: 2\n\n", b"data: 3\n\n") + b"0\r\n\r\n")
            else:  # several writes, each drained, while the caller is away
                for i in range(3):
                    w.write(_chunks(b"data: %d\n\n" % i))
                    await w.drain()
                w.write(b"0\r\n\r\n")
            await w.drain()
            sent.set()

    async with engine(handler) as (port, notes):
        client = EngineClient()
        got: list[bytes] = []
        async with client.request(port, "POST", "/v1/one-read", body=b"{}") as answer:
            assert answer.content_type == "text/event-stream"
            await answer.pipe(got.append)
        assert b"".join(got) == b"data: 1\n\ndata: 2\n\ndata: 3\n\n"
        assert len(got) <= 2  # the body came with the head or in one read after it
        sent.clear()
        async with client.request(port, "POST", "/v1/held", body=b"{}") as answer:
            await sent.wait()
            await wait_until(lambda: answer.complete, 10, "the whole answer read")
            pieces = [p async for p in answer.body()]
        assert pieces == [b"data: 0\n\ndata: 1\n\ndata: 2\n\n"]
        assert notes == ["conn 1"]  # and the connection was kept alive between them
        client.close()


async def test_a_paused_pipe_stops_reading_the_engine_until_resumed() -> None:
    """Flow control: a caller out of credit pauses the answer; the engine's socket fills and
    its writes wait; on resume the rest arrives, all of it, in order."""
    total = 16 << 20
    block = bytes(range(256)) * 256  # 64 KiB
    writer: list[asyncio.StreamWriter] = []

    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        await head(r)
        writer.append(w)
        w.write(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % total)
        for _ in range(total // len(block)):
            w.write(block)
        await w.drain()

    async with engine(handler) as (port, notes):
        client = EngineClient()
        got: list[bytes] = []
        async with client.request(port, "GET", "/v1/big") as answer:
            def sink(data: bytes) -> None:
                got.append(data)
                answer.pause()  # the first piece used up the credit

            done = answer.pipe(sink)
            await wait_until(lambda: got, 10, "a first piece")
            # the engine cannot get rid of its answer: what it wrote waits in its own buffer
            await wait_until(lambda: writer and writer[0].transport.get_write_buffer_size() > 0,
                             10, "the engine's writes to back up")
            held = len(got)
            for _ in range(5):  # turns of the loop in which a reading client would read more
                await asyncio.sleep(0)
            assert len(got) == held and not done.done()
            assert sum(map(len, got)) < total // 4
            answer.resume()  # credit came: one piece and paused again, until the end
            while not done.done():
                def more(seen: int = held) -> bool:
                    return len(got) > seen or done.done()

                await wait_until(more, 10, "the next piece")
                held = len(got)
                answer.resume()
            await done
        data = b"".join(got)
        assert len(data) == total and data == block * (total // len(block))
        assert notes == ["conn 1"]
        client.close()


async def test_heads_past_the_cap_are_refused_and_1xx_heads_are_skipped() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        req = await head(r)
        while b"/continue" in req or b"/under" in req:  # answered, the connection kept
            if b"/continue" in req:
                w.write(b"HTTP/1.1 100 Continue\r\n\r\n" + OK)
            else:  # just under the cap: fine
                w.write(b"HTTP/1.1 200 OK\r\nX-A: " + b"a" * (MAX_HEAD - 200)
                        + b"\r\nContent-Length: 2\r\n\r\n{}")
            await w.drain()
            req = await head(r)
        if b"/many-1xx" in req:  # each small, together past the cap
            w.write(b"HTTP/1.1 100 Continue\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n")
            for _ in range(MAX_HEAD // 1000 + 1):
                w.write(b"HTTP/1.1 102 Processing\r\nX-Pad: " + b"p" * 1000 + b"\r\n\r\n")
                await w.drain()
        elif b"/one-read" in req:  # a head past the cap, all of it in one read
            w.write(b"HTTP/1.1 200 OK\r\n" + b"X-A: %s\r\n" % (b"a" * 2000) * 40 + b"\r\n")
        await w.drain()
        await r.read()  # until the client goes

    async with engine(handler) as (port, _):
        client = EngineClient()
        async with client.request(port, "GET", "/v1/continue") as answer:
            assert answer.status == 200 and await answer.read(10) == b"{}"
        async with client.request(port, "GET", "/v1/under") as answer:
            assert answer.status == 200 and await answer.read(10) == b"{}"
        for path in ("/v1/many-1xx", "/v1/one-read"):
            with pytest.raises(EngineError, match=f"HTTP/1.1: a head longer than {MAX_HEAD}"):
                async with client.request(port, "GET", path):
                    pass
        client.close()


async def test_the_one_timer_fires_on_silence_only() -> None:
    """The lazily re-armed timer: an engine that keeps sending is never cut off however long
    it takes; one that falls silent mid-body is, while the caller waits; a paused caller is
    no silence of the engine."""
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        req = await head(r)
        w.write(CHUNKED)
        if b"/steady" in req:  # 40 pieces, 50 ms apart: 2 s in all against a 1 s timeout
            for i in range(40):
                w.write(_chunks(b"%d," % i))
                await w.drain()
                await asyncio.sleep(0.05)
            w.write(b"0\r\n\r\n")
            await w.drain()
            req = await head(r)  # the next request on the kept-alive connection
            w.write(CHUNKED)
        if b"/falls-silent" in req:
            w.write(_chunks(b"first"))
            await w.drain()
            await asyncio.sleep(30)
        elif b"/paused" in req:
            w.write(_chunks(b"first"))
            await w.drain()
            await r.readexactly(1)  # the test's nudge: then the rest
            w.write(_chunks(b"second") + b"0\r\n\r\n")
        await w.drain()
        await r.read()

    async with engine(handler) as (port, _):
        client = EngineClient(read_timeout_s=1.0)
        async with client.request(port, "GET", "/v1/steady") as answer:
            assert await answer.read(1000) == b"".join(b"%d," % i for i in range(40))
        got: list[bytes] = []
        with pytest.raises(EngineError, match="sent nothing for 1s"):
            async with client.request(port, "GET", "/v1/falls-silent") as answer:
                await answer.pipe(got.append)
        assert got == [b"first"]

        got = []
        async with client.request(port, "GET", "/v1/paused") as answer:
            def sink(data: bytes) -> None:
                got.append(data)
                answer.pause()

            done = answer.pipe(sink)
            await wait_until(lambda: got, 10, "the first piece")
            await asyncio.sleep(2.5)  # two timeouts and more, paused: not the engine's silence
            assert not done.done()
            conn = answer._conn
            assert conn.transport is not None
            conn.transport.write(b"!")  # the nudge (the engine reads it as a byte of body)
            answer.resume()
            await done
        assert b"".join(got) == b"firstsecond"
        client.close()


async def test_breaches_of_http_are_engine_errors_and_odd_framing_is_handled() -> None:
    async def handler(r: asyncio.StreamReader, w: asyncio.StreamWriter, n: int) -> None:
        while True:
            try:
                req = await head(r)
            except asyncio.IncompleteReadError:
                return
            if b"/bad-status" in req:
                w.write(b"HTTP/1.1 abc OK\r\n\r\n")
            elif b"/bad-chunk" in req:
                w.write(CHUNKED + b"zz\r\nhello\r\n")
            elif b"/upgrade" in req:
                w.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: x\r\n"
                        b"Connection: upgrade\r\n\r\nraw")
            elif b"/to-eof" in req:  # no length: the body is what comes until the close
                w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\nuntil the end")
                await w.drain()
                return
            elif b"/close" in req:
                w.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\n{}")
            elif b"/http10" in req:
                w.write(b"HTTP/1.0 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            elif b"/too-much" in req:  # bytes past Content-Length
                w.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}garbage")
            else:
                w.write(OK)
            await w.drain()

    async with engine(handler) as (port, notes):
        client = EngineClient()
        for path in ("/v1/bad-status", "/v1/bad-chunk", "/v1/upgrade"):
            with pytest.raises(EngineError, match="broke HTTP/1.1"):
                async with client.request(port, "GET", path) as answer:
                    await answer.read(100)
        conns = len(notes)
        async with client.request(port, "GET", "/v1/to-eof") as answer:
            assert await answer.read(100) == b"until the end"
        for path in ("/v1/close", "/v1/http10", "/v1/too-much"):
            async with client.request(port, "GET", path) as answer:
                assert await answer.read(100) == b"{}"
        async with client.request(port, "GET", "/v1/ok") as answer:
            assert await answer.read(100) == b"{}"
        # none of those answers left its connection for the next request
        assert len(notes) == conns + 5
        with pytest.raises(EngineError, match="printable ASCII"):
            client.request(port, "GET", "/v1/a b")
        with pytest.raises(EngineError, match="printable ASCII"):
            client.request(port, "POST", "/v1/x", content_type="text/plain\r\nX-Evil: 1")
        client.close()

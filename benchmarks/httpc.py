"""A minimal keep-alive HTTP/1.1 client, sync and asyncio, for load generation.

The benchmarks measure the coordinator, so the client must cost as little as possible:
one persistent connection, TCP_NODELAY, Content-Length bodies only (what the coordinator's
JSON routes answer). Not a general HTTP client.
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import orjson


class HttpError(RuntimeError):
    pass


# The admin token benchmark coordinators start with (procs.start_coordinator sets
# MESH_ADMIN_TOKEN to it); every request carries it, as a real API client's would.
BENCH_TOKEN = "gm_benchmark-admin-token"


def _request_bytes(method: str, path: str, body: bytes | None, host: str) -> bytes:
    head = f"{method} {path} HTTP/1.1\r\nHost: {host}\r\n"
    head += f"Authorization: Bearer {BENCH_TOKEN}\r\n"
    if body is not None:
        head += f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
    return head.encode() + b"\r\n" + (body or b"")


def _parse_head(head: bytes) -> tuple[int, int]:
    lines = head.split(b"\r\n")
    status = int(lines[0].split(b" ", 2)[1])
    length = 0
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        if name.strip().lower() == b"content-length":
            length = int(value.strip())
        elif name.strip().lower() == b"transfer-encoding":
            raise HttpError("chunked responses are not supported here")
    return status, length


class HttpConn:
    """Blocking, one request at a time, over one kept-alive socket."""

    def __init__(self, host: str, port: int, timeout: float = 60.0) -> None:
        self.addr, self.timeout = (host, port), timeout
        self.host = f"{host}:{port}"
        self._connect()

    def _connect(self) -> None:
        self.sock = socket.create_connection(self.addr, timeout=self.timeout)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            return self._request(method, path, body)
        except (HttpError, ConnectionError):
            if method != "GET":
                raise
            self.sock.close()
            self._connect()
            return self._request(method, path, body)

    def _request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        raw = None if body is None else orjson.dumps(body)
        self.sock.sendall(_request_bytes(method, path, raw, self.host))
        while b"\r\n\r\n" not in self.buf:
            self._recv()
        head, self.buf = self.buf.split(b"\r\n\r\n", 1)
        status, length = _parse_head(head)
        while len(self.buf) < length:
            self._recv()
        payload, self.buf = self.buf[:length], self.buf[length:]
        return status, orjson.loads(payload) if payload else None

    def _recv(self) -> None:
        chunk = self.sock.recv(1 << 16)
        if not chunk:
            raise HttpError("connection closed by the server")
        self.buf += chunk

    def close(self) -> None:
        self.sock.close()


class AsyncHttpConn:
    """The asyncio twin of HttpConn; one request at a time per connection."""

    def __init__(self, host: str, port: int) -> None:
        self.addr = (host, port)
        self.host = f"{host}:{port}"

    @classmethod
    async def open(cls, host: str, port: int) -> AsyncHttpConn:
        conn = cls(host, port)
        await conn._connect()
        return conn

    async def _connect(self) -> None:
        self.reader, self.writer = await asyncio.open_connection(*self.addr, limit=1 << 24)
        sock = self.writer.get_extra_info("socket")
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def request(self, method: str, path: str, body: Any = None) -> tuple[int, Any]:
        try:
            return await self._request(method, path, body)
        except (asyncio.IncompleteReadError, ConnectionError):
            if method != "GET":
                raise
            await self.close()
            await self._connect()
            return await self._request(method, path, body)

    async def _request(self, method: str, path: str, body: Any) -> tuple[int, Any]:
        raw = None if body is None else orjson.dumps(body)
        self.writer.write(_request_bytes(method, path, raw, self.host))
        head = await self.reader.readuntil(b"\r\n\r\n")
        status, length = _parse_head(head[:-4])
        payload = await self.reader.readexactly(length) if length else b""
        return status, orjson.loads(payload) if payload else None

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass

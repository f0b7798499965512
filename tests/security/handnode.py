"""A node the security tests drive by hand over a real WebSocket, to lie where a real client
would not: it registers with the join token (then its credential), heartbeats every 0.2 s
listing `running` (so reconciliation never takes its attempts back), collects every frame
the coordinator sends into `frames`, and sends only what the test tells it to."""

from __future__ import annotations

import asyncio
import contextlib
import json
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from tests.conftest import TEST_JOIN_TOKEN, wait_until

REGISTER = {"type": "register", "executors": ["builtin"], "cpu_count": 2, "slots": 2}


async def healthy(http: httpx.AsyncClient) -> bool:
    """The coordinator answers /health (False while it is down or starting)."""
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False


class HandNode:
    def __init__(self, name: str, ws_url: str = "") -> None:
        self.name, self.ws_url = name, ws_url
        self.credential = ""
        self.running: list[dict[str, Any]] = []
        self.frames: list[dict[str, Any]] = []
        self.register_extra: dict[str, Any] = {}  # more register fields (e.g. features)
        self._ws: ClientConnection | None = None
        self._tasks: list[asyncio.Task[None]] = []

    async def connect(
        self, ws_url: str = "", running: list[dict[str, Any]] | None = None
    ) -> dict[str, Any]:
        """Register (again: to `ws_url`, a restarted coordinator's); the `registered` frame."""
        self.ws_url = ws_url or self.ws_url
        if running is not None:
            self.running = list(running)
        self.frames = []
        self._ws = await connect(f"{self.ws_url}/ws/{self.name}")
        doc = {**REGISTER, **self.register_extra, "token": TEST_JOIN_TOKEN,
               "running": self.running}
        if self.credential:
            doc["credential"] = self.credential
        await self._ws.send(json.dumps(doc))
        registered: dict[str, Any] = json.loads(await self._ws.recv())
        assert registered["type"] == "registered", registered
        self.credential = registered.get("credential") or self.credential
        self._tasks = [asyncio.create_task(self._read()), asyncio.create_task(self._beat())]
        return registered

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._ws is not None:
            await self._ws.close()

    async def _read(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(ConnectionClosed):
            async for raw in self._ws:
                self.frames.append(json.loads(raw))

    async def _beat(self) -> None:
        assert self._ws is not None
        with contextlib.suppress(ConnectionClosed):
            while True:
                await self._ws.send(json.dumps({"type": "heartbeat", "running": self.running}))
                await asyncio.sleep(0.2)

    async def send(self, doc: dict[str, Any]) -> None:
        assert self._ws is not None
        await self._ws.send(json.dumps(doc))

    def seen(self, **match: Any) -> list[dict[str, Any]]:
        return [f for f in self.frames if all(f.get(k) == v for k, v in match.items())]

    async def frame(self, timeout: float = 20, **match: Any) -> dict[str, Any]:
        """The first frame received with these fields, waiting for it."""
        found: list[dict[str, Any]] = await wait_until(
            lambda: self.seen(**match), timeout, f"a frame {match} for node {self.name}"
        )
        return found[0]

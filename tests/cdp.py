"""A small driver for headless Chromium over the DevTools protocol (CDP), for page tests.

Chromium is started with `--remote-debugging-port=0`; the port it picked is read from
`DevToolsActivePort` in its profile dir, and the test talks to the page's target over a
WebSocket (the `websockets` package). Input goes through `Input.dispatchMouseEvent` and
`Input.insertText`, as a user's would: a click lands on whatever is at that point.
Console errors and uncaught exceptions (a CSP violation is one) are collected in `errors`.
"""

from __future__ import annotations

import asyncio
import base64
import json
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
from websockets.asyncio.client import ClientConnection, connect

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")


class CdpError(Exception):
    pass


class Page:
    def __init__(self, ws: ClientConnection) -> None:
        self.ws = ws
        self._next = 0
        self._waiting: dict[int, asyncio.Future[dict[str, Any]]] = {}
        self.errors: list[str] = []
        self.console: list[str] = []
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        async for raw in self.ws:
            msg = json.loads(raw)
            if "id" in msg:
                fut = self._waiting.pop(msg["id"], None)
                if fut is not None and not fut.done():
                    fut.set_result(msg)
                continue
            method, params = msg.get("method"), msg.get("params", {})
            if method == "Runtime.exceptionThrown":
                d = params["exceptionDetails"]
                self.errors.append(d.get("exception", {}).get("description") or d["text"])
            elif method == "Runtime.consoleAPICalled":
                text = " ".join(str(a.get("value", a.get("description", "")))
                                for a in params.get("args", []))
                self.console.append(f"{params['type']}: {text}")
                if params["type"] == "error":
                    self.errors.append(text)
            elif method == "Log.entryAdded":
                entry = params["entry"]
                if entry["level"] == "error" and "the server responded with a status" not in \
                        entry["text"]:  # a 401/404 the page asked for is not a page error
                    self.errors.append(entry["text"])

    async def send(self, method: str, **params: Any) -> dict[str, Any]:
        self._next += 1
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._waiting[self._next] = fut
        await self.ws.send(json.dumps({"id": self._next, "method": method, "params": params}))
        msg = await asyncio.wait_for(fut, 30)
        if "error" in msg:
            raise CdpError(f"{method}: {msg['error']}")
        result: dict[str, Any] = msg.get("result", {})
        return result

    async def evaluate(self, expr: str) -> Any:
        r = await self.send("Runtime.evaluate", expression=expr, returnByValue=True,
                            awaitPromise=True)
        if "exceptionDetails" in r:
            raise CdpError(f"{expr}: {r['exceptionDetails']}")
        return r["result"].get("value")

    async def goto(self, url: str) -> None:
        await self.send("Page.navigate", url=url)
        await self.wait_for("document.readyState === 'complete'", what=f"{url} loaded")

    async def wait_for(self, expr: str, timeout: float = 15, what: str = "") -> Any:
        """Evaluate `expr` until it is truthy; its value. Fails with `what` at the deadline."""
        deadline = time.monotonic() + timeout
        while True:
            value = await self.evaluate(expr)
            if value or isinstance(value, dict):  # an element comes back as {}
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out after {timeout}s waiting for {what or expr}")
            await asyncio.sleep(0.05)

    async def text(self, selector: str) -> str:
        value = await self.evaluate(
            f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent")
        return value or ""

    async def click(self, selector: str) -> None:
        box = await self.wait_for(
            f"""(() => {{ const e = document.querySelector({json.dumps(selector)});
            if (!e || e.disabled) return null; e.scrollIntoView({{block: "center"}});
            const r = e.getBoundingClientRect();
            return r.width && r.height ? [r.x + r.width / 2, r.y + r.height / 2] : null; }})()""",
            what=f"{selector} clickable",
        )
        x, y = box
        for kind in ("mouseMoved", "mousePressed", "mouseReleased"):
            await self.send("Input.dispatchMouseEvent", type=kind, x=x, y=y, button="left",
                            clickCount=1)

    async def type(self, selector: str, text: str) -> None:
        await self.click(selector)
        await self.evaluate(f"document.querySelector({json.dumps(selector)}).select()")
        await self.send("Input.insertText", text=text)

    async def choose(self, selector: str, value: str) -> None:
        """Pick an option of a <select>, as the browser does when a user picks one."""
        await self.evaluate(f"""(() => {{ const s = document.querySelector({json.dumps(selector)});
            s.value = {json.dumps(value)};
            s.dispatchEvent(new Event("input", {{bubbles: true}}));
            s.dispatchEvent(new Event("change", {{bubbles: true}})); }})()""")

    async def screenshot(self, path: Path) -> None:
        r = await self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)
        await asyncio.to_thread(path.write_bytes, base64.b64decode(r["data"]))

    async def close(self) -> None:
        await self.ws.close()
        self._reader.cancel()


class Browser:
    """`async with Browser(profile_dir) as page:` a fresh headless Chromium and its page."""

    def __init__(self, profile: Path) -> None:
        self.profile = profile
        self.proc: asyncio.subprocess.Process | None = None
        self.page: Page | None = None

    async def __aenter__(self) -> Page:
        assert CHROMIUM is not None
        self.profile.mkdir(parents=True, exist_ok=True)
        self.proc = await asyncio.create_subprocess_exec(
            CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
            "--no-first-run", "--disable-background-networking", "--disable-component-update",
            "--disable-sync", "--disable-extensions", "--window-size=1400,1000",
            "--remote-debugging-port=0", f"--user-data-dir={self.profile}", "about:blank",
            stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
        )
        port_file = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            if self.proc.returncode is not None or time.monotonic() > deadline:
                raise AssertionError("chromium did not open its DevTools port")
            await asyncio.sleep(0.05)
        port = int(port_file.read_text().split()[0])
        async with httpx.AsyncClient() as http:
            targets = (await http.get(f"http://127.0.0.1:{port}/json/list")).json()
        url = next(t["webSocketDebuggerUrl"] for t in targets if t["type"] == "page")
        ws = await connect(url, max_size=64 << 20)
        self.page = page = Page(ws)
        for domain in ("Page", "Runtime", "Log"):
            await page.send(f"{domain}.enable")
        return page

    async def __aexit__(self, *exc: object) -> None:
        if self.page is not None:
            await self.page.close()
        if self.proc is not None and self.proc.returncode is None:
            self.proc.terminate()
            try:
                await asyncio.wait_for(self.proc.wait(), 10)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

"""The seed's browser `fetch` example, run in a real headless Chromium from another origin,
beside a hostile page that tries the no-preflight ("simple request") way in."""

from __future__ import annotations

import asyncio
import shutil
import sys
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.settings import Settings
from tests.conftest import admin_token, free_port, run_coordinator

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

PAGE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const api = "%s";
const auth = {"Authorization": "Bearer %s"};
fetch(api + "/tasks/submit", {
  method: "POST",
  headers: {"Content-Type": "application/json", ...auth},
  body: JSON.stringify({task_type: "test", priority: 7}),
}).then(r => r.json())
  .then(d => fetch(api + "/tasks/" + d.task_id, {headers: auth}).then(r => r.json()))
  .then(t => { document.getElementById("out").textContent = "ok " + t.task_id + " " + t.status; })
  .catch(e => { document.getElementById("out").textContent = "error " + e; });
</script></body></html>
"""

# What any web page can send without a preflight: text/plain, no credentials of ours, opaque.
HOSTILE = """<!doctype html><html><body><pre id="out">pending</pre><script>
const api = "%s";
Promise.all([
  fetch(api + "/tasks/submit", {method: "POST", mode: "no-cors",
    headers: {"Content-Type": "text/plain"},
    body: '{"task_type":"custom","script":"id > /tmp/pwned"}'}),
  fetch(api + "/tasks/submit", {method: "POST", mode: "no-cors",
    body: new URLSearchParams({task_type: "test"})}),
]).then(() => { document.getElementById("out").textContent = "sent"; })
  .catch(e => { document.getElementById("out").textContent = "error " + e; });
</script></body></html>
"""


@pytest.fixture
async def page_server(tmp_path: Path) -> AsyncIterator[tuple[Path, int]]:
    """A static file server on its own port: a different origin from the coordinator."""
    site = tmp_path / "site"
    site.mkdir()
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "http.server", str(port), "--bind", "127.0.0.1",
        "--directory", str(site),
        stdout=asyncio.subprocess.DEVNULL, stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(200):
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
                writer.close()
                break
            except OSError:
                await asyncio.sleep(0.05)
        yield site, port
    finally:
        proc.terminate()
        await proc.wait()


async def render(url: str, profile: Path) -> str:
    assert CHROMIUM is not None
    proc = await asyncio.create_subprocess_exec(
        CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
        "--no-first-run", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", f"--user-data-dir={profile}", "--virtual-time-budget=10000",
        "--dump-dom", url,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 90)
    return out.decode()


@pytest.mark.parametrize("allowed", [True, False], ids=["allowed-origin", "other-origin"])
async def test_browser_fetch_from_another_origin(
    settings: Settings, page_server: tuple[Path, int], tmp_path: Path, allowed: bool
) -> None:
    site, port = page_server
    origin = f"http://127.0.0.1:{port}" if allowed else "http://elsewhere.example"
    async with run_coordinator(replace(settings, cors_origins=(origin,))) as live:
        token = admin_token(live.settings)
        (site / "index.html").write_text(PAGE % (live.url, token))
        dom = await render(f"http://127.0.0.1:{port}/index.html", tmp_path / "profile")
        if allowed:
            assert "ok " in dom and " queued" in dom, dom[-500:]
            assert len(live.mesh.tasks) == 1
        else:
            assert "error TypeError" in dom, dom[-500:]  # the preflight was refused
            assert not live.mesh.tasks  # so the POST was never sent


@pytest.mark.parametrize("listed", [True, False], ids=["listed-origin", "other-origin"])
async def test_hostile_page_cannot_submit(
    settings: Settings, page_server: tuple[Path, int], tmp_path: Path, listed: bool
) -> None:
    site, port = page_server
    origin = f"http://127.0.0.1:{port}" if listed else "http://elsewhere.example"
    async with run_coordinator(replace(settings, cors_origins=(origin,))) as live:
        (site / "index.html").write_text(HOSTILE % live.url)
        dom = await render(f"http://127.0.0.1:{port}/index.html", tmp_path / "profile")
        assert "sent" in dom, dom[-500:]  # the browser did send both requests
        assert not live.mesh.tasks  # 415 / 401: nothing was queued
        done = (await live.http.get("/tasks/completed")).json()
        assert done["count"] == 0

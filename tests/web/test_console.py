"""The console (/ui) and the rendered API document (/docs) in a real headless Chromium.

The tests act in the page as a user would (type the token, pick filters, click a task, click
cancel and drain) and check both what the page shows and what the server then holds.
Screenshots land in the test's tmp dir.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import pytest
from websockets.asyncio.client import connect

from coordinator.settings import Settings
from shared.protocol import GpuInfo, Heartbeat, Register
from tests.cdp import CHROMIUM, Browser, Page
from tests.conftest import (
    TEST_JOIN_TOKEN,
    LiveCoordinator,
    Proc,
    admin_token,
    run_coordinator,
    wait_until,
)

pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed")

# Task names and output are user data: the page must show them as text, never run them.
HOSTILE_NAME = '<img src=x onerror="window.pwned=1">'
GPUS = [
    GpuInfo(index=0, name="H100", vendor="nvidia", uuid="GPU-c-0", memory_total_mb=81_920,
            memory_used_mb=12_288, utilization_pct=73.0, temperature_c=61.0),
    GpuInfo(index=1, name="H100", vendor="nvidia", uuid="GPU-c-1", memory_total_mb=81_920,
            memory_used_mb=0, utilization_pct=4.0, temperature_c=38.0),
]


async def telemetry_node(url: str, stop: asyncio.Event) -> None:
    """A node speaking the real protocol that reports GPU readings and offers no executor
    (so it gets no work): fake GPUs report no utilisation."""
    async with connect(f"{url}/ws/gpubox") as ws:
        await ws.send(msgspec.json.encode(Register(
            hostname="gpubox", gpus=GPUS, cpu_count=8, memory_mb=65_536, executors=[],
            token=TEST_JOIN_TOKEN)))
        assert json.loads(await ws.recv())["type"] == "registered"
        while not stop.is_set():
            await ws.send(msgspec.json.encode(Heartbeat(gpus=GPUS)))
            try:
                await asyncio.wait_for(stop.wait(), 0.5)
            except TimeoutError:
                pass


@pytest.fixture
async def gpubox(coordinator: LiveCoordinator) -> AsyncIterator[None]:
    stop = asyncio.Event()
    task = asyncio.create_task(telemetry_node(coordinator.ws_url, stop))
    await wait_until(lambda: "gpubox" in coordinator.mesh.nodes or task.done(), 10, "gpubox")
    yield
    stop.set()
    await task


async def row_count(page: Page, selector: str) -> int:
    n: int = await page.evaluate(f"document.querySelectorAll({json.dumps(selector)}).length")
    return n



async def click_until(page: Page, selector: str, done: Callable[[], bool], what: str) -> None:
    """Click a button of the nodes table until the server shows its effect. The table is
    rebuilt on every refresh; a rebuild between the mouse press and release (a busy CI
    machine) swallows that click, as it would a person's, who would click again."""
    for _ in range(5):
        await page.click(selector)
        try:
            await wait_until(done, 3, what)
            return
        except AssertionError:
            continue
    raise AssertionError(f"{what}: five clicks on {selector} changed nothing on the server")

async def test_console_end_to_end(
    coordinator: LiveCoordinator, gpubox: None, spawn_client: Callable[..., Proc],
    tmp_path: Path,
) -> None:
    live = coordinator
    spawn_client("worker", live.ws_url)
    await wait_until(lambda: "worker" in live.mesh.nodes, 20, "worker online")
    script = "for i in $(seq 1 600); do echo line-$i; sleep 0.1; done"
    long_id = await live.submit(task_type="custom", script=script, name=HOSTILE_NAME,
                                tenant="alice")
    done_id = await live.submit(task_type="test", name="quick", tenant="bob")
    queued_id = await live.submit(task_type="custom", script="true", priority=9,
                                  requirements={"gpu_count": 8}, name="too-big")
    await live.wait_finished(done_id)
    await wait_until(lambda: live.mesh.tasks[long_id].state == "running", 20, "running")
    shots = tmp_path / "screenshots"
    shots.mkdir()

    async with Browser(tmp_path / "chromium") as page:
        await page.goto(f"{live.url}/ui")
        await page.wait_for("document.getElementById('conn').textContent.includes('token')",
                            what="the page to ask for a token")
        await page.type("#token", admin_token(live.settings))
        await page.click("#token-save")
        await page.wait_for("document.querySelector('tr.node-row[data-node=\"worker\"]')",
                            what="the nodes table")
        assert await page.evaluate("sessionStorage.getItem('gpumesh.token')") == \
            admin_token(live.settings)

        # per-GPU readings, as the node reported them
        gpu0 = "tr[data-node='gpubox'][data-gpu='0']"
        assert "H100" in await page.text(f"{gpu0} td.gpu")
        assert await page.text(f"{gpu0} td.util") == "73%"
        assert await page.text(f"{gpu0} td.vram") == "12.0 / 80.0 GiB"
        assert await page.text(f"{gpu0} td.temp") == "61 °C"
        assert await page.text("tr[data-node='gpubox'][data-gpu='1'] td.util") == "4%"
        await page.screenshot(shots / "1-nodes.png")

        # the queue by priority: the one queued task is critical
        assert await page.text("#queue-bands [data-band='critical'] .value") == "1"
        assert queued_id in await page.evaluate(
            "[...document.querySelectorAll('#queue-list li')].map(l => l.dataset.task).join()")

        # filters: state, then tenant, then node
        await page.wait_for(f"document.querySelector('tr.task-row[data-task=\"{done_id}\"]')")
        await page.choose("#f-state", "running")
        await page.wait_for("document.querySelectorAll('tr.task-row').length === 1")
        assert await page.evaluate("document.querySelector('tr.task-row').dataset.task") == long_id
        await page.choose("#f-state", "")
        await page.type("#f-tenant", "bob")
        await page.evaluate("document.getElementById('f-tenant').dispatchEvent("
                            "new Event('change'))")
        await page.wait_for("[...document.querySelectorAll('tr.task-row')]"
                            f".every(r => r.dataset.task === '{done_id}')")
        assert await row_count(page, "tr.task-row") == 1
        await page.type("#f-tenant", "")
        await page.evaluate("document.getElementById('f-tenant').dispatchEvent("
                            "new Event('change'))")
        await page.type("#f-node", "worker")
        await page.wait_for("document.querySelectorAll('tr.task-row').length === 2",
                            what="worker's two tasks")
        await page.screenshot(shots / "2-filtered.png")

        # the task's name is shown as text, and nothing in it ran
        name_cell = f"tr.task-row[data-task='{long_id}'] td.name"
        assert await page.text(name_cell) == HOSTILE_NAME
        assert await page.evaluate("document.querySelectorAll('img').length") == 0

        # open the task: its log lines appear while it runs
        await page.click(f"tr.task-row[data-task='{long_id}']")
        await page.wait_for("!document.getElementById('detail').hidden")
        assert await page.text("#detail-id") == long_id
        await page.wait_for("document.getElementById('log').textContent.includes('line-3\\n')",
                            what="the first log lines")
        first = await page.evaluate("document.getElementById('log').textContent.length")
        await page.wait_for(f"document.getElementById('log').textContent.length > {first} + 20",
                            what="more log lines, live")
        await page.screenshot(shots / "3-task-logs.png")

        # cancel: the server cancels it, and the page says so
        await page.click("#cancel")
        await wait_until(lambda: long_id in live.mesh.finished, 15, "the task cancelled")
        assert live.mesh.finished[long_id].state == "cancelled"
        await page.wait_for("document.getElementById('detail-status').textContent === "
                            "'cancelled'")
        assert await page.evaluate("document.getElementById('cancel').disabled") is True

        # drain the worker from its row, then undrain it
        await click_until(page, "tr.node-row[data-node='worker'] button.drain",
                          lambda: live.mesh.nodes["worker"].drain is not None, "drained")
        await page.wait_for("document.querySelector(\"tr.node-row[data-node='worker'] "
                            "button.undrain\")", what="the undrain button")
        status = await page.text("tr.node-row[data-node='worker'] td.status")
        assert status.startswith("drain"), status
        await page.screenshot(shots / "4-drained.png")
        await click_until(page, "tr.node-row[data-node='worker'] button.undrain",
                          lambda: live.mesh.nodes["worker"].drain is None, "undrained")

        # a read token: the page shows the server's refusal, and nothing changes
        made = await live.http.post("/admin/tokens", json={"tenant": "ops", "role": "read"})
        await page.type("#token", made.json()["token"])
        await page.click("#token-save")
        await page.wait_for("document.getElementById('detail').hidden",
                            what="alice's task closed: not this token's to see")
        assert "404" in await page.text("#message")
        await page.wait_for("document.querySelector(\"tr.node-row[data-node='worker'] "
                            "button.drain\")")
        await page.click("tr.node-row[data-node='worker'] button.drain")
        await page.wait_for("document.getElementById('message').textContent.includes('403')",
                            what="the refusal shown")
        assert "needs admin" in await page.text("#message")
        assert live.mesh.nodes["worker"].drain is None

        assert await page.evaluate("window.pwned") is None
        assert not page.errors, page.errors  # no exception, no CSP violation
    assert all((shots / f).stat().st_size > 1000 for f in
               ("1-nodes.png", "2-filtered.png", "3-task-logs.png", "4-drained.png"))


async def test_console_without_auth_needs_no_token(settings: Settings, tmp_path: Path) -> None:
    async with run_coordinator(replace(settings, auth="off")) as live:
        task_id = await live.submit(task_type="custom", script="true", name="waiting")
        async with Browser(tmp_path / "chromium") as page:
            await page.goto(f"{live.url}/ui")
            await page.wait_for(f"document.querySelector('tr.task-row[data-task=\"{task_id}\"]')",
                                what="the task, with no token typed")
            assert await page.text("#nodes-empty") == "no nodes have joined"
            assert not page.errors, page.errors


async def test_docs_renders_every_operation(
    coordinator: LiveCoordinator, tmp_path: Path
) -> None:
    doc = (await coordinator.http.get("/openapi.json")).json()
    ops = sum(len(item) for item in doc["paths"].values())
    async with Browser(tmp_path / "chromium") as page:
        await page.goto(f"{coordinator.url}/docs")
        await page.wait_for(f"document.querySelectorAll('details.op').length === {ops}",
                            what=f"{ops} operations")
        await page.click("#post_tasks_submit > summary")
        body = await page.text("#post_tasks_submit")
        assert "TaskSubmit" in body and "422" in body and "submit" in body
        await page.screenshot(tmp_path / "docs.png")
        assert not page.errors, page.errors


async def tenant_submit(live: LiveCoordinator, token: str, **body: Any) -> str:
    r = await live.http.post("/tasks/submit", json=body,
                             headers={"Authorization": f"Bearer {token}"})
    assert r.status_code == 200, r.text
    task_id: str = r.json()["task_id"]
    return task_id


async def test_console_tenants_panel(
    coordinator: LiveCoordinator, spawn_client: Callable[..., Proc], tmp_path: Path
) -> None:
    """Two tenants (weights 1 and 3, a GPU quota of 1 on alpha) with queued work and alpha
    holding a GPU: the panel shows each one's weight, quotas, use and queue as
    /admin/tenants has them, and a queued task's detail names the quota that holds it.
    A read token gets the server's 403 in one line; the rest of the page goes on."""
    live = coordinator
    spawn_client("g2", live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xA100-80GB")
    configs = {"alpha": {"weight": 1, "max_gpus": 1, "max_queued": 10, "rate": 50, "burst": 20},
               "beta": {"weight": 3}}
    for name, config in configs.items():
        assert (await live.http.put(f"/admin/tenants/{name}", json=config)).status_code == 200
    tokens = {name: (await live.http.post("/admin/tokens", json={"tenant": name})).json()["token"]
              for name in configs}
    await wait_until(lambda: "g2" in live.mesh.nodes, 20, "g2 online")
    one_gpu = {"task_type": "custom", "script": "sleep 60", "requirements": {"gpu_count": 1}}
    running = await tenant_submit(live, tokens["alpha"], **one_gpu)
    await wait_until(lambda: live.mesh.tasks[running].state == "running", 20, "alpha's GPU task")
    # alpha's next tasks wait for its GPU quota; beta's need more GPUs than the mesh has
    held = [await tenant_submit(live, tokens["alpha"], **one_gpu) for _ in range(2)]
    for _ in range(2):
        await tenant_submit(live, tokens["beta"], task_type="custom", script="true",
                            requirements={"gpu_count": 4})
    await wait_until(lambda: "GPU quota" in live.mesh.queued_reason(live.mesh.tasks[held[0]]),
                     10, "alpha held by its quota")
    server = {t["name"]: t for t in (await live.http.get("/admin/tenants")).json()["tenants"]}
    assert (server["alpha"]["gpus"], server["alpha"]["queued"], server["beta"]["queued"]) == \
        (1, 2, 2)

    async with Browser(tmp_path / "chromium") as page:
        await page.goto(f"{live.url}/ui")
        await page.type("#token", admin_token(live.settings))
        await page.click("#token-save")
        await page.wait_for("document.querySelectorAll('tr.tenant-row').length >= 2",
                            what="the tenants' rows")
        for name in configs:
            row, want = f"tr.tenant-row[data-tenant='{name}']", server[name]
            assert await page.text(f"{row} td.weight") == f"{want['weight']:g}"
            assert await page.text(f"{row} td.queued") == \
                f"{want['queued']} / {want['quota'].get('max_queued', '∞')}"
            assert await page.text(f"{row} td.gpus") == \
                f"{want['gpus']} / {want['quota'].get('max_gpus', '∞')}"
            assert await page.text(f"{row} td.running") == f"{want['running']} / ∞"
            assert await page.text(f"{row} td.share") == \
                f"{want['share']:.0%} / {want['target_share']:.0%}"
        assert await page.text("tr.tenant-row[data-tenant='alpha'] td.gpus") == "1 / 1"
        assert await page.text("tr.tenant-row[data-tenant='alpha'] td.rate") == \
            "50/s (burst 20)"
        assert await page.text("tr.tenant-row[data-tenant='beta'] td.rate") == "unlimited"
        assert await page.text("tr.tenant-row[data-tenant='alpha'] td.share") == "100% / 25%"
        assert await page.text("tr.tenant-row[data-tenant='beta'] td.share") == "0% / 75%"
        assert "weighted Jain index" in await page.text("#tenants-jain")

        # a queued task's detail says what holds it: its tenant's GPU quota
        await page.click(f"tr.task-row[data-task='{held[0]}']")
        await page.wait_for("document.querySelector('#detail-fields dd[data-field=\"waiting "
                            "for\"]')", what="the task's reason")
        reason = await page.text("#detail-fields dd[data-field='waiting for']")
        assert "tenant alpha is at its GPU quota" in reason, reason
        await page.screenshot(tmp_path / "tenants.png")

        # a read token: the panel says why in one line; the rest of the page still works
        made = await live.http.post("/admin/tokens", json={"tenant": "beta", "role": "read"})
        await page.type("#token", made.json()["token"])
        await page.click("#token-save")
        await page.wait_for("document.getElementById('tenants-note').textContent"
                            ".includes('403')", what="the tenants' refusal")
        note = await page.text("#tenants-note")
        assert "needs admin" in note and "\n" not in note, note
        assert await page.evaluate("document.getElementById('tenants-table').hidden") is True
        await page.wait_for("document.querySelectorAll('tr.task-row').length === 2",
                            what="beta's own two tasks, for beta's read token")
        await page.wait_for("document.getElementById('detail').hidden",
                            what="alpha's task closed: not the read token's to see")
        assert (await page.text("#conn")).startswith("connected")
        await page.screenshot(tmp_path / "tenants-403.png")
        assert not page.errors, page.errors
    assert (tmp_path / "tenants.png").stat().st_size > 1000

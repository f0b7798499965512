"""`gpumesh` driven as a subprocess against a real coordinator and real client processes:
tables hold the right rows, `--json` parses, exit codes, `logs -f` following a running task,
drain and undrain of a real node, a dead URL, `detect`."""

from __future__ import annotations

import asyncio
import io
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from rich.console import Console

from gpumesh.cli import nodes as cli_nodes
from gpumesh.sdk import Client
from tests.conftest import (
    ROOT,
    TEST_ADMIN_TOKEN,
    LiveCoordinator,
    Proc,
    admin_token,
    free_port,
    wait_until,
)
from tests.e2e.test_tls import make_certs

Spawn = Callable[..., Proc]


def _env(live: LiveCoordinator | None = None, **extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MESH_", "GPU_"))}
    if live is not None:
        env |= {"MESH_URL": live.url, "MESH_API_TOKEN": admin_token(live.settings)}
    return env | {"COLUMNS": "250"} | extra


async def gpumesh(
    *args: str, live: LiveCoordinator | None = None, **env: str
) -> subprocess.CompletedProcess[str]:
    """Run the CLI off the loop: the in-process coordinator must keep answering."""
    argv = [sys.executable, "-m", "gpumesh.cli.main", *args]
    return await asyncio.to_thread(
        subprocess.run, argv, env=_env(live, **env), cwd=ROOT, capture_output=True, text=True,
        timeout=60,
    )


def _row(out: str, key: str) -> list[str]:
    """The table row that starts with `key`, split on whitespace."""
    for line in out.splitlines():
        if line.split()[:1] == [key]:
            return line.split()
    raise AssertionError(f"no row {key!r} in:\n{out}")


def _one_line_error(res: subprocess.CompletedProcess[str]) -> str:
    assert "Traceback" not in res.stderr + res.stdout, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("gpumesh: "), res.stderr
    return lines[0]


async def _online(live: LiveCoordinator, name: str) -> None:
    await wait_until(lambda: name in live.mesh.nodes and live.mesh.nodes[name].online, 20,
                     f"node {name} online")


async def test_submit_wait_tasks_task_nodes_status_cancel(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    live = coordinator
    spawn_client("n1", live.ws_url, MESH_FAKE_GPUS="2xA100-80GB", GPU_ENABLED="true")
    await _online(live, "n1")
    ok = await gpumesh("submit", '{"task_type": "test", "name": "hello"}', "--wait", "30",
                       live=live)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "completed" in ok.stdout
    good = json.loads((await gpumesh("tasks", "--state", "completed", "--json",
                                     live=live)).stdout)[0]["task_id"]
    bad = await gpumesh("submit", '{"task_type": "custom", "script": "echo oops; exit 3"}',
                        "--wait", "30", "--json", live=live)
    assert bad.returncode == 1, bad.stdout + bad.stderr  # failed: 1
    failed = json.loads(bad.stdout)
    assert failed["status"] == "failed" and "exit code 3" in failed["error"]
    # a task no node can take: queued, with its reason, until cancelled
    stuck = (await gpumesh("submit", '{"task_type": "test", "requirements": {"gpu_count": 8}}',
                           live=live)).stdout.strip()
    await wait_until(lambda: live.mesh.queued_reason(live.mesh.tasks[stuck]) != "waiting for "
                     "a free slot", 10, "a placement reason")
    table = (await gpumesh("tasks", live=live)).stdout
    row = _row(table, stuck)
    assert row[2:4] == ["queued", "5"] and "no node fits" in table
    assert good not in table  # finished tasks only with --all
    everything = (await gpumesh("tasks", "--all", live=live)).stdout
    assert _row(everything, good)[1:4] == ["hello", "completed", "5"]
    assert _row(everything, failed["task_id"])[2] == "failed"
    only_failed = json.loads((await gpumesh("tasks", "--all", "--state", "failed", "--json",
                                            live=live)).stdout)
    assert [t["task_id"] for t in only_failed] == [failed["task_id"]]
    assert json.loads((await gpumesh("tasks", "--node", "elsewhere", "--all", "--json",
                                     live=live)).stdout) == []
    detail = await gpumesh("task", good, live=live)
    assert detail.returncode == 0 and "completed" in detail.stdout and "n1" in detail.stdout
    assert json.loads((await gpumesh("task", good, "--json", live=live)).stdout)["node"] == "n1"
    nodes = (await gpumesh("nodes", live=live)).stdout
    assert _row(nodes, "n1")[1:4] == ["online", "2x", "A100"]
    assert "0.0/160.0" in nodes
    node_docs = json.loads((await gpumesh("nodes", "--json", live=live)).stdout)
    assert [(n["name"], n["gpu_count"]) for n in node_docs] == [("n1", 2)]
    status = await gpumesh("status", live=live)
    assert status.returncode == 0 and "1/1 online" in status.stdout and stuck in status.stdout
    assert json.loads((await gpumesh("status", "--json", live=live)).stdout)["queued_tasks"] == 1
    top = await gpumesh("top", "--once", live=live)
    assert top.returncode == 0 and _row(top.stdout, "n1")[1] == "online"
    snapshot = json.loads((await gpumesh("top", "--json", live=live)).stdout)
    assert [n["name"] for n in snapshot["nodes"]] == ["n1"]
    assert [t["task_id"] for t in snapshot["tasks"]] == [stuck]
    cancelled = await gpumesh("cancel", stuck, live=live)
    assert cancelled.returncode == 0 and "cancelled" in cancelled.stdout
    again = await gpumesh("cancel", stuck, live=live)
    assert again.returncode == 1 and "already finished" in _one_line_error(again)
    missing = await gpumesh("task", "f" * 32, live=live)
    assert missing.returncode == 1 and "unknown task" in _one_line_error(missing)


async def test_logs_follow_a_running_task_until_it_ends(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    live = coordinator
    spawn_client("n1", live.ws_url)
    await _online(live, "n1")
    script = "for i in 1 2 3 4 5; do echo line$i; sleep 0.4; done"
    task_id = await live.submit(task_type="custom", script=script)
    await wait_until(lambda: live.mesh.tasks[task_id].state == "running", 20, "task running")
    started = time.monotonic()
    follow = await gpumesh("logs", "-f", task_id, live=live)
    assert follow.returncode == 0, follow.stderr
    assert follow.stdout.splitlines() == [f"line{i}" for i in range(1, 6)]
    assert (await live.task(task_id))["status"] == "completed"
    assert time.monotonic() - started > 0.8  # it followed, it did not just print the start
    plain = await gpumesh("logs", task_id, live=live)
    assert plain.stdout.splitlines() == [f"line{i}" for i in range(1, 6)]
    as_json = await gpumesh("logs", task_id, "--json", live=live)
    assert [json.loads(x)["line"] for x in as_json.stdout.splitlines()] == [
        f"line{i}" for i in range(1, 6)]
    # submit --wait prints the live logs too, then the end
    waited = await gpumesh("submit", json.dumps({"task_type": "custom", "script": script}),
                           "--wait", "30", live=live)
    assert waited.returncode == 0, waited.stderr
    lines = waited.stdout.splitlines()
    assert lines[:5] == [f"line{i}" for i in range(1, 6)] and "completed" in lines[-1]


async def test_drain_and_undrain_a_real_node(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    live = coordinator
    client = spawn_client("n1", live.ws_url)
    await _online(live, "n1")
    drained = await gpumesh("node", "drain", "n1", "--reason", "bios update", live=live)
    assert drained.returncode == 0 and "drained node n1" in drained.stdout, drained.stderr
    nodes = (await gpumesh("nodes", live=live)).stdout
    assert _row(nodes, "n1")[1] == "drained" and "drain: bios update" in nodes
    task_id = (await gpumesh("submit", '{"task_type": "test"}', live=live)).stdout.strip()
    await wait_until(lambda: "draining" in live.mesh.queued_reason(live.mesh.tasks[task_id]),
                     10, "the task held by the drain")
    doc = json.loads((await gpumesh("task", task_id, "--json", live=live)).stdout)
    assert doc["status"] == "queued" and "1 is draining" in doc["reason"]
    await wait_until(lambda: "draining: bios update" in client.output(), 10, "client told")
    lifted = await gpumesh("node", "undrain", "n1", "--json", live=live)
    assert lifted.returncode == 0 and json.loads(lifted.stdout)["draining"] is False
    assert (await live.wait_finished(task_id))["status"] == "completed"
    assert _row((await gpumesh("nodes", live=live)).stdout, "n1")[1] == "online"
    unknown = await gpumesh("node", "drain", "nobody", live=live)
    assert unknown.returncode == 1 and "unknown node" in _one_line_error(unknown)
    # forgetting a drained node lifts its drain: the next node of that name starts clean
    assert (await gpumesh("node", "drain", "n1", live=live)).returncode == 0
    forgot = await gpumesh("node", "forget", "n1", live=live)
    assert forgot.returncode == 0 and "forgot node n1" in forgot.stdout, forgot.stderr
    assert live.mesh.drains == {} and await live.mesh.store.node_drains() == []


async def test_dead_url_and_bad_input_are_one_line_and_exit_2() -> None:
    dead = f"http://127.0.0.1:{free_port()}"
    for args in (["status"], ["tasks"], ["nodes"], ["logs", "-f", "x"], ["top", "--once"],
                 ["submit", '{"task_type": "test"}', "--wait", "5"], ["node", "drain", "n"]):
        res = await gpumesh(*args, "--url", dead)
        assert res.returncode == 2, (args, res.stderr)
        assert f"cannot reach {dead}" in _one_line_error(res)
    res = await gpumesh("--url", dead, "tasks")  # before the command, as `nomad -address`
    assert res.returncode == 2 and f"cannot reach {dead}" in _one_line_error(res)
    res = await gpumesh("submit", "{not json", "--url", dead)
    assert res.returncode == 2 and "not valid JSON" in _one_line_error(res)
    res = await gpumesh("submit", "@/no/such/file.json", "--url", dead)
    assert res.returncode == 2 and "cannot read" in _one_line_error(res)
    res = await gpumesh("no-such-command")
    assert res.returncode == 2 and "Traceback" not in res.stderr


async def test_detect_reports_devices_and_why_it_skipped_any() -> None:
    fake = await gpumesh("detect", "--json", MESH_FAKE_GPUS="2xRTX4090-24GB")
    assert fake.returncode == 0, fake.stderr
    report = json.loads(fake.stdout)
    assert [(g["name"], g["memory_total_mb"]) for g in report["gpus"]] == [
        ("RTX4090", 24 * 1024)] * 2
    off = json.loads((await gpumesh("detect", "--json", GPU_ENABLED="false")).stdout)
    assert off["gpus"] == [] and "GPU_ENABLED=false" in off["skipped"][0]["why"]
    real = await gpumesh("detect")  # this host's detectors: each vendor found or skipped, why
    assert real.returncode == 0 and "Traceback" not in real.stderr
    vendors = {"nvidia", "amd", "intel", "apple"}
    table = json.loads((await gpumesh("detect", "--json")).stdout)
    assert {d["vendor"] for d in table["detectors"]} == vendors
    for d in table["detectors"]:
        if d["usable"] == 0:
            assert any(s["vendor"] == d["vendor"] and s["why"] for s in table["skipped"]), d


async def test_https_with_mesh_ca_file(spawn_coordinator: Spawn, tmp_path: Path) -> None:
    ca, cert, key = make_certs(tmp_path)
    port = free_port()
    spawn_coordinator(port, tmp_path / "data", MESH_TLS_CERT=str(cert), MESH_TLS_KEY=str(key))
    url = f"https://127.0.0.1:{port}"
    token = {"MESH_API_TOKEN": TEST_ADMIN_TOKEN}

    async def up() -> bool:
        return (await gpumesh("status", "--url", url, MESH_CA_FILE=str(ca), **token)
                ).returncode == 0

    await wait_until(up, 30, "the CLI reaching the TLS coordinator")
    unverified = await gpumesh("nodes", "--url", url, **token)
    assert unverified.returncode == 2
    assert "CERTIFICATE_VERIFY_FAILED" in _one_line_error(unverified)


async def test_status_lists_no_tasks_past_its_limit(
    coordinator: LiveCoordinator, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(cli_nodes, "LIST_MAX", 1)
    for _ in range(2):
        await coordinator.submit(task_type="test", requirements={"gpu_count": 2})

    def draw() -> str:
        with Client(coordinator.url, admin_token(coordinator.settings)) as c:
            out = Console(record=True, width=200, file=io.StringIO())
            out.print(cli_nodes.screen(c))
            return out.export_text()

    text = await asyncio.to_thread(draw)
    assert "2 unfinished: too many to list" in text and "no node fits" not in text


async def test_ctrl_c_while_waiting_leaves_the_task_and_says_how_to_cancel_it(
    coordinator: LiveCoordinator,
) -> None:
    live = coordinator
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "gpumesh.cli.main", "submit",
        '{"task_type": "test", "requirements": {"gpu_count": 1}}', "--wait", "60",
        env=_env(live), cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    try:
        await wait_until(lambda: set(live.mesh.tasks) & set(live.mesh._done), 20,
                         "the CLI long-polling its task")
        proc.send_signal(signal.SIGINT)
        _, raw = await asyncio.wait_for(proc.communicate(), 20)
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    err = raw.decode()
    (task_id,) = live.mesh.tasks
    assert proc.returncode == 130 and "Traceback" not in err, err
    assert f"gpumesh cancel {task_id}" in err and live.mesh.tasks[task_id].state == "queued"

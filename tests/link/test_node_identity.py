"""Node identity: join token, issued credentials, impostors, forget, hostile names and tokens.

Real coordinator (in this loop), real `python -m gpu_client` processes, real sockets.
"""

from __future__ import annotations

import json
import stat
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

from coordinator.settings import Settings
from gpu_client.credential import credential_path
from shared.protocol import CloseCode
from tests.conftest import (
    TEST_JOIN_TOKEN,
    LiveCoordinator,
    Proc,
    run_coordinator,
    wait_until,
)

GATED = 'while [ ! -e "$GATE" ]; do sleep 0.05; done; echo released'


async def _refused(url: str, register: dict[str, Any]) -> tuple[int, str, str]:
    """(close code, close reason, error frame reason) for a register that is refused."""
    err: dict[str, Any] = {}
    async with connect(url) as ws:
        with pytest.raises(ConnectionClosed) as info:
            await ws.send(json.dumps({"type": "register", "executors": ["builtin"], **register}))
            while True:
                frame = json.loads(await ws.recv())
                err = err or frame
    assert info.value.rcvd is not None
    return info.value.rcvd.code, info.value.rcvd.reason, err.get("reason", "")


async def _exit_code(proc: Proc) -> int:
    popen = proc.popen
    assert popen is not None
    await wait_until(lambda: popen.poll() is not None, 20, f"{proc.argv} to exit")
    return popen.returncode


async def _online(live: LiveCoordinator, name: str) -> bool:
    node = live.mesh.nodes.get(name)
    return node is not None and node.online


async def test_impostor_is_refused_and_the_real_node_keeps_its_work(
    coordinator: LiveCoordinator, spawn_client: Any, tmp_path: Path
) -> None:
    real = spawn_client("n1", coordinator.ws_url)
    await wait_until(lambda: _online(coordinator, "n1"), 20, "n1 online")
    gate = tmp_path / "gate"
    task_id = await coordinator.submit(task_type="custom", script=GATED, env={"GATE": str(gate)})
    await wait_until(
        lambda: coordinator.mesh.tasks[task_id].state == "running", 20, "task running on n1"
    )
    epoch = coordinator.mesh.nodes["n1"].epoch

    # Another machine with the join token and the same NODE_NAME, but its own state dir.
    impostor = spawn_client("n1", coordinator.ws_url, MESH_STATE_DIR=str(tmp_path / "other"))
    assert await _exit_code(impostor) == 2, impostor.output()
    assert "NODE_NAME" in impostor.output() and "gpumesh node forget n1" in impostor.output()

    node = coordinator.mesh.nodes["n1"]
    assert node.online and node.epoch == epoch, "the rightful node was superseded"
    t = coordinator.mesh.tasks[task_id]
    assert (t.state, t.node, t.attempt) == ("running", "n1", 1)
    gate.touch()
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "completed", doc
    assert real.popen is not None and real.popen.poll() is None
    trail = (await coordinator.http.get("/admin/audit", params={"limit": "100"})).json()
    seen = [(r["action"], r["target"]) for r in trail["records"]]
    assert ("node.admit", "n1") in seen and ("node.refuse", "n1") in seen, seen


async def test_restarted_client_reregisters_with_its_saved_credential(
    coordinator: LiveCoordinator, spawn_client: Any, tmp_path: Path
) -> None:
    first = spawn_client("n2", coordinator.ws_url)
    await wait_until(lambda: _online(coordinator, "n2"), 20, "n2 online")
    saved = credential_path(tmp_path / "state-n2", coordinator.ws_url, "n2")
    # The node is online once `registered` is sent; it writes the credential that frame
    # carries a moment later (off its loop), so the file may trail the status by a few ms.
    await wait_until(saved.exists, 5, "the credential saved")
    assert stat.S_IMODE(saved.stat().st_mode) == 0o600
    credential = saved.read_text().strip()
    assert len(credential) >= 32
    assert credential.encode() not in (coordinator.settings.data_dir / "nodes.sqlite3").read_bytes()
    first.stop()
    await wait_until(lambda: not coordinator.mesh.nodes["n2"].online, 20, "n2 disconnected")
    second = spawn_client("n2", coordinator.ws_url)  # same state dir
    await wait_until(lambda: _online(coordinator, "n2"), 20, "n2 back online")
    assert saved.read_text().strip() == credential  # not reissued
    task_id = await coordinator.submit(task_type="test")
    assert (await coordinator.wait_finished(task_id))["status"] == "completed"
    assert second.popen is not None and second.popen.poll() is None


async def test_forget_frees_the_name_for_another_node(
    coordinator: LiveCoordinator, spawn_client: Any, tmp_path: Path
) -> None:
    old = spawn_client("n3", coordinator.ws_url)
    await wait_until(lambda: _online(coordinator, "n3"), 20, "n3 online")
    gate = tmp_path / "gate"
    task_id = await coordinator.submit(task_type="custom", script=GATED, env={"GATE": str(gate)})
    await wait_until(lambda: coordinator.mesh.tasks[task_id].state == "running", 20, "running")
    busy = await coordinator.http.delete("/mesh/nodes/n3")
    assert busy.status_code == 409 and "holds 1 task" in busy.json()["reason"]
    gate.touch()
    await coordinator.wait_finished(task_id)

    r = await coordinator.http.delete("/mesh/nodes/n3")
    assert r.status_code == 200, r.text
    assert r.json()["had_credential"] is True
    assert await _exit_code(old) == 2, old.output()
    assert "n3" not in coordinator.mesh.nodes
    assert (await coordinator.http.delete("/mesh/nodes/n3")).status_code == 404

    new = spawn_client("n3", coordinator.ws_url, MESH_STATE_DIR=str(tmp_path / "new-machine"))
    await wait_until(lambda: _online(coordinator, "n3"), 20, "the new n3 online")
    assert new.popen is not None and new.popen.poll() is None


@pytest.mark.parametrize(
    "name", ["bad%0Aname", "a%20b", "-leading-dash", "x" * 64, "%E2%98%83", "..", "a%2Fb"]
)
async def test_hostile_node_names_are_refused_cleanly(
    coordinator: LiveCoordinator, name: str, caplog: pytest.LogCaptureFixture
) -> None:
    try:
        code, reason, err = await _refused(
            f"{coordinator.ws_url}/ws/{name}", {"token": TEST_JOIN_TOKEN}
        )
    except InvalidStatus as exc:  # a path the router does not match at all: refused earlier
        assert exc.response.status_code in (403, 404)
        return
    assert code == CloseCode.POLICY_VIOLATION
    assert "invalid node name" in reason, err
    assert not coordinator.mesh.nodes
    assert all("\n" not in r.getMessage() for r in caplog.records), "a forged log line"


@pytest.mark.parametrize("token", ["ünïcödé", "\udcff", "", "wrong", TEST_JOIN_TOKEN + "x"])
async def test_bad_and_non_ascii_join_tokens_get_1008(
    coordinator: LiveCoordinator, token: str
) -> None:
    code, _, err = await _refused(f"{coordinator.ws_url}/ws/tok", {"token": token})
    assert code == CloseCode.POLICY_VIOLATION, err
    assert err.startswith("bad token") or "malformed" in err, err  # a lone surrogate: bad JSON
    assert "tok" not in coordinator.mesh.nodes


async def test_non_ascii_credential_for_a_known_name_is_name_taken(
    coordinator: LiveCoordinator,
) -> None:
    url = f"{coordinator.ws_url}/ws/known"
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "register", "executors": ["builtin"],
                                  "token": TEST_JOIN_TOKEN}))
        reg = json.loads(await ws.recv())
        assert reg["type"] == "registered" and reg["credential"]
        code, reason, err = await _refused(
            url, {"token": TEST_JOIN_TOKEN, "credential": "crédential"}
        )
        assert code == CloseCode.NAME_TAKEN and "NODE_NAME" in err
        assert coordinator.mesh.nodes["known"].online  # the rightful socket was not touched
    # The right credential supersedes the old connection, as a reconnect does.
    async with connect(url) as ws:
        await ws.send(json.dumps({"type": "register", "executors": ["builtin"],
                                  "token": TEST_JOIN_TOKEN, "credential": reg["credential"]}))
        again = json.loads(await ws.recv())
        assert again["type"] == "registered" and again.get("credential", "") == ""


async def test_join_token_is_generated_into_the_data_dir(
    settings: Settings, spawn_client: Any
) -> None:
    async with run_coordinator(replace(settings, token="")) as live:
        path = live.settings.data_dir / "join.token"
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        token = path.read_text().strip()
        assert len(token) >= 32
        spawn_client("joiner", live.ws_url, MESH_TOKEN=token)
        spawn_client("filed", live.ws_url, MESH_TOKEN="", MESH_TOKEN_FILE=str(path))
        await wait_until(lambda: _online(live, "joiner"), 20, "joiner online")
        await wait_until(lambda: _online(live, "filed"), 20, "the MESH_TOKEN_FILE client online")
        refused = spawn_client("stranger", live.ws_url)  # the tests' default token: wrong here
        assert await _exit_code(refused) == 2, refused.output()
    async with run_coordinator(replace(settings, token="")) as again:  # same file on restart
        assert (again.settings.data_dir / "join.token").read_text().strip() == token
        assert again.mesh is not None
    elsewhere = settings.data_dir.parent / "join" / "join.token"  # MESH_JOIN_TOKEN_FILE
    async with run_coordinator(replace(settings, token="", join_token_file=elsewhere)) as live:
        assert stat.S_IMODE(elsewhere.stat().st_mode) == 0o600
        assert live.mesh is not None

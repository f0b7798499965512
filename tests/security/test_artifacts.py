"""Artifacts against a node that lies (issue 25 item 1; coordinator/web/artifacts.py).

A node is driven by hand over a real WebSocket to a real coordinator and uploads over real
HTTP with the credential it was issued: it names files outside its attempt in its result,
uploads past the limits (alone, with names that look partial, all at once), fills the data
dir, and leaves a half-written upload behind when the coordinator is killed with SIGKILL.
What a tenant can download is only what this coordinator stored for the attempt that ended.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
from collections.abc import AsyncIterator
from dataclasses import replace
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx

from coordinator.settings import Settings
from shared.files import MAX_ARTIFACT_FILES, MAX_ARTIFACTS_TOTAL
from tests.conftest import (
    ADMIN_HEADERS,
    LiveCoordinator,
    Proc,
    free_port,
    run_coordinator,
    wait_until,
)
from tests.security.handnode import HandNode, healthy

MiB = 1 << 20


class LyingNode(HandNode):
    """A hand-driven node that answers its assignment with `task_started`, uploads with
    its own credential, and sends whatever result the test writes."""

    def __init__(self, name: str, url: str, ws_url: str) -> None:
        super().__init__(name, ws_url)
        self.url = url

    async def take(self, task_id: str) -> int:
        """Wait for the task's assignment, start it; its attempt."""
        assign = await self.frame(type="assign", task_id=task_id)
        attempt: int = assign["attempt"]
        self.running.append({"task_id": task_id, "attempt": attempt})
        await self.send({"type": "task_started", "task_id": task_id, "attempt": attempt})
        return attempt

    def http(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(base_url=self.url, timeout=60,
                                 headers={"Authorization": f"Bearer {self.credential}"})

    async def put(self, client: httpx.AsyncClient, task_id: str, attempt: int, name: str,
                  body: bytes) -> httpx.Response:
        return await client.put(
            f"/nodes/{self.name}/tasks/{task_id}/{attempt}/artifacts/{quote(name)}",
            content=body)


@contextlib.asynccontextmanager
async def node_with_a_task(
    live: LiveCoordinator, name: str = "liar"
) -> AsyncIterator[tuple[LyingNode, str, int]]:
    """The only node of `live`, holding one task it was assigned: (node, task, attempt)."""
    node = LyingNode(name, live.url, live.ws_url)
    await node.connect()
    try:
        task_id = await live.submit(task_type="test")
        yield node, task_id, await node.take(task_id)
    finally:
        await node.close()


def files_under(path: Path) -> list[Path]:
    return sorted(p for p in path.rglob("*") if p.is_file() or p.is_symlink())


def stored_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def artifact_url(task_id: str, name: str) -> str:
    return f"/tasks/{task_id}/artifacts/{quote(name, safe='')}"  # `/` and `..` sent as is


# --- what a result may record, and what a download may open --------------------------------


async def test_a_node_cannot_name_a_file_outside_its_attempt(
    coordinator: LiveCoordinator,
) -> None:
    """The verified attack: a result listing `../../../admin.token` made the coordinator's
    admin token (and /etc/passwd, the SQLite files) downloadable by the task's tenant. Now
    only what this coordinator stored for that attempt is recorded, with its own size and
    sha256; the rest of the result stands, and the refused names are said and logged."""
    data_dir = coordinator.settings.data_dir
    secret = (data_dir / "admin.token").read_text().strip()
    lies = ["../../../admin.token", "/etc/passwd", "../../../mesh.sqlite3",
            "../../../auth.sqlite3", "never-uploaded.bin"]
    async with node_with_a_task(coordinator) as (node, task_id, attempt):
        async with node.http() as http:
            r = await node.put(http, task_id, attempt, "ok.txt", b"honest bytes")
            assert r.status_code == 200, r.text
        listed = [{"name": "ok.txt", "size": 1, "sha256": "0" * 64}]  # its size and sum lie too
        listed += [{"name": n, "size": 1, "sha256": "0" * 64} for n in lies]
        await node.send({"type": "task_result", "task_id": task_id, "attempt": attempt,
                         "status": "completed",
                         "result": {"exit_code": 0, "output": "done", "artifacts": listed}})
        await node.frame(type="ack", task_id=task_id)  # the result is taken, whole
    doc = await coordinator.task(task_id)
    assert doc["status"] == "completed" and doc["result"]["output"] == "done"
    assert doc["result"]["artifacts"] == [{
        "name": "ok.txt", "size": 12, "sha256": hashlib.sha256(b"honest bytes").hexdigest()}]
    cut = " | ".join(doc["result"]["artifacts_cut"])
    for name in lies:
        assert repr(name) in cut, cut
    for name in lies:
        r = await coordinator.http.get(artifact_url(task_id, name))
        assert r.status_code == 404, (name, r.status_code)
        assert secret not in r.text
    r = await coordinator.http.get(artifact_url(task_id, "ok.txt"))
    assert r.status_code == 200 and r.content == b"honest bytes"


async def test_a_download_never_follows_a_symlink(coordinator: LiveCoordinator) -> None:
    """Whatever ends up on disk, a download opens its file component by component without
    following a symlink: not the file's, not a directory's on the way."""
    data_dir = coordinator.settings.data_dir
    secret = (data_dir / "admin.token").read_text().strip()
    async with node_with_a_task(coordinator) as (node, task_id, attempt):
        async with node.http() as http:
            for name in ("ok.txt", "admin.token"):  # an honest name may be any relative path
                assert (await node.put(http, task_id, attempt, name, b"mine")).status_code == 200
        await node.send({"type": "task_result", "task_id": task_id, "attempt": attempt,
                         "status": "completed", "result": {"artifacts": [
                             {"name": n, "size": 4, "sha256": ""} for n in ("ok.txt",
                                                                             "admin.token")]}})
        await node.frame(type="ack", task_id=task_id)
    assert (await coordinator.http.get(artifact_url(task_id, "ok.txt"))).content == b"mine"
    where = data_dir / "artifacts" / task_id / str(attempt)
    (where / "ok.txt").unlink()
    (where / "ok.txt").symlink_to("/etc/passwd")
    r = await coordinator.http.get(artifact_url(task_id, "ok.txt"))
    assert r.status_code == 404 and "root:" not in r.text, r.text
    where.rename(where.with_name("moved"))
    where.symlink_to(data_dir)  # the attempt's directory now leads to the data dir
    r = await coordinator.http.get(artifact_url(task_id, "admin.token"))
    assert r.status_code == 404 and secret not in r.text, r.text


# --- upload limits: counted as bytes are written, no name exempt, concurrency included ------


async def test_upload_names_that_look_partial_count_like_any_other(
    coordinator: LiveCoordinator,
) -> None:
    async with node_with_a_task(coordinator) as (node, task_id, attempt):
        async with node.http() as http:
            for i in range(MAX_ARTIFACT_FILES):
                r = await node.put(http, task_id, attempt, f"x{i}.part-0000abcd", b"x")
                assert r.status_code == 200, r.text
            r = await node.put(http, task_id, attempt, "one-more.part-1", b"x")
            assert r.status_code == 413 and "at most 32 artifacts" in r.json()["reason"], r.text
            # A retried upload of a stored name replaces it: no new file, taken.
            r = await node.put(http, task_id, attempt, "x0.part-0000abcd", b"again")
            assert r.status_code == 200, r.text
    where = coordinator.settings.data_dir / "artifacts" / task_id / str(attempt)
    assert len(files_under(where)) == MAX_ARTIFACT_FILES


async def test_an_attempt_cannot_store_more_bytes_than_its_limit(
    coordinator: LiveCoordinator,
) -> None:
    """The check used to run before the bytes landed: 31 MiB stored, an 8 MiB upload passed."""
    async with node_with_a_task(coordinator) as (node, task_id, attempt):
        async with node.http() as http:
            for i in range(31):
                r = await node.put(http, task_id, attempt, f"f{i}.bin", b"\0" * MiB)
                assert r.status_code == 200, r.text
            r = await node.put(http, task_id, attempt, "big.bin", b"\0" * (2 * MiB))
            assert r.status_code == 413, r.text
            assert f"at most {MAX_ARTIFACTS_TOTAL} bytes" in r.json()["reason"]
            r = await node.put(http, task_id, attempt, "last.bin", b"\0" * MiB)  # exactly full
            assert r.status_code == 200, r.text
    where = coordinator.settings.data_dir / "artifacts" / task_id / str(attempt)
    assert stored_bytes(where) == MAX_ARTIFACTS_TOTAL


async def test_concurrent_uploads_cannot_together_pass_the_attempt_limit(
    coordinator: LiveCoordinator,
) -> None:
    """20 uploads of 2 MiB at once (40 MiB against 32): each holds its bytes before it
    streams, so at most 16 are taken; the refused ones' holds are released."""
    async with node_with_a_task(coordinator) as (node, task_id, attempt):
        async with node.http() as http:
            answers = await asyncio.gather(*(
                node.put(http, task_id, attempt, f"c{i}.bin", b"\1" * (2 * MiB))
                for i in range(20)))
            taken = [r for r in answers if r.status_code == 200]
            assert {r.status_code for r in answers} <= {200, 413}, [r.text for r in answers]
            assert 0 < len(taken) <= MAX_ARTIFACTS_TOTAL // (2 * MiB)
            room = MAX_ARTIFACTS_TOTAL - 2 * MiB * len(taken)
            if room:  # whatever room is left is there to take: nothing stayed held
                r = await node.put(http, task_id, attempt, "rest.bin", b"\1" * min(room, MiB))
                assert r.status_code == 200, r.text
    where = coordinator.settings.data_dir / "artifacts" / task_id / str(attempt)
    assert stored_bytes(where) <= MAX_ARTIFACTS_TOTAL


async def test_the_data_dir_total_answers_507_when_full(settings: Settings) -> None:
    """MESH_ARTIFACTS_MAX_BYTES bounds everything under <data-dir>/artifacts/, across tasks."""
    async with run_coordinator(replace(settings, artifacts_max_bytes=MiB)) as live:
        async with node_with_a_task(live) as (node, task_id, attempt):
            async with node.http() as http:
                r = await node.put(http, task_id, attempt, "a.bin", b"\0" * (600 << 10))
                assert r.status_code == 200, r.text
                r = await node.put(http, task_id, attempt, "b.bin", b"\0" * (600 << 10))
                assert r.status_code == 507, r.text
                assert "MESH_ARTIFACTS_MAX_BYTES" in r.json()["reason"]
                # The refused upload's hold was released: what still fits is taken.
                r = await node.put(http, task_id, attempt, "c.bin", b"\0" * (300 << 10))
                assert r.status_code == 200, r.text
        assert stored_bytes(settings.data_dir / "artifacts") <= MiB


# --- a kill -9 in the middle of an upload ----------------------------------------------------


async def test_partial_uploads_left_by_a_kill_9_are_removed_at_start(
    spawn_coordinator: Any, tmp_path: Path,
) -> None:
    """A coordinator killed while an upload streams in leaves its partial file; the next
    start removes it, counts what is stored, and still records an upload the attempt made
    before the kill when the node's result arrives after it."""
    data_dir, port = tmp_path / "mesh-data", free_port()
    url, ws_url = f"http://127.0.0.1:{port}", f"ws://127.0.0.1:{port}"
    admin = httpx.AsyncClient(base_url=url, headers=ADMIN_HEADERS, timeout=30)
    env = {"MESH_ARTIFACTS_MAX_BYTES": str(2 * MiB)}

    async def up() -> Proc:
        proc: Proc = spawn_coordinator(port, data_dir, **env)
        await wait_until(lambda: healthy(admin), 30, "the coordinator answering")
        return proc

    first = await up()
    node = LyingNode("survivor", url, ws_url)
    await node.connect()
    try:
        r = await admin.post("/tasks/submit", json={"task_type": "test"})
        task_id = r.json()["task_id"]
        attempt = await node.take(task_id)
        stalled = asyncio.Event()

        async def half_an_upload() -> AsyncIterator[bytes]:
            yield b"\2" * (256 << 10)
            await stalled.wait()

        async with node.http() as http:
            assert (await node.put(http, task_id, attempt, "kept.txt", b"kept")).status_code == 200
            hung = asyncio.create_task(http.put(
                f"/nodes/survivor/tasks/{task_id}/{attempt}/artifacts/half.bin",
                content=half_an_upload()))
            artifacts = data_dir / "artifacts"
            await wait_until(lambda: len(files_under(artifacts)) == 2, 20, "the partial file")
            first.kill9()
            stalled.set()  # the body ends; the connection is gone
            with contextlib.suppress(httpx.HTTPError):
                await asyncio.wait_for(hung, 20)
        await node.close()
        await up()
        assert [p.relative_to(artifacts).as_posix() for p in files_under(artifacts)] == [
            f"{task_id}/{attempt}/kept.txt"]
        await node.connect()  # it still runs the task; its result comes after the restart
        await node.send({"type": "task_result", "task_id": task_id, "attempt": attempt,
                         "status": "completed", "result": {"artifacts": [
                             {"name": "kept.txt", "size": 4, "sha256": ""}]}})
        await node.frame(type="ack", task_id=task_id)
        doc = (await admin.get(f"/tasks/{task_id}")).json()
        assert doc["result"]["artifacts"] == [
            {"name": "kept.txt", "size": 4, "sha256": hashlib.sha256(b"kept").hexdigest()}]
        assert (await admin.get(artifact_url(task_id, "kept.txt"))).content == b"kept"
    finally:
        await node.close()
        await admin.aclose()


async def healthy(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False

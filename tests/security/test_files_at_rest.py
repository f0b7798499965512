"""Issue 25 item 7: another local user cannot read the coordinator's or a node's files.

The data dir is 0700 and every file in it 0600 (tokens, node credentials, the SQLite files
with their -wal/-shm, artifacts, the lock), by construction; a wider data dir left by an
older version is narrowed at start. The client's state dir (credential, launch journal)
likewise. Checked on a coordinator process that ran a task with artifacts on a client
process, and on an app built in this process (which has no umask of its own).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable
from pathlib import Path

import httpx

from coordinator.settings import Settings
from tests.conftest import Proc, free_port, run_coordinator, wait_until
from tests.security.handnode import healthy

Spawn = Callable[..., Proc]

TASK = {
    "task_type": "custom", "requirements": {"gpu_count": 0},
    "script": "mkdir -p out && echo '{\"ok\": 1}' > model.json && echo hi > out/a.txt",
    "artifacts": ["model.json", "out/*.txt"],
}


def modes(root: Path) -> dict[str, int]:
    """Every entry under `root` (and `root` itself, as "."), with its permission bits;
    symbolic links are not followed."""
    found = {".": stat.S_IMODE(os.lstat(root).st_mode)}
    for dirpath, dirs, files in os.walk(root):
        for name in dirs + files:
            path = Path(dirpath) / name
            found[str(path.relative_to(root))] = stat.S_IMODE(os.lstat(path).st_mode)
    return found


def assert_private(root: Path, skip: frozenset[str] = frozenset()) -> dict[str, int]:
    """Directories 0700, regular files 0600, under `root` and `root` itself."""
    found = modes(root)
    wrong = {}
    for rel, mode in found.items():
        path = root / rel
        if rel in skip or path.is_symlink():
            continue
        want = 0o700 if path.is_dir() else 0o600
        if mode != want:
            wrong[rel] = oct(mode)
    assert not wrong, f"not private under {root}: {wrong}"
    return found


async def test_a_coordinators_data_dir_and_a_nodes_state_dir_are_private(
    spawn_coordinator: Spawn, spawn_client: Spawn, tmp_path: Path
) -> None:
    """A coordinator process that generated its own admin and join tokens ran a task with
    artifacts on a client process: every directory 0700, every file 0600, on both sides."""
    port, data = free_port(), tmp_path / "data"
    state = tmp_path / "state-n1"
    state.mkdir(mode=0o755)  # a wide state dir from before: narrowed when the client starts
    os.chmod(state, 0o755)
    # No MESH_ADMIN_TOKEN, no MESH_JOIN_TOKEN: both are generated into the data dir.
    spawn_coordinator(port, data, MESH_ADMIN_TOKEN="", MESH_JOIN_TOKEN="")
    await wait_until(lambda: (data / "admin.token").exists() and (data / "join.token").exists(),
                     30, "the tokens to be generated")
    admin = (data / "admin.token").read_text().strip()
    join = (data / "join.token").read_text().strip()
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30,
                                 headers={"Authorization": f"Bearer {admin}"}) as http:
        await wait_until(lambda: healthy(http), 30, "the coordinator to answer")
        spawn_client("n1", f"ws://127.0.0.1:{port}", MESH_TOKEN=join)
        r = await http.post("/tasks/submit", json=TASK)
        assert r.status_code == 200, r.text
        task_id = r.json()["task_id"]
        doc = (await http.get(f"/tasks/{task_id}", params={"wait": "30"}, timeout=60)).json()
        assert doc["status"] == "completed", doc
        names = sorted(a["name"] for a in doc["result"]["artifacts"])
        assert names == ["model.json", "out/a.txt"], doc["result"]
        assert (await http.get(f"/tasks/{task_id}/artifacts/out/a.txt")).text == "hi\n"
        found = assert_private(data)  # while it runs: the -wal and -shm files are there
    for name in ("admin.token", "join.token", "coordinator.lock", "mesh.sqlite3",
                 "mesh.sqlite3-wal", "auth.sqlite3", "nodes.sqlite3"):
        assert name in found, sorted(found)
    stored = [rel for rel in found if rel.startswith("artifacts/") and rel.endswith("a.txt")]
    assert stored, sorted(found)
    seen = assert_private(state)
    assert any(rel.endswith(".credential") for rel in seen), sorted(seen)


async def test_a_wide_data_dir_is_narrowed_at_start(
    spawn_coordinator: Spawn, tmp_path: Path
) -> None:
    """A data dir left 0755 with 0644 files (an older version, or a hand): the coordinator
    takes group and other access off at start, and follows no symbolic link out of it."""
    data = tmp_path / "data"
    (data / "artifacts" / "t-1" / "1").mkdir(parents=True)
    for path in (data, data / "artifacts", data / "artifacts" / "t-1", data / "artifacts/t-1/1"):
        os.chmod(path, 0o755)
    for rel in ("artifacts/t-1/1/model.json", "old.sqlite3-wal", "notes.txt"):
        (data / rel).write_text("x")
        os.chmod(data / rel, 0o644)
    outside = tmp_path / "outside.txt"
    outside.write_text("not the coordinator's")
    os.chmod(outside, 0o644)
    (data / "link").symlink_to(outside)
    port = free_port()
    spawn_coordinator(port, data)
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=30) as http:
        await wait_until(lambda: healthy(http), 30, "the coordinator to answer")
        assert_private(data)
    assert stat.S_IMODE(outside.stat().st_mode) == 0o644  # a link is not followed


async def test_an_app_built_in_process_keeps_its_stores_and_tokens_private(
    settings: Settings,
) -> None:
    """No umask here (tests build apps in their own process): the modes are named where each
    file is created. The SQLite files, their -wal/-shm, the admin token: 0600; the dir 0700."""
    old = os.umask(0o022)  # the usual umask: files 0644 unless their creator says otherwise
    try:
        async with run_coordinator(settings) as live:
            r = await live.http.get("/mesh/status")
            assert r.status_code == 200
            found = assert_private(settings.data_dir, skip=frozenset(
                rel for rel in modes(settings.data_dir) if rel.startswith("artifacts")))
            for name in ("admin.token", "mesh.sqlite3", "mesh.sqlite3-wal", "mesh.sqlite3-shm",
                         "auth.sqlite3", "nodes.sqlite3"):
                assert name in found, sorted(found)
    finally:
        os.umask(old)

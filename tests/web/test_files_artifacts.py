"""Files in, artifacts out (issue 14 item 2): through the API, real clients and real engines."""

from __future__ import annotations

import base64
import hashlib
import io
import os
import pwd
import subprocess
import tarfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from coordinator.settings import Settings
from gpu_client.executors.workdir import (
    Collected,
    collect,
    extract,
    fetch_roots,
    matches,
    write_inputs,
)
from shared.files import MAX_ARTIFACT_BYTES, MAX_FILES, script_command
from tests.conftest import LiveCoordinator, run_coordinator, wait_until
from tests.docker_images import busybox_image, requires_docker

TRAIN = """\
import json, os, sys
os.makedirs("out", exist_ok=True)
with open("model.json", "w") as f:
    json.dump({"epochs": 3, "python": sys.version_info[0]}, f)
for i in range(2):
    open(f"out/log{i}.txt", "w").write(f"epoch {i}\\n")
with open("data.bin", "rb") as f:
    print("data", f.read().hex())
"""
BLOB = bytes(range(256))


def seed_task(**more: Any) -> dict[str, Any]:
    """The seed's custom example as written, with the file it names sent along."""
    return {
        "task_type": "custom", "requirements": {"memory_gb": 12, "gpu_count": 1},
        "script": "train_model.py",
        "files": {"train_model.py": TRAIN, "data.bin": {"base64": base64.b64encode(BLOB).decode()}},
        "artifacts": ["model.json", "out/*.txt", "missing.pt"], **more,
    }


async def finished(live: LiveCoordinator, task_id: str) -> dict[str, Any]:
    doc = await live.wait_finished(task_id, timeout=30)
    assert doc["status"] == "completed", doc
    return doc


# --- the edge: what is refused with 422 before anything is stored -------------------------


@pytest.mark.parametrize("files, why", [
    ({"../evil.py": "x"}, "no empty, `.` or `..`"),
    ({"/etc/passwd": "x"}, "must be relative"),
    ({"a\x00b": "x"}, "NUL"),
    ({"output.log": "x"}, "reserved"),
    ({"a": "x", "a/b": "y"}, "is a file"),
    ({"b.bin": {"base64": "not base64!"}}, "not valid base64"),
    ({f"f{i}": "" for i in range(MAX_FILES + 1)}, f"more than {MAX_FILES}"),
    ({"big": "x" * (800 << 10)}, "bytes in all"),
])
async def test_bad_files_are_refused(coordinator: LiveCoordinator, files: dict[str, Any],
                                     why: str) -> None:
    r = await coordinator.http.post("/tasks/submit", json={
        "task_type": "custom", "script": "echo hi", "files": files})
    assert r.status_code == 422, r.text
    assert why in r.json()["reason"]
    assert coordinator.mesh.tasks == {}


async def test_bad_artifacts_are_refused_and_an_unsent_script_accepted(
    coordinator: LiveCoordinator,
) -> None:
    for artifacts, why in ((["../x"], "`..`"), (["a"] * 33, "more than 32")):
        r = await coordinator.http.post("/tasks/submit", json={
            "task_type": "custom", "script": "echo", "artifacts": artifacts})
        assert r.status_code == 422 and why in r.json()["reason"], r.text
    # The seed's example names a file it does not send: accepted (it may be in the image);
    # run without it, the task fails saying to send it (tests/e2e/test_seed_examples.py).
    r = await coordinator.http.post("/tasks/submit", json={
        "task_type": "custom", "requirements": {"memory_gb": 8, "gpu_count": 1},
        "script": "train_model.py"})
    assert r.status_code == 200, r.text


def test_script_names_its_interpreter() -> None:
    files = {"t.py": "", "r.sh": "", "tool": "#!/bin/sh\n"}
    assert script_command("t.py", files, "process") == "python3 ./t.py"
    assert script_command("t.py", files, "docker") == "python ./t.py"
    assert script_command("r.sh", files, "docker") == "sh ./r.sh"
    assert script_command("tool", files, "process") == "./tool"
    assert script_command("echo hi > x.py", files, "process") is None  # a shell command
    assert script_command("make", files, "process") is None  # not sent, no suffix: a command
    # Not sent: it may be in the image; if not, the task fails saying to send it (exit 127).
    not_sent = script_command("other.sh", files, "process")
    assert not_sent is not None and not_sent.endswith("exec sh ./other.sh")
    done = subprocess.run(["sh", "-c", not_sent], capture_output=True, text=True, timeout=10)
    assert done.returncode == 127 and "send it in `files`" in done.stderr, done


def test_patterns_and_limits(tmp_path: Path) -> None:
    assert matches("out/a/b.txt", "out/**/*.txt") and matches("out/b.txt", "out/**/*.txt")
    assert not matches("outx/b.txt", "out/*.txt") and matches("m.pt", "*.pt")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "a.txt").write_text("a")
    (tmp_path / "big.bin").write_bytes(b"\0" * (MAX_ARTIFACT_BYTES + 1))
    (tmp_path / "link.txt").symlink_to("/etc/hostname")
    (tmp_path / "output.log").write_text("executor's own")
    found = collect(tmp_path, ["out/*.txt", "big.bin", "*.txt", "output.log"])
    assert [n for n, _, _ in found.files] == ["out/a.txt"]  # no symlink, no executor file
    notes = " | ".join(found.notes)
    assert "big.bin" in notes and "over the" in notes and "output.log: no such file" in notes
    assert fetch_roots(["model.pt", "out/*.txt", "out/x/y", "*.json"]) == [""]
    assert fetch_roots(["model.pt", "out/**/*.txt", "out/x"]) == ["out", "model.pt"]


def test_extract_reads_matching_members_of_an_archive(tmp_path: Path) -> None:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tar:
        for name, data in (("out/a.txt", b"A"), ("out/b.bin", b"B"), ("out/c.txt", b"C")):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        link = tarfile.TarInfo("out/l.txt")
        link.type, link.linkname = tarfile.SYMTYPE, "/etc/shadow"
        tar.addfile(link)
    found = Collected()
    raw = buf.getvalue()
    extract([raw[i:i + 100] for i in range(0, len(raw), 100)], "out", ["out/*.txt"], tmp_path,
             found)
    assert [n for n, _, _ in found.files] == ["out/a.txt", "out/c.txt"]
    assert (tmp_path / "out" / "c.txt").read_bytes() == b"C"


# --- the process executor, end to end -------------------------------------------------------


async def run_seed_task(live: LiveCoordinator, spawn_client: Any, name: str) -> str:
    spawn_client(name, live.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xRTX4090-24GB")
    task_id = await live.submit(**seed_task())
    doc = await finished(live, task_id)
    result = doc["result"]
    assert f"data {BLOB.hex()}" in result["output"]  # the binary file arrived intact
    names = sorted(a["name"] for a in result["artifacts"])
    assert names == ["model.json", "out/log0.txt", "out/log1.txt"], result
    assert result["artifacts_cut"] == ["missing.pt: no such file"]
    return task_id


async def fetch(http: httpx.AsyncClient, task_id: str, name: str) -> httpx.Response:
    return await http.get(f"/tasks/{task_id}/artifacts/{name}")


async def test_seed_script_runs_the_sent_file_and_artifacts_survive_a_restart(
    settings: Settings, spawn_client: Any
) -> None:
    async with run_coordinator(settings) as live:
        task_id = await run_seed_task(live, spawn_client, "files-a")
        doc = await live.task(task_id)
        listed = {a["name"]: a for a in doc["result"]["artifacts"]}
        r = await fetch(live.http, task_id, "model.json")
        assert r.status_code == 200 and r.json() == {"epochs": 3, "python": 3}
        assert hashlib.sha256(r.content).hexdigest() == listed["model.json"]["sha256"]
        assert (await fetch(live.http, task_id, "nope")).status_code == 404
    async with run_coordinator(settings) as live:  # the same data dir: a restart
        r = await fetch(live.http, task_id, "out/log1.txt")
        assert r.status_code == 200 and r.text == "epoch 1\n"
        other = await live.http.post("/admin/tokens", json={"tenant": "b", "role": "read"})
        assert other.status_code == 200, other.text
        headers = {"Authorization": f"Bearer {other.json()['token']}"}
        r = await live.http.get(f"/tasks/{task_id}/artifacts/model.json", headers=headers)
        assert r.status_code == 404  # another tenant's task is not there for this caller


async def test_retention_deletes_artifacts(
    settings: Settings, spawn_client: Any
) -> None:
    async with run_coordinator(replace(settings, artifact_retention_s=1.0)) as live:
        task_id = await run_seed_task(live, spawn_client, "files-b")
        where = settings.data_dir / "artifacts" / task_id
        files = live.server.config.loaded_app.app.state.artifacts  # type: ignore[attr-defined]
        await wait_until(lambda: files.swept >= 1 and not where.exists(), 10,
                         "the sweeper deleting the task's artifacts")
        r = await fetch(live.http, task_id, "model.json")
        assert r.status_code == 410 and "MESH_ARTIFACT_RETENTION_S" in r.json()["reason"]


async def test_uploads_need_the_node_credential_and_the_current_attempt(
    coordinator: LiveCoordinator,
) -> None:
    url = "/nodes/n1/tasks/abc/1/artifacts/x.txt"
    async with httpx.AsyncClient(base_url=coordinator.url) as anon:
        r = await anon.put(url, content=b"x", headers={"Authorization": "Bearer nope"})
        assert r.status_code == 401, r.text
    ids = coordinator.server.config.loaded_app.app.state.identities  # type: ignore[attr-defined]
    admitted = await ids.admit("n1", "")
    async with httpx.AsyncClient(base_url=coordinator.url) as node:
        r = await node.put(url, content=b"x",
                           headers={"Authorization": f"Bearer {admitted.issued}"})
        assert r.status_code == 409 and "not current" in r.json()["reason"], r.text


# --- the docker executor, end to end ----------------------------------------------------------


class TestDocker:
    pytestmark = requires_docker()

    async def test_files_in_and_artifacts_out_of_a_container(
        self, coordinator: LiveCoordinator, spawn_client: Any
    ) -> None:
        image = busybox_image()
        spawn_client("files-d", coordinator.ws_url, MESH_EXECUTORS="docker")
        task_id = await coordinator.submit(
            task_type="custom", image=image, script="run.sh",
            files={"run.sh": "mkdir -p out && cat in/data.txt > out/copy.txt && "
                             "pwd > where.txt && echo ran\n",
                   "in/data.txt": "hello from the submission\n"},
            artifacts=["out/*.txt", "where.txt"],
        )
        doc = await finished(coordinator, task_id)
        assert "ran" in doc["result"]["output"]
        assert sorted(a["name"] for a in doc["result"]["artifacts"]) == [
            "out/copy.txt", "where.txt"]
        r = await fetch(coordinator.http, task_id, "out/copy.txt")
        assert r.status_code == 200 and r.text == "hello from the submission\n"
        assert (await fetch(coordinator.http, task_id, "where.txt")).text == "/workspace\n"


async def test_upload_limits_and_what_a_cancelled_attempt_left(
    coordinator: LiveCoordinator, spawn_client: Any, tmp_path: Path
) -> None:
    """The route itself: fenced by attempt, bounded, checked names; a task that ends without
    naming its uploads (cancelled here) has them swept."""
    spawn_client("files-c", coordinator.ws_url)
    task_id = await coordinator.submit(task_type="custom", command=["sleep", "60"])
    await wait_until(lambda: (t := coordinator.mesh.tasks.get(task_id)) is not None
                     and t.state.value == "running", 20, "the task running")
    cred = await wait_until(lambda: list(tmp_path.glob("state-files-c/**/*.credential")), 10,
                            "the node's credential")
    auth = {"Authorization": f"Bearer {cred[0].read_text().strip()}"}
    base = f"/nodes/files-c/tasks/{task_id}"
    async with httpx.AsyncClient(base_url=coordinator.url, headers=auth) as node:
        r = await node.put(f"{base}/1/artifacts/big.bin", content=b"\0" * (MAX_ARTIFACT_BYTES + 1))
        assert r.status_code == 413, r.text
        r = await node.put(f"{base}/1/artifacts/output.log", content=b"x")
        assert r.status_code == 422 and "reserved" in r.json()["reason"], r.text
        r = await node.put(f"{base}/2/artifacts/a.txt", content=b"x")
        assert r.status_code == 409, r.text
        r = await node.put(f"{base}/1/artifacts/sub/a.txt", content=b"hello")
        assert r.status_code == 200, r.text
        assert r.json() == {"name": "sub/a.txt", "size": 5,
                            "sha256": hashlib.sha256(b"hello").hexdigest()}
        where = coordinator.settings.data_dir / "artifacts" / task_id / "1"
        assert (where / "sub" / "a.txt").read_bytes() == b"hello"
        assert [p.name for p in where.rglob("*") if ".part-" in p.name] == []
        assert (await coordinator.http.delete(f"/tasks/{task_id}")).status_code == 200
        r = await node.put(f"{base}/1/artifacts/b.txt", content=b"late")
        assert r.status_code == 409, r.text
    files = coordinator.server.config.loaded_app.app.state.artifacts  # type: ignore[attr-defined]
    await files.sweep(time.time())
    assert not where.exists()  # the result named none of them


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root (a MESH_RUN_AS client)")
def test_inputs_belong_to_the_run_as_user(tmp_path: Path) -> None:
    pw = pwd.getpwnam("nobody")
    write_inputs(tmp_path, {"sub/dir/t.sh": "#!/bin/sh\necho\n", "a.txt": "x"},
                 (pw.pw_uid, pw.pw_gid))
    nobody = pw.pw_uid
    for rel in (".", "sub", "sub/dir", "sub/dir/t.sh", "a.txt"):
        assert (tmp_path / rel).stat().st_uid == nobody, rel
    assert os.access(tmp_path / "sub/dir/t.sh", os.X_OK)


def test_a_template_task_s_own_script_file_runs_with_its_interpreter() -> None:
    from coordinator.web.templates import load_templates, parse_submission

    spec, _ = parse_submission({
        "task_type": "training", "script": "train.py", "files": {"train.py": "print(1)"},
    }, load_templates())
    assert spec.script == "python ./train.py" and spec.image  # the template's image runs it

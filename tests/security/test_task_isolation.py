"""A task is a stranger on its node (issue 26, items 1 and 2): with a root client, each
process-task attempt runs as a uid of its own (MESH_TASK_UIDS), cannot read the client's
environment, state dir, credential or journal, cannot touch another tenant's files, cannot
make root write or chown through a symlink it planted, and cannot make a restarted client act
on a pid or meta.json it forged. Real client processes as root, real task processes.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_client.detect import FakeGpus
from gpu_client.executors.process import ProcessExecutor
from shared.protocol import Assign
from tests.conftest import TEST_JOIN_TOKEN, LiveCoordinator, Proc, wait_until

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="a uid per attempt needs a root client")


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory any user can traverse (pytest's tmp is root's 0700: it would hide too much
    to prove anything)."""
    path = Path(tempfile.mkdtemp(prefix="gpumesh-iso-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def client_env(top: Path, name: str) -> dict[str, str]:
    return {"MESH_STATE_DIR": str(top / "state"), "MESH_SLOTS": "2"}  # work dir: tmp_path's


async def online(live: LiveCoordinator, name: str) -> None:
    await wait_until(lambda: (n := live.mesh.nodes.get(name)) is not None and n.online, 20,
                     f"node {name} online")


async def test_two_tenants_tasks_get_different_uids_and_cannot_touch_each_others_files(
    coordinator: LiveCoordinator, spawn_client: ..., top: Path, tmp_path: Path
) -> None:
    spawn_client("iso", coordinator.ws_url, **client_env(top, "iso"))
    await online(coordinator, "iso")
    alice = await coordinator.submit(
        task_type="custom", executor="process", tenant="alice",
        files={"secret.txt": "alice-secret", "result.txt": "alice-result"},
        script="id -u; while [ ! -e go ]; do sleep 0.05; done; cat result.txt")
    work = tmp_path / "work-iso"
    await wait_until(lambda: (work / f"{alice}.1" / "secret.txt").exists(), 20, "alice's dir")
    bob = await coordinator.submit(
        task_type="custom", executor="process", tenant="bob", env={"PEER": f"{alice}.1"},
        script=("id -u; cat ../$PEER/secret.txt; echo read=$?; echo forged > ../$PEER/result.txt;"
                " echo wrote=$?; ls ..; echo listed=$?"))
    doc_b = await coordinator.wait_finished(bob, 30)
    (work / f"{alice}.1" / "go").touch()
    doc_a = await coordinator.wait_finished(alice, 30)
    out_a, out_b = doc_a["result"]["output"], doc_b["result"]["output"]
    uid_a, uid_b = int(out_a.split()[0]), int(out_b.split()[0])
    assert uid_a != uid_b and 60000 <= uid_a <= 60999 and 60000 <= uid_b <= 60999
    assert "alice-secret" not in out_b and "read=1" in out_b, out_b
    assert "wrote=" in out_b and "wrote=0" not in out_b and "listed=0" not in out_b, out_b
    assert doc_a["status"] == "completed" and out_a.split()[-1] == "alice-result", out_a


async def test_a_task_cannot_read_the_clients_environ_state_dir_credential_or_journal(
    coordinator: LiveCoordinator, spawn_client: ..., top: Path
) -> None:
    client = spawn_client("iso", coordinator.ws_url, **client_env(top, "iso"))
    await online(coordinator, "iso")
    state = top / "state"
    saved = await wait_until(lambda: [p for p in state.rglob("*") if p.is_file()], 20,
                             "the node's credential saved")
    credential = saved[0].read_text().strip()
    assert credential
    task = await coordinator.submit(
        task_type="custom", executor="process", tenant="alice",
        env={"CLIENT": str(client.pid), "STATE": str(state)},
        script=("tr '\\0' '\\n' < /proc/$CLIENT/environ; echo environ=$?; "
                "ls -R $STATE; echo listed=$?; cat $STATE/* $STATE/*/* $STATE/*/*/* 2>&1; "
                "find $STATE -type f -exec cat {} + ; echo done"))
    doc = await coordinator.wait_finished(task, 30)
    out = doc["result"]["output"]
    assert "environ=0" not in out and "listed=0" not in out, out
    assert TEST_JOIN_TOKEN not in out and credential not in out, out
    assert "MESH_TOKEN" not in out and '"task_id"' not in out, out  # no journal entry either


def run_in(ex: ProcessExecutor, task_id: str, script: str, **more: object) -> asyncio.Task:
    a = Assign(task_id=task_id, attempt=1, task_type="custom", executor="process",
               script=script, **more)  # type: ignore[arg-type]
    return asyncio.create_task(ex.run(a, lambda: None, lambda _: None))


@pytest.mark.parametrize("run_as", ["", "nobody"])
async def test_a_planted_symlink_never_makes_root_write_or_chown_outside(
    top: Path, run_as: str
) -> None:
    target = top / "target"  # root's, 0755: what a task must not get root to write into
    target.mkdir(mode=0o755)
    ex = ProcessExecutor(top / "work", FakeGpus.parse("1xA100-80GB"), kill_grace_s=1.0,
                         run_as=run_as, journal_dir=top / "journal")
    assert await ex.available()
    # The attacker runs beside every launch, planting links in its own dir and in every
    # attempt dir it can reach (a next attempt's too), as fast as it can.
    attacker = run_in(ex, "evil", (
        f"T={target}; while :; do for d in ../v*.1; do ln -s $T $d/sub; ln -s $T/x $d/a;"
        " done; mkdir ../v$((${#n}+1)).1 && ln -s $T ../v$((${#n}+1)).1/sub; n=x$n;"
        " done 2>/dev/null"))
    # (a plain file first: before this change the dir was handed over after the first file)
    files = {"a": "1", **{f"f{j}": "filler" for j in range(50)}, "sub/x": "pwned",
             "sub/y/z": "2", "run.sh": "#!/bin/sh\necho ok\n"}
    deadline = time.monotonic() + 120
    for i in range(200):
        assert time.monotonic() < deadline, f"only {i} launches in 120s"
        out = await asyncio.wait_for(run_in(ex, f"v{i}", "cat sub/x", files=files), 30)
        assert out.exit_code == 0 and out.output == "pwned", out
        await ex.release(f"v{i}", 1)
    await ex.cancel("evil", 1)
    await asyncio.wait_for(attacker, 20)
    assert list(target.iterdir()) == [], "root wrote through a planted symlink"
    st = target.stat()
    assert (st.st_uid, st.st_gid, st.st_mode & 0o777) == (0, 0, 0o755), "chowned through a link"


async def test_a_task_cannot_make_the_client_read_a_root_file_as_its_output(top: Path) -> None:
    secret = top / "root-secret"
    secret.write_text("root-only-secret\n")
    secret.chmod(0o600)
    ex = ProcessExecutor(top / "work", FakeGpus.parse("1xA100-80GB"), kill_grace_s=1.0,
                         journal_dir=top / "journal")
    out = await asyncio.wait_for(run_in(
        ex, "t1", f"echo hi; rm -f output.log exit_code; ln -s {secret} output.log; "
                  f"ln -s {secret} exit_code; mkfifo pid"), 20)
    assert "root-only-secret" not in out.output, out


async def test_a_forged_pid_and_meta_are_never_acted_on_after_a_client_restart(
    coordinator: LiveCoordinator, spawn_client: ..., top: Path, tmp_path: Path
) -> None:
    sentinel = subprocess.Popen(["sleep", "300"], start_new_session=True)  # root's
    try:
        env = client_env(top, "iso")
        first: Proc = spawn_client("iso", coordinator.ws_url, **env)
        await online(coordinator, "iso")
        s = sentinel.pid
        forged = json.dumps({"task_id": "x", "attempt": 1, "started_at": time.time(), "pid": s,
                             "pgid": s, "marker": "x", "timeout_s": None})
        task = await coordinator.submit(
            task_type="custom", executor="process", tenant="alice",
            script=(f"echo '{forged}' > meta.json; echo '{s} {s}' > pid.tmp && mv -f pid.tmp pid;"
                    " echo forged; exec sleep 300"))
        pid_file = tmp_path / "work-iso" / f"{task}.1" / "pid"
        await wait_until(lambda: pid_file.exists() and pid_file.read_text().split()[:1] == [str(s)],
                         20, "the forged pid record")
        first.kill9()
        spawn_client("iso", coordinator.ws_url, **env)
        # the restarted client judges the attempt (its own records: lost or running), and
        # the coordinator sees the verdict; by then any kill it would do is done
        await wait_until(lambda: "adopted task" in first.output(), 30, "the adoption")
        await wait_until(lambda: (t := coordinator.mesh.tasks.get(task)) is not None
                         and t.attempt >= 2, 30, "the verdict (lost: run again)")
        assert sentinel.poll() is None, "the client killed a root process named by a forgery"
        await coordinator.http.delete(f"/tasks/{task}")
    finally:
        sentinel.kill()
        sentinel.wait(10)

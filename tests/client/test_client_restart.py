"""Issue 19: a client restart, however it happens, never fails a task.

Real clients (`python -m gpu_client`) killed with their whole process group (SIGKILL, as
`systemctl restart` with the default KillMode does) at points of a launch chosen by the
test-only hook GPUMESH_TEST_CRASH_AT, or mid-run by the test, then started again: each task
completes exactly once with its own output, and the attempt budget is untouched.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest

from coordinator.core.mesh import Mesh
from coordinator.model import TaskState
from coordinator.settings import Settings
from coordinator.storage.store import Store
from gpu_client.detect import FakeGpus
from gpu_client.executors.journal import Found, Verdict, decide
from gpu_client.executors.process import ProcessExecutor
from shared.protocol import Assign
from tests.conftest import FAST, LiveCoordinator, Proc, run_coordinator, wait_until
from tests.core.test_mesh import assigned, join, submit

Spawn = Callable[..., Proc]


# --- the decision table ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("found", "verdict"),
    [
        (Found(dir_exists=False, exit_code=False, pid_record=False, wrapper_alive=False),
         Verdict.GONE),
        (Found(dir_exists=True, exit_code=True, pid_record=True, wrapper_alive=False),
         Verdict.EXITED),
        (Found(dir_exists=True, exit_code=True, pid_record=True, wrapper_alive=True),
         Verdict.EXITED),  # the wrapper is between writing exit_code and exiting
        (Found(dir_exists=True, exit_code=True, pid_record=True, wrapper_alive=False,
               signalled=True), Verdict.KILLED),
        (Found(dir_exists=True, exit_code=False, pid_record=True, wrapper_alive=True),
         Verdict.RUNNING),
        (Found(dir_exists=True, exit_code=False, pid_record=True, wrapper_alive=False),
         Verdict.LOST),
        (Found(dir_exists=True, exit_code=False, pid_record=False, wrapper_alive=False),
         Verdict.NOT_STARTED),
    ],
)
def test_decision_table(found: Found, verdict: Verdict) -> None:
    assert decide(found) is verdict


def _executor(tmp_path: Path) -> ProcessExecutor:
    return ProcessExecutor(tmp_path / "work", FakeGpus.parse("none"), kill_grace_s=1.0,
                           journal_dir=tmp_path / "journal")


async def test_an_intent_without_a_work_dir_is_reported_as_infra(tmp_path: Path) -> None:
    ex = _executor(tmp_path)
    d = ex.attempt_dir("t1", 3)
    name = f"{ex._tag}-{d.name}"
    ex._journal.intend(name, {"task_id": "t1", "attempt": 3, "dir": str(d), "marker": name,
                              "at": 1.0})
    (found,) = await _executor(tmp_path).adopt()
    assert (found.task_id, found.attempt, found.running) == ("t1", 3, False)
    outcome = await found.follow(lambda _: None)
    assert outcome.infra and outcome.exit_code is None
    assert "does not exist" in outcome.error
    await ex.release("t1", 3)
    assert await _executor(tmp_path).adopt() == []  # release drops the intent


async def test_a_work_dir_without_a_pid_record_is_not_started(tmp_path: Path) -> None:
    ex = _executor(tmp_path)
    d = ex.attempt_dir("t1", 1)
    d.mkdir(parents=True)
    (d / "meta.json").write_text(json.dumps(
        {"task_id": "t1", "attempt": 1, "started_at": 1.0, "timeout_s": None}))
    (found,) = await ex.adopt()
    outcome = await found.follow(lambda _: None)
    assert outcome.infra and outcome.error.startswith("not started"), outcome.error


async def test_pids_recorded_under_another_pid_space_name_nothing_here(tmp_path: Path) -> None:
    """After a reboot or a container restart the recorded pid and group may belong to
    someone else now: the attempt is lost, and that process is left alone."""
    stranger = await asyncio.create_subprocess_exec("sleep", "60", start_new_session=True)
    try:
        ex = _executor(tmp_path)
        d = ex.attempt_dir("t1", 1)
        d.mkdir(parents=True)
        (d / "meta.json").write_text(json.dumps(
            {"task_id": "t1", "attempt": 1, "started_at": 1.0, "timeout_s": None,
             "pid_space": "another-boot:1"}))
        (d / "pid").write_text(f"{stranger.pid} {stranger.pid}\n")
        (found,) = await ex.adopt()
        assert not found.running
        outcome = await found.follow(lambda _: None)
        assert outcome.infra and outcome.error.startswith("lost with the client")
        assert stranger.returncode is None  # not ours: not ended
    finally:
        stranger.kill()
        await stranger.wait()


async def test_a_group_signalled_while_no_client_watched_is_killed_not_failed(
    tmp_path: Path,
) -> None:
    """systemd's default stop: SIGTERM to every process of the unit, tasks included. The
    task answers with exit code 143 while no client watches: that is not its outcome."""
    first = _executor(tmp_path)
    started = asyncio.Event()
    run = asyncio.create_task(first.run(
        Assign(task_id="t1", attempt=1, task_type="custom", executor="process",
               script="touch ran; sleep 60"), started.set, lambda _: None))
    await asyncio.wait_for(started.wait(), 10)
    run.cancel()  # the client goes away...
    with pytest.raises(asyncio.CancelledError):
        await run
    d = first.attempt_dir("t1", 1)
    await wait_until(lambda: (d / "ran").exists(), 10, "the command running")
    pgid = int((d / "pid").read_text().split()[1])
    os.killpg(pgid, signal.SIGTERM)  # ...and its tasks get SIGTERM with it
    await wait_until(lambda: (d / "exit_code").exists(), 10, "the wrapper's exit code")
    assert (d / "exit_code").read_text().strip() == "143"
    (found,) = await _executor(tmp_path).adopt()
    outcome = await found.follow(lambda _: None)
    assert outcome.infra and outcome.error.startswith("killed with the client"), outcome


# --- the coordinator's side -----------------------------------------------------------------


@pytest.fixture
async def mesh(tmp_path: Path) -> AsyncIterator[Mesh]:
    store = Store(tmp_path / "mesh.sqlite3")
    await store.open()
    m = Mesh(store, replace(FAST, data_dir=tmp_path))
    await m.start()
    yield m
    m.check_invariants()
    await m.stop()
    await store.close()


async def test_a_restarted_node_without_the_task_spends_no_attempt(mesh: Mesh) -> None:
    """A client that died before it journaled the assignment re-registers without it: an
    infrastructure loss, not the task's; only the cap (MESH_MAX_INFRA_RETRIES) ends it."""
    task_id = await submit(mesh, max_attempts=1)
    link = join(mesh, "a", slots=1)
    await assigned(mesh, link, task_id)
    for attempt in (2, 3):  # two restarts in a row, each losing the attempt
        link = join(mesh, "a", slots=1, running=[])
        assert (await assigned(mesh, link, task_id)).attempt == attempt
    t = await mesh.lookup(task_id)
    assert t is not None and t.state is TaskState.ASSIGNED and t.infra_retries == 2
    assert [e["attempt"] for e in t.history] == [1, 2]
    assert all(e["infra"] and "re-registered without it" in e["cause"] for e in t.history)
    stored = await mesh.store.get(task_id)  # durable: a coordinator restart keeps the count
    assert stored is not None and stored.infra_retries == 2 and stored.history == t.history
    mesh.settings = replace(mesh.settings, max_infra_retries=2)
    join(mesh, "a", slots=1, running=[])  # a third loss is past the cap
    t = await mesh.lookup(task_id)
    assert t is not None and t.state is TaskState.FAILED
    assert t.error.startswith("gave up after 3 node faults"), t.error


# --- real clients, killed at points of a launch ---------------------------------------------


async def _online(live: LiveCoordinator, name: str) -> None:
    await wait_until(lambda: name in live.mesh.nodes and live.mesh.nodes[name].online, 20,
                     f"node {name} online")


def _kill_group(proc: Proc) -> None:
    """What `systemctl restart` (KillMode=control-group) does to the client's own group."""
    assert proc.popen is not None
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.popen.wait(10)


# (crash point, attempt that completes, infra losses): before the command runs, the attempt
# is reported "not started" and placed again; once it has started, it is re-adopted.
POINTS = [
    ("intent", 2, 1),  # intent recorded, no work dir yet
    ("dir", 2, 1),  # work dir made, launcher not started
    ("launched", 1, 0),  # launcher running, its pid not yet read by the client
    ("started", 1, 0),  # right after the start was reported
    ("midrun", 1, 0),  # killed by the test while the task runs
]


@pytest.fixture
def top() -> Iterator[Path]:
    """A directory any user can traverse, removed after the test (a root client runs each
    task as a uid of its own: the marks and the gate must be where any user reaches them,
    not in pytest's 0700 tmp)."""
    path = Path(tempfile.mkdtemp(prefix="gpumesh-marks-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.mark.parametrize(("point", "attempt", "losses"), POINTS, ids=[p[0] for p in POINTS])
async def test_client_killed_at_a_point_of_launch_then_restarted(
    settings: Settings, spawn_client: Spawn, tmp_path: Path, top: Path, point: str,
    attempt: int, losses: int,
) -> None:
    marks, gate = top / "marks", top / "gate"
    marks.mkdir()
    marks.chmod(0o1777)
    # Each run leaves a mark named by task and attempt; the gate holds the first task in
    # `midrun` until the client has been killed under it.
    script = (f"touch {marks}/$MESH_TASK_ID.$MESH_ATTEMPT; "
              f"while [ ! -e {gate} ]; do sleep 0.02; done; echo out-$MESH_TASK_ID")
    async with run_coordinator(replace(settings, reconnect_grace_s=30)) as live:
        crash = {} if point == "midrun" else {"GPUMESH_TEST_CRASH_AT": point}
        first = spawn_client("a", live.ws_url, MESH_SLOTS="1", **crash)  # one launch at a time
        await _online(live, "a")
        ids = [await live.submit(task_type="custom", script=script, max_attempts=1)
               for _ in range(3)]
        if point == "midrun":
            await wait_until(lambda: any(marks.iterdir()), 20, "the first task running")
            await asyncio.to_thread(_kill_group, first)
        else:
            await wait_until(lambda: first.popen is not None and first.popen.poll() is not None,
                             20, f"the client to die at {point}")
        gate.touch()
        spawn_client("a", live.ws_url, MESH_SLOTS="1")
        docs = [await live.wait_finished(i, 40) for i in ids]
        out = first.output()
        for doc in docs:
            assert doc["status"] == "completed", (doc, out)
            assert doc["result"]["output"].strip() == f"out-{doc['task_id']}"
            assert doc["max_attempts"] == 1
            assert doc["attempt"] == 1 + doc["infra_losses"] == 1 + len(doc["history"])
        crashed = docs[0]
        assert [d["infra_losses"] for d in docs[1:]] == [0, 0], [d["history"] for d in docs]
        assert (crashed["attempt"], crashed["infra_losses"]) == (attempt, losses), crashed
        if losses:
            assert crashed["history"][0]["infra"] and crashed["history"][0]["node"] == "a"
            metrics = (await live.http.get("/metrics")).text
            lines = [ln for ln in metrics.splitlines() if "infra_losses_total" in ln]
            assert 'gpumesh_infra_losses_total{node="a"} 1.0' in lines, lines
        ran = sorted(p.name for p in marks.iterdir())
        assert ran == sorted(f"{d['task_id']}.{d['attempt']}" for d in docs), ran  # once each
        assert live.mesh.finished_counts["failed"] == 0
    if losses:  # the count survives a coordinator restart: it is in the task's row
        async with run_coordinator(settings) as again:
            doc = await again.task(ids[0])
            assert doc["infra_losses"] == losses and len(doc["history"]) == losses

"""Nodes that fail well, client side (issue 11), with real processes and real sockets.

Nothing outlives its task (background and setsid'd children, on completion and on cancel,
with and without a cgroup); node faults are `infra` results; heartbeats keep their rhythm
while a GPU read hangs; a client cut off from its coordinator fences itself; NVML faults
reach `GpuInfo.fault`. The coordinator is the scripted one of test_client_agent.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

import psutil
import pytest

from gpu_client.agent import Agent
from gpu_client.detect import DetectedGpus, FakeGpus
from gpu_client.detectors.nvidia import NvmlDetector
from gpu_client.executors.builtin import BuiltinExecutor
from gpu_client.executors.process import ProcessExecutor
from gpu_client.executors.tree import cgroup_root
from gpu_client.health import work_dir_problem
from gpu_client.settings import ClientSettings
from shared.protocol import Assign, GpuInfo, Heartbeat, TaskResult, TaskStarted
from tests.client.test_client_agent import WAIT_S, Coordinator, coordinator  # noqa: F401 - fixture
from tests.fakes import FakeNvml, h100

CHILDREN = (
    "sleep 777 & echo $! > bg.pid; "
    "setsid sh -c 'echo $$ > setsid.pid; exec sleep 778' & "
    "while [ ! -s setsid.pid ]; do sleep 0.01; done; echo started"
)
HAS_CGROUP2 = cgroup_root() is not None


def pexec(tmp_path: Path, cgroup: str, **kw: object) -> ProcessExecutor:
    return ProcessExecutor(tmp_path / "work", FakeGpus.parse("1xA100-80GB"), kill_grace_s=1.0,
                           cgroup=cgroup, **kw)  # type: ignore[arg-type]


def passign(task_id: str = "t1", attempt: int = 1, **kw: object) -> Assign:
    return Assign(task_id=task_id, attempt=attempt, task_type="custom", executor="process",
                  **kw)  # type: ignore[arg-type]


def alive(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def pids_in(d: Path) -> list[int]:
    return [int((d / name).read_text()) for name in ("bg.pid", "setsid.pid")]


CGROUP_MODES = ["off", pytest.param("auto", marks=pytest.mark.skipif(
    not HAS_CGROUP2, reason="no writable cgroup2 hierarchy here"))]


@pytest.mark.parametrize("cgroup", CGROUP_MODES)
async def test_children_are_gone_when_a_completed_task_is_reported(
    tmp_path: Path, cgroup: str
) -> None:
    ex = pexec(tmp_path, cgroup)
    d = ex.attempt_dir("t1", 1)
    outcome = await asyncio.wait_for(
        ex.run(passign(script=CHILDREN), lambda: None, lambda _: None), WAIT_S
    )
    assert outcome.ok and "started" in outcome.output
    children = pids_in(d)
    # The outcome exists only once the tree is gone: no waiting here.
    assert [p for p in children if alive(p)] == []
    assert ex.cleanup_s and ex.cleanup_s[-1] < 3.0, ex.cleanup_s
    if cgroup == "auto":
        root = cgroup_root()
        assert root is not None and not (root / f"{ex._tag}-{d.name}").exists()  # removed
    await ex.release("t1", 1)


@pytest.mark.parametrize("cgroup", CGROUP_MODES)
async def test_cancel_ends_the_whole_tree(tmp_path: Path, cgroup: str) -> None:
    ex = pexec(tmp_path, cgroup)
    d = ex.attempt_dir("t1", 1)
    started = asyncio.Event()
    run = asyncio.create_task(
        ex.run(passign(script=CHILDREN + "; sleep 300"), started.set, lambda _: None)
    )
    await asyncio.wait_for(started.wait(), WAIT_S)
    while not (d / "setsid.pid").exists() or not (d / "bg.pid").exists():
        await asyncio.sleep(0.02)
    children = pids_in(d)
    assert all(alive(p) for p in children)
    began = time.monotonic()
    await ex.cancel("t1", 1)
    outcome = await asyncio.wait_for(run, WAIT_S)
    assert outcome.error == "cancelled" and not outcome.infra
    assert [p for p in children if alive(p)] == []
    assert time.monotonic() - began < 5.0


async def test_adoption_of_an_ended_attempt_ends_what_it_left(tmp_path: Path) -> None:
    first = pexec(tmp_path, "off")
    started = asyncio.Event()
    d = first.attempt_dir("t1", 1)
    gate = d / "go"  # in its own dir: a root client's task runs as a uid that cannot see ours
    script = CHILDREN + "; while [ ! -e go ]; do sleep 0.05; done"
    run = asyncio.create_task(first.run(passign(script=script), started.set, lambda _: None))
    await asyncio.wait_for(started.wait(), WAIT_S)
    while not (d / "setsid.pid").exists():
        await asyncio.sleep(0.02)
    run.cancel()  # the client goes away; the task runs on
    with pytest.raises(asyncio.CancelledError):
        await run
    gate.touch()  # ...and ends while no client watches, leaving its children
    while not (d / "exit_code").exists():
        await asyncio.sleep(0.02)
    children = pids_in(d)
    assert all(alive(p) for p in children)
    (found,) = await pexec(tmp_path, "off").adopt()
    assert not found.running
    outcome = await asyncio.wait_for(found.follow(lambda _: None), WAIT_S)
    assert outcome.ok
    assert [p for p in children if alive(p)] == []


async def test_work_dir_that_is_a_file_is_an_infra_failure(tmp_path: Path) -> None:
    (tmp_path / "work").write_text("not a directory")
    ex = pexec(tmp_path, "off")
    outcome = await ex.run(passign(script="echo hi"), lambda: None, lambda _: None)
    assert outcome.infra and not outcome.ok
    assert "work dir" in outcome.error and "unusable" in outcome.error
    assert "not a writable directory" in work_dir_problem(tmp_path / "work", 0)
    # The task's own failure is not the node's.
    (tmp_path / "work").unlink()
    outcome = await ex.run(passign("t2", script="exit 3"), lambda: None, lambda _: None)
    assert outcome.error == "exit code 3" and not outcome.infra


# --- through the agent -------------------------------------------------------------------


class HangingGpus:
    """A GPU source whose reads hang (a stuck NVML call) once `hang` is set."""

    def __init__(self) -> None:
        self.fake = FakeGpus.parse("1xA100-80GB")
        self.hang = threading.Event()
        self.release = threading.Event()

    def read(self) -> list[GpuInfo]:
        if self.hang.is_set():
            self.release.wait(60)
        return self.fake.read()


@contextlib.asynccontextmanager
async def agent_for(
    coordinator: Coordinator, tmp_path: Path, source: object = None, **kw: object
) -> AsyncIterator[Agent]:
    settings = ClientSettings(node_name="a", coordinator_url=coordinator.url,
                              work_dir=tmp_path / "work", reconnect_max_s=0.2, slots=2,
                              executors=("builtin", "process"), **kw)  # type: ignore[arg-type]
    src = source or FakeGpus.parse("1xA100-80GB")
    executors = {"builtin": BuiltinExecutor("a", src),  # type: ignore[arg-type]
                 "process": ProcessExecutor(settings.work_dir, src, kill_grace_s=1.0)}  # type: ignore[arg-type]
    agent = Agent(settings, src, executors)  # type: ignore[arg-type]
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, WAIT_S) == 0


async def test_infra_results_and_health_in_heartbeats(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    async with agent_for(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        hb = await peer.expect(Heartbeat)
        assert hb.health == "" and hb.executors == ["builtin", "process"]
        (tmp_path / "work").rmdir()
        (tmp_path / "work").write_text("an operator's mistake")
        await peer.send(passign(script="echo hi"))
        result = await peer.expect(TaskResult)
        assert result.status == "failed" and result.infra, result
        # The infra error triggers a re-probe: the next heartbeats say why, and drop process.
        while True:
            hb = await peer.expect(Heartbeat)
            if hb.health:
                break
        assert "not a writable directory" in hb.health
        assert hb.executors == ["builtin"]


async def test_heartbeats_keep_their_rhythm_while_a_gpu_read_hangs(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    source = HangingGpus()
    try:
        async with agent_for(coordinator, tmp_path, source) as agent:
            peer = await coordinator.peer()
            await peer.register()  # heartbeat_interval_s=0.2
            await peer.expect(Heartbeat)
            source.hang.set()
            beats: list[tuple[float, Heartbeat]] = []
            while len(beats) < 10:
                hb = await peer.expect(Heartbeat)
                beats.append((time.monotonic(), hb))
            gaps = [b[0] - a[0] for a, b in zip(beats, beats[1:], strict=False)]
            assert max(gaps) < 0.6, gaps  # 0.2 s apart, not blocked on the hung read
            assert agent.telemetry.late_reads >= 1
            assert all(hb.gpus and hb.gpus[0].name == "A100" for _, hb in beats)  # last good
    finally:
        source.release.set()


async def test_client_cut_off_fences_itself(coordinator: Coordinator, tmp_path: Path) -> None:
    async with agent_for(coordinator, tmp_path, fence_after_s=1.5) as agent:
        peer = await coordinator.peer()
        await peer.register()
        await peer.send(passign(script="echo $$ > main.pid; sleep 300"))
        await peer.expect(TaskStarted)
        pid_file = tmp_path / "work" / "t1.1" / "main.pid"
        while not pid_file.exists():
            await asyncio.sleep(0.02)
        pid = int(pid_file.read_text())
        assert alive(pid)
        # The coordinator stalls: its socket stays open, but it reads nothing and answers
        # no ping (as under SIGSTOP).
        peer.ws.transport.pause_reading()
        silent_from = time.monotonic()
        while alive(pid):
            assert time.monotonic() - silent_from < 10, "not fenced"
            await asyncio.sleep(0.05)
        took = time.monotonic() - silent_from
        assert took >= 1.2, took  # not before MESH_FENCE_AFTER_S
        assert agent.fence.fenced == 1
        assert all(key[0] != "t1" for key in agent._runs)  # dropped, not reported
        peer.ws.transport.resume_reading()


# --- NVML faults -------------------------------------------------------------------------


def test_nvml_faults_reach_gpu_info() -> None:
    cards = [h100(0), h100(1), h100(2), h100(3)]
    nvml = FakeNvml(cards)
    source = DetectedGpus([NvmlDetector(nvml)])
    assert [g.fault for g in source.read()] == ["", "", "", ""]
    cards[0].ecc_uncorrected = 2
    cards[1].xids.append(79)
    cards[2].lost = True
    cards[3].xids.append(13)  # a program's own error: not a GPU fault
    gpus = source.read()
    assert [g.fault for g in gpus] == [
        "uncorrectable ECC errors (2)", "xid 79", "fallen off the bus (NVML: GPU is lost)", "",
    ]
    assert gpus[2].name == "NVIDIA H100 80GB HBM3" and gpus[2].memory_total_mb > 0  # last good
    cards[0].ecc_uncorrected = 0
    cards[3].retired_pending = True
    assert [g.fault for g in source.read()][:2] == ["", "xid 79"]  # XIDs stay until restart
    assert source.read()[3].fault == "retired pages pending (GPU reset needed)"


def test_nvml_compute_pids() -> None:
    cards = [h100(0, compute_pids=[11, 12]), h100(1, compute_pids=[13])]
    source = DetectedGpus([NvmlDetector(FakeNvml(cards))])
    source.read()
    assert source.compute_pids() == {11, 12, 13}

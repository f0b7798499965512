"""A submit token cannot take nodes out of service with a task no node can run.

At submit (shared/tasks.py `launch_problem`, called by coordinator/web/api.py for the full
stack and the fast lane alike): what a node's kernel, file system or engine refuses
whatever the node is refused with a 422 that names the field. On the node
(gpu_client/executors/process.py): a launch that fails because of the task's own values
(exec's E2BIG, a NUL or `=` in env, a file name the file system will not hold) fails the
task as an ordinary failure; it never counts as a node fault, so it never quarantines the
node. Real coordinators (fast lane on and off), real `python -m gpu_client` processes.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import msgspec
import pytest

from coordinator.settings import Settings
from coordinator.web import fastlane
from gpu_client.detect import FakeGpus, NoGpus
from gpu_client.executors.docker import DockerExecutor
from gpu_client.executors.process import ProcessExecutor
from shared.protocol import Assign
from shared.tasks import ARG_MAX, ARG_RESERVE, MAX_ARG_STRLEN, TaskSubmit
from tests.conftest import (
    FAST,
    TEST_JOIN_TOKEN,
    LiveCoordinator,
    Proc,
    _base_env,
    admin_token,
    run_coordinator,
    wait_until,
)
from tests.docker_images import busybox_image, requires_docker

Pair = tuple[LiveCoordinator, LiveCoordinator]
E200 = "é" * 200  # 200 characters (within the 255-character limit), 400 bytes in UTF-8
CMD = {"task_type": "custom", "command": ["true"]}

# (what it is, the submitted object, the field the refusal must name)
REFUSED: list[tuple[str, dict[str, Any], str]] = [
    ("file name component over 255 bytes", {**CMD, "files": {E200: "x"}}, "$.files"),
    ("file name under a component over 255 bytes",
     {**CMD, "files": {f"d/{E200}": "x"}}, "$.files"),
    ("artifact pattern over 255 bytes", {**CMD, "artifacts": [E200]}, "$.artifacts"),
    ("env name with =", {**CMD, "env": {"A=B": "x"}}, "$.env['A=B']"),
    ("env name with NUL", {**CMD, "env": {"A\x00B": "x"}}, "$.env['A\\x00B']"),
    ("env name starting with a digit", {**CMD, "env": {"1A": "x"}}, "$.env['1A']"),
    ("empty env name", {**CMD, "env": {"": "x"}}, "$.env['']"),
    ("env value with NUL", {**CMD, "env": {"A": "x\x00y"}}, "$.env['A']"),
    ("env NAME=value over 128 KiB",
     {**CMD, "env": {"BIG": "x" * (MAX_ARG_STRLEN - len("BIG="))}}, "$.env['BIG']"),
    ("argument with NUL", {**CMD, "command": ["echo", "a\x00b"]}, "$.command[1]"),
    ("argument over 128 KiB",
     {**CMD, "command": ["echo", "x" * MAX_ARG_STRLEN]}, "$.command[1]"),
    ("script with NUL", {"task_type": "custom", "script": "echo a\x00b"}, "$.script"),
    ("script over 128 KiB", {"task_type": "custom", "script": "#" * MAX_ARG_STRLEN}, "$.script"),
    ("argv and env over ARG_MAX",  # 9 bytes each to exec (NUL, pointer), 3 in the JSON
     {**CMD, "command": ["true"] + [""] * ((ARG_MAX - ARG_RESERVE) // 9)}, "$.command, $.env"),
    ("file over the process executor's own",
     {**CMD, "files": {"meta.json/x": "a"}}, "$.files"),
    ("file named like the wrapper's marker", {**CMD, "files": {"signalled": "a"}}, "$.files"),
    ("image that is no reference",
     {"task_type": "custom", "image": "Not An Image!", "script": "true"}, "$.image"),
    ("image with NUL", {"task_type": "custom", "image": "busybox\x00", "script": "true"},
     "$.image"),
    ("docker task without an image",
     {**CMD, "requirements": {"executor": "docker"}}, "$.image"),
    ("process task with nothing to run",
     {"task_type": "custom", "image": "busybox", "requirements": {"executor": "process"}}, "$"),
    ("builtin executor for a custom task",
     {**CMD, "requirements": {"executor": "builtin"}}, "$.requirements.executor"),
    ("template value filling an env over 128 KiB",  # PROMPT = "{prompt}" in templates.toml
     {"task_type": "llm_inference", "model": "m", "prompt": "p" * MAX_ARG_STRLEN},
     "$.env['PROMPT']"),
]


@pytest.fixture
def lane_hits(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The statuses the fast lane answered itself (so a test cannot pass with it idle)."""
    hits: list[int] = []
    real = fastlane._send

    async def counted(send: Any, answer: Any) -> None:
        hits.append(answer[0])
        await real(send, answer)

    monkeypatch.setattr(fastlane, "_send", counted)
    return hits


@pytest.fixture
async def pair(tmp_path: Path) -> AsyncIterator[Pair]:
    """Two real coordinators: the fast lane on (first) and off (second)."""
    fast = replace(FAST, data_dir=tmp_path / "fast", fast_lane=True)
    full = replace(FAST, data_dir=tmp_path / "full", fast_lane=False)
    async with run_coordinator(fast) as a, run_coordinator(full) as b:
        yield a, b


async def _submit_both(pair: Pair, body: Any) -> list[httpx.Response]:
    out = []
    for live in pair:
        headers = {"Authorization": f"Bearer {admin_token(live.settings)}"}
        async with httpx.AsyncClient(base_url=live.url, timeout=30, headers=headers) as http:
            out.append(await http.post("/tasks/submit", json=body))
    return out


async def test_a_task_no_node_can_run_is_refused_at_submit_naming_the_field(
    pair: Pair, lane_hits: list[int]
) -> None:
    for what, body, field in REFUSED:
        fast, full = await _submit_both(pair, body)
        for r in (fast, full):
            assert r.status_code == 422, (what, r.status_code, r.text[:300])
            assert r.json()["reason"].startswith(f"{field}:"), (what, r.json()["reason"])
        assert fast.json() == full.json(), what
    assert lane_hits.count(422) == len(REFUSED)  # the fast lane refused each one itself
    for live in pair:  # nothing was stored
        assert not live.mesh.tasks


async def test_one_unrunnable_item_refuses_its_batch_naming_the_item(
    pair: Pair, lane_hits: list[int]
) -> None:
    batch = [CMD, {**CMD, "env": {"A=B": "x"}}]
    for r in await _submit_both(pair, batch):
        assert r.status_code == 422 and r.json()["reason"].startswith("$[1].env['A=B']:")
    assert lane_hits == [422]


async def test_values_at_the_kernel_limits_are_still_accepted(
    pair: Pair, lane_hits: list[int]
) -> None:
    """Honest values at the edge of each limit pass: the checks count what exec counts."""
    at_limit = [
        {**CMD, "env": {"BIG": "x" * (MAX_ARG_STRLEN - len("BIG=") - 1)}},  # 131072 with NUL
        {**CMD, "command": ["echo", "x" * (MAX_ARG_STRLEN - 1)]},
        {**CMD, "files": {"é" * 127: "x", "a" * 255: "y"}},  # 254 and 255 bytes
        {**CMD, "env": {"_a1": "x", "Lower_case": "y"}},
        {"task_type": "custom", "image": "registry.example.com:5000/team/img:v1.2-rc_3",
         "script": "true"},
    ]
    for body in at_limit:
        for r in await _submit_both(pair, body):
            assert r.status_code == 200, (body if len(str(body)) < 300 else "", r.text[:300])
    assert lane_hits == [200] * len(at_limit)


# --- on the node: the task's own values fail the task, not the node ----------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    # Two node faults within the window would quarantine the node: the tasks below are four.
    return replace(FAST, data_dir=tmp_path / "mesh-data", quarantine_errors=2)


@pytest.fixture
async def spawn_node(tmp_path: Path) -> AsyncIterator[Callable[..., Proc]]:
    """A real `python -m gpu_client` (process executor), optionally under `ulimit -s`."""
    procs: list[Proc] = []

    def spawn(name: str, url: str, stack_kib: int | None = None) -> Proc:
        env = _base_env(
            NODE_NAME=name, MESH_COORDINATOR_URL=url, GPU_ENABLED="false",
            MESH_WORK_DIR=str(tmp_path / f"work-{name}"), MESH_RECONNECT_MAX_S="1",
            MESH_TOKEN=TEST_JOIN_TOKEN, MESH_STATE_DIR=str(tmp_path / f"state-{name}"),
            MESH_EXECUTORS="process",
        )
        python = f"exec {sys.executable} -m gpu_client"
        script = python if stack_kib is None else f"ulimit -s {stack_kib} && {python}"
        proc = Proc(["/bin/sh", "-c", script], env, tmp_path / f"client-{name}.log")
        procs.append(proc.start())
        return proc

    yield spawn
    await asyncio.gather(*(asyncio.to_thread(p.stop) for p in procs))


async def _ended_or_quarantined(live: LiveCoordinator, node: str, task_id: str) -> None:
    """Until the task ends, or its node is quarantined (where a node fault leads)."""
    async def settled() -> bool:
        n = live.mesh.nodes.get(node)
        if n is not None and n.quarantine_reason:
            return True
        return (await live.task(task_id))["status"] in ("completed", "failed", "cancelled")
    await wait_until(settled, 60, f"task {task_id} to end or node {node} to be quarantined")


async def _node_view(live: LiveCoordinator, node: str) -> dict[str, Any]:
    found: dict[str, Any] = (await live.http.get("/mesh/nodes")).json()["nodes"][node]
    return found


async def _assert_ordinary_failures(
    live: LiveCoordinator, node: str, task_ids: list[str], reasons: list[str]
) -> None:
    for task_id, reason in zip(task_ids, reasons, strict=True):
        await _ended_or_quarantined(live, node, task_id)
        doc = await live.task(task_id)
        assert doc["status"] == "failed", (reason, doc["status"], doc.get("error"))
        assert reason in doc["error"], (reason, doc["error"])
        assert doc["infra_losses"] == 0, doc
    view = await _node_view(live, node)
    assert not view["quarantined"], view["quarantine_reason"]
    assert view["infra_failures"] == 0
    assert live.mesh.nodes[node].infra_total == 0


async def test_an_argument_list_the_nodes_kernel_refuses_fails_the_task_not_the_node(
    coordinator: LiveCoordinator, spawn_node: Callable[..., Proc]
) -> None:
    """Past submit (each string within 128 KiB, all within 2 MiB) but over this node's
    ARG_MAX: with a 512 KiB stack limit exec takes 128 KiB in all, and answers E2BIG."""
    spawn_node("small", coordinator.ws_url, stack_kib=512)
    await wait_until(lambda: "small" in coordinator.mesh.nodes, 30, "node small online")
    big = ["true", "x" * 70_000, "y" * 70_000]
    ids = [await coordinator.submit(task_type="custom", command=big, max_attempts=1)
           for _ in range(4)]
    await _assert_ordinary_failures(coordinator, "small", ids, ["E2BIG"] * 4)
    # and the node still runs what fits
    ok = await coordinator.submit(task_type="custom", command=["true"])
    assert (await coordinator.wait_finished(ok))["status"] == "completed"


async def test_a_stored_task_the_node_cannot_launch_fails_as_the_tasks_own_fault(
    coordinator: LiveCoordinator, spawn_node: Callable[..., Proc]
) -> None:
    """The finding's values, as a coordinator before this check stored them (straight into
    the Mesh, past the edge): each fails on the node as the task's failure; four of them do
    not quarantine a node that two node faults would."""
    spawn_node("n1", coordinator.ws_url)
    await wait_until(lambda: "n1" in coordinator.mesh.nodes, 30, "node n1 online")
    bad = [
        ({"files": {E200: "x"}}, "File name too long"),
        ({"env": {"A=B": "x"}}, "illegal environment variable name"),
        ({"env": {"A": "x\x00y"}}, "embedded null byte"),
        ({"env": {"BIG": "x" * MAX_ARG_STRLEN}}, "E2BIG"),
        ({"files": {"pid.tmp/x": "a"}}, "process executor's own"),
    ]
    specs = [(msgspec.convert({**CMD, "max_attempts": 1, **extra}, TaskSubmit), {})
             for extra, _ in bad]
    tasks = await coordinator.mesh.submit(specs)
    await _assert_ordinary_failures(
        coordinator, "n1", [t.id for t in tasks], [why for _, why in bad])


async def test_a_missing_command_is_the_tasks_failure_and_never_quarantines(
    coordinator: LiveCoordinator, spawn_node: Callable[..., Proc]
) -> None:
    spawn_node("n2", coordinator.ws_url)
    await wait_until(lambda: "n2" in coordinator.mesh.nodes, 30, "node n2 online")
    ids = [await coordinator.submit(task_type="custom", command=["/no/such/binary"],
                                    max_attempts=1) for _ in range(3)]
    await _assert_ordinary_failures(coordinator, "n2", ids, ["command not found"] * 3)


# --- the executor itself: which launch failures are the task's ---------------------------


async def _run(ex: ProcessExecutor, task_id: str, **kw: Any) -> Any:
    a = Assign(task_id=task_id, attempt=1, task_type="custom", executor="process", **kw)
    return await asyncio.wait_for(ex.run(a, lambda: None, lambda _: None), 30)


async def test_the_process_executor_blames_the_task_for_its_own_values(tmp_path: Path) -> None:
    ex = ProcessExecutor(tmp_path / "work", FakeGpus.parse("1xA100-80GB"), kill_grace_s=1.0)
    cases: list[tuple[dict[str, Any], str]] = [
        ({"command": ["true"], "env": {"A=B": "x"}}, "illegal environment variable name"),
        ({"command": ["true"], "env": {"A\x00": "x"}}, "embedded null byte"),
        ({"command": ["echo", "a\x00"]}, "embedded null byte"),
        ({"script": "echo a\x00"}, "embedded null byte"),
        ({"command": ["echo", "x" * MAX_ARG_STRLEN]}, "E2BIG"),
        ({"command": ["true"] + [""] * 300_000}, "E2BIG"),
        ({"command": ["true"], "files": {E200: "x"}}, "File name too long"),
        ({"command": ["true"], "files": {"exit_code/x": "x"}}, "process executor's own"),
        ({"command": ["true"], "files": {"../x": "x"}}, "input file refused"),
    ]
    for i, (kw, why) in enumerate(cases):
        out = await _run(ex, f"t{i}", **kw)
        assert not out.ok and not out.infra, (why, out.error)
        assert why in out.error, (why, out.error)
    # what the task may run still runs
    out = await _run(ex, "fine", command=["true"], env={"A": "x"}, files={"é" * 127: "x"})
    assert out.ok, out.error


async def test_a_work_dir_the_node_cannot_use_is_still_the_nodes_fault(tmp_path: Path) -> None:
    """The other side of the line: the node's own file system failing is infra."""
    (tmp_path / "work").write_text("a file, not a directory")
    ex = ProcessExecutor(tmp_path / "work", FakeGpus.parse("1xA100-80GB"), kill_grace_s=1.0)
    out = await _run(ex, "t", command=["true"], files={"a": "x"})
    assert out.infra and "unusable on this node" in out.error


_ENGINE = requires_docker()  # marked `docker`; skipped with the reason where no engine answers


@_ENGINE[0]
@_ENGINE[1]
async def test_an_image_reference_the_engine_refuses_is_the_tasks_failure() -> None:
    """An engine that answers 400 to the reference (a task stored before the submit check)
    fails the task; only an engine that does not answer is the node's fault."""
    ex = DockerExecutor("dx-refs", NoGpus(), kill_grace_s=1, pull_timeout_s=20)
    try:
        a = Assign(task_id="t", attempt=1, task_type="custom", executor="docker",
                   image="Not/An:Image:Ref", script="true")
        out = await ex.run(a, lambda: None, lambda _: None)
    finally:
        ex.close()
    assert not out.ok and not out.infra, out.error


@_ENGINE[0]
@_ENGINE[1]
async def test_an_artifact_path_too_long_to_look_up_does_not_fail_the_node() -> None:
    """A stored task's pattern over NAME_MAX: the engine would answer 500 to the archive
    request (an exception, so a node fault); the node notes it and reports the run."""
    ex = DockerExecutor("dx-arts", NoGpus(), kill_grace_s=1, pull_timeout_s=20)
    try:
        a = Assign(task_id="t", attempt=1, task_type="custom", executor="docker",
                   image=busybox_image(), script="true", artifacts=[E200])
        out = await ex.run(a, lambda: None, lambda _: None)
        await ex.release("t", 1)
    finally:
        ex.close()
    assert out.ok and not out.infra, out.error
    assert out.artifacts is not None and any("NAME_MAX" in n for n in out.artifacts.notes)

"""The builtin executor's `test` task: result shape, sleep_s, fail, cancel."""

from __future__ import annotations

import asyncio
import socket

from gpu_client.detect import FakeGpus
from gpu_client.executors.builtin import BuiltinExecutor
from shared.protocol import Assign


def make_assign(**params: object) -> Assign:
    return Assign(task_id="t", attempt=2, task_type="test", gpu_indices=[1], params=params)


async def test_result_shape() -> None:
    ex = BuiltinExecutor("node-a", FakeGpus.parse("2xA100-80GB"))
    started: list[bool] = []
    out: list[str] = []
    outcome = await ex.run(make_assign(x=1), lambda: started.append(True), out.append)
    assert outcome.ok and outcome.exit_code == 0
    assert outcome.output == "test task ok on node node-a"
    # An instant test task neither reports a start nor streams: its result says it all.
    assert started == [] and out == []
    assert outcome.data["node"] == "node-a"
    assert outcome.data["hostname"] == socket.gethostname()
    assert [g["name"] for g in outcome.data["gpus"]] == ["A100", "A100"]
    assert outcome.data["gpus"][0]["memory_total_mb"] == 80 * 1024
    assert outcome.data["gpu_indices"] == [1]
    assert outcome.data["params"] == {"x": 1}
    assert await ex.adopt() == []


async def test_fail_param() -> None:
    ex = BuiltinExecutor("n", FakeGpus())
    outcome = await ex.run(make_assign(fail=True), lambda: None, lambda _: None)
    assert outcome.exit_code == 1 and outcome.error == "test task asked to fail"
    assert not outcome.ok


async def test_unknown_task_type_fails() -> None:
    ex = BuiltinExecutor("n", FakeGpus())
    a = Assign(task_id="t", attempt=1, task_type="training")
    outcome = await ex.run(a, lambda: None, lambda _: None)
    assert not outcome.ok and "training" in outcome.error


async def test_sleep_then_cancel() -> None:
    ex = BuiltinExecutor("n", FakeGpus())
    started = asyncio.Event()
    run = asyncio.create_task(ex.run(make_assign(sleep_s=300), started.set, lambda _: None))
    await asyncio.wait_for(started.wait(), 5)
    assert not run.done()
    await ex.cancel("t", 2)
    outcome = await asyncio.wait_for(run, 5)
    assert outcome.error == "cancelled" and outcome.exit_code is None


async def test_short_sleep_completes() -> None:
    ex = BuiltinExecutor("n", FakeGpus())
    outcome = await ex.run(make_assign(sleep_s=0.05), lambda: None, lambda _: None)
    assert outcome.ok and outcome.duration_s >= 0.05

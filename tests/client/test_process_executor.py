"""The process executor with real processes: exit codes, output, env, timeouts, cancel, adopt."""

from __future__ import annotations

import asyncio
import os
import time
from pathlib import Path

import psutil
import pytest

from gpu_client.detect import FakeGpus
from gpu_client.executors.base import RunOutcome
from gpu_client.executors.process import ProcessExecutor, _searchable_path
from shared.protocol import Assign


def make(tmp_path: Path, **kw: object) -> ProcessExecutor:
    kw.setdefault("kill_grace_s", 1.0)
    return ProcessExecutor(tmp_path / "work", FakeGpus.parse("2xA100-80GB"), **kw)  # type: ignore[arg-type]


def assign(task_id: str = "t1", attempt: int = 1, **kw: object) -> Assign:
    return Assign(task_id=task_id, attempt=attempt, task_type="custom", executor="process", **kw)  # type: ignore[arg-type]


class Recorder:
    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.chunks: list[str] = []

    def on_started(self) -> None:
        self.started.set()

    def on_output(self, text: str) -> None:
        self.chunks.append(text)

    @property
    def text(self) -> str:
        return "".join(self.chunks)


async def run(ex: ProcessExecutor, a: Assign) -> tuple[RunOutcome, Recorder]:
    rec = Recorder()
    outcome = await asyncio.wait_for(ex.run(a, rec.on_started, rec.on_output), 30)
    return outcome, rec


async def wait_until(cond: object, within: float = 10.0) -> None:
    deadline = time.monotonic() + within
    while not cond():  # type: ignore[operator]
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {within}s")
        await asyncio.sleep(0.02)


def live(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def read_pid(path: Path) -> int:
    return int(path.read_text().strip())


async def test_exit_zero_completes_with_output(tmp_path: Path) -> None:
    ex = make(tmp_path)
    outcome, rec = await run(ex, assign(script="echo hello; echo oops >&2"))
    assert outcome.ok and outcome.exit_code == 0 and outcome.error == ""
    assert "hello" in outcome.output and "oops" in outcome.output
    assert rec.started.is_set()
    assert "hello" in rec.text
    assert outcome.duration_s >= 0


async def test_nonzero_exit_fails_with_reason(tmp_path: Path) -> None:
    outcome, _ = await run(make(tmp_path), assign(script="echo bad; exit 3"))
    assert outcome.exit_code == 3
    assert outcome.error == "exit code 3"
    assert "bad" in outcome.output


async def test_command_argv_is_not_shell_interpreted(tmp_path: Path) -> None:
    outcome, _ = await run(make(tmp_path), assign(command=["echo", "$HOME; rm -rf x", "'q'"]))
    assert outcome.ok
    assert outcome.output.strip() == "$HOME; rm -rf x 'q'"


async def test_output_tail_is_bounded(tmp_path: Path) -> None:
    ex = make(tmp_path, output_tail_bytes=100)
    outcome, rec = await run(ex, assign(script="seq 1 5000; echo LAST"))
    assert outcome.ok
    assert len(outcome.output.encode()) <= 100
    assert outcome.output.endswith("LAST\n")
    assert "LAST" in rec.text and rec.text.startswith("1\n")


async def test_env_and_gpu_env(tmp_path: Path) -> None:
    ex = make(tmp_path, base_env={"PATH": os.environ["PATH"], "MESH_TOKEN": "secret",
                                  "CUDA_VISIBLE_DEVICES": "0,1,2,3", "KEEP": "yes"})
    script = "env | sort"
    outcome, _ = await run(ex, assign(script=script, env={"FOO": "bar"}, gpu_indices=[1],
                                      gpu_vendor="nvidia"))
    env = dict(line.split("=", 1) for line in outcome.output.splitlines() if "=" in line)
    assert env["FOO"] == "bar" and "KEEP" not in env  # a clean env: nothing of the client's
    # a root client runs the task as a uid of its own: PATH entries it cannot search go
    path = _searchable_path(os.environ["PATH"]) if os.geteuid() == 0 else os.environ["PATH"]
    assert env["HOME"].startswith(str(tmp_path)) and env["PATH"] == path
    assert env["CUDA_VISIBLE_DEVICES"] == "1"
    assert env["MESH_TASK_ID"] == "t1" and env["MESH_ATTEMPT"] == "1"
    assert env["MESH_GPU_INDICES"] == "1"
    assert "MESH_TOKEN" not in env


async def test_cpu_task_sees_no_gpu(tmp_path: Path) -> None:
    outcome, _ = await run(make(tmp_path), assign(script='echo "[$CUDA_VISIBLE_DEVICES]"'))
    assert outcome.output.strip() == "[]"


async def test_command_not_found_fails_with_reason(tmp_path: Path) -> None:
    ex = make(tmp_path)
    outcome, _ = await run(ex, assign(command=["/no/such/binary", "x"]))
    assert outcome.exit_code == 127
    assert "command not found" in outcome.error
    outcome, _ = await run(ex, assign("t2", script="no-such-command-gpumesh"))
    assert outcome.exit_code == 127 and "not found" in outcome.output


async def test_timeout_kills_the_whole_group(tmp_path: Path) -> None:
    ex = make(tmp_path)
    script = "sleep 300 & echo $! > child.pid; trap '' TERM; sleep 300"
    began = time.monotonic()
    outcome, _ = await run(ex, assign(script=script, timeout_s=0.5))
    assert outcome.error == "timed out after 0.5s"
    assert not outcome.ok
    assert time.monotonic() - began < 10
    child = read_pid(ex.attempt_dir("t1", 1) / "child.pid")
    await wait_until(lambda: not live(child))


async def test_cancel_kills_the_group_and_run_returns(tmp_path: Path) -> None:
    ex = make(tmp_path)
    rec = Recorder()
    script = "sleep 300 & echo $! > child.pid; sleep 300"
    task = asyncio.create_task(ex.run(assign(script=script), rec.on_started, rec.on_output))
    await asyncio.wait_for(rec.started.wait(), 10)
    child_pid = ex.attempt_dir("t1", 1) / "child.pid"
    # the shell creates the file before `echo` writes to it: wait for the pid itself
    await wait_until(lambda: child_pid.exists() and child_pid.read_text().strip())
    child = read_pid(child_pid)
    await ex.cancel("t1", 1)
    outcome = await asyncio.wait_for(task, 10)
    assert outcome.error == "cancelled"
    await wait_until(lambda: not live(child))
    await ex.cancel("t1", 1)  # a second cancel, and one for an unknown task, are no-ops
    await ex.cancel("nope", 7)


async def test_adopt_after_the_client_goes_away(tmp_path: Path) -> None:
    first = make(tmp_path)
    rec = Recorder()
    gate = first.attempt_dir("t1", 1) / "go"  # in its own dir: the task's uid may not see ours
    script = "echo before; while [ ! -e go ]; do sleep 0.05; done; echo after; exit 4"
    task = asyncio.create_task(first.run(assign(script=script), rec.on_started, rec.on_output))
    await asyncio.wait_for(rec.started.wait(), 10)
    task.cancel()  # the client shuts down: the process must keep running
    with pytest.raises(asyncio.CancelledError):
        await task
    del first

    second = make(tmp_path)
    adopted = await second.adopt()
    assert [(a.task_id, a.attempt, a.running) for a in adopted] == [("t1", 1, True)]
    follower = asyncio.create_task(adopted[0].follow(rec.on_output))
    gate.touch()
    outcome = await asyncio.wait_for(follower, 10)
    assert outcome.exit_code == 4 and outcome.error == "exit code 4"
    assert "before" in outcome.output and "after" in outcome.output

    # Not acked yet: a third client finds it finished; release() removes it.
    third = make(tmp_path)
    (found,) = await third.adopt()
    assert not found.running
    assert (await found.follow(rec.on_output)).exit_code == 4
    await third.release("t1", 1)
    assert await make(tmp_path).adopt() == []


async def test_adopt_reports_a_dead_process_without_exit_code(tmp_path: Path) -> None:
    first = make(tmp_path)
    rec = Recorder()
    task = asyncio.create_task(first.run(assign(script="sleep 300"), rec.on_started, rec.on_output))
    await asyncio.wait_for(rec.started.wait(), 10)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    pid, pgid = map(int, (first.attempt_dir("t1", 1) / "pid").read_text().split())
    os.killpg(pgid, 9)
    await wait_until(lambda: not live(pid))
    (found,) = await make(tmp_path).adopt()
    assert not found.running
    outcome = await found.follow(rec.on_output)
    assert outcome.exit_code is None and outcome.infra
    assert outcome.error.startswith("lost with the client"), outcome.error

"""The agent against a scripted coordinator: a real websockets server in the test's loop.

The peer speaks the wire protocol by hand, so each test states exactly what the coordinator
sends and checks exactly what the client answers.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import TypeVar

import pytest
from websockets.asyncio.server import Server, ServerConnection, serve
from websockets.datastructures import Headers
from websockets.exceptions import ConnectionClosed
from websockets.http11 import Request, Response

from gpu_client.agent import Agent, reconnect_delays
from gpu_client.detect import FakeGpus
from gpu_client.executors.builtin import BuiltinExecutor
from gpu_client.executors.process import ProcessExecutor
from gpu_client.logstream import LogStream
from gpu_client.settings import ClientSettings
from shared.protocol import (
    Ack,
    Assign,
    Cancel,
    ClientMsg,
    Drain,
    Heartbeat,
    Msg,
    Register,
    Registered,
    TaskAccepted,
    TaskLog,
    TaskRef,
    TaskResult,
    TaskStarted,
    decode_client,
    encode,
)

M = TypeVar("M", bound=Msg)
WAIT_S = 10.0


class Peer:
    """One client connection, seen from the coordinator's side."""

    def __init__(self, ws: ServerConnection) -> None:
        self.ws = ws
        self.seen: list[ClientMsg] = []
        self.closed = asyncio.Event()

    async def send(self, msg: Msg) -> None:
        await self.ws.send(encode(msg).decode())

    async def next(self) -> ClientMsg:
        msg = decode_client(await asyncio.wait_for(self.ws.recv(), WAIT_S))
        assert not isinstance(msg, type(None))
        assert hasattr(msg, "__struct_fields__"), msg
        self.seen.append(msg)  # type: ignore[arg-type]
        return msg  # type: ignore[return-value]

    async def expect(self, kind: type[M]) -> M:
        """The next message of `kind`, skipping heartbeats, logs, accepted and started."""
        while True:
            msg = await self.next()
            if isinstance(msg, kind):
                return msg
            skippable = Heartbeat | TaskLog | TaskAccepted | TaskStarted
            assert isinstance(msg, skippable), f"expected {kind.__name__}, got {msg}"

    async def register(self, **kw: object) -> Register:
        reg = await self.expect(Register)
        await self.send(Registered(node_id="a", heartbeat_interval_s=0.2, **kw))  # type: ignore[arg-type]
        return reg


class Coordinator:
    def __init__(self) -> None:
        self.peers: asyncio.Queue[Peer] = asyncio.Queue()
        self.refuse_http: int | None = None
        self.server: Server | None = None

    async def handler(self, ws: ServerConnection) -> None:
        peer = Peer(ws)
        await self.peers.put(peer)
        await ws.wait_closed()
        peer.closed.set()

    def process_request(self, ws: ServerConnection, request: Request) -> Response | None:
        if self.refuse_http is None:
            return None
        return Response(self.refuse_http, "refused", Headers(), b"")

    @property
    def url(self) -> str:
        assert self.server is not None
        port = self.server.sockets[0].getsockname()[1]
        return f"ws://127.0.0.1:{port}"

    async def peer(self) -> Peer:
        return await asyncio.wait_for(self.peers.get(), WAIT_S)


@pytest.fixture
async def coordinator() -> AsyncIterator[Coordinator]:
    c = Coordinator()
    async with serve(c.handler, "127.0.0.1", 0, process_request=c.process_request) as server:
        c.server = server
        yield c


@contextlib.asynccontextmanager
async def running_agent(coordinator: Coordinator, tmp_path: Path) -> AsyncIterator[Agent]:
    settings = ClientSettings(node_name="a", coordinator_url=coordinator.url,
                              work_dir=tmp_path / "work", reconnect_max_s=0.2, slots=2)
    source = FakeGpus.parse("2xA100-80GB")
    executors = {"builtin": BuiltinExecutor("a", source),
                 "process": ProcessExecutor(settings.work_dir, source, kill_grace_s=1.0)}
    agent = Agent(settings, source, executors)
    task = asyncio.create_task(agent.run())
    try:
        yield agent
    finally:
        agent.stop()
        assert await asyncio.wait_for(task, WAIT_S) == 0


def test_assign(task_id: str = "t1", attempt: int = 1, **kw: object) -> Assign:
    kw.setdefault("task_type", "test")
    return Assign(task_id=task_id, attempt=attempt, **kw)  # type: ignore[arg-type]


test_assign.__test__ = False  # type: ignore[attr-defined]


async def test_register_then_run_a_test_task(coordinator: Coordinator, tmp_path: Path) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        reg = await peer.register()
        assert reg.executors == ["builtin", "process"]
        assert [g.name for g in reg.gpus] == ["A100", "A100"]
        assert reg.slots == 2 and reg.running == [] and reg.version and reg.memory_mb > 0
        await peer.send(test_assign(gpu_indices=[0], params={"x": 1}))
        assert await peer.expect(TaskAccepted) == TaskAccepted(task_id="t1", attempt=1)
        result = await peer.expect(TaskResult)  # instant: no task_started, no task_log
        assert result.status == "completed" and result.result.exit_code == 0
        assert result.result.output == "test task ok on node a"
        assert result.result.data["node"] == "a" and result.result.data["params"] == {"x": 1}
        hb = await peer.expect(Heartbeat)
        assert hb.running == [TaskRef(task_id="t1", attempt=1, state="finished")]
        await peer.send(Ack(task_id="t1", attempt=1))
        for _ in range(20):  # within a few heartbeats the acked result is gone
            if (await peer.expect(Heartbeat)).running == []:
                break
        else:
            raise AssertionError("acked task still reported")
        await peer.send(test_assign())  # a repeated assign of a known attempt is ignored
        assert not [m for m in peer.seen if isinstance(m, TaskStarted | TaskLog)]


async def _beat_with(peer: Peer, assigns: int) -> Heartbeat:
    """The first heartbeat that counts `assigns` (other messages are passed over)."""
    for _ in range(100):
        msg = await peer.next()
        if isinstance(msg, Heartbeat) and msg.assigns == assigns:
            return msg
    raise AssertionError(f"no heartbeat with assigns={assigns}: {peer.seen[-3:]}")


async def test_heartbeats_count_the_assigns_of_their_connection(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    """`Heartbeat.assigns`: the assigns delivered on this connection when `running` was
    read; from 0 again on a new one; -1 (not counting) after a frame it could not decode."""
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        await _beat_with(peer, 0)
        await peer.send(test_assign("t1"))
        await peer.send(test_assign("t2"))
        hb = await _beat_with(peer, 2)
        assert {r.task_id for r in hb.running} == {"t1", "t2"}  # unacked results
        assert not [m for m in peer.seen if isinstance(m, Heartbeat) and m.assigns > 2]
        await peer.ws.close()
        peer = await coordinator.peer()
        await peer.register()
        await _beat_with(peer, 0)
        await peer.ws.send('{"type": "assign", "task_id": 5}')  # undecodable
        await _beat_with(peer, -1)
        await peer.send(test_assign("t3"))
        assert (await peer.expect(TaskResult)).task_id in ("t1", "t2", "t3")
        seen = len(peer.seen)
        await _beat_with(peer, -1)
        assert all(m.assigns == -1 for m in peer.seen[seen:] if isinstance(m, Heartbeat))


async def test_refusals_are_failed_results(coordinator: Coordinator, tmp_path: Path) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        await peer.send(test_assign(executor="docker"))
        await peer.expect(TaskAccepted)
        result = await peer.expect(TaskResult)
        assert result.status == "failed"
        assert result.error == "executor docker not offered by node a"
        await peer.send(Drain(reason="maintenance"))
        await peer.send(test_assign("t2"))
        await peer.expect(TaskAccepted)
        result = await peer.expect(TaskResult)
        assert (result.task_id, result.error, result.infra) == ("t2", "node draining", True)


async def test_process_task_output(coordinator: Coordinator, tmp_path: Path) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        script = 'echo "gpus=$CUDA_VISIBLE_DEVICES"; exit 3'
        await peer.send(test_assign(task_type="custom", executor="process", script=script,
                                    gpu_indices=[1], gpu_vendor="fake"))
        await peer.expect(TaskStarted)
        result = await peer.expect(TaskResult)
        assert result.status == "failed" and result.error == "exit code 3"
        assert result.result.output == "gpus=1\n"


async def test_cancel_stops_the_run_and_sends_no_result(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        await peer.send(test_assign(params={"sleep_s": 300}))
        await peer.expect(TaskStarted)
        await peer.send(Cancel(task_id="t1", attempt=7))  # another attempt: ignored
        await peer.send(Cancel(task_id="t1", attempt=1))
        while (await peer.expect(Heartbeat)).running:
            pass
        await peer.send(test_assign("t2"))
        result = await peer.expect(TaskResult)
        assert result.task_id == "t2"  # and never a result for t1
        assert not any(isinstance(m, TaskResult) and m.task_id == "t1" for m in peer.seen)


async def test_cancel_right_after_assign_stops_the_process(
    coordinator: Coordinator, tmp_path: Path
) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        await peer.send(test_assign(task_type="custom", executor="process", script="sleep 300"))
        await peer.send(Cancel(task_id="t1", attempt=1))  # before the process has started
        while (await peer.expect(Heartbeat)).running:
            pass
        work = tmp_path / "work"
        for _ in range(100):  # released: the attempt's dir goes once the group is gone
            if not any(work.iterdir()):
                break
            await asyncio.sleep(0.05)
        assert not any(work.iterdir())
        assert not any(isinstance(m, TaskResult) for m in peer.seen)


async def test_result_is_resent_after_reconnect(coordinator: Coordinator, tmp_path: Path) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        await peer.send(test_assign(params={"sleep_s": 0.3}))
        await peer.expect(TaskStarted)
        await peer.ws.close(1011, "coordinator crashed")

        peer = await coordinator.peer()
        reg = await peer.expect(Register)
        assert [(r.task_id, r.attempt) for r in reg.running] == [("t1", 1)]
        await peer.send(Registered(node_id="a", heartbeat_interval_s=0.2, keep=reg.running))
        result = await peer.expect(TaskResult)
        assert (result.task_id, result.status) == ("t1", "completed")
        await peer.send(Ack(task_id="t1", attempt=1))


async def test_fenced_attempt_is_stopped(coordinator: Coordinator, tmp_path: Path) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
        await peer.send(test_assign(params={"sleep_s": 300}))
        await peer.expect(TaskStarted)
        await peer.ws.close(1001, "going away")

        peer = await coordinator.peer()
        reg = await peer.expect(Register)
        assert reg.running == [TaskRef(task_id="t1", attempt=1)]
        await peer.send(Registered(node_id="a", heartbeat_interval_s=0.2, stop=reg.running))
        while (await peer.expect(Heartbeat)).running:
            pass
        assert not any(isinstance(m, TaskResult) for m in peer.seen)


@pytest.mark.parametrize("code", [1008, 4002])
async def test_fatal_close_exits_2(coordinator: Coordinator, tmp_path: Path, code: int) -> None:
    settings = ClientSettings(node_name="a", coordinator_url=coordinator.url,
                              work_dir=tmp_path, reconnect_max_s=0.2)
    agent = Agent(settings, FakeGpus(), {"builtin": BuiltinExecutor("a", FakeGpus())})
    task = asyncio.create_task(agent.run())
    peer = await coordinator.peer()
    await peer.expect(Register)
    await peer.ws.close(code, "refused")
    assert await asyncio.wait_for(task, WAIT_S) == 2


@pytest.mark.parametrize(("status", "fatal"), [(403, True), (401, True), (404, False)])
async def test_http_refusal(
    coordinator: Coordinator, tmp_path: Path, status: int, fatal: bool
) -> None:
    coordinator.refuse_http = status
    settings = ClientSettings(node_name="a", coordinator_url=coordinator.url,
                              work_dir=tmp_path, reconnect_max_s=0.2)
    agent = Agent(settings, FakeGpus(), {"builtin": BuiltinExecutor("a", FakeGpus())})
    task = asyncio.create_task(agent.run())
    if fatal:
        assert await asyncio.wait_for(task, WAIT_S) == 2
        return
    done, _ = await asyncio.wait({task}, timeout=1.0)  # it keeps retrying
    assert not done
    coordinator.refuse_http = None
    peer = await coordinator.peer()
    await peer.register()
    agent.stop()
    assert await asyncio.wait_for(task, WAIT_S) == 0


async def test_stop_closes_with_1000(coordinator: Coordinator, tmp_path: Path) -> None:
    async with running_agent(coordinator, tmp_path):
        peer = await coordinator.peer()
        await peer.register()
    await asyncio.wait_for(peer.closed.wait(), WAIT_S)
    assert peer.ws.close_code == 1000
    with pytest.raises(ConnectionClosed):
        await peer.ws.recv()


def test_reconnect_delays_are_capped_and_jittered() -> None:
    gen = reconnect_delays(3.0)
    delays = [next(gen) for _ in range(30)]
    assert 0 <= delays[0] <= 0.5
    assert all(0 < d <= 3.0 for d in delays[1:])
    assert max(delays[-10:]) > 1.4  # grew toward the cap
    assert len(set(delays)) > 20  # jittered


async def test_log_stream_is_rate_limited() -> None:
    sent: list[TaskLog] = []
    stream = LogStream("t", 1, sent.append, interval=0.01, rate=1000)
    for _ in range(100):
        stream.feed("x" * 100)  # 10 kB against a 1 kB/s budget
    stream.close()
    text = "".join(m.data for m in sent)
    assert text.count("x") <= 1000
    assert "bytes dropped]" in text
    assert [m.seq for m in sent] == list(range(len(sent)))
    stream.feed("late")
    assert "late" not in "".join(m.data for m in sent)

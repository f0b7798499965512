"""A node simulator: N WebSocket nodes with fake GPUs in one asyncio process.

`python -m benchmarks.simnodes --url ws://127.0.0.1:8001 --nodes 1000`

Each node speaks the real protocol through the `websockets` client that the compute
client uses, configured as it is (no compression, 20 s pings): `register` with 8 GPUs,
then a `heartbeat` every `heartbeat_interval_s` the coordinator asks for (5 s by default),
the first one at a random point of the interval so they spread out. An `assign` is
answered as the real client answers a `test` task: `task_accepted`, `task_started`, then
a `task_result`. Progress goes to stdout as JSON lines: `{"event": "ready", ...}` once
every node is registered, then `{"event": "tick", ...}` every second with counters.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed

from benchmarks.procs import BENCH_JOIN_TOKEN, raise_fd_limit
from shared.protocol import (
    MAX_FRAME_BYTES,
    Ack,
    Assign,
    GpuInfo,
    Heartbeat,
    Register,
    Registered,
    TaskAccepted,
    TaskOutcome,
    TaskRef,
    TaskResult,
    TaskStarted,
    decode_server,
    encode,
)

MODELS = (
    ("NVIDIA A100-SXM4-80GB", 80, "8.0"),
    ("NVIDIA H100 80GB HBM3", 80, "9.0"),
    ("NVIDIA GeForce RTX 4090", 24, "8.9"),
    ("NVIDIA L4", 24, "8.9"),
)


@dataclass
class Counters:
    registered: int = 0
    heartbeats: int = 0
    assigns: int = 0
    results: int = 0
    closed: int = 0
    failed: int = 0


def fake_gpus(rng: random.Random, i: int, count: int) -> list[GpuInfo]:
    name, mem_gb, cc = MODELS[i % len(MODELS)]
    total = mem_gb * 1024
    return [
        GpuInfo(
            index=g,
            name=name,
            vendor="nvidia",
            uuid=f"GPU-sim-{i}-{g}",
            memory_total_mb=total,
            memory_used_mb=int(total * rng.uniform(0.0, 0.5)),
            utilization_pct=round(rng.uniform(0, 100), 1),
            temperature_c=rng.uniform(35, 80),
            power_w=rng.uniform(50, 300),
            power_limit_w=400.0,
            compute_capability=cc,
        )
        for g in range(count)
    ]


class SimNode:
    def __init__(
        self, name: str, index: int, gpus: int, counters: Counters, compression: str | None
    ) -> None:
        self.name, self.index, self.counters = name, index, counters
        self.compression = compression
        self.rng = random.Random(index)
        self.gpus = fake_gpus(self.rng, index, gpus)
        self.running: dict[tuple[str, int], TaskRef] = {}

    def register(self) -> Register:
        return Register(
            hostname=f"sim-{self.index}",
            version="sim",
            gpus=self.gpus,
            cpu_count=32,
            memory_mb=256 * 1024,
            executors=["builtin"],
            slots=4,
            labels={"sim": "1"},
            token=BENCH_JOIN_TOKEN,  # what the benchmark's coordinator admits (MESH_JOIN_TOKEN)
        )

    def heartbeat(self) -> Heartbeat:
        for g in self.gpus:  # drift the readings a little, as real telemetry does
            g.memory_used_mb = max(
                0, min(g.memory_total_mb, g.memory_used_mb + self.rng.randint(-512, 512))
            )
            g.utilization_pct = round(self.rng.uniform(0, 100), 1)
        return Heartbeat(
            gpus=self.gpus,
            cpu_pct=round(self.rng.uniform(0, 100), 1),
            memory_used_mb=65536,
            load1=round(self.rng.uniform(0, 8), 2),
            running=list(self.running.values()),
        )

    async def serve(
        self, url: str, on_registered: Callable[[], None], all_ready: asyncio.Event
    ) -> None:
        async with connect(
            f"{url}/ws/{self.name}",
            max_size=MAX_FRAME_BYTES,
            open_timeout=120,
            close_timeout=5,
            compression=self.compression,
        ) as ws:
            await ws.send(encode(self.register()))
            reg = decode_server(await ws.recv())
            if not isinstance(reg, Registered):
                raise RuntimeError(f"{self.name}: expected registered, got {reg!r}")
            on_registered()
            beat = asyncio.create_task(self._beat(ws, reg.heartbeat_interval_s, all_ready))
            try:
                async for raw in ws:
                    await self._on_message(ws, raw)
            finally:
                beat.cancel()

    async def _beat(self, ws: ClientConnection, interval: float, all_ready: asyncio.Event) -> None:
        await asyncio.sleep(self.rng.uniform(0, interval))
        while True:
            await ws.send(encode(self.heartbeat()))
            if all_ready.is_set():
                self.counters.heartbeats += 1
            await asyncio.sleep(interval)

    async def _on_message(self, ws: ClientConnection, raw: str | bytes) -> None:
        msg = decode_server(raw)
        if isinstance(msg, Assign):
            self.counters.assigns += 1
            ref = TaskRef(task_id=msg.task_id, attempt=msg.attempt)
            self.running[(msg.task_id, msg.attempt)] = ref
            await ws.send(encode(TaskAccepted(task_id=msg.task_id, attempt=msg.attempt)))
            await ws.send(encode(TaskStarted(task_id=msg.task_id, attempt=msg.attempt)))
            out = f"test task ok on node {self.name}"
            await ws.send(
                encode(
                    TaskResult(
                        task_id=msg.task_id,
                        attempt=msg.attempt,
                        status="completed",
                        result=TaskOutcome(exit_code=0, output=out, data={"node": self.name}),
                    )
                )
            )
            self.counters.results += 1
        elif isinstance(msg, Ack):
            self.running.pop((msg.task_id, msg.attempt), None)


async def main_async(args: argparse.Namespace) -> None:
    counters = Counters()
    limit = asyncio.Semaphore(args.concurrency)  # handshakes in flight
    all_ready = asyncio.Event()
    settled = asyncio.Event()  # every node registered or failed
    began = time.monotonic()

    def count(registered: bool) -> None:
        if registered:
            counters.registered += 1
        else:
            counters.failed += 1
        if counters.registered + counters.failed >= args.nodes:
            settled.set()

    def emit(event: str, **more: object) -> None:
        doc = {"event": event, "t": round(time.monotonic() - began, 3), **vars(counters), **more}
        print(json.dumps(doc), flush=True)

    async def one(i: int) -> None:
        await limit.acquire()
        compression = None if args.compression == "none" else args.compression
        node = SimNode(f"{args.prefix}{i:05d}", i, args.gpus, counters, compression)
        registered = False

        def on_registered() -> None:
            nonlocal registered
            registered = True
            count(True)
            limit.release()

        try:
            await node.serve(args.url, on_registered, all_ready)
        except ConnectionClosed:
            pass
        except (OSError, TimeoutError, RuntimeError) as exc:
            if not registered and counters.failed < 5:
                print(f"{node.name}: {exc!r}", file=sys.stderr, flush=True)
        finally:
            if registered:
                counters.closed += 1
            else:
                count(False)  # never got `registered`
                limit.release()

    nodes = [asyncio.create_task(one(i)) for i in range(args.first, args.first + args.nodes)]
    await settled.wait()
    all_ready.set()
    emit("ready", connect_s=round(time.monotonic() - began, 2))
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    loop.add_signal_handler(signal.SIGINT, stop.set)
    while not stop.is_set():
        try:
            await asyncio.wait_for(stop.wait(), 1.0)
        except TimeoutError:
            emit("tick")
    for t in nodes:
        t.cancel()
    await asyncio.gather(*nodes, return_exceptions=True)
    emit("done")


def main() -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.simnodes", description=__doc__)
    p.add_argument("--url", required=True, help="ws://host:port of the coordinator")
    p.add_argument("--nodes", type=int, default=1000)
    p.add_argument("--first", type=int, default=0, help="number of the first node")
    p.add_argument("--prefix", default="sim")
    p.add_argument("--gpus", type=int, default=8, help="GPUs per node")
    p.add_argument("--concurrency", type=int, default=200, help="handshakes in flight")
    p.add_argument(
        "--compression",
        default="none",
        choices=("deflate", "none"),
        help="none, as gpu_client connects (default), or permessage-deflate to compare",
    )
    args = p.parse_args()
    raise_fd_limit()
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()

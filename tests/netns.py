"""A network namespace for real multicast DNS in tests, and fake coordinators to run in it.

`Netns` creates `ip netns add` with a veth pair (ADDR on one end, multicast on; the kernel
here has no `dummy` module), runs real processes inside it with `ip netns exec`, and reads a
coordinator's API from one thread that joined the namespace (setns): nothing leaves the
machine. ROGUE and RELAY are small `python -c` programs that advertise a mesh name without
the join token (tests/link/test_discovery.py).
"""

from __future__ import annotations

import asyncio
import ctypes
import itertools
import json
import os
import subprocess
import sys
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from tests.conftest import TEST_ADMIN_TOKEN, TEST_JOIN_TOKEN, Proc, _base_env

ADDR = "10.251.0.1"
CLONE_NEWNET = 0x40000000
_names = itertools.count()


class Netns:
    """`ip netns add` with a veth pair (ADDR on one end, multicast on), removed at the end."""

    def __init__(self, tmp_path: Path) -> None:
        self.name = f"gmdisc-{os.getpid()}-{next(_names)}"
        self.tmp = tmp_path
        self.procs: list[Proc] = []
        self._pool: ThreadPoolExecutor | None = None

    def create(self) -> None:
        for cmd in (
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "-n", self.name, "link", "add", "mesh0", "type", "veth", "peer", "peer0"],
            ["ip", "-n", self.name, "addr", "add", f"{ADDR}/24", "dev", "mesh0"],
            ["ip", "-n", self.name, "link", "set", "mesh0", "multicast", "on", "up"],
            ["ip", "-n", self.name, "link", "set", "peer0", "multicast", "on", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def remove(self) -> None:
        for p in self.procs:
            p.stop()
        if self._pool is not None:
            self._pool.shutdown(wait=True)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)

    def spawn(self, label: str, argv: list[str], **env: str) -> Proc:
        proc = Proc(["ip", "netns", "exec", self.name, *argv], _base_env(**env),
                    self.tmp / f"{label}.log")
        self.procs.append(proc.start())
        return proc

    def coordinator(
        self, label: str, port: int, *, host: str = "0.0.0.0", data: str = "", **env: str
    ) -> Proc:
        return self.spawn(
            label,
            [sys.executable, "-m", "coordinator", "--host", host, "--port", str(port),
             "--data-dir", str(self.tmp / f"data-{data or label}")],
            MESH_HEARTBEAT_S="0.5", MESH_ADMIN_TOKEN=TEST_ADMIN_TOKEN,
            **({"MESH_JOIN_TOKEN": TEST_JOIN_TOKEN} | env),
        )

    def client(self, name: str, **env: str) -> Proc:
        return self.spawn(
            f"client-{name}", [sys.executable, "-m", "gpu_client"],
            NODE_NAME=name, GPU_ENABLED="false", MESH_EXECUTORS="process",
            MESH_WORK_DIR=str(self.tmp / f"work-{name}"), MESH_RECONNECT_MAX_S="1",
            MESH_STATE_DIR=str(self.tmp / f"state-{name}"),
            **({"MESH_TOKEN": TEST_JOIN_TOKEN} | env),
        )

    def discover(self) -> tuple[int, list[dict[str, Any]]]:
        """`gpumesh discover --json` run inside the namespace."""
        done = subprocess.run(
            ["ip", "netns", "exec", self.name, sys.executable, "-m", "gpumesh.cli.main",
             "discover", "--json", "--timeout", "1.5"],
            capture_output=True, text=True, timeout=30, cwd=Path(__file__).parent.parent,
        )
        return done.returncode, json.loads(done.stdout or "[]")

    def _enter(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/var/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    async def get(self, port: int, path: str, body: dict[str, Any] | None = None) -> Any:
        """GET (POST with `body`) the coordinator's API from a thread inside the namespace;
        None if it cannot be reached."""
        if self._pool is None:  # its one thread joins the namespace; no other thread does
            self._pool = ThreadPoolExecutor(1, initializer=self._enter)

        def fetch() -> Any:
            req = urllib.request.Request(
                f"http://{ADDR}:{port}{path}", data=json.dumps(body).encode() if body else None,
                headers={"Authorization": f"Bearer {TEST_ADMIN_TOKEN}",
                         "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    return json.loads(resp.read())
            except OSError:
                return None

        return await asyncio.get_running_loop().run_in_executor(self._pool, fetch)

    async def nodes_online(self, port: int) -> set[str]:
        doc = await self.get(port, "/mesh/status")
        nodes = (doc or {}).get("nodes", {})
        return {name for name, n in nodes.items() if n.get("status") == "online"}


ROGUE = r"""
import asyncio, json, sys
from websockets.asyncio.server import serve
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

port, mesh, record, mode, addr, marker = sys.argv[1:7]

def note(**kw):
    with open(record, "a") as f:
        f.write(json.dumps(kw) + "\n")

def answer(conn, request, response):
    note(event="handshake", path=request.path, nonce=request.headers.get("X-Gpumesh-Nonce"))
    if mode == "forged":
        response.headers["X-Gpumesh-Proof"] = "v1." + "A" * 32 + "." + "B" * 43
    return response

async def handler(ws):
    assign = {"type": "assign", "task_id": "pwn", "attempt": 1, "task_type": "custom",
              "executor": "process", "command": ["touch", marker]}
    try:
        await ws.send(json.dumps(assign))
        async for frame in ws:
            note(event="frame", frame=str(frame)[:300])
    except Exception as exc:
        note(event="closed", why=repr(exc))

async def main():
    async with serve(handler, "0.0.0.0", int(port), process_response=answer):
        zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
        info = ServiceInfo(
            "_gpumesh._tcp.local.", f"{mesh} {mode} rogue._gpumesh._tcp.local.", port=int(port),
            properties={"scheme": "ws", "mesh": mesh, "proto": "1", "path": "/ws"},
            server=f"rogue-{mode}.local.", parsed_addresses=[addr])
        await (await zc.async_register_service(info))
        note(event="advertised")
        await asyncio.Event().wait()

asyncio.run(main())
"""


RELAY = r"""
import asyncio, json, sys
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve
from zeroconf import IPVersion, ServiceInfo
from zeroconf.asyncio import AsyncZeroconf

port, mesh, record, mode, addr, upstream = sys.argv[1:7]
up_host, up_port = upstream.split(":")
upstreams = {}

def note(**kw):
    with open(record, "a") as f:
        f.write(json.dumps(kw) + "\n")

async def pipe(reader, writer, from_node):
    try:
        while data := await reader.read(65536):
            if from_node:
                note(event="bytes", data=data.decode("latin-1"))
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()

async def tcp_relay(reader, writer):  # passes every byte on, Host header included
    up_r, up_w = await asyncio.open_connection(up_host, int(up_port))
    await asyncio.gather(pipe(reader, up_w, True), pipe(up_r, writer, False))

async def answer(conn, request, response):  # dials the real one: its Host is the real address
    keep = ("X-Gpumesh-Nonce", "X-Gpumesh-Found")
    up = await connect(f"ws://{upstream}{request.path}",
                       additional_headers={k: request.headers[k] for k in keep
                                           if k in request.headers})
    proof = up.response.headers.get("X-Gpumesh-Proof")
    note(event="handshake", upstream_proof=bool(proof))
    if proof:
        response.headers["X-Gpumesh-Proof"] = proof
    upstreams[conn] = up
    return response

async def ws_relay(ws):
    up = upstreams.pop(ws)
    async def pump(a, b, from_node):
        async for frame in a:
            if from_node:
                note(event="frame", frame=str(frame)[:300])
            await b.send(frame)
    await asyncio.gather(pump(ws, up, True), pump(up, ws, False), return_exceptions=True)

async def main():
    if mode == "tcp":
        server = await asyncio.start_server(tcp_relay, "0.0.0.0", int(port))
    else:
        server = await serve(ws_relay, "0.0.0.0", int(port), process_response=answer)
    zc = AsyncZeroconf(ip_version=IPVersion.V4Only)
    info = ServiceInfo(
        "_gpumesh._tcp.local.", f"{mesh} {mode} relay._gpumesh._tcp.local.", port=int(port),
        properties={"scheme": "ws", "mesh": mesh, "proto": "1", "path": "/ws"},
        server=f"relay-{mode}.local.", parsed_addresses=[addr])
    await (await zc.async_register_service(info))
    note(event="advertised")
    await asyncio.Event().wait()

asyncio.run(main())
"""

"""Model serving (issue 27): the same engine called directly and through the mesh, same run.

One `python -m coordinator`, one `python -m gpu_client` (MESH_SLOTS=1) and a service with one
replica of the `llama_cpp` engine template: llama.cpp's OpenAI server (llama-cpp-python, CPU)
on the tiny GGUF of tests/serving/tinyllama.py. "direct" is that very engine process called
on its own 127.0.0.1 port (found from its command line); "mesh" is the coordinator's
`/v1/chat/completions` with a tenant's token, relayed over the node's WebSocket to the same
engine. Both are driven by the same load: `clients` connections (32; 1 as well, where the
added latency is not hidden in the engine's queue: llama-cpp-python answers one request at a
time), each sending one request after another on a kept-alive connection, in alternating
blocks (direct, mesh, direct, ...) so a busy neighbour slows both alike.

Every line runs in two layouts. `shared`: all processes may run on every core, so on a small
box the coordinator, the node's client and the load generator compete with the engine for
its cores. `pinned`: the engine's threads on the first core, everything else on the others,
the same for the direct and the mesh blocks; that is a deployment's layout (the coordinator
on another machine, the node's client beside an engine that leaves it a core), and it shows
what the mesh adds apart from taking the engine's CPU.

Non-streamed: a chat completion of 1 token, timed from the request's first byte out to the
body's last byte in. Streamed (`"stream": true`, 8 tokens): time to first token (TTFT) is the
first SSE `data:` chunk; the whole stream is read. Coordinator CPU per request is psutil's
user+system time of the coordinator process over the mesh blocks, divided by their requests
(the node's the same way); the engine's work is the same both ways.
"""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import orjson
import psutil

from benchmarks import procs
from benchmarks.httpc import BENCH_TOKEN
from benchmarks.stats import Result, summary

BODY: dict[str, Any] = {
    "model": "tiny", "messages": [{"role": "user", "content": "Hello mesh"}],
    "temperature": 0, "seed": 1,
}


class Conn:
    """One kept-alive HTTP/1.1 connection: POST a JSON body, read a Content-Length or chunked
    answer, note when the first body byte (the first SSE `data:` for a stream) arrived."""

    def __init__(self, host: str, port: int, token: str) -> None:
        self.addr, self.token = (host, port), token

    async def open(self) -> Conn:
        self.reader, self.writer = await asyncio.open_connection(*self.addr, limit=1 << 22)
        self.writer.get_extra_info("socket").setsockopt(
            socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        return self

    async def post(self, path: str, body: bytes) -> tuple[int, int, int, bytes]:
        """(status, ns to the first body data, ns to the end, body)."""
        head = (f"POST {path} HTTP/1.1\r\nHost: {self.addr[0]}:{self.addr[1]}\r\n"
                f"Authorization: Bearer {self.token}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(body)}\r\n\r\n").encode()
        t0 = time.perf_counter_ns()
        self.writer.write(head + body)
        raw = await self.reader.readuntil(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        status = int(lines[0].split(b" ", 2)[1])
        length, chunked = -1, False
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name = name.strip().lower()
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding" and b"chunked" in value.lower():
                chunked = True
        first = 0
        if not chunked:
            data = await self.reader.readexactly(length)
            return status, time.perf_counter_ns() - t0, time.perf_counter_ns() - t0, data
        parts = []
        while True:
            size = int((await self.reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await self.reader.readuntil(b"\r\n")
                break
            piece = (await self.reader.readexactly(size + 2))[:-2]
            if not first and b"data:" in piece:
                first = time.perf_counter_ns() - t0
            parts.append(piece)
        return status, first, time.perf_counter_ns() - t0, b"".join(parts)

    async def close(self) -> None:
        self.writer.close()
        try:
            await self.writer.wait_closed()
        except OSError:
            pass


async def block(port: int, path: str, token: str, body: bytes, clients: int,
                per_client: int) -> tuple[list[int], list[int], float]:
    """`clients` connections, `per_client` requests each: (first-data ns, total ns, seconds)."""
    conns = [await Conn("127.0.0.1", port, token).open() for _ in range(clients)]
    firsts: list[int] = []
    totals: list[int] = []

    async def one(conn: Conn) -> None:
        for _ in range(per_client):
            status, first, total, data = await conn.post(path, body)
            if status != 200:
                raise RuntimeError(f"{path} on port {port}: {status} {data[:300]!r}")
            firsts.append(first)
            totals.append(total)

    began = time.perf_counter()
    try:
        await asyncio.gather(*(one(c) for c in conns))
    finally:
        for c in conns:
            await c.close()
    return firsts, totals, time.perf_counter() - began


def _engine(model: Path) -> tuple[int, int]:
    """(pid, port) of the engine serving this run's model file; (0, 0) if none."""
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if (cmd and Path(cmd[0]).name.startswith("python") and "llama_cpp.server" in cmd
                and str(model) in cmd):  # the interpreter, not the executor's wrapper
            return p.pid, int(cmd[cmd.index("--port") + 1])
    return 0, 0


async def _answer(port: int, token: str, body: bytes) -> str:
    """The generated text of one request (streamed: the deltas joined)."""
    conn = await Conn("127.0.0.1", port, token).open()
    try:
        status, _, _, data = await conn.post("/v1/chat/completions", body)
    finally:
        await conn.close()
    assert status == 200, data
    if not data.startswith(b"data:") and b"\ndata:" not in data:
        return str(orjson.loads(data)["choices"][0]["message"]["content"])
    text = ""
    for line in data.split(b"\n"):
        if line.startswith(b"data:") and line[5:].strip() not in (b"[DONE]", b""):
            for choice in orjson.loads(line[5:])["choices"]:
                text += choice["delta"].get("content") or ""
    return text


def _skip(why: str) -> Result:
    return Result("serving", [], ["path"], [f"skipped: {why}"])


def run(quick: bool = False) -> Result:
    from tests.serving.realengine import missing, tiny_model

    if why := missing():
        return _skip(why)
    rounds, per = (2, 8) if quick else (3, 20)
    with tempfile.TemporaryDirectory(prefix="bench-serve-") as tmp:
        log_dir = Path(tmp)
        os.chmod(log_dir, 0o755)
        model = tiny_model(log_dir / "model")
        # A root client gives each task a uid of its own, which may not reach this venv's
        # interpreter (pyenv under /root): the engine runs as root here, as in the tests.
        node_env = {"MESH_SLOTS": "1", "MESH_EXECUTORS": "process"} | (
            {"MESH_RUN_AS": "root", "MESH_ISOLATION": "none"} if os.geteuid() == 0 else {})
        with procs.mesh(log_dir, clients=1, client_env=node_env) as (port, coord, nodes):
            try:
                return asyncio.run(_measure(port, coord, nodes[0], model, rounds, per))
            finally:  # a stopped client leaves its process tasks running: end the engine
                pid, _ = _engine(model)
                if pid:
                    os.kill(pid, signal.SIGKILL)


async def _admin(port: int, method: str, path: str, body: Any) -> tuple[int, Any]:
    conn = await Conn("127.0.0.1", port, BENCH_TOKEN).open()
    try:
        if method == "POST":
            status, _, _, data = await conn.post(path, orjson.dumps(body))
            return status, orjson.loads(data) if data else None
        raise ValueError(method)
    finally:
        await conn.close()


async def _measure(port: int, coord: procs.Proc, node: procs.Proc, model: Path, rounds: int,
                   per: int) -> Result:
    status, doc = await _admin(port, "POST", "/admin/tokens", {"tenant": "bench",
                                                                "role": "submit"})
    assert status == 200, doc
    token = doc["token"]
    conn = await Conn("127.0.0.1", port, token).open()
    spec = {"name": "tiny", "model": "tiny", "engine": "llama_cpp",
            "params": {"gguf": str(model), "python": sys.executable},
            "replicas": {"min": 1, "max": 1}, "idle_s": 3600, "target_ongoing": 10_000}
    status, _, _, data = await conn.post("/services", orjson.dumps(spec))
    assert status == 201, data
    began = time.monotonic()
    one = orjson.dumps(BODY | {"max_tokens": 1})
    while True:  # the replica starts, loads, reports ready
        status, _, _, data = await conn.post("/v1/chat/completions", one)
        if status == 200:
            break
        if time.monotonic() - began > 120:
            raise RuntimeError(f"no replica answered in 120 s: {status} {data[:300]!r}")
        await asyncio.sleep(0.2)
    cold_s = time.monotonic() - began
    await conn.close()
    engine_pid, engine = _engine(model)
    assert engine, "the engine's port"

    bodies = {"non-streamed": one,
              "streamed": orjson.dumps(BODY | {"max_tokens": 8, "stream": True})}
    # the same answers both ways (temperature 0)
    for body in bodies.values():
        direct = await _answer(engine, "none", body)
        assert direct and await _answer(port, token, body) == direct, direct
    rows: list[dict[str, Any]] = []
    layouts = ["shared", "pinned"] if _pinnable() else ["shared"]
    for layout in layouts:
        _pin(layout, engine_pid, [coord.pid, node.pid, os.getpid()])
        rows += await _layout(layout, port, engine, token, bodies, coord, node, rounds, per)
    _pin("shared", engine_pid, [coord.pid, node.pid, os.getpid()])
    goals, added = [], []
    for layout in layouts:
        g, a = _goals([r for r in rows if r["layout"] == layout])
        goals += [f"{layout}: {line}" for line in g]
        added += [f"{layout}: {line}" for line in a]
    notes = [
        f"{rounds} alternating blocks per line, each `clients` connections x {per} requests "
        f"(x {per * 8} with 1 client), after a warm-up; cold start (POST /services to the first "
        f"answer through the mesh): {cold_s:.1f} s",
        "non-streamed: 1 token, request out to body in; streamed: 8 tokens, TTFT = first SSE "
        "data chunk; the engine (llama-cpp-python) answers one request at a time, so with 32 "
        "clients a request mostly waits in its queue",
        "layout `shared`: every process may run on every core; `pinned`: the engine (all its "
        "threads) on core 0, the coordinator, the node's client and this load generator on the "
        "others, for direct and mesh blocks alike (as where the coordinator runs elsewhere and "
        "the node's client has a core the engine does not need)",
        "cpu ms/req: the coordinator's (and the node's) user+system CPU over the mesh blocks "
        "/ their requests, averaged over the layout's mesh lines",
        *added,
    ]
    columns = ["layout", "request", "clients", "path", "requests", "p50_ms", "p99_ms",
               "ttft_p50_ms", "ttft_p99_ms", "req_per_s", "coord_cpu_ms_per_req",
               "node_cpu_ms_per_req"]
    return Result("serving", rows, columns, notes, goals)


def _pinnable() -> bool:
    return hasattr(os, "sched_setaffinity") and len(os.sched_getaffinity(0)) >= 2


def _pin(layout: str, engine: int, others: list[int]) -> None:
    """Pin every thread of the engine to the first core and `others` to the rest
    ("pinned"), or let all of them run anywhere again ("shared")."""
    cores = sorted(os.sched_getaffinity(0) | set().union(*(
        os.sched_getaffinity(int(t)) for t in os.listdir(f"/proc/{engine}/task"))))
    first, rest = {cores[0]}, set(cores[1:])
    for pid, where in [(engine, first), *((p, rest) for p in others)]:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                os.sched_setaffinity(int(tid), set(cores) if layout == "shared" else where)
            except (ProcessLookupError, PermissionError):
                pass  # a thread that just ended


async def _layout(layout: str, port: int, engine: int, token: str, bodies: dict[str, bytes],
                  coord: procs.Proc, node: procs.Proc, rounds: int,
                  per: int) -> list[dict[str, Any]]:
    coord_cpu = procs.CpuMeter([coord.pid])
    node_cpu = procs.CpuMeter([node.pid])
    rows: list[dict[str, Any]] = []
    for clients in (32, 1):
        n = per if clients == 32 else per * 8
        for kind, body in bodies.items():
            got: dict[str, tuple[list[int], list[int], float]] = {
                "direct": ([], [], 0.0), "mesh": ([], [], 0.0)}
            await block(engine, "/v1/chat/completions", "none", body, clients, 2)  # warm
            await block(port, "/v1/chat/completions", token, body, clients, 2)
            for _ in range(rounds):
                for path_name, p, tok in (("direct", engine, "none"), ("mesh", port, token)):
                    if path_name == "mesh":
                        with coord_cpu, node_cpu:
                            f, t, s = await block(p, "/v1/chat/completions", tok, body,
                                                  clients, n)
                    else:
                        f, t, s = await block(p, "/v1/chat/completions", tok, body, clients, n)
                    prev = got[path_name]
                    got[path_name] = (prev[0] + f, prev[1] + t, prev[2] + s)
            for path_name, (f, t, s) in got.items():
                lat, ttft = summary([x / 1e6 for x in t]), summary([x / 1e6 for x in f])
                row: dict[str, Any] = {
                    "layout": layout, "request": kind, "clients": clients, "path": path_name,
                    "requests": len(t), "p50_ms": round(lat["p50"], 2),
                    "p99_ms": round(lat["p99"], 2), "req_per_s": round(len(t) / s, 1),
                }
                if kind == "streamed":
                    row["ttft_p50_ms"] = round(ttft["p50"], 2)
                    row["ttft_p99_ms"] = round(ttft["p99"], 2)
                rows.append(row)
    mesh_requests = sum(r["requests"] for r in rows if r["path"] == "mesh")
    for r in rows:
        if r["path"] == "mesh":
            r["coord_cpu_ms_per_req"] = round(1000 * coord_cpu.total / mesh_requests, 3)
            r["node_cpu_ms_per_req"] = round(1000 * node_cpu.total / mesh_requests, 3)
    return rows


def _goals(rows: list[dict[str, Any]]) -> tuple[list[str], list[str]]:
    def pick(kind: str, clients: int, path: str) -> dict[str, Any]:
        return next(r for r in rows if (r["request"], r["clients"], r["path"]) ==
                    (kind, clients, path))

    goals, added = [], []
    for clients in (32, 1):
        d, m = pick("non-streamed", clients, "direct"), pick("non-streamed", clients, "mesh")
        sd, sm = pick("streamed", clients, "direct"), pick("streamed", clients, "mesh")
        p50 = round(m["p50_ms"] - d["p50_ms"], 2)
        p99 = round(m["p99_ms"] - d["p99_ms"], 2)
        ttft = round(sm["ttft_p50_ms"] - sd["ttft_p50_ms"], 2)
        ttft99 = round(sm["ttft_p99_ms"] - sd["ttft_p99_ms"], 2)
        rps = round(m["req_per_s"] / d["req_per_s"], 3)
        srps = round(sm["req_per_s"] / sd["req_per_s"], 3)
        added.append(f"{clients} client(s): added p50 {p50} ms, p99 {p99} ms (non-streamed); "
                     f"TTFT added p50 {ttft} ms, p99 {ttft99} ms; req/s mesh/direct {rps} "
                     f"(non-streamed), {srps} (streamed)")
        # With 32 clients the engine's queue (one request at a time) hides most of what the
        # mesh adds; with 1 client nothing does. Both are held to the goals.
        n = f"{clients} client{'s' if clients > 1 else ''}"
        goals += [
            f"{'met' if p50 <= 1 else 'MISSED'}: {n}: added p50 {p50} ms (goal <= 1 ms)",
            f"{'met' if ttft <= 2 else 'MISSED'}: {n}: added TTFT p50 {ttft} ms (goal <= 2 ms)",
            f"{'met' if max(p99, ttft99) <= 5 else 'MISSED'}: {n}: added p99 {p99} ms, TTFT "
            f"p99 {ttft99} ms (goal <= 5 ms)",
        ]
        if clients == 32:
            goals.append(f"{'met' if min(rps, srps) >= 0.9 else 'MISSED'}: {n}: requests/s "
                         f"through the mesh {rps} / {srps} of direct (goal >= 0.9)")
    return goals, added

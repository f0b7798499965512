"""Model serving end to end (issue 27): the real engine, the real coordinator, real clients.

Every test here runs llama.cpp's OpenAI server (llama-cpp-python, CPU) on the tiny GGUF of
tests/serving/tinyllama.py as the replicas of a service created with `POST /services` and
the `llama_cpp` engine template, on real `python -m gpu_client` processes, and calls it through
the coordinator's `/v1` with the official `openai` client (base_url=.../v1, api_key=a token).
The model's output is gibberish, so the tests compare shapes, lengths, streamed with
non-streamed, and runs with runs (temperature 0, a seed).

The clients run their process tasks as root (MESH_RUN_AS=root, MESH_ISOLATION=none) so the
engine can use this venv's interpreter, which may live where a task's own uid cannot search
(pyenv under /root); nothing else about them differs from a production node.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import psutil
import pytest
import uvicorn

from coordinator.settings import Settings
from coordinator.web.app import create_app
from shared.protocol import MAX_FRAME_BYTES
from tests.conftest import (
    ADMIN_HEADERS,
    LiveCoordinator,
    Proc,
    _base_env,
    admin_token,
    free_port,
    wait_until,
)
from tests.serving.realengine import MODEL, missing, tiny_model
from tests.serving.tinyllama import BYTE_IDS, EOG_IDS, N_EMBD

pytestmark = pytest.mark.skipif(bool(missing()), reason=missing() or "")

Spawn = Callable[..., Proc]
NODE_ENV = {"MESH_SLOTS": "1", "MESH_RUN_AS": "root", "MESH_ISOLATION": "none"}
CHAT = {"model": MODEL, "messages": [{"role": "user", "content": "Hello mesh, tell me a story"}],
        "max_tokens": 24, "temperature": 0, "seed": 11}
# an answer that runs to max_tokens, a chunk per token: seconds of streaming
LONG = {"max_tokens": 1000, "logit_bias": {str(i): -100 for i in (*EOG_IDS, *BYTE_IDS)}}


# --- helpers --------------------------------------------------------------------------------


async def tenant_token(live: LiveCoordinator | httpx.AsyncClient, tenant: str,
                       role: str = "submit") -> str:
    http = live.http if isinstance(live, LiveCoordinator) else live
    r = await http.post("/admin/tokens", json={"tenant": tenant, "role": role})
    assert r.status_code == 200, r.text
    token: str = r.json()["token"]
    return token


def service_body(gguf: Path, **over: Any) -> dict[str, Any]:
    params = {"gguf": str(gguf), "python": sys.executable}
    params |= over.pop("params", {})
    return {"name": "tiny", "model": MODEL, "engine": "llama_cpp", "params": params,
            "replicas": {"min": 1, "max": 1}} | over


async def create_service(http: httpx.AsyncClient, token: str, body: dict[str, Any]) -> None:
    r = await http.post("/services", json=body, headers={"Authorization": f"Bearer {token}"})
    assert r.status_code in (200, 201), r.text


_open: list[Any] = []  # the openai clients a test made, closed after it (oai_clients)


def oai(base: str, token: str) -> Any:
    import openai

    client = openai.AsyncOpenAI(base_url=f"{base}/v1", api_key=token, max_retries=0,
                                timeout=120)
    _open.append(client)
    return client


@pytest.fixture(autouse=True)
async def oai_clients() -> AsyncIterator[None]:
    yield
    while _open:
        await _open.pop().close()


def ready(live: LiveCoordinator, tenant: str) -> list[Any]:
    svc = live.mesh.services.lookup(tenant, MODEL)
    return live.mesh.services.ready(svc) if svc is not None else []


def replicas(live: LiveCoordinator, tenant: str) -> list[Any]:
    svc = live.mesh.services.lookup(tenant, MODEL)
    return list(svc.replicas.values()) if svc is not None else []


def engine_pids(model: Path) -> set[int]:
    """Engine processes serving this test's model file (its path is unique to the test): the
    interpreters themselves, not the executor's wrapper shell whose argv holds the command."""
    found = set()
    for p in psutil.process_iter(["cmdline"]):
        cmd = p.info["cmdline"] or []
        if (cmd and Path(cmd[0]).name.startswith("python") and "llama_cpp.server" in cmd
                and str(model) in cmd):
            found.add(p.pid)
    return found


async def task_output(http: httpx.AsyncClient, task_id: str) -> str:
    r = await http.get(f"/tasks/{task_id}/logs")
    return r.text if r.status_code == 200 else ""


async def _served(live: LiveCoordinator, task_id: str, n: int) -> bool:
    return (await task_output(live.http, task_id)).count("POST /v1/chat/completions") >= n


async def engines(model: Path) -> set[int]:
    return await asyncio.to_thread(engine_pids, model)


async def chat_text(client: Any, **over: Any) -> str:
    done = await client.chat.completions.create(**(CHAT | over))
    text: str = done.choices[0].message.content
    return text


async def _none(model: Path) -> bool:
    return not await engines(model)


async def _count(model: Path, n: int) -> bool:
    return len(await engines(model)) == n


@pytest.fixture
def model(tmp_path: Path) -> Path:
    return tiny_model(tmp_path / "model")


@pytest.fixture
async def no_engine_left(model: Path) -> AsyncIterator[None]:
    """Set up first, torn down last: a stopped client leaves its process tasks running (as it
    should, to re-adopt them), so the engines this test's clients started are ended here, by
    pid (only processes serving this test's own model file)."""
    yield
    left = await asyncio.to_thread(engine_pids, model)
    for pid in left:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


# --- the tests ------------------------------------------------------------------------------


async def test_two_replicas_on_two_nodes_share_the_load_and_answer_like_the_engine(
    no_engine_left: None, coordinator: LiveCoordinator, spawn_client: Spawn, model: Path
) -> None:
    import openai

    for name in ("n1", "n2"):
        spawn_client(name, coordinator.ws_url, **NODE_ENV)
    alice, bob = await tenant_token(coordinator, "alice"), await tenant_token(coordinator, "bob")
    began = time.monotonic()
    await create_service(coordinator.http, alice,
                         service_body(model, replicas={"min": 2, "max": 2}))
    both = await wait_until(lambda: len(ready(coordinator, "alice")) == 2 and
                            ready(coordinator, "alice"), 120, "two ready replicas")
    print(f"two replicas ready {time.monotonic() - began:.1f}s after POST /services")
    assert {r.node for r in both} == {"n1", "n2"}

    client = oai(coordinator.url, alice)
    assert [m.id for m in (await client.models.list()).data] == [MODEL]

    # While one replica streams a long answer, requests go to the other, the less busy one
    # (each engine's own access log, in its task's log, says which one served)
    busy = await client.chat.completions.create(**CHAT | LONG, stream=True)
    await anext(aiter(busy))
    [a] = [r for r in both if r.outstanding == 1]
    [b] = [r for r in both if r is not a]
    answers = [await chat_text(client) for _ in range(4)]
    assert a.outstanding == 1 and b.outstanding == 0
    await busy.close()
    await wait_until(lambda: _served(coordinator, b.task_id, 4), 30, "b's log shows 4 requests")
    assert await _served(coordinator, a.task_id, 1)
    # 16 at once: one answer (temperature 0), and none left outstanding
    answers += await asyncio.gather(*(chat_text(client) for _ in range(16)))
    assert len(set(answers)) == 1 and answers[0]
    await wait_until(lambda: all(r.outstanding == 0 for r in both), 30, "all finished")

    # streamed == not streamed, chat and text completions, and a second run the same
    stream = await client.chat.completions.create(**CHAT, stream=True)
    chunks = [c.choices[0].delta.content or "" async for c in stream if c.choices]
    assert len(chunks) > 2 and "".join(chunks) == answers[0]
    text = {"model": MODEL, "prompt": "The mesh", "max_tokens": 32, "temperature": 0, "seed": 3}
    plain = (await client.completions.create(**text)).choices[0].text
    pieces = [c.choices[0].text async for c in await client.completions.create(**text, stream=True)]
    assert len(pieces) > 2 and "".join(pieces) == plain
    assert (await client.completions.create(**text)).choices[0].text == plain

    # another tenant sees no model, and asking for alice's is OpenAI's 404
    other = oai(coordinator.url, bob)
    assert (await other.models.list()).data == []
    with pytest.raises(openai.NotFoundError) as caught:
        await chat_text(other)
    assert caught.value.status_code == 404
    # no token at all: 401
    with pytest.raises(openai.AuthenticationError):
        await chat_text(oai(coordinator.url, "gm_not-a-token"))

    r = await coordinator.http.delete("/services/tiny",
                                      headers={"Authorization": f"Bearer {alice}"})
    assert r.status_code in (200, 202, 204), r.text
    await wait_until(lambda: _none(model), 60, "the engines stopped")


async def test_embeddings_have_the_models_width_and_repeat(
    no_engine_left: None, coordinator: LiveCoordinator, spawn_client: Spawn, model: Path
) -> None:
    spawn_client("e1", coordinator.ws_url, **NODE_ENV)
    alice = await tenant_token(coordinator, "alice")
    await create_service(coordinator.http, alice,
                         service_body(model, params={"embedding": "true"}))
    await wait_until(lambda: ready(coordinator, "alice"), 120, "a ready replica")
    client = oai(coordinator.url, alice)
    emb = await client.embeddings.create(model=MODEL, input=["one sentence", "and another"])
    assert [len(e.embedding) for e in emb.data] == [N_EMBD, N_EMBD]
    assert [e.index for e in emb.data] == [0, 1]
    again = await client.embeddings.create(model=MODEL, input=["one sentence", "and another"])
    assert [e.embedding for e in again.data] == [e.embedding for e in emb.data]
    alone = await client.embeddings.create(model=MODEL, input="one sentence")
    assert alone.data[0].embedding == pytest.approx(emb.data[0].embedding, abs=1e-5)


async def test_a_client_that_goes_away_mid_stream_cancels_the_engines_request(
    no_engine_left: None, coordinator: LiveCoordinator, spawn_client: Spawn, model: Path
) -> None:
    spawn_client("c1", coordinator.ws_url, **NODE_ENV)
    alice = await tenant_token(coordinator, "alice")
    await create_service(coordinator.http, alice, service_body(model))
    [rep] = await wait_until(lambda: ready(coordinator, "alice"), 120, "a ready replica")
    client = oai(coordinator.url, alice)

    stream = await client.chat.completions.create(**CHAT | LONG, stream=True)
    got = 0
    async for _chunk in stream:
        got += 1
        if got == 3:
            break
    assert rep.outstanding == 1
    await stream.close()  # the caller hangs up: the mesh cancels the engine's request
    await wait_until(lambda: rep.outstanding == 0, 30, "the request ended at the router")
    # llama-cpp-python says so when the HTTP request to it is dropped mid-stream
    await wait_until(lambda: _says(coordinator, rep.task_id, "Disconnected from client"), 30,
                     "the engine saw its request cancelled")
    # and it is free again: a short request is answered
    assert await chat_text(client)


async def _says(live: LiveCoordinator, task_id: str, text: str) -> bool:
    return text in await task_output(live.http, task_id)


async def test_llama_cpp_s_models_route_waits_while_it_generates_openapi_json_does_not(
    no_engine_left: None, coordinator: LiveCoordinator, spawn_client: Spawn, model: Path
) -> None:
    """llama-cpp-python answers /v1/models only between generations (it takes the model's
    lock), so a replica checked there turns `unhealthy` while busy on one long answer;
    `"health_path": "/openapi.json"` (served without the lock, and only once the model has
    loaded) keeps it `ready`. Health checks every 0.5 s here instead of 5 s."""
    for name in ("h1", "h2"):
        spawn_client(name, coordinator.ws_url, MESH_REPLICA_HEALTH_S="0.5", **NODE_ENV)
    alice = await tenant_token(coordinator, "alice")
    # An answer long enough to outlast several health checks however fast the machine is:
    # 15,000 tokens (a context to hold them), and the test reads only its first chunk, so the
    # node's window fills and the engine waits, still holding its lock, until it is closed.
    ctx = {"n_ctx": "16384"}
    await create_service(coordinator.http, alice, service_body(
        model, name="models", health_path="/v1/models", params=ctx))
    await create_service(coordinator.http, alice, service_body(
        model, name="openapi", model="tiny-openapi", health_path="/openapi.json", params=ctx))
    svcs = coordinator.mesh.services

    def replica(name: str) -> Any:
        svc = svcs.lookup("alice", name)
        return next(iter(svc.replicas.values()), None) if svc is not None else None

    await wait_until(lambda: all(svcs.ready(svcs.lookup("alice", m))
                                 for m in (MODEL, "tiny-openapi")), 120, "both ready")
    plain, openapi = replica(MODEL), replica("tiny-openapi")
    client = oai(coordinator.url, alice)
    longer = LONG | {"max_tokens": 15000}
    busy = [await client.chat.completions.create(**CHAT | longer | {"model": m}, stream=True)
            for m in (MODEL, "tiny-openapi")]
    for stream in busy:
        await anext(aiter(stream))  # each engine generates (and holds its lock) until closed
    checked = (await task_output(coordinator.http, openapi.task_id)).count("GET /openapi.json")

    async def settled() -> bool:
        assert openapi.state == "ready", openapi
        now = (await task_output(coordinator.http, openapi.task_id)).count("GET /openapi.json")
        return plain.state == "unhealthy" and now >= checked + 3
    await wait_until(settled, 60, "/v1/models failing while /openapi.json answers")
    for stream in busy:
        await stream.close()
    await wait_until(lambda: plain.state == "ready", 60, "ready again once the answer ended")
    assert await chat_text(client)


async def test_kill_9_of_a_node_fails_its_requests_cleanly_and_the_replica_comes_back(
    no_engine_left: None, coordinator: LiveCoordinator, spawn_client: Spawn, model: Path
) -> None:
    import openai

    nodes = {name: spawn_client(name, coordinator.ws_url, **NODE_ENV) for name in ("k1", "k2")}
    alice = await tenant_token(coordinator, "alice")
    await create_service(coordinator.http, alice, service_body(model))
    [rep] = await wait_until(lambda: ready(coordinator, "alice"), 120, "a ready replica")
    task_id, attempt, node = rep.task_id, rep.attempt, rep.node
    client = oai(coordinator.url, alice)
    whole = await chat_text(client, **LONG | {"max_tokens": 400})

    stream = await client.chat.completions.create(**CHAT | LONG, stream=True)
    seen, killed_at = "", 0.0
    with pytest.raises((openai.APIError, httpx.HTTPError)):
        async for chunk in stream:
            if chunk.choices:
                seen += chunk.choices[0].delta.content or ""
            if len(seen) > 20 and nodes[node].popen.poll() is None:  # type: ignore[union-attr]
                killed_at = time.monotonic()
                await asyncio.to_thread(nodes[node].kill9)
    assert whole.startswith(seen) and seen, (seen, whole)  # what came was the true prefix

    survivor = "k2" if node == "k1" else "k1"
    [back] = await wait_until(
        lambda: [r for r in ready(coordinator, "alice") if r.node == survivor], 120,
        "a ready replica on the node left")
    assert back.task_id == task_id and back.attempt == attempt + 1  # the same task, requeued
    assert await chat_text(client) == (await chat_text(client))
    print(f"node killed -> a ready replica on {survivor}: {time.monotonic() - killed_at:.1f}s")

    # the killed node's engine outlived its client; the client, back, is told to stop it
    spawn_client(node, coordinator.ws_url, **NODE_ENV)
    await wait_until(lambda: _count(model, 1), 60, "the fenced engine stopped")
    assert await chat_text(client)


async def test_scale_from_zero_on_the_first_request_and_back_to_zero_when_idle(
    no_engine_left: None, coordinator: LiveCoordinator, spawn_client: Spawn, model: Path
) -> None:
    spawn_client("z1", coordinator.ws_url, **NODE_ENV)
    alice = await tenant_token(coordinator, "alice")
    await create_service(coordinator.http, alice,
                         service_body(model, replicas={"min": 0, "max": 1}, idle_s=2))
    await wait_until(lambda: coordinator.mesh.services.lookup("alice", MODEL), 10, "the service")
    assert replicas(coordinator, "alice") == [] and await _none(model)
    client = oai(coordinator.url, alice)
    assert [m.id for m in (await client.models.list()).data] == [MODEL]  # listed at zero

    for round_ in (1, 2):
        began = time.monotonic()
        first = await chat_text(client)  # waits for a replica to start and load
        print(f"scale from zero, round {round_}: first answer in {time.monotonic() - began:.1f}s")
        assert first and len(replicas(coordinator, "alice")) == 1
        idle_from = time.monotonic()
        await wait_until(lambda: not replicas(coordinator, "alice"), 60, "scaled back to zero")
        await wait_until(lambda: _none(model), 30, "its engine stopped")
        print(f"idle_s=2: back at zero {time.monotonic() - idle_from:.1f}s after the answer")


async def test_a_coordinator_restart_readopts_running_replicas_and_they_serve(
    no_engine_left: None, spawn_coordinator: Spawn, spawn_client: Spawn, model: Path,
    tmp_path: Path,
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    coord = spawn_coordinator(port, tmp_path / "data")
    async with httpx.AsyncClient(base_url=url, headers=ADMIN_HEADERS, timeout=30) as http:
        await wait_until(lambda: _answers(http), 30, "the coordinator")
        spawn_client("r1", f"ws://127.0.0.1:{port}", **NODE_ENV)
        alice = await tenant_token(http, "alice")
        await create_service(http, alice, service_body(model))
        client = oai(url, alice)
        before = await wait_until(lambda: _replica_tasks(http), 120, "the replica task")
        answer = await _first_answer(client, 120)
        pids = engine_pids(model)
        assert len(pids) == 1

        coord.kill9()
        coord = spawn_coordinator(port, tmp_path / "data")
        began = time.monotonic()
        again = await _first_answer(client, 120)
        print(f"coordinator kill -9 and restart: serving again in {time.monotonic() - began:.1f}s")
        assert again == answer
        assert await _replica_tasks(http) == before  # the same task, the same attempt
        assert engine_pids(model) == pids  # the same engine process, never restarted


async def _answers(http: httpx.AsyncClient) -> bool:
    try:
        return (await http.get("/health")).status_code == 200
    except httpx.HTTPError:
        return False


async def _replica_tasks(http: httpx.AsyncClient) -> dict[str, Any]:
    r = await http.get("/tasks/active")
    tasks: dict[str, Any] = r.json()["tasks"] if r.status_code == 200 else {}
    return {tid: t.get("attempt") for tid, t in tasks.items()
            if t.get("status") == "running"}


async def _first_answer(client: Any, timeout: float) -> str:
    """Ask until answered (the mesh may be restarting: 503s and refused connections)."""
    import openai

    deadline = time.monotonic() + timeout
    while True:
        try:
            return await chat_text(client)
        except (openai.APIError, httpx.HTTPError):
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)


# --- a replica only its node can reach ------------------------------------------------------


def _can_netns() -> str:
    if os.geteuid() != 0 or shutil.which("ip") is None:
        return "needs root and iproute2 (network namespaces)"
    return ""


class _Veth:
    """A network namespace joined to this one by a veth pair: HOST here, PEER there. The
    node runs inside; its engine's 127.0.0.1 is the namespace's own loopback."""

    def __init__(self) -> None:
        n = os.getpid() % 200 + 20
        self.name = f"gmsrv-{os.getpid()}"
        self.host, self.peer = f"10.254.{n}.1", f"10.254.{n}.2"
        self.dev = f"gs{os.getpid() % 100000}"

    def create(self) -> None:
        for cmd in (
            ["ip", "netns", "add", self.name],
            ["ip", "-n", self.name, "link", "set", "lo", "up"],
            ["ip", "link", "add", self.dev, "type", "veth", "peer", "name", "eth0",
             "netns", self.name],
            ["ip", "addr", "add", f"{self.host}/30", "dev", self.dev],
            ["ip", "link", "set", self.dev, "up"],
            ["ip", "-n", self.name, "addr", "add", f"{self.peer}/30", "dev", "eth0"],
            ["ip", "-n", self.name, "link", "set", "eth0", "up"],
        ):
            subprocess.run(cmd, check=True, capture_output=True, timeout=10)

    def remove(self) -> None:
        subprocess.run(["ip", "link", "del", self.dev], capture_output=True, timeout=10)
        subprocess.run(["ip", "netns", "del", self.name], capture_output=True, timeout=10)


@pytest.mark.skipif(bool(_can_netns()), reason=_can_netns() or "")
async def test_a_replica_only_its_node_can_reach_still_serves_through_the_nodes_link(
    no_engine_left: None, settings: Settings, model: Path, tmp_path: Path
) -> None:
    ns = _Veth()
    ns.create()
    client: Proc | None = None
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((ns.host, 0))  # the coordinator listens on the veth only
        config = uvicorn.Config(
            create_app(replace(settings, host=ns.host)), ws="websockets-sansio",
            ws_max_size=MAX_FRAME_BYTES, log_level="warning", lifespan="on",
            timeout_graceful_shutdown=2)
        server = uvicorn.Server(config)
        serving = asyncio.create_task(server.serve(sockets=[sock]))
        await wait_until(lambda: server.started or serving.done(), 10, "server start")
        port = sock.getsockname()[1]
        base = f"http://{ns.host}:{port}"
        async with httpx.AsyncClient(
                base_url=base, timeout=30,
                headers={"Authorization": f"Bearer {admin_token(settings)}"}) as http:
            live = LiveCoordinator(settings, server, port, http)
            client = Proc(["ip", "netns", "exec", ns.name, sys.executable, "-m", "gpu_client"],
                          _base_env(NODE_NAME="inside", MESH_COORDINATOR_URL=f"ws://{base[7:]}",
                                    GPU_ENABLED="false", MESH_EXECUTORS="process",
                                    MESH_TOKEN=settings.token or "",
                                    MESH_WORK_DIR=str(tmp_path / "work-inside"),
                                    MESH_STATE_DIR=str(tmp_path / "state-inside"),
                                    MESH_RECONNECT_MAX_S="1", **NODE_ENV),
                          tmp_path / "client-inside.log").start()
            alice = await tenant_token(http, "alice")
            await create_service(http, alice, service_body(model))
            await wait_until(lambda: ready(live, "alice"), 120, "a ready replica")

            [pid] = engine_pids(model)
            cmd = psutil.Process(pid).cmdline()
            engine_port = int(cmd[cmd.index("--port") + 1])
            assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
            # the engine lives in the node's namespace: from here its port is not there
            assert os.readlink(f"/proc/{pid}/ns/net") != os.readlink("/proc/self/ns/net")
            with pytest.raises(OSError):
                socket.create_connection(("127.0.0.1", engine_port), timeout=2).close()
            with pytest.raises(OSError):
                socket.create_connection((ns.peer, engine_port), timeout=2).close()

            oa = oai(base, alice)
            plain = await chat_text(oa)
            stream = await oa.chat.completions.create(**CHAT, stream=True)
            assert "".join([c.choices[0].delta.content or "" async for c in stream
                            if c.choices]) == plain
            r = await http.delete("/services/tiny", headers={"Authorization": f"Bearer {alice}"})
            assert r.status_code in (200, 202, 204), r.text
            await wait_until(lambda: _none(model), 60, "the engine stopped")
            client.stop()
            server.should_exit = True
            await serving
    finally:
        if client is not None:
            client.stop()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(client.pid, signal.SIGKILL)
        sock.close()
        ns.remove()


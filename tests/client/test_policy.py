"""Nodes decide what they run: the policy check, placement's filter, the client's own refusal,
clean process environments and locked-down containers."""

from __future__ import annotations

import asyncio
import os
import pwd
import shutil
import tempfile
import uuid
from pathlib import Path
from typing import Any

import msgspec
import pytest

from coordinator.model import Node, Task
from coordinator.scheduling.placement import place
from gpu_client.detect import FakeGpus
from gpu_client.executors.docker_spec import container_spec
from gpu_client.executors.process import ProcessExecutor, task_env
from gpu_client.policy import assign_refusal, node_policy
from gpu_client.settings import ClientSettings
from shared.policy import HOOK_ENV, PolicyAsk, refusal
from shared.protocol import Assign, GpuInfo, NodePolicy
from shared.tasks import Requirements, TaskSubmit
from tests.conftest import LiveCoordinator, wait_until
from tests.docker_images import busybox_image, docker_unavailable

DEFAULT = node_policy(ClientSettings(node_name="n"), ("builtin", "process", "docker"))


def test_default_policy_refuses_bind_mounts_and_hooks() -> None:
    ok = PolicyAsk("docker", image="python:3.11-slim", env_names=("MODEL", "HF_HOME"))
    assert refusal(DEFAULT, ok) == ""
    assert "allows no host paths" in refusal(DEFAULT, PolicyAsk("docker", volumes=("/:/host",)))
    for name in ("LD_PRELOAD", "LD_LIBRARY_PATH", "PYTHONPATH", "BASH_ENV", "NODE_OPTIONS",
                 "DYLD_INSERT_LIBRARIES", "PERL5OPT", "JAVA_TOOL_OPTIONS", "GCONV_PATH"):
        why = refusal(DEFAULT, PolicyAsk("process", env_names=(name,)))
        assert name in why and "hooks" in why, name
    assert refusal(None, PolicyAsk("docker", volumes=("/:/host",))) == ""  # nothing stated


def test_volume_prefixes_images_and_executors() -> None:
    policy = NodePolicy(allowed_images=["ghcr.io/lab/*"], allowed_volumes=["/data/models", "cache"],
                        executors=["builtin", "docker"])
    assert refusal(policy, PolicyAsk("docker", "ghcr.io/lab/x:1", ("/data/models/a:/m:ro",))) == ""
    assert refusal(policy, PolicyAsk("docker", "ghcr.io/lab/x", ("cache:/root/.cache",))) == ""
    assert "outside" in refusal(policy, PolicyAsk("docker", "ghcr.io/lab/x", ("/data/modelsX:/m",)))
    assert "outside" in refusal(policy, PolicyAsk("docker", "ghcr.io/lab/x",
                                                  ("/data/models/../../etc:/m",)))
    assert "named volume" in refusal(policy, PolicyAsk("docker", "ghcr.io/lab/x", ("other:/x",)))
    assert "does not match" in refusal(policy, PolicyAsk("docker", "evil/miner"))
    assert "executor process" in refusal(policy, PolicyAsk("process"))


def _task(**spec: Any) -> Task:
    s = TaskSubmit(task_type="custom", script="true", **spec)
    return Task(id="t", seq=1, task_type="custom", priority=5, executor="process",
                req_raw=msgspec.json.encode(s.requirements), spec_raw=msgspec.json.encode(s),
                params_raw=b"{}", max_attempts=1, tenant="", submitted_at=0.0)


def test_tasks_that_policy_can_tell_apart_do_not_share_a_queue_class() -> None:
    plain, plain2 = _task(), _task()
    assert plain.class_key == plain2.class_key == ("process", plain.req_raw)
    with_env = _task(env={"LD_PRELOAD": "/x.so"})
    other_env = _task(env={"MODEL": "m"})
    with_vol = _task(volumes=["/etc:/x"])
    keys = {t.class_key for t in (plain, with_env, other_env, with_vol)}
    assert len(keys) == 4
    assert _task(env={"MODEL": "other value"}).class_key == other_env.class_key  # names only


def _view(policy: NodePolicy | None) -> Node:
    return Node(name="n1", executors=frozenset({"builtin", "process"}), policy=policy, slots=2,
                gpus=[GpuInfo(index=0)])


def test_placement_filters_by_node_policy_and_says_so() -> None:
    ask = PolicyAsk("process", env_names=("LD_PRELOAD",))
    nofit = place(Requirements(), "process", [_view(DEFAULT)], ask=ask)
    assert "node policy" in getattr(nofit, "reason", ""), nofit
    assert "LD_PRELOAD" in nofit.reason  # type: ignore[union-attr]
    placed = place(Requirements(gpu_count=1), "process", [_view(None)], ask=ask)
    assert getattr(placed, "node", None) == "n1", placed  # no stated policy: not filtered


def _assign(**kw: Any) -> Assign:
    return Assign(task_id="t", attempt=1, task_type="custom", executor="docker",
                  image="python:3.11-slim", **kw)


def test_client_refuses_an_assign_outside_its_policy() -> None:
    assert assign_refusal(DEFAULT, _assign()) == ""
    why = assign_refusal(DEFAULT, _assign(volumes=["/:/host:rw"]))
    assert why.startswith("node policy:") and "/:/host:rw" in why
    assert "LD_PRELOAD" in assign_refusal(DEFAULT, _assign(env={"LD_PRELOAD": "/tmp/x.so"}))


def test_containers_are_locked_down() -> None:
    spec = container_spec(_assign(), "n", [])
    assert spec["privileged"] is False
    assert spec["security_opt"] == ["no-new-privileges"]
    assert spec["cap_drop"] == ["ALL"] and "cap_add" not in spec
    assert container_spec(_assign(), "n", [], caps=["SYS_PTRACE"])["cap_add"] == ["SYS_PTRACE"]


def test_process_env_is_clean(tmp_path: Path) -> None:
    base = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "AWS_SECRET_ACCESS_KEY": "s3cr3t",
            "MESH_TOKEN": "join", "HOME": "/root", "CUDA_VISIBLE_DEVICES": "0,1"}
    a = Assign(task_id="t", attempt=1, task_type="custom", env={"MODEL": "m"})
    env = task_env(base, a, [], tmp_path)
    assert env["PATH"] == "/usr/bin:/bin" and env["HOME"] == str(tmp_path)
    assert env["MODEL"] == "m" and env["CUDA_VISIBLE_DEVICES"] == ""
    assert "AWS_SECRET_ACCESS_KEY" not in env and "MESH_TOKEN" not in env
    assert set(HOOK_ENV).isdisjoint(env)


async def _queued_reason(live: LiveCoordinator, task_id: str) -> str:
    doc = await live.task(task_id)
    reason: str = doc.get("reason", "") or ""
    return reason if doc["status"] == "queued" and "node policy" in reason else ""


async def test_placement_holds_tasks_a_node_would_refuse(
    coordinator: LiveCoordinator, spawn_client: Any
) -> None:
    spawn_client("p1", coordinator.ws_url)
    await wait_until(lambda: "p1" in coordinator.mesh.nodes, 20, "p1 registered")
    mount = await coordinator.submit(task_type="custom", script="ls /x", volumes=["/etc:/x"],
                                     requirements={"executor": "process"})
    preload = await coordinator.submit(task_type="custom", script="true",
                                       env={"LD_PRELOAD": "/tmp/evil.so"})
    fine = await coordinator.submit(task_type="custom", script="echo fine", env={"MODEL": "m"})
    assert (await coordinator.wait_finished(fine))["status"] == "completed"
    why = await wait_until(lambda: _queued_reason(coordinator, mount), 10, "mount reason")
    assert "/etc:/x" in why and "MESH_ALLOWED_VOLUMES" in why
    why = await wait_until(lambda: _queued_reason(coordinator, preload), 10, "preload reason")
    assert "LD_PRELOAD" in why
    for task_id in (mount, preload):
        r = await coordinator.http.delete(f"/tasks/{task_id}")
        assert r.status_code == 200, r.text


async def test_client_refuses_what_slips_past_placement(
    coordinator: LiveCoordinator, spawn_client: Any
) -> None:
    spawn_client("p2", coordinator.ws_url)
    await wait_until(lambda: "p2" in coordinator.mesh.nodes, 20, "p2 registered")
    coordinator.mesh.nodes["p2"].policy = None  # as an older coordinator would know it
    task_id = await coordinator.submit(task_type="custom", script="echo ran",
                                       env={"LD_PRELOAD": "/tmp/evil.so"})
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "failed", doc
    assert "node policy" in doc["error"] and "LD_PRELOAD" in doc["error"]


async def test_process_task_does_not_see_the_client_env(
    coordinator: LiveCoordinator, spawn_client: Any
) -> None:
    spawn_client("p3", coordinator.ws_url, CLIENT_SECRET="hunter2")
    await wait_until(lambda: "p3" in coordinator.mesh.nodes, 20, "p3 registered")
    task_id = await coordinator.submit(task_type="custom", script="env; echo HOME=$HOME",
                                       env={"VISIBLE": "yes"})
    doc = await coordinator.wait_finished(task_id)
    out = doc["result"]["output"]
    assert doc["status"] == "completed", doc
    assert "VISIBLE=yes" in out and "hunter2" not in out and "MESH_TOKEN" not in out
    assert f"HOME={os.sep}" in out and "work-p3" in out


@pytest.mark.docker
@pytest.mark.skipif(bool(docker_unavailable()), reason=docker_unavailable() or "engine answers")
async def test_containers_run_without_capabilities_and_images_are_allowed_by_glob(
    coordinator: LiveCoordinator, spawn_client: Any
) -> None:
    node = f"pd-{uuid.uuid4().hex[:6]}"
    spawn_client(node, coordinator.ws_url, MESH_EXECUTORS="docker",
                 MESH_ALLOWED_IMAGES="gpumesh-test-*")
    await wait_until(lambda: node in coordinator.mesh.nodes, 30, "docker node registered")
    ok = await coordinator.submit(task_type="custom", image=busybox_image(),
                                  script="grep -E '^(CapEff|NoNewPrivs)' /proc/self/status")
    doc = await coordinator.wait_finished(ok, 60)
    assert doc["status"] == "completed", doc
    assert "CapEff:\t0000000000000000" in doc["result"]["output"]
    assert "NoNewPrivs:\t1" in doc["result"]["output"]
    evil = await coordinator.submit(task_type="custom", image="evil/miner:latest", script="true")
    why = await wait_until(lambda: _queued_reason(coordinator, evil), 10, "image reason")
    assert "evil/miner:latest" in why and "gpumesh-test-*" in why
    assert (await coordinator.http.delete(f"/tasks/{evil}")).status_code == 200


@pytest.mark.skipif(os.geteuid() != 0, reason="switching users needs a root client")
async def test_process_task_runs_as_mesh_run_as_user() -> None:
    nobody = pwd.getpwnam("nobody")
    top = Path(tempfile.mkdtemp(prefix="gpumesh-runas-"))  # not under pytest's 0700 tmp
    try:
        top.chmod(0o755)
        ex = ProcessExecutor(top / "work", FakeGpus.parse("1xA100-80GB"), run_as="nobody",
                             kill_grace_s=1.0)
        a = Assign(task_id="t1", attempt=1, task_type="custom", executor="process",
                   script="id -u; touch mine && echo wrote")
        out = await asyncio.wait_for(ex.run(a, lambda: None, lambda _: None), 20)
        assert out.exit_code == 0, out
        assert out.output.split() == [str(nobody.pw_uid), "wrote"]
    finally:
        shutil.rmtree(top, ignore_errors=True)

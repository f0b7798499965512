"""A hostile tenant's docker task against the node that runs it (issue 26 item 4).

Real Docker engine and the real client's DockerExecutor: a symlink planted under an allowed
volume prefix, GPU steering variables in the task's env (and in its image), image names made
to slip past an allowed pattern. Plus the pure checks behind them: the image glob, the
prefix boundary and the `:rw` syntax of MESH_ALLOWED_VOLUMES.
"""

from __future__ import annotations

import io
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpu_client.detect import NoGpus
from gpu_client.executors.docker import DockerExecutor
from gpu_client.executors.docker_spec import LABEL_NODE, container_spec
from gpu_client.policy import VolumeRefused, assign_refusal, node_policy, resolve_volumes
from gpu_client.settings import ClientSettings, ConfigError
from shared.policy import PolicyAsk, image_matches, refusal, under_prefix, volume_refusal
from shared.protocol import Assign, GpuInfo, NodePolicy
from tests.docker_images import busybox_image, requires_docker

DEFAULT = node_policy(ClientSettings(node_name="n"), ("docker",))


def _assign(**kw: Any) -> Assign:
    base: dict[str, Any] = {"task_id": "t1", "attempt": 1, "task_type": "custom",
                            "executor": "docker", "image": "img:1"}
    return Assign(**{**base, **kw})


# --- pure: image patterns, prefixes, modes ----------------------------------------------


def test_an_image_pattern_never_matches_across_a_slash_or_into_a_registry_host() -> None:
    assert image_matches("myimg:1", "myimg*") and image_matches("myimg-gpu", "myimg*")
    assert not image_matches("myimg.evil.example/x", "myimg*")
    assert not image_matches("myimg.evil.example:443/x", "myimg*/x")
    assert image_matches("registry.local/team/app:1", "registry.local/team/*")
    assert image_matches("registry.local/team/app@sha256:" + "a" * 64, "registry.local/team/*")
    for evil in ("registry.local/team/app/../x", "registry.local.evil/team/x",
                 "registry.local/team/a/b", "registry.local:5000/team/x", "evil/team/x"):
        assert not image_matches(evil, "registry.local/team/*"), evil
    assert not image_matches("evil.example/lab/x", "*/lab/*")  # a host is never globbed
    assert image_matches("anything.example/x/y:z", "*")  # `*` alone: every image, as before
    policy = NodePolicy(allowed_images=["myimg*"])
    why = refusal(policy, PolicyAsk("docker", image="myimg.evil.example/x"))
    assert "does not match" in why and "myimg*" in why
    assert assign_refusal(policy, _assign(image="myimg.evil.example/x")).startswith(
        "node policy: image 'myimg.evil.example/x'")


def test_an_allowed_prefix_holds_only_paths_below_it_on_a_component_boundary() -> None:
    assert under_prefix("/data/x", ["/data"]) and under_prefix("/data", ["/data/"])
    assert not under_prefix("/database", ["/data"]) and not under_prefix("/data2/x", ["/data"])
    assert under_prefix("/data/x", ["/data:rw"])  # the mode is not part of the prefix
    assert "outside" in volume_refusal("/database:/d", ["/data"])
    assert "outside" in volume_refusal("/data/../etc:/d", ["/data"])


def test_allowed_volumes_are_read_only_unless_the_entry_says_rw() -> None:
    allowed = ["/data:rw", "/models", "/data/frozen", "cache:rw", "ro-cache"]
    assert volume_refusal("/data/a:/a:rw", allowed) == ""
    assert volume_refusal("/models/m:/m:ro", allowed) == ""
    assert volume_refusal("/models/m:/m", allowed) == ""  # mounted read-only
    assert "read-only" in volume_refusal("/models/m:/m:rw", allowed)
    assert "read-only" in volume_refusal("/data/frozen/x:/m:rw", allowed)  # the deepest wins
    assert "read-only" in volume_refusal("ro-cache:/c:rw", allowed)
    assert "mode" in volume_refusal("/data/a:/a:rw,rshared", allowed)
    with pytest.raises(ConfigError):
        ClientSettings.from_env({"NODE_NAME": "n", "MESH_ALLOWED_VOLUMES": "/data:rshared"})
    s = ClientSettings.from_env({"NODE_NAME": "n", "MESH_ALLOWED_VOLUMES": "/data:rw,/models"})
    assert s.allowed_volumes == ("/data:rw", "/models")


def test_a_volume_is_mounted_read_only_unless_its_prefix_allows_writes(tmp_path: Path) -> None:
    (tmp_path / "rw" / "a").mkdir(parents=True)
    (tmp_path / "ro" / "b").mkdir(parents=True)
    allowed = [f"{tmp_path}/rw:rw", f"{tmp_path}/ro"]
    assert resolve_volumes(
        [f"{tmp_path}/rw/a:/a", f"{tmp_path}/ro/b:/b", f"{tmp_path}/rw/a:/c:ro", "v:/v"],
        [*allowed, "v"],
    ) == [f"{tmp_path}/rw/a:/a:rw", f"{tmp_path}/ro/b:/b:ro", f"{tmp_path}/rw/a:/c:ro",
          "v:/v:ro"]


def test_a_symlink_under_an_allowed_prefix_cannot_lead_out(tmp_path: Path) -> None:
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (data / "root").symlink_to("/")
    (data / "away").symlink_to(outside)
    (data / "inner").symlink_to(data / "real")
    (data / "real").mkdir()
    allowed = [f"{data}:rw"]
    for src in (f"{data}/root", f"{data}/root/etc", f"{data}/away", f"{data}/away/new/dir"):
        with pytest.raises(VolumeRefused, match="outside the allowed paths"):
            resolve_volumes([f"{src}:/x"], allowed)
    assert not (outside / "new").exists()  # nothing was created through the link
    assert resolve_volumes([f"{data}/inner:/x"], allowed) == [f"{data}/real:/x:rw"]
    # A missing source is created below the prefix, as the engine would have.
    assert resolve_volumes([f"{data}/real/a/b:/x"], allowed) == [f"{data}/real/a/b:/x:rw"]
    assert (data / "real" / "a" / "b").is_dir()
    # The allowed prefix is itself resolved: a node whose /data is a link still works.
    (tmp_path / "alias").symlink_to(data)
    assert resolve_volumes([f"{tmp_path}/alias/real:/x"], [f"{tmp_path}/alias"]) == [
        f"{data}/real:/x:ro"]


def test_the_container_spec_never_lets_task_env_steer_the_gpus() -> None:
    env = {"NVIDIA_VISIBLE_DEVICES": "all", "NVIDIA_DRIVER_CAPABILITIES": "all",
           "CUDA_VISIBLE_DEVICES": "0,1,2,3", "ROCR_VISIBLE_DEVICES": "0", "A": "kept"}
    spec = container_spec(_assign(env=env), "n", [])
    assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == "void"
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == ""
    assert spec["environment"]["A"] == "kept"
    assert "NVIDIA_DRIVER_CAPABILITIES" not in spec["environment"]
    assert "ROCR_VISIBLE_DEVICES" not in spec["environment"]
    gpu = GpuInfo(index=1, name="H100", vendor="nvidia", uuid="GPU-1aaa", memory_total_mb=81559)
    spec = container_spec(_assign(env=env, gpu_indices=[1], gpu_vendor="nvidia"), "n", [gpu])
    assert spec["environment"]["NVIDIA_VISIBLE_DEVICES"] == "GPU-1aaa"
    assert spec["device_requests"][0]["DeviceIDs"] == ["GPU-1aaa"]


def test_a_task_cannot_set_the_variables_that_pick_its_gpus() -> None:
    for name in ("NVIDIA_VISIBLE_DEVICES", "NVIDIA_DRIVER_CAPABILITIES", "CUDA_VISIBLE_DEVICES",
                 "CUDA_DEVICE_ORDER", "ROCR_VISIBLE_DEVICES", "HIP_VISIBLE_DEVICES",
                 "GPU_DEVICE_ORDINAL", "ZE_AFFINITY_MASK", "ONEAPI_DEVICE_SELECTOR"):
        why = assign_refusal(DEFAULT, _assign(env={name: "all"}))
        assert why == (f"node policy: env {name} may not be set: the node sets them from the "
                       "task's GPU assignment"), why
    assert assign_refusal(DEFAULT, _assign(env={"MODEL": "x", "HF_HOME": "/c"})) == ""


# --- the real engine --------------------------------------------------------------------

def engine(test: Any) -> Any:
    """Marks `test` docker, and skips it with the reason when no engine answers."""
    for mark in requires_docker():
        test = mark(test)
    return test


@pytest.fixture
def node() -> Iterator[str]:
    name = f"esc-{uuid.uuid4().hex[:8]}"
    yield name
    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={name}"}):
        c.remove(force=True)
    client.close()


@pytest.fixture
def data(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


@pytest.fixture
async def ex(node: str, data: Path) -> AsyncIterator[DockerExecutor]:
    executor = DockerExecutor(node, NoGpus(), kill_grace_s=1, pull_timeout_s=20,
                              allowed_volumes=[f"{data}:rw"])
    assert await executor.available()
    yield executor
    executor.close()


def _containers(node: str) -> list[Any]:
    client = docker.from_env()
    try:
        found: list[Any] = client.containers.list(
            all=True, filters={"label": f"{LABEL_NODE}={node}"}, sparse=True)
        return found
    finally:
        client.close()


@engine
async def test_a_container_cannot_reach_the_host_root_through_a_planted_symlink(
    ex: DockerExecutor, node: str, data: Path
) -> None:
    # An earlier task (data is writable to tasks) left a link to / under the allowed prefix.
    (data / "escape").symlink_to("/")
    started: list[bool] = []
    out = await ex.run(
        _assign(image=busybox_image(), script="cat /host/etc/hostname",
                volumes=[f"{data}/escape:/host"]),
        lambda: started.append(True), lambda _: None,
    )
    assert out.error.startswith("node policy: bind mount") and "resolves to / " in out.error
    assert "outside the allowed paths" in out.error
    assert not out.infra and out.exit_code is None  # the task's failure, not the node's
    assert not started and _containers(node) == []  # no container was ever created
    # An honest mount under the same prefix still runs, read-write as the entry says.
    (data / "mine").mkdir()
    ok = await ex.run(
        _assign(image=busybox_image(), script="echo hi > /w/f && cat /w/f",
                volumes=[f"{data}/mine:/w"], attempt=2),
        lambda: None, lambda _: None,
    )
    assert ok.ok and ok.output == "hi\n", ok
    assert (data / "mine" / "f").read_text() == "hi\n"


@engine
async def test_a_container_mount_is_read_only_unless_the_node_allows_writes(
    node: str, tmp_path: Path
) -> None:
    models = tmp_path / "models"
    models.mkdir()
    ex = DockerExecutor(node, NoGpus(), allowed_volumes=[str(models)])  # an entry without :rw
    try:
        out = await ex.run(
            _assign(image=busybox_image(), script="echo x > /m/planted",
                    volumes=[f"{models}:/m"]),
            lambda: None, lambda _: None,
        )
    finally:
        ex.close()
    assert out.exit_code != 0 and "Read-only file system" in out.output, out
    assert not (models / "planted").exists()


@engine
async def test_a_container_sees_only_the_gpu_variables_of_its_assignment(
    ex: DockerExecutor,
) -> None:
    # The image itself says NVIDIA_VISIBLE_DEVICES=all (as nvidia/cuda images do), and the
    # task's env (past the policy, as an older coordinator might send it) asks for more.
    client = docker.from_env()
    try:
        tag = f"gpumesh-test-nvidia-all:{uuid.uuid4().hex[:8]}"
        dockerfile = f"FROM {busybox_image()}\nENV NVIDIA_VISIBLE_DEVICES=all\n"
        client.images.build(fileobj=io.BytesIO(dockerfile.encode()), tag=tag, rm=True)
        out = await ex.run(
            _assign(image=tag, command=["/bin/sh", "-c", "env | sort"],
                    env={"NVIDIA_VISIBLE_DEVICES": "all", "CUDA_VISIBLE_DEVICES": "0,1,2,3",
                         "NVIDIA_DRIVER_CAPABILITIES": "all", "ZE_AFFINITY_MASK": "0,1"},
                    gpu_indices=[1], gpu_vendor="fake"),
            lambda: None, lambda _: None,
        )
        assert out.ok, out
        env = dict(line.split("=", 1) for line in out.output.splitlines() if "=" in line)
        assert env["NVIDIA_VISIBLE_DEVICES"] == "void"  # no NVIDIA GPU assigned
        assert env["CUDA_VISIBLE_DEVICES"] == "1" and env["MESH_GPU_INDICES"] == "1"
        assert "NVIDIA_DRIVER_CAPABILITIES" not in env and "ZE_AFFINITY_MASK" not in env
    finally:
        client.images.remove(tag, force=True)
        client.close()


def test_gpumesh_up_keeps_its_model_cache_writable() -> None:
    from gpumesh.cli.up import _client_env
    env = _client_env({}, 8001, Path(os.sep) / "nonexistent")
    assert env["MESH_ALLOWED_VOLUMES"] == "/var/cache/gpumesh:rw"

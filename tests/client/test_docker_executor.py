"""The docker executor: create arguments for each GPU vendor (pure), then a real engine."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import docker
import pytest

from gpu_client.detect import FakeGpus, NoGpus
from gpu_client.executors.docker import DockerExecutor
from gpu_client.executors.docker_spec import LABEL_NODE, container_name, container_spec
from shared.protocol import Assign, GpuInfo
from tests.conftest import wait_until
from tests.docker_images import busybox_image, requires_docker

# --- container_spec: what our code hands the SDK (no engine, no GPU needed) ---------------


def assign(**kw: Any) -> Assign:
    base: dict[str, Any] = {"task_id": "t1", "attempt": 2, "task_type": "custom",
                            "executor": "docker", "image": "img:1"}
    return Assign(**{**base, **kw})


def test_spec_for_a_cpu_task() -> None:
    spec = container_spec(
        assign(script="echo hi", env={"A": "1", "MESH_TASK_ID": "spoofed"},
               volumes=["/data:/data:ro"], shm_size="2g", cpus=1.5, mem_limit="512m",
               timeout_s=30),
        "node-a", [], created_at=1000.0,
    )
    assert spec["image"] == "img:1" and spec["name"] == "gpumesh-node-a-t1-2"
    assert spec["entrypoint"] == ["/bin/sh", "-c", "echo hi"] and "command" not in spec
    assert spec["labels"] == {
        "gpumesh.managed": "1", "gpumesh.task_id": "t1", "gpumesh.attempt": "2",
        "gpumesh.node": "node-a", "gpumesh.created_at": "1000.000", "gpumesh.timeout_s": "30",
    }
    env = spec["environment"]
    assert env["A"] == "1" and env["MESH_TASK_ID"] == "t1" and env["MESH_ATTEMPT"] == "2"
    assert env["CUDA_VISIBLE_DEVICES"] == "" and env["MESH_NODE"] == "node-a"
    assert spec["volumes"] == ["/data:/data:ro"] and spec["shm_size"] == "2g"
    assert spec["nano_cpus"] == 1_500_000_000 and spec["mem_limit"] == "512m"
    assert spec["init"] is True
    assert "device_requests" not in spec and "devices" not in spec


def test_spec_command_replaces_the_entrypoint_and_no_command_keeps_the_image_s() -> None:
    assert container_spec(assign(command=["python", "-c", "x"]), "n", [])["entrypoint"] == [
        "python", "-c", "x"
    ]
    spec = container_spec(assign(), "n", [])
    assert "entrypoint" not in spec and "command" not in spec


def test_spec_nvidia_names_the_allocated_devices_by_uuid() -> None:
    gpus = [
        GpuInfo(index=i, name="A100", vendor="nvidia", uuid=f"GPU-{i}aaa", memory_total_mb=81920)
        for i in range(4)
    ]
    spec = container_spec(assign(gpu_indices=[1, 3], gpu_vendor="nvidia"), "n", gpus)
    (request,) = spec["device_requests"]
    assert request["Driver"] == "nvidia" and request["DeviceIDs"] == ["GPU-1aaa", "GPU-3aaa"]
    assert request["Capabilities"] == [["gpu"]] and request["Count"] == 0
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == "GPU-1aaa,GPU-3aaa"  # valid inside
    assert spec["environment"]["MESH_GPU_INDICES"] == "1,3"
    assert "devices" not in spec


def test_spec_nvidia_mig_instance_and_index_fallback() -> None:
    mig = GpuInfo(index=7, name="A100 MIG 1g.10gb", vendor="nvidia", uuid="MIG-abc",
                  memory_total_mb=10240, parent_index=0)
    spec = container_spec(assign(gpu_indices=[7], gpu_vendor="nvidia"), "n", [mig])
    assert spec["device_requests"][0]["DeviceIDs"] == ["MIG-abc"]
    # GPUs the source no longer lists: the vendor's index, renumbered from 0 inside.
    spec = container_spec(assign(gpu_indices=[2, 5], gpu_vendor="nvidia"), "n", [])
    assert spec["device_requests"][0]["DeviceIDs"] == ["2", "5"]
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_spec_fake_nvidia_allocation_from_mesh_fake_gpus() -> None:
    gpus = FakeGpus.parse("2xA100-80GB@nvidia").read()
    spec = container_spec(assign(gpu_indices=[1], gpu_vendor="nvidia"), "n", gpus)
    assert spec["device_requests"][0]["DeviceIDs"] == ["1"]
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == "0"


def test_spec_amd_gets_kfd_and_dri_and_rocr_visible_devices() -> None:
    gpus = FakeGpus.parse("4xMI300X-192GB@amd").read()
    spec = container_spec(assign(gpu_indices=[0, 2], gpu_vendor="amd"), "n", gpus)
    assert spec["devices"] == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
    assert spec["environment"]["ROCR_VISIBLE_DEVICES"] == "0,2"
    assert "HIP_VISIBLE_DEVICES" not in spec["environment"]
    assert "device_requests" not in spec


def test_spec_intel_gets_dri_and_ze_affinity_mask() -> None:
    gpus = FakeGpus.parse("2xMax1550-128GB@intel").read()
    spec = container_spec(assign(gpu_indices=[1], gpu_vendor="intel"), "n", gpus)
    assert spec["devices"] == ["/dev/dri:/dev/dri:rwm"]
    assert spec["environment"]["ZE_AFFINITY_MASK"] == "1"
    assert "device_requests" not in spec


def test_spec_mixed_node_passes_each_vendor_its_way() -> None:
    gpus = FakeGpus.parse("1xRTX4090-24GB@nvidia,1xRX7900-24GB@amd").read()
    assert [g.index for g in gpus] == [0, 100]
    spec = container_spec(assign(gpu_indices=[100]), "n", gpus)
    assert spec["devices"] == ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
    assert spec["environment"]["ROCR_VISIBLE_DEVICES"] == "0"
    assert "device_requests" not in spec


def test_spec_simulated_gpus_get_only_the_environment() -> None:
    gpus = FakeGpus.parse("2xA100-80GB").read()
    spec = container_spec(assign(gpu_indices=[1], gpu_vendor="fake"), "n", gpus)
    assert "device_requests" not in spec and "devices" not in spec
    assert spec["environment"]["CUDA_VISIBLE_DEVICES"] == "1"


def test_container_name_is_always_valid() -> None:
    assert container_name("a b", "t/1", 3) == "gpumesh-a_b-t_1-3"


# --- Docker unreachable: no engine needed -----------------------------------------------


async def test_unreachable_engine_is_not_offered_and_run_fails_with_the_reason(
    tmp_path: Path,
) -> None:
    dead = {"DOCKER_HOST": f"unix://{tmp_path}/no-docker.sock"}
    ex = DockerExecutor("n", NoGpus(), environment=dead)
    assert await ex.available() is False
    assert await ex.available() is False  # cached
    assert await ex.adopt() == []
    out = await ex.run(assign(script="true"), lambda: None, lambda _: None)
    assert not out.ok and "docker engine on node n unreachable" in out.error
    await ex.cancel("t1", 2)  # nothing to stop: no error either
    await ex.release("t1", 2)


async def test_a_task_without_image_fails_with_the_reason() -> None:
    ex = DockerExecutor("n", NoGpus())
    out = await ex.run(assign(image=None, script="true"), lambda: None, lambda _: None)
    assert out.error == "a docker task needs an `image`"


# --- a real engine ----------------------------------------------------------------------

def engine(test: Any) -> Any:
    """Marks `test` docker, and skips it with the reason when no engine answers."""
    for mark in requires_docker():
        test = mark(test)
    return test


@pytest.fixture
def node() -> Iterator[str]:
    """A node name no other test uses; its containers are removed afterwards."""
    name = f"dx-{uuid.uuid4().hex[:8]}"
    yield name
    client = docker.from_env()
    for c in client.containers.list(all=True, filters={"label": f"{LABEL_NODE}={name}"}):
        c.remove(force=True)
    client.close()


@pytest.fixture
async def ex(node: str) -> AsyncIterator[DockerExecutor]:
    executor = DockerExecutor(node, NoGpus(), kill_grace_s=1, pull_timeout_s=20)
    assert await executor.available()
    yield executor
    executor.close()


def containers(node: str, **labels: str) -> list[Any]:
    client = docker.from_env()
    try:
        filters = [f"{LABEL_NODE}={node}", *(f"gpumesh.{k}={v}" for k, v in labels.items())]
        found: list[Any] = client.containers.list(
            all=True, filters={"label": filters}, sparse=True
        )
        return found
    finally:
        client.close()


def leave(node: str, a: Assign, start: bool = True) -> None:
    """Create (and start) a container as a client that then died would have."""
    client = docker.from_env()
    try:
        container = client.containers.create(**container_spec(a, node, []))
        if start:
            container.start()
    finally:
        client.close()


def _status(node: str, task_id: str) -> str:
    (c,) = containers(node, task_id=task_id)
    return str(c.status)


def box(task_id: str = "t1", attempt: int = 1, **kw: Any) -> Assign:
    return assign(task_id=task_id, attempt=attempt, image=busybox_image(), **kw)


@engine
async def test_run_streams_output_and_reports_exit_code_and_tail(
    ex: DockerExecutor, node: str
) -> None:
    chunks: list[str] = []
    started: list[float] = []
    out = await ex.run(
        box(script="echo one; sleep 0.1; echo two >&2; sleep 0.3; echo three; exit 3",
            env={"A": "b"}),
        lambda: started.append(time.monotonic()), chunks.append,
    )
    assert started and out.exit_code == 3 and out.error == "exit code 3" and not out.ok
    assert out.output == "one\ntwo\nthree\n" and "".join(chunks) == out.output
    assert len(chunks) >= 2  # streamed while it ran, not only at the end
    assert 0.2 < out.duration_s < 10
    # Kept (exited) until release: a client crash before the ack loses no result.
    (kept,) = containers(node, task_id="t1", attempt="1")
    assert kept.status == "exited"
    await ex.release("t1", 1)
    assert containers(node) == []


@engine
async def test_env_gpus_and_command(ex: DockerExecutor) -> None:
    out = await ex.run(
        box(command=["/bin/sh", "-c", 'echo "$A|$MESH_TASK_ID|$MESH_ATTEMPT|$MESH_NODE|'
                     '$CUDA_VISIBLE_DEVICES|$MESH_GPU_INDICES"'],
            env={"A": "x y"}, attempt=4, gpu_indices=[1], gpu_vendor="fake"),
        lambda: None, lambda _: None,
    )
    assert out.ok, out
    assert out.output == f"x y|t1|4|{ex._node}|1|1\n"


@engine
async def test_volumes_read_write_and_read_only(node: str, tmp_path: Path) -> None:
    # The node allows tmp_path read-write (MESH_ALLOWED_VOLUMES=<tmp_path>:rw).
    ex = DockerExecutor(node, NoGpus(), allowed_volumes=[f"{tmp_path}:rw"])
    rw, ro = tmp_path / "rw", tmp_path / "ro"
    rw.mkdir()
    ro.mkdir()
    (ro / "in.txt").write_text("input")
    out = await ex.run(
        box(script="cat /in/in.txt > /out/copy.txt; echo x > /in/nope",
            volumes=[f"{rw}:/out", f"{ro}:/in:ro"]),
        lambda: None, lambda _: None,
    )
    ex.close()
    assert out.exit_code != 0 and "Read-only file system" in out.output
    assert (rw / "copy.txt").read_text() == "input" and not (ro / "nope").exists()


@engine
async def test_cancel_stops_the_container_promptly(ex: DockerExecutor, node: str) -> None:
    started = asyncio.Event()
    run = asyncio.create_task(ex.run(box(script="sleep 60"), started.set, lambda _: None))
    await asyncio.wait_for(started.wait(), 20)
    began = time.monotonic()
    await ex.cancel("t1", 1)
    out = await asyncio.wait_for(run, 20)
    assert out.error == "cancelled" and time.monotonic() - began < 5
    await ex.release("t1", 1)
    assert containers(node) == []


@engine
async def test_timeout_stops_a_container_that_ignores_sigterm(ex: DockerExecutor) -> None:
    began = time.monotonic()
    out = await ex.run(
        box(script="trap '' TERM; echo waiting; sleep 60 & wait; sleep 60", timeout_s=0.5),
        lambda: None, lambda _: None,
    )
    assert out.error == "timed out after 0.5s" and out.exit_code == 137  # SIGKILL after grace
    assert out.output == "waiting\n" and time.monotonic() - began < 10


@engine
async def test_missing_image_fails_with_the_reason_and_no_container(
    ex: DockerExecutor, node: str
) -> None:
    out = await ex.run(assign(image="gpumesh-nope:1", script="true"), lambda: None,
                       lambda _: None)
    assert not out.ok and out.exit_code is None
    assert out.error.startswith(f"image gpumesh-nope:1 not found on node {node}; pulling it")
    assert containers(node) == []


@engine
async def test_missing_binary_and_bad_limits_fail_with_reasons(
    ex: DockerExecutor, node: str
) -> None:
    out = await ex.run(box(command=["/no/such/binary"]), lambda: None, lambda _: None)
    assert out.error == "exit code 127 (command not found)" and "/no/such/binary" in out.output
    out = await ex.run(box("t2", script="true", mem_limit="lots"), lambda: None, lambda _: None)
    assert out.error.startswith(f"could not start a container of {busybox_image()}: ")
    assert "lots" in out.error and out.exit_code is None
    assert [c.attrs["Labels"]["gpumesh.task_id"] for c in containers(node)] == ["t1"]


@engine
async def test_adopt_finds_running_and_exited_and_drops_never_started(
    node: str, tmp_path: Path
) -> None:
    # What a client killed with -9 leaves behind: one ended, one running, one never started.
    leave(node, box("done", script="echo finished; exit 2"))
    leave(node, box("live", script="echo before; until [ -e /x/go ]; do sleep 0.05; done; "
                    "echo after", timeout_s=30, volumes=[f"{tmp_path}:/x"]))
    leave(node, box("never", script="true"), start=False)
    await wait_until(lambda: _status(node, "done") == "exited", 20, "the first one ended")
    second = DockerExecutor(node, NoGpus(), kill_grace_s=1)
    assert await second.available()
    found = {a.task_id: a for a in await second.adopt()}
    assert set(found) == {"done", "live"}
    assert found["live"].running and not found["done"].running
    assert containers(node, task_id="never") == []
    done = await found["done"].follow(lambda _: None)
    assert (done.exit_code, done.error, done.output) == (2, "exit code 2", "finished\n")
    chunks: list[str] = []
    following = asyncio.create_task(found["live"].follow(chunks.append))
    await asyncio.sleep(0.2)  # the log stream attaches; then the task goes on
    (tmp_path / "go").touch()
    live = await asyncio.wait_for(following, 20)
    assert live.ok and live.output == "before\nafter\n"
    assert "".join(chunks) == "after\n"  # only what came after adoption is streamed again
    second.close()


@engine
async def test_cancel_of_an_adopted_container_and_release_remove_it(node: str) -> None:
    leave(node, box(script="sleep 60"))
    second = DockerExecutor(node, NoGpus(), kill_grace_s=1)
    assert await second.available()
    (adopted,) = await second.adopt()
    follow = asyncio.create_task(adopted.follow(lambda _: None))
    await second.cancel("t1", 1)  # the coordinator said `stop` at register
    out = await asyncio.wait_for(follow, 20)
    assert out.error == "cancelled"
    await second.release("t1", 1)
    assert containers(node) == []
    second.close()

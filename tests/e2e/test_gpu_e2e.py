"""GPU-aware placement end to end: simulated-GPU nodes (MESH_FAKE_GPUS) as real processes."""

from __future__ import annotations

from collections.abc import Callable

from tests.conftest import LiveCoordinator, Proc, wait_until

Spawn = Callable[..., Proc]


async def test_tasks_land_by_vram_and_priority_and_wait_with_a_reason(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("big", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="1xA100-80GB")
    spawn_client("small", coordinator.ws_url, GPU_ENABLED="true",
                 MESH_FAKE_GPUS="2xRTX4090-24GB")
    await wait_until(lambda: len([n for n in coordinator.mesh.nodes.values() if n.online]) == 2,
                     20, "two GPU nodes online")
    status = (await coordinator.http.get("/mesh/status")).json()
    assert status["total_gpus"] == 3 and status["total_vram"] == 128

    # Needs 40 GB: only the A100 has it. It holds the GPU for a while.
    long = await coordinator.submit(
        task_type="test", sleep_s=3, requirements={"gpu_count": 1, "memory_gb": 40}
    )
    await wait_until(lambda: coordinator.mesh.nodes["big"].gpu_tasks, 20, "A100 taken")
    # A second 40 GB task waits, and says why.
    waiting = await coordinator.submit(
        task_type="test", requirements={"gpu_count": 1, "memory_gb": 40}
    )
    doc = await coordinator.task(waiting, wait=0.3)
    assert doc["status"] == "queued"
    assert "fewer than 1 free GPU with >= 40 GB free" in doc["reason"], doc["reason"]
    # Normal work that fits on a 4090 is not held up behind it.
    small = await coordinator.submit(
        task_type="custom", script="echo gpus=$CUDA_VISIBLE_DEVICES",
        requirements={"gpu_count": 2, "memory_gb": 16},
    )
    small_doc = await coordinator.wait_finished(small)
    assert small_doc["node"] == "small" and small_doc["gpu_indices"] == [0, 1]
    assert small_doc["result"]["output"].strip() == "gpus=0,1"

    long_doc, waiting_doc = [await coordinator.wait_finished(t) for t in (long, waiting)]
    assert long_doc["node"] == waiting_doc["node"] == "big"
    assert waiting_doc["status"] == "completed"

    # Critical work takes the most powerful free GPU, even on a busier node.
    crit = await coordinator.submit(task_type="test", priority=9,
                                    requirements={"gpu_count": 1})
    assert (await coordinator.wait_finished(crit))["node"] == "big"
    low = await coordinator.submit(task_type="test", priority=1,
                                   requirements={"gpu_count": 1})
    assert (await coordinator.wait_finished(low))["node"] in ("big", "small")


async def test_telemetry_and_energy_reach_status_and_nodes(
    coordinator: LiveCoordinator, spawn_client: Spawn
) -> None:
    spawn_client("g", coordinator.ws_url, GPU_ENABLED="true", MESH_FAKE_GPUS="2xH100-80GB")
    await wait_until(lambda: "g" in coordinator.mesh.nodes and coordinator.mesh.nodes["g"].online,
                     20, "node online")
    task_id = await coordinator.submit(
        task_type="test", sleep_s=2, tenant="alice", requirements={"gpu_count": 1}
    )
    doc = await coordinator.wait_finished(task_id)
    assert doc["status"] == "completed"
    assert doc["result"]["energy_j"] > 0  # 25 W simulated, integrated over heartbeats
    node = (await coordinator.http.get("/mesh/nodes")).json()["nodes"]["g"]
    assert node["gpus"][0]["power_w"] == 25.0 and node["gpus"][0]["temperature_c"] == 35.0
    assert node["history"] and node["energy_j"] > 0
    status = (await coordinator.http.get("/mesh/status")).json()
    fairness = status["fairness"]
    assert fairness["jain_index"] == 1.0 and fairness["gpu_seconds_by_tenant"]["alice"] > 1.5

"""What the docker executor asks the engine for: `container_spec`, a pure function.

Tests assert on it for NVIDIA, AMD, Intel and simulated allocations without any GPU.
"""

from __future__ import annotations

import fnmatch
import json
import re
import time
from collections.abc import Sequence
from typing import Any

from docker.types import DeviceRequest

from gpu_client.detectors.layout import VENDOR_BLOCK, runtime_id
from gpu_client.executors.base import gpu_env
from gpu_client.serving import PORT_VAR
from shared.files import WORKSPACE
from shared.policy import GPU_ENV
from shared.protocol import Assign, GpuInfo

LABEL_MANAGED = "gpumesh.managed"
LABEL_TASK = "gpumesh.task_id"
LABEL_ATTEMPT = "gpumesh.attempt"
LABEL_NODE = "gpumesh.node"
LABEL_TIMEOUT = "gpumesh.timeout_s"
LABEL_CREATED = "gpumesh.created_at"
LABEL_ARTIFACTS = "gpumesh.artifacts"  # the task's artifact patterns, JSON: read after it ends

_UNSAFE_NAME = re.compile(r"[^A-Za-z0-9_.-]")
_NVIDIA_IDS = ("GPU-", "MIG-")


def container_name(node: str, task_id: str, attempt: int) -> str:
    return _UNSAFE_NAME.sub("_", f"gpumesh-{node}-{task_id}-{attempt}")


def container_spec(
    assign: Assign, node: str, gpus: Sequence[GpuInfo], *, created_at: float | None = None,
    caps: Sequence[str] = (), volumes: Sequence[str] | None = None,
) -> dict[str, Any]:
    """The keyword arguments handed to `DockerClient.containers.create` for one attempt.

    Pure: `gpus` is what the node's GpuSource reads. NVIDIA GPUs go in one device request
    naming the allocated devices as the detector names them (UUIDs, MIG instances); AMD GPUs
    get /dev/kfd and /dev/dri with ROCR_VISIBLE_DEVICES; Intel GPUs /dev/dri with
    ZE_AFFINITY_MASK; simulated (`fake`) GPUs only the environment.

    A gang member runs with host networking (`network_mode: host`), so the rendezvous its
    node found and was given is reachable as is.

    Never privileged: `no-new-privileges`, every capability dropped but the node's `caps`
    (MESH_DOCKER_CAPS). `volumes`: the task's, resolved and checked on this host right
    before create (`gpu_client.policy.resolve_volumes`); the task's own when None.

    The GPU steering variables (`shared.policy.GPU_ENV`) come only from the assignment: a
    task's own are dropped (the node policy refuses them before this), and
    NVIDIA_VISIBLE_DEVICES always names the assigned NVIDIA devices, `void` when there are
    none, so an image's `NVIDIA_VISIBLE_DEVICES=all` hands out no GPU under a default
    NVIDIA runtime either.
    """
    steer = re.compile("|".join(fnmatch.translate(p) for p in GPU_ENV))
    env = {k: v for k, v in assign.env.items() if not steer.match(k)}
    env.update(gpu_env(assign, gpus))
    env["NVIDIA_VISIBLE_DEVICES"] = "void"
    env["MESH_NODE"] = node
    labels = {
        LABEL_MANAGED: "1",
        LABEL_TASK: assign.task_id,
        LABEL_ATTEMPT: str(assign.attempt),
        LABEL_NODE: node,
        LABEL_CREATED: f"{time.time() if created_at is None else created_at:.3f}",
    }
    if assign.timeout_s is not None:
        labels[LABEL_TIMEOUT] = f"{assign.timeout_s:g}"
    spec: dict[str, Any] = {
        "image": assign.image,
        "name": container_name(node, assign.task_id, assign.attempt),
        "labels": labels,
        "init": True,
        "privileged": False,
        "security_opt": ["no-new-privileges"],
        "cap_drop": ["ALL"],
    }
    if caps:
        spec["cap_add"] = list(caps)
    if assign.command:
        spec["entrypoint"] = list(assign.command)
    elif assign.script:
        spec["entrypoint"] = ["/bin/sh", "-c", assign.script]
    binds = list(assign.volumes if volumes is None else volumes)
    if binds:
        spec["volumes"] = binds
    if assign.files or assign.artifacts:  # files go in, artifacts come out, here (workdir.py)
        spec["working_dir"] = WORKSPACE
        labels[LABEL_ARTIFACTS] = json.dumps(assign.artifacts)
    if assign.gang is not None:
        # A gang member (issue 28) shares the node's network: rank 0 listens on the
        # MASTER_PORT its node found free, at the node's address its peers were given
        # (gpu_client/gang.py), and every member reaches its peers as the node does.
        spec["network_mode"] = "host"
    elif assign.service is not None and (port := assign.env.get(PORT_VAR, "")).isdigit():
        spec["ports"] = {f"{port}/tcp": ("127.0.0.1", int(port))}  # the node's loopback only
    if assign.shm_size:
        spec["shm_size"] = assign.shm_size
    if assign.cpus:
        spec["nano_cpus"] = round(assign.cpus * 1e9)
    if assign.mem_limit:
        spec["mem_limit"] = assign.mem_limit
    spec.update(_gpu_access(assign, gpus, env))
    spec["environment"] = env
    return spec


def _gpu_access(assign: Assign, gpus: Sequence[GpuInfo], env: dict[str, str]) -> dict[str, Any]:
    """Device requests and device nodes for the assigned GPUs; may fix up `env`."""
    by_index = {g.index: g for g in gpus}
    nvidia: list[str] = []
    devices: list[str] = []
    for i in assign.gpu_indices:
        gpu = by_index.get(i)
        vendor = (gpu.vendor if gpu is not None else assign.gpu_vendor).lower()
        if vendor == "nvidia":
            nvidia.append(runtime_id(gpu) if gpu is not None else str(i % VENDOR_BLOCK))
        elif vendor == "amd":
            devices += ["/dev/kfd:/dev/kfd:rwm", "/dev/dri:/dev/dri:rwm"]
        elif vendor == "intel":
            devices.append("/dev/dri:/dev/dri:rwm")
    access: dict[str, Any] = {}
    if nvidia:
        access["device_requests"] = [
            DeviceRequest(driver="nvidia", device_ids=nvidia, capabilities=[["gpu"]])
        ]
        env["NVIDIA_VISIBLE_DEVICES"] = ",".join(nvidia)
        if not all(d.startswith(_NVIDIA_IDS) for d in nvidia):
            # The container sees only its devices, numbered from 0: host indices would hide them.
            env["CUDA_VISIBLE_DEVICES"] = ",".join(str(n) for n in range(len(nvidia)))
    if devices:
        access["devices"] = list(dict.fromkeys(devices))
    return access

"""What every executor implements, so the agent runs builtin, process and docker tasks alike.

An executor turns one `Assign` into one `RunOutcome`. The agent owns everything about the
conversation with the coordinator (accepting, fencing, logs, results, acks); an executor only
starts work, reports output, stops work and finds work a previous client left running.

Contract, for an executor named `name` (the word in `Assign.executor` and `Register.executors`):

- `await available()`: can this node run such tasks now (is the Docker engine up, ...)?
  Called once at start; an executor that is not available is not offered.
- `await run(assign, on_started, on_output) -> RunOutcome`: run one attempt to its end. Call
  `on_started()` once the work really runs (the container or process exists) and `cancel()`
  can reach it; the agent holds a cancel that arrives earlier until then. Pass output text
  to `on_output(text)` as it appears; the agent batches and rate-limits it. A task that fails
  (nonzero exit, timeout, command not found, image missing) is a `RunOutcome` with `error`
  set, never an exception. If the coroutine is *cancelled* (the client is shutting down), it
  must leave the work running when it can be re-adopted (processes, containers) and re-raise.
- `await cancel(task_id, attempt)`: stop that attempt (its whole process group, its
  container); its `run()` or adopted `follow()` then returns promptly and the agent discards
  the outcome. Unknown attempts are ignored.
- `await adopt() -> list[Adopted]`: at client start, the attempts a previous incarnation of the
  client left behind: still running, or finished with a result that was never acked. The
  agent reports them in `register` and calls `follow()` to get each outcome.
- `await release(task_id, attempt)`: the coordinator acked the result, or fenced the attempt
  off: remove what is left of it (work dirs, stopped containers). Must not fail if nothing is.

An executor module exposes `create(settings: ClientSettings, source: GpuSource) -> Executor`;
`gpu_client.executors.load_executors` imports `gpu_client.executors.<name>` for each name in
`MESH_EXECUTORS`, so a new executor needs no change in the agent.
"""

from __future__ import annotations

import signal
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from gpu_client.detect import visible_devices_env
from gpu_client.executors.workdir import Collected
from shared.files import ArtifactRef
from shared.protocol import Assign, GpuInfo

OnStarted = Callable[[], None]
OnOutput = Callable[[str], None]


@dataclass(frozen=True, kw_only=True)
class RunOutcome:
    """How one attempt ended. Completed when `exit_code == 0` and `error` is empty."""

    exit_code: int | None
    output: str = ""  # the tail of stdout and stderr together, at most output_tail_bytes
    duration_s: float = 0.0
    error: str = ""  # why it failed: "exit code 3", "timed out after 5s", "cancelled"
    data: dict[str, Any] = field(default_factory=dict)
    infra: bool = False  # the node failed it (work dir, engine gone, disk full): run it elsewhere
    artifacts: Collected | None = None  # files the task declared, found after it (workdir.py)
    uploaded: tuple[ArtifactRef, ...] = ()  # those the coordinator stored (gpu_client/artifacts)

    @property
    def ok(self) -> bool:
        return self.exit_code == 0 and not self.error


@dataclass(frozen=True, kw_only=True)
class Adopted:
    """An attempt found at start; `follow(on_output)` waits for (or reads) its outcome."""

    task_id: str
    attempt: int
    running: bool  # False: it ended while no client watched; follow() returns at once
    follow: Callable[[OnOutput], Awaitable[RunOutcome]]


class Executor(Protocol):
    name: str

    async def available(self) -> bool: ...

    async def run(self, assign: Assign, on_started: OnStarted, on_output: OnOutput) -> RunOutcome:
        ...

    async def cancel(
        self, task_id: str, attempt: int, grace_s: float | None = None
    ) -> None: ...  # grace_s: SIGTERM to SIGKILL; None: the executor's own

    async def adopt(self) -> list[Adopted]: ...

    async def release(self, task_id: str, attempt: int) -> None: ...


# Visibility variables a task must not inherit from the client: set only from the assignment.
GPU_VISIBILITY_VARS = (
    "CUDA_VISIBLE_DEVICES",
    "NVIDIA_VISIBLE_DEVICES",
    "ROCR_VISIBLE_DEVICES",
    "HIP_VISIBLE_DEVICES",
    "ZE_AFFINITY_MASK",
)


def gpu_env(assign: Assign, gpus: Sequence[GpuInfo] = ()) -> dict[str, str]:
    """The environment that confines a task to its assigned GPUs, plus the MESH_* task vars.

    `gpus` is what the node's GpuSource reads: when every assigned index is among them,
    `visible_devices_env` names each by its runtime id (NVIDIA UUIDs, MIG instances, the
    vendor's own index on mixed nodes). Otherwise the indices go into the variable of
    `assign.gpu_vendor`. With no GPUs assigned, `CUDA_VISIBLE_DEVICES=""`, so a CPU task
    never grabs a GPU. AMD gets ROCR_VISIBLE_DEVICES only: HIP numbers the devices ROCr
    leaves visible from 0, so the same indices in HIP_VISIBLE_DEVICES would hide them.
    """
    indices = ",".join(str(i) for i in assign.gpu_indices)
    env = {
        "MESH_TASK_ID": assign.task_id,
        "MESH_ATTEMPT": str(assign.attempt),
        "MESH_GPU_INDICES": indices,
    }
    if not assign.gpu_indices:
        env["CUDA_VISIBLE_DEVICES"] = ""
        return env
    by_index = {g.index: g for g in gpus}
    assigned = [by_index[i] for i in assign.gpu_indices if i in by_index]
    if len(assigned) == len(assign.gpu_indices):
        env.update(visible_devices_env(assigned))
        return env
    vendor = assign.gpu_vendor.lower()
    if vendor == "amd":
        env["ROCR_VISIBLE_DEVICES"] = indices
    elif vendor == "intel":
        env["ZE_AFFINITY_MASK"] = indices
    elif vendor != "apple":  # nvidia, fake, or unnamed
        env["CUDA_VISIBLE_DEVICES"] = indices
    return env


def describe_exit(code: int) -> str:
    """`exit code 3`, `exit code 127 (command not found)`, `exit code 137 (killed by SIGKILL)`."""
    if code == 126:
        return "exit code 126 (command not executable)"
    if code == 127:
        return "exit code 127 (command not found)"
    if code < 0 or code > 128:
        signum = -code if code < 0 else code - 128
        try:
            return f"exit code {code} (killed by {signal.Signals(signum).name})"
        except ValueError:
            pass
    return f"exit code {code}"

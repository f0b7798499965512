"""What a task is: the submission users POST, its requirements, and which executor runs it."""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from shared.files import FileContent, artifacts_problem, files_problem

TaskType = Literal["llm_inference", "training", "embeddings", "custom", "test"]
TASK_TYPES: tuple[str, ...] = ("llm_inference", "training", "embeddings", "custom", "test")
TEMPLATE_TYPES = frozenset({"llm_inference", "training", "embeddings"})

Priority = Annotated[int, msgspec.Meta(ge=0, le=10)]
GpuCount = Annotated[int, msgspec.Meta(ge=0, le=64)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Attempts = Annotated[int, msgspec.Meta(ge=1, le=100)]

EXECUTORS = ("builtin", "process", "docker")


class Requirements(msgspec.Struct, kw_only=True, omit_defaults=True):
    gpu_count: GpuCount = 0
    memory_gb: Annotated[float, msgspec.Meta(ge=0)] = 0.0  # free VRAM per GPU
    gpu_type: str = ""  # substring of the GPU name, case-insensitive: "A100", "4090"
    vendor: str = ""  # nvidia | amd | intel | apple
    min_compute_capability: str = ""  # "8.0"
    labels: dict[str, str] = {}  # the node must carry every one of these labels
    node_selector: dict[str, str] = {}  # the same, under the name Kubernetes users know
    balancing: Literal["", "speed", "efficiency", "balanced", "endurance"] = ""  # "" = mesh's
    executor: Literal["", "builtin", "process", "docker"] = ""  # "" chooses from the task
    shared: bool = False  # may share a GPU with other shared tasks when the memory fits


class TaskSubmit(msgspec.Struct, kw_only=True, omit_defaults=True):
    """The body of `POST /tasks/submit`. Other top-level fields are kept as `params`."""

    task_type: TaskType
    priority: Priority = 5
    requirements: Requirements = msgspec.field(default_factory=Requirements)
    name: str = ""
    tenant: str = ""
    script: str | None = None
    command: list[str] | None = None
    image: str | None = None
    env: dict[str, str] = {}
    timeout_s: Positive | None = None
    max_attempts: Attempts = 3
    volumes: list[str] = []
    shm_size: str | None = None
    cpus: Positive | None = None
    mem_limit: str | None = None
    files: dict[str, FileContent] = {}  # input files: shared/files.py
    artifacts: list[str] = []  # output paths or globs collected after the task
    preemptible: bool = True  # false: critical work never stops it (a tenant quota bounds it)

    def __post_init__(self) -> None:
        if self.task_type == "custom" and not (self.script or self.command or self.image):
            raise ValueError("a custom task needs a `script`, a `command` or an `image`")
        if why := files_problem(self.files) or artifacts_problem(self.artifacts):
            raise ValueError(why)
        if self.script is not None and self.command is not None:
            raise ValueError("give either `script` or `command`, not both")
        if self.command is not None and not self.command:
            raise ValueError("`command` must not be empty")


SUBMIT_FIELDS = frozenset(TaskSubmit.__struct_fields__) | {"type"}


def executor_for(spec: TaskSubmit) -> str:
    """The executor a task needs: named in its requirements, else chosen from its shape."""
    if spec.requirements.executor:
        return spec.requirements.executor
    if spec.task_type == "test":
        return "builtin"
    if spec.image or spec.task_type in TEMPLATE_TYPES:
        return "docker"
    return "process"


def priority_band(priority: int) -> str:
    if priority >= 8:
        return "critical"
    if priority >= 6:
        return "high"
    if priority >= 3:
        return "normal"
    return "low"


def split_submission(body: dict[str, Any]) -> tuple[TaskSubmit, dict[str, Any]]:
    """Validate a decoded JSON object; raises msgspec.ValidationError with the reason."""
    spec = msgspec.convert(body, TaskSubmit)
    params = {k: v for k, v in body.items() if k not in SUBMIT_FIELDS}
    return spec, params

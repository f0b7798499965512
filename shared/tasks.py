"""What a task is: the submission users POST, its requirements, and which executor runs it."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from shared.files import (
    FileContent,
    artifacts_problem,
    bookkeeping_problem,
    files_problem,
    name_bytes_problem,
)

TaskType = Literal["llm_inference", "training", "embeddings", "custom", "test"]
TASK_TYPES: tuple[str, ...] = ("llm_inference", "training", "embeddings", "custom", "test")
TEMPLATE_TYPES = frozenset({"llm_inference", "training", "embeddings"})

Priority = Annotated[int, msgspec.Meta(ge=0, le=10)]
GpuCount = Annotated[int, msgspec.Meta(ge=0, le=64)]
Positive = Annotated[float, msgspec.Meta(gt=0)]
Attempts = Annotated[int, msgspec.Meta(ge=1, le=100)]

EXECUTORS = ("builtin", "process", "docker")
MAX_GANG_NODES = 64  # members of one gang task (`nodes`): README, "Limits"
GangSize = Annotated[int, msgspec.Meta(ge=1, le=MAX_GANG_NODES)]


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


class GangRef(msgspec.Struct, kw_only=True, frozen=True):
    """What makes a task one member of a gang: set by the coordinator, never by a caller."""

    id: str  # the gang task's id
    rank: Annotated[int, msgspec.Meta(ge=0, lt=MAX_GANG_NODES)]
    nodes: GangSize


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
    nodes: GangSize = 1  # > 1: a gang, one member per node, all or nothing (core/gangs.py)
    gang: GangRef | None = None  # a gang member's place in its gang (the coordinator sets it)

    def __post_init__(self) -> None:
        if self.task_type == "custom" and not (self.script or self.command or self.image):
            raise ValueError("a custom task needs a `script`, a `command` or an `image`")
        if why := files_problem(self.files) or artifacts_problem(self.artifacts):
            raise ValueError(why)
        if self.script is not None and self.command is not None:
            raise ValueError("give either `script` or `command`, not both")
        if self.command is not None and not self.command:
            raise ValueError("`command` must not be empty")
        if self.nodes > 1 and self.requirements.shared:
            raise ValueError("a gang's members hold their GPUs whole: `nodes` > 1 cannot be "
                             "`shared`")


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


# --- what no node can start: refused at submit (`launch_problem`) ----------------------------

ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
MAX_ARG_STRLEN = 131072  # bytes in one argument or `NAME=value` with its NUL (32 pages, Linux)
ARG_MAX = 2 << 20  # argv + env as execve counts them, on a node with the default 8 MiB stack
ARG_RESERVE = 64 << 10  # of ARG_MAX, left for what the node adds (launcher, PATH, MESH_* vars)
POINTER_BYTES = 8  # execve counts a pointer per string on top of the string and its NUL
# Docker's image reference grammar (github.com/distribution/reference, regexp.go).
_PATH_PART = r"[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*"
_DOMAIN_PART = r"(?:[a-zA-Z0-9]|[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9])"
_HOST = rf"(?:{_DOMAIN_PART}(?:\.{_DOMAIN_PART})*|\[[a-fA-F0-9:]+\])(?::[0-9]+)?"
_IMAGE_REF = re.compile(
    rf"(?P<name>(?:{_HOST}/)?{_PATH_PART}(?:/{_PATH_PART})*)"
    r"(?::[A-Za-z0-9_][A-Za-z0-9_.-]{0,127})?"
    r"(?:@[A-Za-z][A-Za-z0-9]*(?:[-_+.][A-Za-z][A-Za-z0-9]*)*:[0-9a-fA-F]{32,})?"
)
MAX_IMAGE_NAME = 255  # characters in an image's name (before its tag), as Docker counts them
MAX_IMAGE_REF = 1024  # characters in a whole reference: name 255, tag 128, a digest


def launch_problem(spec: TaskSubmit, where: str = "$") -> str | None:
    """Why no node could start this (filled-in) task, naming the field, or None.

    What a node's kernel, file system or engine refuses whatever the node: an env name that
    is not `[A-Za-z_][A-Za-z0-9_]*`, a NUL in env, `script` or `command`, one argument or
    `NAME=value` over MAX_ARG_STRLEN, argv and env together over ARG_MAX less ARG_RESERVE, a
    file name over NAME_MAX/PATH_MAX bytes, a process task's file over the executor's own, an
    image that is not a reference, an executor given nothing it can run. Checked at the edge
    only, not when a stored spec is decoded: a task stored before it ran must still load."""
    executor = executor_for(spec)
    if spec.gang is not None:
        return (f"{where}.gang: set by the coordinator on a gang's members; ask for a gang "
                f"with `nodes` (2 to {MAX_GANG_NODES})")
    if executor == "docker":
        if not spec.image:
            return f"{where}.image: a docker task needs an `image`"
        if why := image_problem(spec.image):
            return f"{where}.image: {why}"
    elif executor == "process" and not (spec.script or spec.command):
        return f"{where}: a process task needs a `script` or a `command`"
    elif executor == "builtin" and spec.task_type != "test":
        return f"{where}.requirements.executor: the builtin executor runs only `test` tasks"
    total = 0
    for name, value in spec.env.items():  # paths are spelled out only for a refusal
        size = _utf8(name) + 1 + _utf8(value) + 1
        if size > MAX_ARG_STRLEN or "\x00" in value or not ENV_NAME.fullmatch(name):
            return _env_refusal(f"{where}.env[{name[:40]!r}]", name, value, size)
        total += size + POINTER_BYTES
    for i, arg in enumerate(spec.command or ()):
        size = _utf8(arg) + 1
        if size > MAX_ARG_STRLEN or "\x00" in arg:
            return _arg_refusal(f"{where}.command[{i}]", arg, size)
        total += size + POINTER_BYTES
    if spec.script is not None:
        size = _utf8(spec.script) + 1
        if size > MAX_ARG_STRLEN or "\x00" in spec.script:
            return _arg_refusal(f"{where}.script", spec.script, size,
                                ": send it in `files` and give its name as `script`")
        total += size + POINTER_BYTES
    if total > ARG_MAX - ARG_RESERVE:
        return (f"{where}.command, {where}.env: {total} bytes of exec's argument space (each "
                f"string with its NUL and a {POINTER_BYTES}-byte pointer), over the "
                f"{ARG_MAX - ARG_RESERVE} a node can give a task (ARG_MAX {ARG_MAX} with the "
                f"default 8 MiB stack, less {ARG_RESERVE} for what the node adds)")
    for name in spec.files:
        why = name_bytes_problem(name) or (
            bookkeeping_problem(name) if executor == "process" else None)
        if why:
            return f"{where}.files: {why}"
    for pattern in spec.artifacts:
        if why := name_bytes_problem(pattern, "artifact pattern"):
            return f"{where}.artifacts: {why}"
    return None


def _env_refusal(at: str, name: str, value: str, size: int) -> str:
    if "\x00" in name or "\x00" in value:
        return f"{at}: contains NUL, which no environment can hold"
    if not ENV_NAME.fullmatch(name):
        return (f"{at}: not an environment variable name: letters, digits and `_`, "
                "not starting with a digit")
    return (f"{at}: `NAME=value` is {size} bytes with its NUL, over the kernel's "
            f"{MAX_ARG_STRLEN}-byte limit per string (MAX_ARG_STRLEN): send it in `files`")


def _arg_refusal(at: str, arg: str, size: int, hint: str = "") -> str:
    if "\x00" in arg:
        return f"{at}: contains NUL, which no argument can hold"
    return (f"{at}: {size} bytes with its NUL, over the kernel's {MAX_ARG_STRLEN}-byte "
            f"limit per argument (MAX_ARG_STRLEN){hint}")


def image_problem(image: str) -> str | None:
    """Why `image` is not a reference Docker can pull or run, or None."""
    if len(image) > MAX_IMAGE_REF:  # first: the pattern's cost grows with the length
        return f"{image[:80]!r}...: longer than {MAX_IMAGE_REF} characters"
    m = _IMAGE_REF.fullmatch(image)
    if m is None:
        return (f"{image[:80]!r} is not an image reference: [host[:port]/]name[:tag][@digest], "
                "the name in lowercase letters, digits and separators")
    if len(m.group("name")) > MAX_IMAGE_NAME:
        return f"{image[:80]!r}...: its name is longer than {MAX_IMAGE_NAME} characters"
    return None


def _utf8(text: str) -> int:
    """Bytes of `text` in UTF-8: its length when it is ASCII (no copy)."""
    return len(text) if text.isascii() else len(text.encode("utf-8", "surrogatepass"))


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

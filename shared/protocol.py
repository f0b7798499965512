"""The wire protocol between the coordinator and compute clients.

Every frame is one JSON object with a ``type`` tag. Both sides decode a frame once, at
the edge, into one of the typed messages below; a frame that does not decode becomes a
``BadMessage`` value carrying the reason, never an exception in a connection handler
(a frame nested deeper than the decoder can follow included).

Every number a node sends has a range, checked by decoding: out of range is a decode
error naming the field (``Expected `int` <= 65536 - at `$.slots```). Integers are signed
64-bit at most (what SQLite, PostgreSQL and orjson hold); floats are finite (JSON has no
NaN or infinity, and ``1e400`` is refused as out of range). The ranges of `register` and
`heartbeat` (README "Limits"):

    GPU index, parent_index          0 .. 65,535 (MAX_GPU_INDEX)
    seed gpu_count, gpu_memory       0 .. 1,024 (MAX_GPUS); 0 .. 4,194,304 GB
    MiB (host and GPU memory)        0 .. 2**32 MiB, 4 PiB (MAX_MIB)
    cpu_count, slots                 0 .. 65,536 (MAX_CPUS)
    cpu_pct, utilization_pct         0 .. 100
    temperature_c                    -273.15 .. 1,000
    power_w, power_limit_w           0 .. 100,000
    load1                            0 .. 1,000,000
    attempts, seq, counts, protocol  0 .. 2**63-1 (assigns: -1 ..)

Fields may be added in later protocol versions; they are never renamed. Unknown fields
are ignored, so an older peer can read a newer one's messages.
"""

from __future__ import annotations

import math
import re
import threading
from enum import IntEnum
from typing import Annotated, Any, Literal

import msgspec

from shared.files import ArtifactRef, FileContent
from shared.tasks import MAX_GANG_NODES

PROTOCOL_VERSION = 1
SUPPORTED_PROTOCOLS = frozenset({1})
MAX_FRAME_BYTES = 1 << 20  # larger frames are closed with 1009 by the WebSocket layer

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
MAX_GPUS = 1024  # GPUs in one register or heartbeat (shared/limits.py refuses more)
MAX_GPU_INDEX = 65_535
MAX_MIB = 1 << 32  # 4 PiB, in MiB: no host or GPU comes near it
MAX_CPUS = 65_536  # logical CPUs, and slots (concurrent CPU tasks), of one node

Int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
NonNegInt = Annotated[int, msgspec.Meta(ge=0, le=INT64_MAX)]
GpuIndex = Annotated[int, msgspec.Meta(ge=0, le=MAX_GPU_INDEX)]
MiB = Annotated[int, msgspec.Meta(ge=0, le=MAX_MIB)]
CpuCount = Annotated[int, msgspec.Meta(ge=0, le=MAX_CPUS)]
Port = Annotated[int, msgspec.Meta(ge=0, le=65535)]
NodeAddress = Annotated[str, msgspec.Meta(max_length=253, pattern=r"^[A-Za-z0-9.:_\-\[\]%]*$")]
Percent = Annotated[float, msgspec.Meta(ge=0, le=100)]
Celsius = Annotated[float, msgspec.Meta(ge=-273.15, le=1000)]
Watts = Annotated[float, msgspec.Meta(ge=0, le=100_000)]
Load = Annotated[float, msgspec.Meta(ge=0, le=1_000_000)]

# What a node name may be: it goes into logs, paths, metrics labels and container names.
NODE_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,62}")


def valid_node_name(name: str) -> bool:
    return NODE_NAME_RE.fullmatch(name) is not None


class CloseCode(IntEnum):
    """Close codes the coordinator uses. The client treats 1008 and 4002 as fatal."""

    NORMAL = 1000  # the coordinator closed a finished conversation
    GOING_AWAY = 1001  # the coordinator is shutting down: reconnect later
    INVALID_PAYLOAD = 1007  # a text frame that is not UTF-8 (raised by the WebSocket layer)
    POLICY_VIOLATION = 1008  # bad token, or a first frame that is not `register`: fatal
    MESSAGE_TOO_BIG = 1009  # a frame over MAX_FRAME_BYTES (raised by the WebSocket layer)
    INTERNAL_ERROR = 1011  # a bug on the coordinator: reconnect with backoff
    SUPERSEDED = 4001  # the same node connected again; this older socket is closed
    PROTOCOL_UNSUPPORTED = 4002  # `register.protocol` is not spoken here: fatal
    NODE_LOST = 4003  # the node was silent past the heartbeat timeout; its tasks moved
    NAME_TAKEN = 4004  # the node name belongs to another node's credential: fatal
    SLOW_CONSUMER = 4005  # the node did not read its frames; its send queue filled up
    REGISTER_TIMEOUT = 4006  # no `register` within MESH_REGISTER_TIMEOUT_S of the handshake
    NOT_LEADER = 4010  # a standby coordinator: the reason is the leader's ws:// URL; go there
    TRY_AGAIN_LATER = 1013  # too many connections: reconnect with backoff


FATAL_CLOSE_CODES = frozenset(
    {CloseCode.POLICY_VIOLATION, CloseCode.PROTOCOL_UNSUPPORTED, CloseCode.NAME_TAKEN}
)


class GpuInfo(msgspec.Struct, kw_only=True, omit_defaults=True):
    """One schedulable GPU (a whole card, or one MIG instance) and its latest readings."""

    index: GpuIndex
    name: str = ""
    vendor: str = ""  # nvidia | amd | intel | apple | fake
    uuid: str = ""
    memory_total_mb: MiB = 0
    memory_used_mb: MiB = 0
    utilization_pct: Percent = 0.0
    temperature_c: Celsius | None = None
    power_w: Watts | None = None
    power_limit_w: Watts | None = None
    compute_capability: str = ""
    parent_index: GpuIndex | None = None  # the physical card of a MIG instance
    fault: str = ""  # a fault the driver reported (XID, uncorrectable ECC, off the bus): unusable


def _within(value: float | None, low: float, high: float) -> float | None:
    ok = value is not None and math.isfinite(value) and low <= value <= high
    return value if ok else None


def within_ranges(gpu: GpuInfo) -> GpuInfo:
    """`gpu` with every reading inside its range above: what a driver got wrong (a sentinel
    such as 65535 C, a power limit of 0xFFFFFFFF mW, utilization past 100) becomes no
    reading, so the node's heartbeat is taken instead of refused. The client sends only this."""
    util = gpu.utilization_pct if math.isfinite(gpu.utilization_pct) else 0.0
    return msgspec.structs.replace(
        gpu,
        memory_total_mb=min(max(gpu.memory_total_mb, 0), MAX_MIB),
        memory_used_mb=min(max(gpu.memory_used_mb, 0), MAX_MIB),
        utilization_pct=min(max(util, 0.0), 100.0),
        temperature_c=_within(gpu.temperature_c, -273.15, 1000),
        power_w=_within(gpu.power_w, 0, 100_000),
        power_limit_w=_within(gpu.power_limit_w, 0, 100_000),
    )


class TaskRef(msgspec.Struct, kw_only=True, omit_defaults=True):
    """A task a client holds: still running, or finished with its result not yet acked."""

    task_id: str
    attempt: NonNegInt
    state: Literal["running", "finished"] = "running"


class SeedNodeInfo(msgspec.Struct, kw_only=True):
    """The seed's short register form: `{"gpu_count", "gpu_type", "gpu_memory"}` (GB)."""

    gpu_count: Annotated[int, msgspec.Meta(ge=0, le=MAX_GPUS)] = 0
    gpu_type: str = ""
    gpu_memory: Annotated[float, msgspec.Meta(ge=0, le=MAX_MIB / 1024)] = 0.0


class Msg(msgspec.Struct, tag_field="type", kw_only=True, omit_defaults=True):
    pass


class NodePolicy(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What a node agrees to run; it travels in `register` so placement can respect it."""

    executors: list[str] = []  # the executors it offers
    allowed_images: list[str] = msgspec.field(default_factory=lambda: ["*"])  # image globs
    allowed_volumes: list[str] = []  # host path prefixes a bind mount must lie under
    forbidden_env: list[str] = []  # env names or glob patterns a task may not set
    capabilities: list[str] = []  # Linux capabilities containers keep (all others dropped)
    # Set by a node that cannot isolate process tasks (isolation `none`) and whose owner did
    # not opt in (MESH_ISOLATION=none): it runs process tasks of this tenant only.
    owner_tenant: str = ""


# --- client -> coordinator ---------------------------------------------------------------


class Register(Msg, tag="register"):
    protocol: Int64 = PROTOCOL_VERSION
    token: str = ""
    node_info: SeedNodeInfo | None = None  # the seed's short form; the fields below win
    hostname: str = ""
    role: str = "compute"
    version: str = ""
    gpus: list[GpuInfo] = []
    cpu_count: CpuCount = 0
    memory_mb: MiB = 0
    executors: list[str] | None = None  # None: the seed's short form, offers nothing
    slots: CpuCount = 0  # concurrent CPU tasks; 0 means cpu_count
    labels: dict[str, str] = {}
    running: list[TaskRef] = []
    credential: str = ""  # the node's own credential, issued on its first registration
    policy: NodePolicy | None = None  # None: an older client that states no policy
    proof: str = ""  # HMAC of the join token over this connection's nonces (shared/proof.py)
    features: list[str] = []  # optional protocol features the client speaks (FEATURES)
    # How the node isolates process tasks: user+cgroup | user | none; "": an older client.
    isolation: Literal["", "user+cgroup", "user", "none"] = ""
    # Where its peers reach it (MESH_NODE_ADDRESS): a gang's MASTER_ADDR when it is rank 0;
    # "": the address it connected from. A host name or an IP literal.
    address: NodeAddress = ""


class Heartbeat(Msg, tag="heartbeat"):
    gpus: list[GpuInfo] = []
    cpu_pct: Percent = 0.0
    memory_used_mb: MiB = 0
    load1: Load = 0.0
    running: list[TaskRef] = []
    executors: list[str] | None = None  # the executors usable now (re-probed); None: unchanged
    health: str = ""  # why the node cannot run work now (work dir, disk); "" when healthy
    # `assign` messages this connection had delivered when `running` was read; -1: an older
    # client that does not count. A task whose assign came later is not missing from it.
    assigns: Annotated[int, msgspec.Meta(ge=-1, le=INT64_MAX)] = -1


class TaskAccepted(Msg, tag="task_accepted"):
    task_id: str
    attempt: NonNegInt
    master_port: Port = 0  # a gang's rank 0: the free port its node found for MASTER_PORT


class TaskStarted(Msg, tag="task_started"):
    task_id: str
    attempt: NonNegInt


class TaskLog(Msg, tag="task_log"):
    task_id: str
    attempt: NonNegInt
    data: str
    stream: str = "output"
    seq: NonNegInt = 0


class TaskOutcome(msgspec.Struct, kw_only=True, omit_defaults=True):
    exit_code: int | None = None
    output: str = ""  # the tail of stdout and stderr together
    duration_s: float = 0.0
    data: dict[str, Any] = {}  # structured results (the `test` task puts the node's GPUs here)
    energy_j: float | None = None
    artifacts: list[ArtifactRef] = []  # uploaded before this result was sent (shared/files.py)
    artifacts_cut: list[str] = []  # declared artifacts left out, and why (limits, not found)


class TaskResult(Msg, tag="task_result"):
    task_id: str
    attempt: NonNegInt
    status: Literal["completed", "failed"]
    result: TaskOutcome = msgspec.field(default_factory=TaskOutcome)
    error: str = ""
    infra: bool = False  # the attempt ended because of the node, not the task: run it elsewhere


# --- model serving (issue 27): replicas and HTTP streams over the node's own link --------
# A service replica is a task whose `assign` carries `service`; the node fills `{port}` with
# a free loopback port, runs it, checks its health path and reports `replica`. The
# coordinator then opens streams to it on this same WebSocket: each stream is one HTTP
# request to the engine on 127.0.0.1:{port}, answered by `stream_head`, `stream_data`
# chunks and one `stream_end`. Flow control is by credit: the node sends at most `window`
# bytes of `stream_data` (counted as the UTF-8 length of `data`) beyond what the
# coordinator granted back with `stream_credit`, so a slow caller stalls its stream, never
# the link or the coordinator's memory.
SERVE = "serve"
StreamId = Annotated[int, msgspec.Meta(ge=1, le=INT64_MAX)]
MAX_STREAM_BODY = 1 << 19  # a request body carried in `stream_open` (bytes of UTF-8)
MAX_STREAM_CHUNK = 1 << 16  # one `stream_data` chunk (bytes of UTF-8)
HttpStatus = Annotated[int, msgspec.Meta(ge=100, le=599)]


class ReplicaState(Msg, tag="replica"):
    """node -> coordinator: a replica's health, after each change."""

    task_id: str
    attempt: NonNegInt
    state: Literal["starting", "ready", "unhealthy"]
    port: Annotated[int, msgspec.Meta(ge=0, le=65535)] = 0
    reason: str = ""


class StreamHead(Msg, tag="stream_head"):
    """node -> coordinator: the engine's status line and content type."""

    stream: StreamId
    status: HttpStatus
    content_type: str = ""


class StreamData(Msg, tag="stream_data"):
    """node -> coordinator: the next chunk of the engine's body, passed through as it came."""

    stream: StreamId
    data: Annotated[str, msgspec.Meta(max_length=MAX_STREAM_CHUNK)]


class StreamEnd(Msg, tag="stream_end"):
    """node -> coordinator: the body is complete ("" error) or broke off (the reason)."""

    stream: StreamId
    error: str = ""


ClientMsg = (
    Register | Heartbeat | TaskAccepted | TaskStarted | TaskLog | TaskResult
    | ReplicaState | StreamHead | StreamData | StreamEnd
)

# Optional features, offered in `register.features` and accepted in `registered.features`;
# a peer that does not list one never receives it. "bundle": several messages in one frame
# (`bundle` below, each direction), in the order they were made, handled as if sent one by one.
BUNDLE = "bundle"
FEATURES = frozenset({BUNDLE, SERVE})  # SERVE: the messages of model serving
MAX_BUNDLE = 1024  # messages in one bundle; more is a bad frame


class ClientBundle(Msg, tag="bundle"):
    msgs: Annotated[
        list[
            Heartbeat | TaskAccepted | TaskStarted | TaskLog | TaskResult
            | ReplicaState | StreamHead | StreamData | StreamEnd
        ],
        msgspec.Meta(max_length=MAX_BUNDLE),
    ] = []


# --- coordinator -> client ---------------------------------------------------------------


class Registered(Msg, tag="registered"):
    node_id: str
    protocol: int = PROTOCOL_VERSION
    heartbeat_interval_s: float = 5.0
    keep: list[TaskRef] = []  # reported tasks whose attempt is current: carry on
    stop: list[TaskRef] = []  # reported tasks that were fenced off: stop and forget them
    credential: str = ""  # set on a node's first registration: keep it, present it from now on
    features: list[str] = []  # those of the register's `features` the coordinator will use


class ServiceRun(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What makes an `assign` a service replica (issue 27): the node picks a free loopback
    port, puts it where `{port}` appears (command, script, env), and checks `health_path`."""

    service: str
    model: str
    health_path: str = "/v1/models"


class GangRun(msgspec.Struct, kw_only=True, omit_defaults=True):
    """What makes an `assign` one member of a gang: torchrun's rendezvous. Rank 0's assign
    goes first with `master_port` 0: its node picks a free port, runs with it and reports
    it in `task_accepted`; the other ranks' assigns carry it."""

    gang_id: str
    rank: Annotated[int, msgspec.Meta(ge=0, lt=MAX_GANG_NODES)]
    nnodes: Annotated[int, msgspec.Meta(ge=2, le=MAX_GANG_NODES)]
    gpus_per_node: Annotated[int, msgspec.Meta(ge=0, le=MAX_GPUS)] = 0
    master_addr: NodeAddress = ""
    master_port: Port = 0
    node_addrs: Annotated[list[NodeAddress], msgspec.Meta(max_length=MAX_GANG_NODES)] = []


class Assign(Msg, tag="assign"):
    task_id: str
    attempt: NonNegInt
    task_type: str
    priority: int = 5
    executor: str = "builtin"  # builtin | process | docker
    gpu_indices: list[int] = []
    gpu_vendor: str = ""
    script: str | None = None
    command: list[str] | None = None
    image: str | None = None
    env: dict[str, str] = {}
    timeout_s: float | None = None
    volumes: list[str] = []
    shm_size: str | None = None
    cpus: float | None = None
    mem_limit: str | None = None
    params: dict[str, Any] = {}  # the submission's other fields, for task-type templates
    files: dict[str, FileContent] = {}  # written into the working dir first (shared/files.py)
    artifacts: list[str] = []  # paths or globs collected from the working dir afterwards
    tenant: str = ""  # the task's tenant ("default" with auth off): node policy owner_tenant
    service: ServiceRun | None = None  # set for a model service's replica (issue 27)
    gang: GangRun | None = None  # set for a gang's member (issue 28)


class StreamOpen(Msg, tag="stream_open"):
    """coordinator -> node: one HTTP request to a replica it runs (current attempt only)."""

    stream: StreamId
    task_id: str
    attempt: NonNegInt
    path: str  # origin-form under /v1/ (the node refuses anything else)
    method: Literal["GET", "POST"] = "POST"
    content_type: str = "application/json"
    body: Annotated[str, msgspec.Meta(max_length=MAX_STREAM_BODY)] = ""
    window: Annotated[int, msgspec.Meta(ge=1, le=1 << 30)] = 1 << 20  # bytes before credit


class StreamCredit(Msg, tag="stream_credit"):
    """coordinator -> node: the caller took `bytes` more of the stream: send that much more."""

    stream: StreamId
    bytes: Annotated[int, msgspec.Meta(ge=1, le=1 << 30)]


class StreamCancel(Msg, tag="stream_cancel"):
    """coordinator -> node: the caller went away: abort the engine's request."""

    stream: StreamId
    reason: str = ""


class Cancel(Msg, tag="cancel"):
    task_id: str
    attempt: NonNegInt
    reason: str = ""
    # SIGTERM to SIGKILL, seconds; 0: the node's own (preemption sends MESH_PREEMPT_GRACE_S)
    grace_s: Annotated[float, msgspec.Meta(ge=0, le=600)] = 0.0


class Ack(Msg, tag="ack"):
    """A task_result was written durably; the client may forget it."""

    task_id: str
    attempt: NonNegInt


class Drain(Msg, tag="drain"):
    """An admin drained this node: finish what runs, expect no new work (the coordinator
    sends none). `lifted`: the drain is over (undrain). Sent again after every register."""

    reason: str = ""
    lifted: bool = False


class Error(Msg, tag="error"):
    reason: str
    code: str = "bad_message"  # bad_message | not_registered | stale_attempt | unknown_task
    task_id: str | None = None
    attempt: int | None = None


ServerMsg = (
    Registered | Assign | Cancel | Ack | Drain | Error | StreamOpen | StreamCredit | StreamCancel
)


class ServerBundle(Msg, tag="bundle"):
    msgs: Annotated[
        list[
            Registered | Assign | Cancel | Ack | Drain | Error
            | StreamOpen | StreamCredit | StreamCancel
        ],
        msgspec.Meta(max_length=MAX_BUNDLE),
    ] = []


def bundle_frame(frames: list[bytes]) -> bytes:
    """One `bundle` frame of already encoded messages (each a JSON object): no re-encoding."""
    return b'{"type":"bundle","msgs":[' + b",".join(frames) + b"]}"


class BadMessage(msgspec.Struct, frozen=True):
    """A frame that did not decode; `reason` says why, in msgspec's words."""

    reason: str


# Annotated: mypy cannot read the decoded type from a union passed as a value.
_client_decoder: msgspec.json.Decoder[ClientMsg | ClientBundle] = msgspec.json.Decoder(
    ClientMsg | ClientBundle
)
_server_decoder: msgspec.json.Decoder[ServerMsg | ServerBundle] = msgspec.json.Decoder(
    ServerMsg | ServerBundle
)
_encoder = msgspec.json.Encoder()


# The decoder follows nesting on the C stack, guarded by Python's recursion limit: a frame
# nested past it (`[[[[...` 5,000 deep fits in a few KiB) raises RecursionError. That is
# a bad frame like any other; what does decode is still walked by shared/limits.py, which
# refuses more than 32 levels in anything kept.
TOO_DEEP = "JSON nested too deeply to decode (values may nest 32 levels)"


def decode_client(raw: bytes | str) -> ClientMsg | ClientBundle | BadMessage:
    try:
        return _client_decoder.decode(raw)
    except msgspec.DecodeError as exc:  # ValidationError is a subclass
        return BadMessage(str(exc))
    except RecursionError:
        return BadMessage(TOO_DEEP)


def decode_server(raw: bytes | str) -> ServerMsg | ServerBundle | BadMessage:
    try:
        return _server_decoder.decode(raw)
    except msgspec.DecodeError as exc:
        return BadMessage(str(exc))
    except RecursionError:
        return BadMessage(TOO_DEEP)


def encode(msg: Msg) -> bytes:
    return _encoder.encode(msg)


_scratch = threading.local()


def encode_exact(msg: Msg) -> bytes:
    """`encode`, into a reused buffer and copied out at its exact size, for frames that wait
    in a queue. `encode` hands back its growing buffer, which keeps up to a few KiB of slack
    per frame on the heap: 10,000 queued frames of 7 KiB held 1.5x their length in RSS."""
    buf: bytearray | None = getattr(_scratch, "buf", None)
    if buf is None:
        buf = _scratch.buf = bytearray()
    _encoder.encode_into(msg, buf)
    return bytes(buf)

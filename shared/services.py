"""What a model service is: the spec users POST to `/services` (issue 27), checked at the edge.

A service is a durable, tenant-owned spec; its replicas are tasks the coordinator's control
plane (coordinator/core/services.py) submits and keeps. What a replica runs is an `engine`
template (`[engine.NAME]` in the templates file, coordinator/web/engines.py) or a custom
`command`, `script` or `image`, in which `{port}` is filled by the NODE with a free loopback
port it then health-checks and forwards requests to.

`service_problem` is every check a decoded spec needs beyond its types, each refusal naming
the field (`$.replicas.max: ...`), as the API answers it with 422.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

import msgspec

from shared.limits import refusal
from shared.protocol import valid_node_name
from shared.tasks import Priority, Requirements, image_problem

MAX_REPLICAS = 64  # replicas of one service, at most (`replicas.max`)
MAX_MODEL = 200  # characters in a model name (what OpenAI clients send as `model`)
MAX_HEALTH_PATH = 512  # characters in a health path
MAX_IDLE_S = 7 * 86400.0  # `idle_s`: a week at most
MAX_TARGET_ONGOING = 10_000  # `target_ongoing`: requests in flight per replica
PORT = "{port}"  # what the node replaces with the replica's loopback port
DEFAULT_HEALTH_PATH = "/v1/models"  # a custom service's, or an engine's that names none
# The label the coordinator gives a node that speaks the "serve" protocol feature, and that
# every replica requires: a client too old to run replicas is never sent one.
SERVE_LABEL = "gpumesh.serve"

# origin-form (RFC 9112 3.2.1): an absolute path and an optional query, printable ASCII only
_ORIGIN_FORM = re.compile(r"/[!#-~]*")
_MODEL = re.compile(r"[^\x00-\x1f\x7f]+")


class Replicas(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    min: Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)] = 1
    max: Annotated[int, msgspec.Meta(ge=0, le=MAX_REPLICAS)] = 1


class ServiceSpec(msgspec.Struct, kw_only=True, omit_defaults=True, forbid_unknown_fields=True):
    """The body of `POST /services` and `PUT /services/{name}`."""

    name: str
    model: str
    engine: str = ""  # a template in the templates file's [engine.*]: llama_cpp, vllm
    command: list[str] | None = None
    script: str | None = None
    image: str | None = None
    executor: Literal["", "process", "docker"] = ""  # "": from the engine or the shape
    requirements: Requirements = msgspec.field(default_factory=Requirements)
    replicas: Replicas = msgspec.field(default_factory=Replicas)
    health_path: str = ""  # "": the engine's (`health_path` in its template), else /v1/models
    idle_s: Annotated[float, msgspec.Meta(ge=1, le=MAX_IDLE_S)] = 300.0
    target_ongoing: Annotated[int, msgspec.Meta(ge=1, le=MAX_TARGET_ONGOING)] = 8
    routing: Literal["least", "prefix"] = "least"
    env: dict[str, str] = {}
    params: dict[str, Any] = {}  # values for the engine template's placeholders
    priority: Priority = 5


def decode_service(body: bytes) -> ServiceSpec | str:
    """The spec in a request body, or why not (naming the field), as a 422 says it."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError as exc:  # JSON that does not parse, or nested past decoding
        return str(exc)
    if why := refusal(doc, "$"):  # what the store and a node could not hold (depth, ints)
        return why
    try:
        spec = msgspec.convert(doc, ServiceSpec)
    except msgspec.ValidationError as exc:  # "... - at `$.replicas.min`"
        return str(exc)
    return service_problem(spec) or spec


def service_problem(spec: ServiceSpec) -> str | None:
    """Why this (decoded) spec cannot be a service, naming the field; None when it can."""
    if not valid_node_name(spec.name):
        return ("$.name: 1-63 of A-Z a-z 0-9 . _ - starting with a letter or digit "
                f"(like a node name), got {spec.name[:80]!r}")
    if not 1 <= len(spec.model) <= MAX_MODEL or not _MODEL.fullmatch(spec.model):
        return f"$.model: 1-{MAX_MODEL} printable characters, got {spec.model[:80]!r}"
    if spec.replicas.min > spec.replicas.max:
        return (f"$.replicas.min: {spec.replicas.min} is more than replicas.max "
                f"{spec.replicas.max}")
    if spec.replicas.max < 1:
        return "$.replicas.max: at least 1, or the service can never serve"
    if spec.health_path and (len(spec.health_path) > MAX_HEALTH_PATH
                             or not _ORIGIN_FORM.fullmatch(spec.health_path)):
        return ("$.health_path: a path under / in origin-form (printable ASCII, no spaces, "
                f"at most {MAX_HEALTH_PATH} characters), got {spec.health_path[:80]!r}")
    given = [f for f in ("engine", "command", "script", "image") if getattr(spec, f)]
    if not given:
        return "$: a service needs an `engine`, a `command`, a `script` or an `image`"
    if spec.engine and len(given) > 1:
        return f"$.engine: give an `engine` or a custom {'/'.join(given[1:])}, not both"
    if spec.command is not None and spec.script is not None:
        return "$.script: give either `script` or `command`, not both"
    if spec.command is not None and not spec.command:
        return "$.command: must not be empty"
    if spec.image is not None and (why := image_problem(spec.image)):
        return f"$.image: {why}"
    if not spec.engine:
        texts = [*(spec.command or ()), spec.script or "", *spec.env.values()]
        if not any(PORT in text for text in texts):
            which = "command" if spec.command is not None else "script" if spec.script else "env"
            return (f"$.{which}: a custom service must put `{PORT}` in its command, script or "
                    "an env value: the loopback port the node picks for the replica (its "
                    "health check and requests go there)")
    if spec.requirements.executor and spec.executor and (
            spec.requirements.executor != spec.executor):
        return (f"$.requirements.executor: {spec.requirements.executor!r} differs from "
                f"$.executor {spec.executor!r}")
    return None

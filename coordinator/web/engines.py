"""Engine templates of model services (issue 27): `[engine.NAME]` in the templates file.

A sibling of coordinator/web/templates.py (task types) that reads the same TOML file: an
engine names its `executor`, an `image` (docker) or none (process), a `command` or `script`,
`env`, default `requirements` and `params` (defaults for its placeholders). `replica_task`
turns a service spec into the task its replicas run: the engine's placeholders filled from
the service's `params`, its `model` and these defaults; `{port}` stays for the node to fill.
A custom service (`command`, `script` or `image`) is taken as it is.

The filled task is checked like a submitted one (shared/tasks.py `launch_problem`, the
assign frame's size), so a service no node could start is a 422 naming the field.
"""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

import msgspec

from coordinator.web.edge import frame_refusal, launch_refusal
from coordinator.web.templates import DEFAULT_PATH, TemplateError, _fields, _fill
from shared.services import DEFAULT_HEALTH_PATH, PORT, SERVE_LABEL, ServiceSpec
from shared.tasks import Requirements, TaskSubmit


class EngineTemplate(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    executor: Literal["process", "docker"]
    description: str = ""
    image: str | None = None
    command: list[str] | None = None
    script: str | None = None
    env: dict[str, str] = {}
    params: dict[str, Any] = {}
    requirements: Requirements = msgspec.field(default_factory=Requirements)
    shm_size: str | None = None
    volumes: list[str] = []
    health_path: str = ""  # what the node polls when the service names none

    def __post_init__(self) -> None:
        if self.health_path and not self.health_path.startswith("/"):
            raise ValueError("an engine's `health_path` is a path under /")
        if (self.command is None) == (self.script is None):
            raise ValueError("an engine needs either `command` or `script`")
        if self.executor == "docker" and not self.image:
            raise ValueError("a docker engine needs an `image`")
        if not any(PORT in t for t in self._texts()):
            raise ValueError(f"an engine must put {PORT} in its command, script or env")
        for text in self._texts():
            _fields(text)  # raises on a malformed placeholder

    def _texts(self) -> list[str]:
        return [self.image or "", *(self.command or []), self.script or "",
                *self.env.values(), *self.volumes]

    def placeholders(self) -> set[str]:
        return {name for text in self._texts() for name in _fields(text)}


Engines = Mapping[str, EngineTemplate]


def load_engines(path: Path | str | None = None) -> Engines:
    """The `[engine.*]` tables of a templates file; raises TemplateError saying where."""
    p = DEFAULT_PATH if path is None else Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(f"templates file {p}: {exc}") from exc
    try:
        return msgspec.convert(doc.get("engine", {}), dict[str, EngineTemplate])
    except msgspec.ValidationError as exc:
        raise TemplateError(f"templates file {p}: [engine] {exc}") from exc


def replica_task(spec: ServiceSpec, engines: Engines, tenant: str) -> TaskSubmit | str:
    """The task every replica of `spec` runs, or why none can (naming the field: a 422)."""
    if spec.engine:
        engine = engines.get(spec.engine)
        if engine is None:
            known = ", ".join(sorted(engines)) or "none"
            return f"$.engine: no engine {spec.engine!r} in the templates file (known: {known})"
        try:
            doc = _from_engine(spec, engine)
        except TemplateError as exc:
            return str(exc)
    else:
        doc = {"command": spec.command, "script": spec.script, "image": spec.image,
               "env": spec.env, "requirements": msgspec.to_builtins(spec.requirements)}
    executor = spec.executor or spec.requirements.executor or doc.pop("executor", "")
    req = doc["requirements"]
    if executor:
        req = {**req, "executor": executor}
    # only a node that runs replicas (coordinator/core/nodes.py gives it this label)
    doc["requirements"] = {**req, "labels": {**req.get("labels", {}), SERVE_LABEL: "1"}}
    doc.update(task_type="custom", priority=spec.priority, tenant=tenant,
               name=f"service {spec.name}", max_attempts=100)
    try:
        task = msgspec.convert({k: v for k, v in doc.items() if v is not None}, TaskSubmit)
    except (msgspec.ValidationError, ValueError) as exc:
        return f"$: {exc}"
    return launch_refusal(task, "$") or frame_refusal(task, spec.params, "$") or task


def with_health_path(spec: ServiceSpec, engines: Engines) -> ServiceSpec:
    """The spec with the path its node polls: its own, else its engine's, else /v1/models."""
    if spec.health_path:
        return spec
    engine = engines.get(spec.engine) if spec.engine else None
    path = (engine.health_path if engine is not None else "") or DEFAULT_HEALTH_PATH
    return msgspec.structs.replace(spec, health_path=path)


def _from_engine(spec: ServiceSpec, engine: EngineTemplate) -> dict[str, Any]:
    values = {**engine.params, **spec.params, "model": spec.model, "port": PORT}
    missing = sorted(n for n in engine.placeholders() if n not in values)
    if missing:
        names = ", ".join(f"`{n}`" for n in missing)
        raise TemplateError(f"$.params: engine {spec.engine} needs {names}")
    req: dict[str, Any] = msgspec.to_builtins(engine.requirements)
    req.update(msgspec.to_builtins(spec.requirements))  # omit_defaults: only what was set
    return {
        "executor": engine.executor,
        "image": _fill(engine.image, values) if engine.image else None,
        "command": [_fill(a, values) for a in engine.command] if engine.command else None,
        "script": _fill(engine.script, values, quote=True) if engine.script else None,
        "env": {**{k: _fill(v, values) for k, v in engine.env.items()}, **spec.env},
        "volumes": [_fill(v, values) for v in engine.volumes],
        "shm_size": engine.shm_size,
        "requirements": req,
    }

"""Task-type templates: what `llm_inference`, `training` and `embeddings` run, from a TOML file.

A template names an image, a `command` (argv) or `script`, `env`, default `requirements`,
resources and `params` (default values for its placeholders). `apply_template` fills the
template's `{name}` placeholders from the submission's own top-level fields (its `params`:
`model`, `prompt`, `epochs`, ...) and the template's defaults, then lets the submission's
explicit fields win:

- `image`, `timeout_s`, `shm_size`, `cpus`, `mem_limit`, `volumes`: the submission's when given;
- `command`/`script`: a submission giving either replaces the template's whole command;
- `env`: merged, the submission's keys win;
- `requirements`: each field the submission left at its default takes the template's value
  (so `{"gpu_type": "A100"}` keeps the template's `gpu_count`; a zero counts as not given).

Values fill `command` and `env` as plain text, one argv element or variable each (lists and
objects as JSON), so no shell ever parses them; in a `script` they are shell-quoted. `{{` and
`}}` are literal braces. A placeholder with neither a value nor a default is a
`TemplateError` naming it, which the API answers with 422.

The packaged defaults are `coordinator/web/templates.toml`; `MESH_TEMPLATES` names another file
(the compose profile mounts `profiles/templates.toml`, the copy users edit).
"""

from __future__ import annotations

import difflib
import json
import shlex
import string
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import msgspec

from shared.files import script_command
from shared.tasks import (
    SUBMIT_FIELDS,
    TASK_TYPES,
    TEMPLATE_TYPES,
    Requirements,
    TaskSubmit,
    executor_for,
    split_submission,
)

DEFAULT_PATH = Path(__file__).with_name("templates.toml")
ENV_VAR = "MESH_TEMPLATES"


class TemplateError(ValueError):
    """A submission cannot fill its template, or a templates file is malformed."""


class Template(msgspec.Struct, kw_only=True, frozen=True, forbid_unknown_fields=True):
    image: str
    description: str = ""
    command: list[str] | None = None
    script: str | None = None
    env: dict[str, str] = {}
    params: dict[str, Any] = {}  # defaults for placeholders
    requirements: Requirements = msgspec.field(default_factory=Requirements)
    timeout_s: float | None = None
    shm_size: str | None = None
    cpus: float | None = None
    mem_limit: str | None = None
    volumes: list[str] = []

    def __post_init__(self) -> None:
        if self.command is not None and self.script is not None:
            raise ValueError("give either `command` or `script`, not both")
        for text in self._texts():
            _fields(text)  # raises on a malformed placeholder

    def _texts(self) -> list[str]:
        return [self.image, *(self.command or []), self.script or "", *self.env.values(),
                *self.volumes]

    def placeholders(self) -> set[str]:
        return {name for text in self._texts() for name in _fields(text)}


Templates = Mapping[str, Template]


def templates_path(env: Mapping[str, str]) -> Path:
    """The templates file to load: `MESH_TEMPLATES`, else the packaged defaults."""
    raw = env.get(ENV_VAR, "").strip()
    return Path(raw) if raw else DEFAULT_PATH


def load_templates(path: Path | str | None = None) -> Templates:
    """Read and check a templates file; raises TemplateError saying what is wrong where."""
    p = DEFAULT_PATH if path is None else Path(path)
    try:
        doc = tomllib.loads(p.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise TemplateError(f"templates file {p}: {exc}") from exc
    doc.pop("engine", None)  # model services' engines: coordinator/web/engines.py
    try:
        return msgspec.convert(doc, dict[str, Template])
    except msgspec.ValidationError as exc:
        raise TemplateError(f"templates file {p}: {exc}") from exc


REQUIREMENT_KEYS: frozenset[str] = frozenset(Requirements.__struct_fields__)


def parse_submission(
    body: dict[str, Any], templates: Templates
) -> tuple[TaskSubmit, dict[str, Any]]:
    """One submitted object as a filled spec and its params; raises TemplateError (422).

    The seed puts task parameters inside `requirements` (`"model": "llama-70b"`, `"epochs":
    10`, `"batch_size": 32`): a key there that is not a placement constraint but is a known
    parameter of the task type moves to the params (a top-level field of the same name wins).
    A key that is neither, there or at the top level of a type with a fixed parameter set
    (the template types), is refused with the valid keys, so `gpu_cout: 4` cannot run a task
    without its GPU. `custom` and `test` tasks keep any top-level field as a param (`test`
    echoes its params back).
    """
    if body.get("task_type") not in TASK_TYPES and "task_type" in body:
        kinds = ", ".join(TASK_TYPES)
        raise TemplateError(
            f"unknown task_type {body['task_type']!r} - at `$.task_type`: the types are {kinds}"
        )
    spec, params = split_submission(body)
    known = known_params(spec.task_type, templates)
    raw_req = body.get("requirements")
    inside = {k: v for k, v in raw_req.items() if k not in REQUIREMENT_KEYS} if isinstance(
        raw_req, dict) else {}
    strict = known is not None
    for where, keys in (("requirements", inside), ("", params if strict else {})):
        for key in keys:
            if known is None or key not in known:
                raise TemplateError(_unknown_key(spec.task_type, key, where, known or set()))
    return apply_template(spec, {**inside, **params}, templates)


def known_params(task_type: str, templates: Templates) -> set[str] | None:
    """The parameters a task type reads, or None where any top-level field is allowed."""
    tpl = templates.get(task_type)
    if tpl is not None:
        return tpl.placeholders() | set(tpl.params)
    if task_type in TEMPLATE_TYPES:
        return set()
    return None


def _unknown_key(task_type: str, key: str, where: str, known: set[str]) -> str:
    place = f"in `requirements` of a {task_type} task" if where else f"in a {task_type} task"
    pool = sorted(REQUIREMENT_KEYS | known) if where else sorted(SUBMIT_FIELDS - {"type"} | known)
    hint = difflib.get_close_matches(key, pool, n=1)
    guess = f" (did you mean `{hint[0]}`?)" if hint else ""
    reqs = ", ".join(sorted(REQUIREMENT_KEYS))
    kinds = ", ".join(sorted(known)) or "none"
    if where and task_type not in TEMPLATE_TYPES:
        return (f"unknown key `{key}` {place}{guess}: requirements are {reqs}; "
                f"give task parameters as top-level fields")
    if where:
        return (f"unknown key `{key}` {place}{guess}: requirements are {reqs}; "
                f"parameters of {task_type} are {kinds}")
    fields = ", ".join(sorted(SUBMIT_FIELDS - {"type"}))
    return (f"unknown field `{key}` {place}{guess}: fields are {fields}; "
            f"parameters of {task_type} are {kinds}")


def apply_template(
    spec: TaskSubmit, params: dict[str, Any], templates: Templates
) -> tuple[TaskSubmit, dict[str, Any]]:
    """The submission with its task type's template filled in, and its params with defaults.

    Task types without a template come back unchanged. Raises TemplateError (a ValueError)
    when a placeholder has no value, or when a template type has no template and no image.
    """
    tpl = templates.get(spec.task_type)
    if tpl is None:
        if spec.task_type in TEMPLATE_TYPES and not spec.image:
            raise TemplateError(
                f"no template for task type {spec.task_type}: give an `image` and a `command`"
            )
        return with_script_file(spec), params
    values = {**tpl.params, **params}
    missing = sorted(n for n in _used(tpl, spec) if n not in values)
    if missing:
        names = ", ".join(f"`{n}`" for n in missing)
        them = "it as a top-level field" if len(missing) == 1 else "them as top-level fields"
        raise TemplateError(f"task type {spec.task_type} needs {names}: give {them}")
    doc: dict[str, Any] = msgspec.to_builtins(spec)
    if spec.command is None and spec.script is None:
        if tpl.command is not None:
            doc["command"] = [_fill(a, values) for a in tpl.command]
        elif tpl.script is not None:
            doc["script"] = _fill(tpl.script, values, quote=True)
    doc["image"] = spec.image or _fill(tpl.image, values)
    doc["env"] = {**{k: _fill(v, values) for k, v in tpl.env.items()}, **spec.env}
    doc["volumes"] = spec.volumes or [_fill(v, values) for v in tpl.volumes]
    for name in ("timeout_s", "shm_size", "cpus", "mem_limit"):
        if getattr(spec, name) is None and getattr(tpl, name) is not None:
            doc[name] = getattr(tpl, name)
    doc["requirements"] = _requirements(spec.requirements, tpl.requirements)
    try:
        filled = msgspec.convert(doc, TaskSubmit)
    except msgspec.ValidationError as exc:
        raise TemplateError(f"template {spec.task_type}: {exc}") from exc
    # a submission's own `script` naming a sent file runs it, as for `custom`
    return (with_script_file(filled) if spec.script is not None else filled), values


def _used(tpl: Template, spec: TaskSubmit) -> set[str]:
    """The placeholders this submission will fill: not those of fields it replaces."""
    texts = [v for k, v in tpl.env.items() if k not in spec.env]
    if spec.command is None and spec.script is None:
        texts += [*(tpl.command or []), tpl.script or ""]
    if not spec.image:
        texts.append(tpl.image)
    if not spec.volumes:
        texts += tpl.volumes
    return {name for text in texts for name in _fields(text)}


def _requirements(given: Requirements, defaults: Requirements) -> dict[str, Any]:
    out: dict[str, Any] = msgspec.to_builtins(defaults)
    out.update(msgspec.to_builtins(given))  # omit_defaults: only what the submission set
    return out


_formatter = string.Formatter()


def _fields(text: str) -> list[str]:
    """The placeholder names in `text`; raises TemplateError for anything but `{name}`."""
    try:
        parsed = list(_formatter.parse(text))
    except ValueError as exc:
        raise TemplateError(f"bad placeholder in {text!r}: {exc}") from exc
    names = []
    for _, name, spec, conversion in parsed:
        if name is None:
            continue
        if not name.isidentifier() or spec or conversion:
            raise TemplateError(f"bad placeholder {{{name}}} in {text!r}: use {{name}} only")
        names.append(name)
    return names


def _fill(text: str, values: Mapping[str, Any], *, quote: bool = False) -> str:
    parts = []
    for literal, name, _, _ in _formatter.parse(text):
        parts.append(literal)
        if name is not None:
            value = _text(values[name])
            parts.append(shlex.quote(value) if quote else value)
    return "".join(parts)


def _text(value: Any) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return str(value)
    return json.dumps(value, separators=(",", ":"))


def with_script_file(spec: TaskSubmit) -> TaskSubmit:
    """A `script` that names a sent file (`"script": "train_model.py"`) runs that file with the
    interpreter its name implies (shared/files.py `script_command`), or, not sent, from the
    working dir if it is there (in an image), else the task fails saying to send it."""
    if spec.script is None:
        return spec
    try:
        command = script_command(spec.script, spec.files, executor_for(spec))
    except ValueError as exc:
        raise TemplateError(str(exc)) from exc
    return spec if command is None else msgspec.structs.replace(spec, script=command)

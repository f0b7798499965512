"""What the store and the peers can hold, checked at the edge before any state changes.

One walk over a decoded JSON value (`refusal`) refuses what would fail later, far from its
cause: integers outside the signed 64-bit range (orjson raises "Integer exceeds 64-bit
range" beyond [-2**63, 2**64-1] and SQLite/PostgreSQL hold signed 64-bit; msgspec encodes
any int, so the narrower bound is the one that agrees everywhere), nesting deeper than
MAX_DEPTH (orjson gives up at 255 levels with "Recursion limit reached", msgspec's decoder
near 1000), strings longer than a limit, and values whose encoded size would be too large.
A refusal is a sentence that names the field path and the limit:
``$.params.x: nesting deeper than 32``.

`message_refusal` applies it to every client-message field the coordinator keeps, with the
tighter bound for names (ids, hostnames, labels, GPU names): what a node can make us store.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from typing import Any

import msgspec

from shared.protocol import (
    MAX_FRAME_BYTES,
    MAX_GPUS,
    Heartbeat,
    Msg,
    Register,
    TaskLog,
    TaskResult,
)

INT_MIN, INT_MAX = -(2**63), 2**63 - 1
MAX_DEPTH = 32  # containers inside containers, the top-level value counting as 1
MAX_STRING = MAX_FRAME_BYTES  # characters in any string: more can never reach a node
MAX_BYTES = MAX_FRAME_BYTES  # an estimate of the encoded size of one value
MAX_NAME = 256  # characters in a name: task ids, node names, hostnames, labels, GPU names
MAX_LABELS = 64  # entries in a label map
MAX_REFS = 10_000  # task references in one register or heartbeat


def refusal(
    value: Any,
    path: str = "$",
    *,
    max_depth: int = MAX_DEPTH,
    max_string: int = MAX_STRING,
    max_bytes: int = MAX_BYTES,
) -> str | None:
    """Why `value` (decoded JSON: dict, list, str, int, float, bool, None) cannot be kept,
    or None when it can. Iterative, so a hostile depth cannot exhaust the Python stack.

    It runs on every submitted task and every result, so the walk keeps no path strings:
    an entry holds its parent's entry and its key, and the path is spelled out only for
    a refusal."""
    size = 0
    stack: list[tuple[Any, int, Any]] = [(value, 1, None)]
    pop, push = stack.pop, stack.append
    while stack:
        v, depth, at = pop()
        kind = type(v)
        if kind is str:
            if len(v) > max_string:
                return f"{_path(path, at)}: string longer than {max_string} characters"
            size += len(v) + 2
        elif kind is dict:
            if depth > max_depth:
                return f"{_path(path, at)}: nesting deeper than {max_depth}"
            size += 2
            for k, item in v.items():
                key = k if type(k) is str else str(k)
                if len(key) > max_string:
                    return f"{_path(path, at)}: key longer than {max_string} characters"
                size += len(key) + 4
                push((item, depth + 1, (at, key)))
        elif kind is list:
            if depth > max_depth:
                return f"{_path(path, at)}: nesting deeper than {max_depth}"
            size += 2 + len(v)
            for i, item in enumerate(v):
                push((item, depth + 1, (at, i)))
        elif v is None or kind is bool:
            size += 5
        elif kind is int:
            if not INT_MIN <= v <= INT_MAX:
                return (f"{_path(path, at)}: integer outside the signed 64-bit range "
                        "[-2**63, 2**63-1]")
            size += 20
        elif kind is float:
            size += 24
        else:
            why = _subclass_refusal(v, path, at, max_string)
            if why is not None:
                return why
            size += _subclass_size(v)
            if isinstance(v, dict | list):
                if depth > max_depth:
                    return f"{_path(path, at)}: nesting deeper than {max_depth}"
                items = v.items() if isinstance(v, dict) else enumerate(v)
                for k, item in items:
                    push((item, depth + 1, (at, str(k) if isinstance(v, dict) else k)))
        if size > max_bytes:
            return f"{_path(path, at)}: value larger than {max_bytes} bytes"
    return None


def _subclass_refusal(v: Any, path: str, at: Any, max_string: int) -> str | None:
    """A subclass of a JSON type (an IntEnum, a str subclass): judged as its base type."""
    if isinstance(v, str):
        if len(v) > max_string:
            return f"{_path(path, at)}: string longer than {max_string} characters"
    elif isinstance(v, bool):
        pass
    elif isinstance(v, int):
        if not INT_MIN <= v <= INT_MAX:
            return f"{_path(path, at)}: integer outside the signed 64-bit range [-2**63, 2**63-1]"
    elif isinstance(v, dict):
        for k in v:
            if len(str(k)) > max_string:
                return f"{_path(path, at)}: key longer than {max_string} characters"
    elif not isinstance(v, float | list):
        return f"{_path(path, at)}: {type(v).__name__} is not a JSON value"
    return None


def _subclass_size(v: Any) -> int:
    if isinstance(v, str):
        return len(v) + 2
    if isinstance(v, bool):
        return 5
    if isinstance(v, int):
        return 20
    if isinstance(v, float):
        return 24
    if isinstance(v, dict):
        return 2 + sum(len(str(k)) + 4 for k in v)
    return 2 + len(v)


def _path(root: str, at: Any) -> str:
    """Spell out the path of a walk entry: `at` is None (the root) or (parent, key)."""
    keys = []
    while at is not None:
        at, key = at
        keys.append(key)
    where = root
    for key in reversed(keys):
        where = f"{where}[{key}]" if type(key) is int else _child(where, key)
    return where


def _child(where: str, key: str) -> str:
    if key.isidentifier():
        return f"{where}.{key}"
    return f"{where}[{key[:40]!r}]"


def name_refusal(value: str, where: str, limit: int = MAX_NAME) -> str | None:
    return f"{where}: longer than {limit} characters" if len(value) > limit else None


def labels_refusal(labels: dict[str, str], where: str) -> str | None:
    if len(labels) > MAX_LABELS:
        return f"{where}: more than {MAX_LABELS} labels"
    for k, v in labels.items():
        why = name_refusal(k, f"{where} key") or name_refusal(v, _child(where, k))
        if why:
            return why
    return None


def message_refusal(msg: Msg) -> str | None:
    """Why a decoded client message cannot be kept, naming the field and the limit."""
    task_id = getattr(msg, "task_id", None)
    if isinstance(task_id, str) and (why := name_refusal(task_id, "$.task_id")):
        return why
    if isinstance(msg, TaskResult):
        try:
            result = msgspec.to_builtins(msg.result)
        except RecursionError:  # decoded just under the limit, copied from deeper in the stack
            return f"$.result: nesting deeper than {MAX_DEPTH}"
        return refusal(result, "$.result") or refusal(msg.error, "$.error")
    if isinstance(msg, TaskLog):
        return name_refusal(msg.stream, "$.stream") or refusal(msg.data, "$.data")
    if isinstance(msg, Register):
        return _register_refusal(msg)
    if isinstance(msg, Heartbeat):
        return (
            _gpus_refusal(msg.gpus)
            or _refs_refusal(msg.running)
            or _names_refusal(msg.executors, "$.executors")
            or name_refusal(msg.health, "$.health", 4096)
        )
    return None


def _register_refusal(msg: Register) -> str | None:
    info = msg.node_info
    for field in ("token", "hostname", "role", "version"):
        limit = 4096 if field == "token" else MAX_NAME
        if why := name_refusal(getattr(msg, field), f"$.{field}", limit):
            return why
    if info is not None and (why := name_refusal(info.gpu_type, "$.node_info.gpu_type")):
        return why
    if info is not None and info.gpu_count > MAX_GPUS:
        return f"$.node_info.gpu_count: more than {MAX_GPUS}"
    policy = getattr(msg, "policy", None)
    if policy is not None and (why := refusal(msgspec.to_builtins(policy), "$.policy",
                                              max_string=4096, max_bytes=64 << 10)):
        return why
    return (
        name_refusal(getattr(msg, "credential", ""), "$.credential", 4096)
        or labels_refusal(msg.labels, "$.labels")
        or _gpus_refusal(msg.gpus)
        or _refs_refusal(msg.running)
        or _names_refusal(msg.executors, "$.executors")
    )


def _gpus_refusal(gpus: list[Any]) -> str | None:
    if len(gpus) > MAX_GPUS:
        return f"$.gpus: more than {MAX_GPUS} GPUs"
    for i, g in enumerate(gpus):
        for field in ("name", "vendor", "uuid", "compute_capability", "fault"):
            if why := name_refusal(getattr(g, field), f"$.gpus[{i}].{field}"):
                return why
        for field in ("index", "memory_total_mb", "memory_used_mb", "parent_index"):
            v = getattr(g, field)
            if v is not None and not INT_MIN <= v <= INT_MAX:
                return f"$.gpus[{i}].{field}: integer outside the signed 64-bit range"
    return None


def _refs_refusal(refs: list[Any]) -> str | None:
    if len(refs) > MAX_REFS:
        return f"$.running: more than {MAX_REFS} tasks"
    for i, ref in enumerate(refs):
        if why := name_refusal(ref.task_id, f"$.running[{i}].task_id"):
            return why
    return None


def _names_refusal(names: list[str] | None, where: str) -> str | None:
    if names is None:
        return None
    if len(names) > MAX_LABELS:
        return f"{where}: more than {MAX_LABELS} entries"
    for i, n in enumerate(names):
        if why := name_refusal(n, f"{where}[{i}]"):
            return why
    return None


class NodeLogLimit(logging.Filter):
    """A filter for the loggers that write about nodes: a WARNING that names a node
    (`extra={"node": name}`) passes at most `burst` times per `interval_s` for each (node,
    message); the first one let through after that says how many were held back. Whatever
    one node sends, it cannot make the coordinator warn faster than that. INFO lines (task
    transitions, which name their node too) and errors pass untouched. At most `max_keys`
    (node, message) pairs are remembered, the oldest forgotten first."""

    def __init__(self, burst: int = 10, interval_s: float = 10.0, max_keys: int = 10_000) -> None:
        super().__init__()
        self.burst, self.interval_s, self.max_keys = burst, interval_s, max_keys
        # (node, message) -> [window start, records passed in it, records held back]
        self._seen: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self.held = 0  # records held back in all

    def filter(self, record: logging.LogRecord) -> bool:
        node = getattr(record, "node", None)
        if node is None or record.levelno != logging.WARNING:
            return True
        key = (str(node), str(record.msg))
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            if seen[1] < self.burst:
                seen[1] += 1
                return True
            seen[2] += 1
            self.held += 1
            return False
        self._seen[key] = [now, 1, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        if seen is not None and seen[2]:
            record.msg = (f"{record.msg} ({int(seen[2])} more like it about this node in the "
                          f"last {self.interval_s:g}s not logged)")
        return True


class Throttled:
    """Log a repeated refusal once per `interval_s` per key (a node), not once per frame;
    the next line says how many were held back. At most `max_keys` keys are remembered."""

    def __init__(
        self, logger: logging.Logger, interval_s: float = 10.0, max_keys: int = 10_000
    ) -> None:
        self.logger, self.interval_s, self.max_keys = logger, interval_s, max_keys
        self._seen: OrderedDict[str, list[float]] = OrderedDict()  # key -> [last, held back]
        self.emitted = 0

    def warning(self, key: str, msg: str, *args: Any, **kwargs: Any) -> bool:
        now = time.monotonic()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval_s:
            seen[1] += 1
            return False
        held = int(seen[1]) if seen is not None else 0
        self._seen[key] = [now, 0]
        self._seen.move_to_end(key)
        while len(self._seen) > self.max_keys:
            self._seen.popitem(last=False)
        if held:
            msg += f" ({held} more like it in the last {self.interval_s:g}s not logged)"
        self.logger.warning(msg, *args, **kwargs)
        self.emitted += 1
        return True

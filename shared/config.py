"""Reading settings from the environment: one function per type, each with a clear error."""

from __future__ import annotations

import os
from collections.abc import Mapping


class ConfigError(ValueError):
    def __init__(self, name: str, value: str, expected: str) -> None:
        super().__init__(f"{name}={value!r}: expected {expected}")
        self.name, self.value, self.expected = name, value, expected


def env_str(env: Mapping[str, str], name: str, default: str) -> str:
    value = env.get(name, "").strip()
    return value or default


def env_int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise ConfigError(name, raw, "an integer") from None


def env_float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return float(raw)
    except ValueError:
        raise ConfigError(name, raw, "a number") from None


_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off"}


def env_bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in _TRUE:
        return True
    if raw in _FALSE:
        return False
    raise ConfigError(name, raw, "true or false")


def env_list(env: Mapping[str, str], name: str, default: tuple[str, ...]) -> tuple[str, ...]:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    return tuple(part.strip() for part in raw.split(",") if part.strip())


def env_labels(env: Mapping[str, str], name: str) -> dict[str, str]:
    """`MESH_LABELS=zone=eu,owner=lab` -> {"zone": "eu", "owner": "lab"}."""
    labels: dict[str, str] = {}
    for part in env_list(env, name, ()):
        key, sep, value = part.partition("=")
        if not sep or not key.strip():
            raise ConfigError(name, part, "key=value pairs separated by commas")
        labels[key.strip()] = value.strip()
    return labels


def current_env() -> Mapping[str, str]:
    return os.environ
